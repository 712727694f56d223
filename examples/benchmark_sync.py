"""What `synchronized=True` adds to a training step, on 2 processes over loopback.

For each backend, two processes on 127.0.0.1 train the article's model
(Conv2D 32 -> BN -> MaxPooling -> Flatten -> Dense 10, adam), each on its
share of a global batch:

- TensorFlow: `MultiWorkerMirroredStrategy` (a custom loop, `strategy.run`
  in a `tf.function`); `synchronized=True` against `False`.
- PyTorch: a gloo process group, the Keras model in
  `DistributedDataParallel` (eager); `synchronized=True` against `False`.
- JAX: `jax.distributed` (gloo CPU collectives), one CPU device per
  process, `keras.distribution.DataParallel` and `train_on_batch`. There
  the jitted step sees the global batch as one array, so its statistics
  are global whatever `synchronized` says; the contender without
  cross-process statistics is `replica_group_size=1` (each replica its own
  statistics).

Both models live in the same processes and are timed in interleaved rounds
(each round: STEPS steps of one, then of the other, order alternating); a
figure is the median over rounds. Printed per backend: the median step of
each and the median of the per-round differences and ratios.

    python examples/benchmark_sync.py                    # all three backends
    python examples/benchmark_sync.py --backends torch   # one
    python examples/benchmark_sync.py --quick            # seconds; a smoke test
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import free_ports  # noqa: E402
from _common import run_processes  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PROCESSES = 2
GLOBAL_BATCH = 64


def _article(keras, bnlayers, **bn_kwargs):
    rng = np.random.default_rng(0)
    model = keras.Sequential(
        [
            keras.layers.InputLayer(shape=(28, 28, 1)),
            keras.layers.Conv2D(32, (3, 3), activation="relu"),
            bnlayers.BatchNormalization(**bn_kwargs),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    # The same start in every process.
    model.set_weights(
        [
            rng.uniform(-0.05, 0.05, w.shape).astype("float32")
            for w in model.weights
        ]
    )
    return model


def _data(rank):
    rng = np.random.default_rng(rank)
    share = GLOBAL_BATCH // PROCESSES
    x = rng.random((share, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, share)
    return x, y


def _steppers_tensorflow(rank, ports):
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": rank},
        }
    )
    import keras
    import tensorflow as tf

    import bnlayers

    tf.config.threading.set_intra_op_parallelism_threads(1)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    x, y = _data(rank)

    def make(**kwargs):
        with strategy.scope():
            model = _article(keras, bnlayers, **kwargs)
            optimizer = keras.optimizers.Adam(1e-3)
            optimizer.build(model.trainable_variables)

        def replica_step(x, y):
            with tf.GradientTape() as tape:
                p = model(x, training=True)
                loss = (
                    tf.reduce_sum(
                        keras.losses.sparse_categorical_crossentropy(y, p)
                    )
                    / GLOBAL_BATCH
                )
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(
                zip(grads, model.trainable_variables, strict=False)
            )
            return loss

        xs = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(x)
        )
        ys = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(y)
        )
        step = tf.function(lambda: strategy.run(replica_step, args=(xs, ys)))
        return lambda: np.asarray(
            strategy.experimental_local_results(step())[0]
        )

    return {"synchronized": make(synchronized=True), "local": make()}


def _steppers_torch(rank, ports):
    import torch
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{ports[0]}",
        rank=rank,
        world_size=PROCESSES,
    )
    import keras
    from torch.nn.parallel import DistributedDataParallel

    import bnlayers

    x, y = _data(rank)
    xt, yt = torch.tensor(x), torch.tensor(y)

    def make(**kwargs):
        model = _article(keras, bnlayers, **kwargs)
        parallel = DistributedDataParallel(model)
        optimizer = torch.optim.Adam(
            [p for p in model.parameters() if p.requires_grad], lr=1e-3
        )

        def step():
            optimizer.zero_grad()
            p = parallel(xt, training=True)
            loss = -torch.log(p.gather(1, yt[:, None])).mean()
            loss.backward()
            optimizer.step()
            return float(loss)

        return step

    return {"synchronized": make(synchronized=True), "local": make()}


def _steppers_jax(rank, ports):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{ports[0]}",
        num_processes=PROCESSES,
        process_id=rank,
    )
    import keras

    import bnlayers

    keras.distribution.set_distribution(keras.distribution.DataParallel())
    x, y = _data(rank)

    def make(**kwargs):
        keras.utils.set_random_seed(0)
        model = _article(keras, bnlayers, **kwargs)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss="sparse_categorical_crossentropy",
        )
        return lambda: float(model.train_on_batch(x, y))

    return {
        "synchronized": make(synchronized=True),
        "local": make(synchronized=True, replica_group_size=1),
    }


def worker(backend, rank, ports, rounds, steps):
    make = {
        "tensorflow": _steppers_tensorflow,
        "torch": _steppers_torch,
        "jax": _steppers_jax,
    }[backend]
    steppers = make(rank, ports)
    for step in steppers.values():  # compile / warm up
        for _ in range(3):
            step()
    times = {name: [] for name in steppers}
    names = list(steppers)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(steps):
                steppers[name]()
            times[name].append((time.perf_counter() - start) / steps)
    print(json.dumps(times), flush=True)


def run_backend(backend, rounds, steps, timeout):
    ports = free_ports(PROCESSES)
    # One compute thread per process: two processes share the machine.
    env = dict(
        os.environ,
        KERAS_BACKEND=backend,
        TF_CPP_MIN_LOG_LEVEL="3",
        OMP_NUM_THREADS="1",
    )
    env.pop("TF_CONFIG", None)
    commands = [
        [sys.executable, __file__, "--worker", backend, str(rank)]
        + [f"--rounds={rounds}", f"--steps={steps}"]
        + ["--ports"]
        + [str(p) for p in ports]
        for rank in range(PROCESSES)
    ]
    codes, outs = run_processes(commands, env, timeout)
    if any(code != 0 for code in codes):
        raise SystemExit(
            f"{backend}: a process failed or timed out:\n"
            + "\n".join(err[-2000:] for _, err in outs)
        )
    times = json.loads(outs[0][0].strip().splitlines()[-1])
    sync, local = np.array(times["synchronized"]), np.array(times["local"])
    return {
        "backend": backend,
        "synchronized_ms": 1e3 * float(np.median(sync)),
        "local_ms": 1e3 * float(np.median(local)),
        "added_ms": 1e3 * float(np.median(sync - local)),
        "ratio": float(np.median(sync / local)),
        "rounds": len(sync),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backends", nargs="+", default=["tensorflow", "torch", "jax"]
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--ports", nargs="+", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(
            args.worker[0],
            int(args.worker[1]),
            args.ports,
            args.rounds,
            args.steps,
        )
        return
    if args.quick:
        args.rounds, args.steps = 2, 1
    print(
        "| backend | synchronized step (ms) | without (ms) | added (ms) | ratio |\n"
        "|---|---|---|---|---|"
    )
    for backend in args.backends:
        r = run_backend(backend, args.rounds, args.steps, timeout=900)
        print(
            f"| {backend} | {r['synchronized_ms']:.1f} | {r['local_ms']:.1f} | "
            f"{r['added_ms']:.2f} | {r['ratio']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
