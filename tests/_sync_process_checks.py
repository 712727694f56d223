"""One process of the multi-process `synchronized=True` checks on PyTorch and JAX.

Run as ``python tests/_sync_process_checks.py RANK WORLD PORT`` with
KERAS_BACKEND set to ``torch`` or ``jax`` (``tests/test_sync_processes.py``
starts every process and asserts on what they print):

- PyTorch: WORLD processes join a gloo process group on 127.0.0.1:PORT;
  each is one replica.
- JAX: WORLD processes join `jax.distributed` (coordinator 127.0.0.1:PORT,
  CPU collectives over gloo), each with `DEVICES_PER_PROCESS` CPU devices;
  `keras.distribution.DataParallel` over all of them, each device a replica.

For every case of `CASES` each process normalizes its share of a global
batch with a synchronized layer, takes the gradients of
``sum(upstream * outputs)``, and measures outputs, input, gamma and beta
gradients and moving statistics against the float64 reference of
`reference` (each group's global batch normalized on its own); it prints
one JSON line with the largest errors (`bn_reference.rel_err`) and the
losses of `TRAIN_STEPS` training steps of the article's model on its share
of each global batch. The test computes the one-process run itself.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np

import bn_reference as ref

FEATURES = 3
ROW_SHAPE = (4, FEATURES)
EPSILON = 1e-3
DEVICES_PER_PROCESS = 2
# Replicas in all: 4 (4 PyTorch processes, or 2 JAX processes x 2 devices).
REPLICAS = 4
# name: (offset, shard sizes or None for even shards of 6, masked, group size)
CASES = {
    "offset_0": (0.0, None, False, None),
    "offset_1e4": (1e4, None, False, None),
    "offset_1e6": (1e6, None, False, None),
    "masked_1e4": (1e4, None, True, None),
    "uneven_masked_1e4": (1e4, (5, 3, 0, 4), True, None),
    "groups_1e6": (1e6, None, False, 2),
    "groups_masked_1e4": (1e4, None, True, 2),
    "groups_uneven_1e4": (1e4, (5, 3, 0, 4), False, 2),
}
TRAIN_STEPS = 5
TRAIN_BATCH = 16


def case_data(name):
    """Global float32 inputs, upstream gradient, mask, shard sizes, gamma, beta."""
    offset, sizes, masked, _ = CASES[name]
    sizes = sizes or (6,) * REPLICAS
    n = sum(sizes)
    seed = sorted(CASES).index(name)
    x, dy = ref.offset_data((n,) + ROW_SHAPE, [2], offset, seed=seed)
    rng = np.random.default_rng(100 + seed)
    mask = rng.random((n, ROW_SHAPE[0])) > 0.3 if masked else None
    gamma = rng.uniform(0.5, 1.5, FEATURES)
    beta = rng.uniform(-1, 1, FEATURES)
    return x.astype("float32"), dy.astype("float32"), mask, sizes, gamma, beta


def reference(name):
    """float64 truth: rows of `y`, `dx`; summed `dgamma`, `dbeta`; moving mean and variance.

    Each group of replicas (all of them without groups) is one batch
    normalized on its own; the moving statistics pool the groups (the
    count-weighted mean of their means, their pooled variance).
    """
    x, dy, mask, sizes, gamma, beta = case_data(name)
    group_size = CASES[name][3] or REPLICAS
    bounds = np.cumsum((0,) + tuple(sizes))
    parts = []
    for g in range(REPLICAS // group_size):
        rows = slice(bounds[g * group_size], bounds[(g + 1) * group_size])
        parts.append(
            ref.batch_norm(
                x[rows],
                [2],
                gamma,
                beta,
                EPSILON,
                None if mask is None else mask[rows],
                dy[rows],
            )
        )
    count = sum(p["count"] for p in parts)
    return {
        "y": np.concatenate([p["y"] for p in parts]),
        "dx": np.concatenate([p["dx"] for p in parts]),
        "dgamma": sum(p["dgamma"] for p in parts),
        "dbeta": sum(p["dbeta"] for p in parts),
        "moving_mean": sum(p["count"] * p["mean"] for p in parts) / count,
        "moving_variance": sum(p["count"] * p["var"] for p in parts) / count,
    }


def make_layer(name, gamma, beta):
    import bnlayers

    layer = bnlayers.BatchNormalization(
        synchronized=True,
        momentum=0.0,
        epsilon=EPSILON,
        replica_group_size=CASES[name][3],
    )
    layer.build((None,) + ROW_SHAPE)
    layer.gamma.assign(gamma.astype("float32"))
    layer.beta.assign(beta.astype("float32"))
    return layer


def errors(name, got, rows):
    """Largest errors of `got` against the reference (`rows` of y and dx)."""
    want = reference(name)
    out = {}
    for key in ("y", "dx"):
        # dx is a difference of terms of the size of the upstream gradient.
        out[key] = ref.rel_err(got[key], want[key][rows], floor=1.0)
    for key in ("dgamma", "dbeta", "moving_mean"):
        out[key] = ref.rel_err(got[key], want[key])
    out["moving_variance"] = float(
        np.max(
            np.abs(got["moving_variance"] - want["moving_variance"])
            / want["moving_variance"]
        )
    )
    return out


def train_data():
    rng = np.random.default_rng(7)
    n = TRAIN_BATCH * TRAIN_STEPS
    x = rng.random((n, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, n).astype("int32")
    return x, y


def article(synchronized):
    import keras

    import bnlayers
    from article import article_model

    if keras.backend.backend() == "jax":
        # Under a multi-process distribution every process must create the
        # same initial values (JAX checks).
        keras.utils.set_random_seed(0)
    model = article_model(
        bnlayers.BatchNormalization(synchronized=synchronized, name="bn"),
        filters=4,
    )
    # The same start in every process (keras.utils.set_random_seed would
    # import TensorFlow, seconds per process).
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if hasattr(layer, "kernel"):
            fan_in = int(np.prod(layer.kernel.shape[:-1]))
            layer.kernel.assign(
                rng.uniform(-1, 1, layer.kernel.shape).astype("float32")
                * np.sqrt(3.0 / fan_in)
            )
    return model


# ------------------------------------------------------------------ PyTorch


def torch_train(model, x, y, parallel=None):
    """Losses of TRAIN_STEPS Adam steps; `parallel` is the DDP wrapper, if any."""
    import torch

    run = parallel or model
    optimizer = torch.optim.Adam(
        [p for p in run.parameters() if p.requires_grad], lr=1e-3
    )
    losses = []
    for step in range(TRAIN_STEPS):
        rows = slice(
            step * len(x) // TRAIN_STEPS, (step + 1) * len(x) // TRAIN_STEPS
        )
        xb = torch.tensor(x[rows])
        yb = torch.tensor(y[rows], dtype=torch.int64)
        optimizer.zero_grad()
        probs = run(xb, training=True)
        loss = -torch.log(probs.gather(1, yb[:, None])).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def torch_main(rank, world, port):
    import torch
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
    )
    results = {}
    for name in CASES:
        x, dy, mask, sizes, gamma, beta = case_data(name)
        bounds = np.cumsum((0,) + tuple(sizes))
        rows = slice(bounds[rank], bounds[rank + 1])
        layer = make_layer(name, gamma, beta)
        xt = torch.tensor(x[rows], requires_grad=True)
        m = None if mask is None else torch.tensor(mask[rows])
        y = layer(xt, training=True, mask=m)
        (y * torch.tensor(dy[rows])).sum().backward()
        grads = {}
        for key, variable in (("dgamma", layer.gamma), ("dbeta", layer.beta)):
            g = variable.value.grad.detach().clone()
            dist.all_reduce(g)  # the gradient of the summed losses
            grads[key] = g.numpy()
        got = {
            "y": y.detach().numpy(),
            "dx": xt.grad.numpy(),
            "moving_mean": layer.moving_mean.numpy(),
            "moving_variance": layer.moving_variance.numpy(),
            **grads,
        }
        results[name] = errors(name, got, rows)

    # Keras' guide to distributed training with PyTorch: the Keras model
    # wrapped in DistributedDataParallel, each process its share of a batch.
    from torch.nn.parallel import DistributedDataParallel

    x, y = train_data()
    model = article(True)
    share = TRAIN_BATCH // world
    mine = np.concatenate(
        [
            np.arange(
                s * TRAIN_BATCH + rank * share,
                s * TRAIN_BATCH + (rank + 1) * share,
            )
            for s in range(TRAIN_STEPS)
        ]
    )
    losses = torch_train(
        model, x[mine], y[mine], DistributedDataParallel(model)
    )
    # The global batch's loss: the mean of the processes' (equal shares).
    global_losses = []
    for loss in losses:
        dist.all_reduce(loss)
        global_losses.append(float(loss) / world)
    bn = model.get_layer("bn")
    results["train"] = {
        "losses": global_losses,
        "moving_mean": bn.moving_mean.numpy().tolist(),
        "moving_variance": bn.moving_variance.numpy().tolist(),
    }
    dist.destroy_process_group()
    return results


# ---------------------------------------------------------------------- JAX


def jax_main(process, processes, port):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=processes,
        process_id=process,
    )
    import jax.numpy as jnp
    import keras
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec

    devices = jax.devices()
    assert len(devices) == REPLICAS, devices
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    mesh = Mesh(np.array(devices), ("batch",))
    sharded = NamedSharding(mesh, PartitionSpec("batch"))

    def to_global(local):
        return jax.make_array_from_process_local_data(sharded, local)

    def to_numpy(value):
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))

    results = {}
    for name in CASES:
        x, dy, mask, sizes, gamma, beta = case_data(name)
        if len(set(sizes)) != 1:
            # A sharded global array has equal shares; uneven ones are
            # PyTorch's and TensorFlow's.
            continue
        layer = make_layer(name, gamma, beta)
        per = len(x) // processes
        mine = slice(process * per, (process + 1) * per)

        def step(trainable, non_trainable, xg, dyg, mg, layer=layer):
            def loss(trainable, xg):
                y, state = layer.stateless_call(
                    trainable, non_trainable, xg, training=True, mask=mg
                )
                return jnp.sum(y * dyg), (y, state)

            (_, (y, state)), (dtrainable, dx) = jax.value_and_grad(
                loss, argnums=(0, 1), has_aux=True
            )(trainable, xg)
            return y, dx, dtrainable, state

        y, dx, dtrainable, state = jax.jit(step)(
            [v.value for v in layer.trainable_variables],
            [v.value for v in layer.non_trainable_variables],
            to_global(x[mine]),
            to_global(dy[mine]),
            None if mask is None else to_global(mask[mine]),
        )
        got = {
            "y": to_numpy(y),
            "dx": to_numpy(dx),
            "dgamma": to_numpy(dtrainable[0]),
            "dbeta": to_numpy(dtrainable[1]),
            "moving_mean": to_numpy(state[0]),
            "moving_variance": to_numpy(state[1]),
        }
        results[name] = errors(name, got, slice(None))

    # Keras' own data-parallel training: each process passes its share of
    # every global batch; the distribution makes them one global array.
    x, y = train_data()
    model = article(True)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
    )
    share = TRAIN_BATCH // processes
    losses = []
    for s in range(TRAIN_STEPS):
        rows = slice(
            s * TRAIN_BATCH + process * share,
            s * TRAIN_BATCH + (process + 1) * share,
        )
        losses.append(float(model.train_on_batch(x[rows], y[rows])))
    bn = model.get_layer("bn")
    results["train"] = {
        "losses": losses,
        "moving_mean": to_numpy(bn.moving_mean.value).tolist(),
        "moving_variance": to_numpy(bn.moving_variance.value).tolist(),
    }
    return results


def single_process_training():
    """The reference for "train": one process, the global batches, no distribution."""
    import keras

    x, y = train_data()
    model = article(True)
    if keras.backend.backend() == "torch":
        losses = [float(loss) for loss in torch_train(model, x, y)]
    else:
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss="sparse_categorical_crossentropy",
        )
        losses = [
            float(
                model.train_on_batch(
                    x[s * TRAIN_BATCH : (s + 1) * TRAIN_BATCH],
                    y[s * TRAIN_BATCH : (s + 1) * TRAIN_BATCH],
                )
            )
            for s in range(TRAIN_STEPS)
        ]
    bn = model.get_layer("bn")
    return {
        "losses": losses,
        "moving_mean": np.asarray(bn.moving_mean.numpy()).tolist(),
        "moving_variance": np.asarray(bn.moving_variance.numpy()).tolist(),
    }


if __name__ == "__main__":
    rank, world, port = (int(a) for a in sys.argv[1:4])
    backend = os.environ["KERAS_BACKEND"]
    main = {"torch": torch_main, "jax": jax_main}[backend]
    print(json.dumps(main(rank, world, port)), flush=True)
