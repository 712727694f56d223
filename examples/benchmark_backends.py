"""Speed of bnlayers.BatchNormalization against the built-in layer, on each Keras backend.

On every backend, both layers are timed in the way that backend runs them:

- TensorFlow: a `tf.function` (the training step takes the gradients with a
  `tf.GradientTape`); bnlayers takes its fused kernel where it applies;
- JAX: `jax.jit` of the layer's `stateless_call` (the training step takes
  the gradients with `jax.value_and_grad` and returns the new moving
  statistics);
- PyTorch: eager calls (`torch.autograd.grad` for the training step), as
  Keras' own `fit` runs them by default on this backend.

For each input shape: a *training step* (forward pass with batch statistics,
gradients with respect to the inputs, gamma and beta for a given upstream
gradient, moving-average update) and an *inference step* (forward pass with
the moving statistics). Then the article's model (Conv2D 32 -> BN ->
MaxPooling -> Flatten -> Dense 10, adam, batch 64) through Keras:
`train_on_batch` and `predict_on_batch`.

Both implementations run in one process, in interleaved rounds (each round
times every contender once, in alternating order); a figure is the median
over the rounds, and a ratio (bnlayers / built-in: below 1 is faster) is
the median of the per-round ratios, so a load change on a shared machine
hits both sides of a ratio alike.

Run from the repository root:

    KERAS_BACKEND=jax python examples/benchmark_backends.py     # one backend
    python examples/benchmark_backends.py --all                 # each installed backend, in turn
    python examples/benchmark_backends.py --all --quick         # seconds; a smoke test

`--out PREFIX` writes PREFIX.md and PREFIX.json. For TensorFlow's full
benchmark (more shapes, elementwise passes, whole epochs), see
examples/benchmark.py.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import importlib.util
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile

import numpy as np

# The shared module beside this file, also when this file is loaded by path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import accelerator  # noqa: E402
from _common import article_model  # noqa: E402
from _common import interleaved  # noqa: E402
from _common import load_average  # noqa: E402
from _common import median_ratio  # noqa: E402
from _common import publish  # noqa: E402

SHAPES = {
    "article": (
        (64, 26, 26, 32),
        "the article's model's BN input (after Conv2D 32)",
    ),
    "resnet": ((32, 56, 56, 64), "a ResNet stage"),
    "dense": ((256, 128), "after a Dense layer"),
    # Little data per feature and many features: the per-call costs, not
    # the passes over the data, set the time here.
    "small conv": ((16, 2, 2, 1280), "a late stage of a small-image CNN"),
}
QUICK_SHAPES = {"tiny": ((8, 6, 6, 4), "smoke test")}
# The least memory traffic of a step, in elementwise passes (one read and
# one write of the tensor): training reads x, writes y, reads dy, reads x
# again and writes dx (five traversals, 2.5 passes; a kernel that does not
# keep a feature's slice on chip between its two reductions needs about
# eight, 4 passes); inference reads x and writes y.
FLOOR_PASSES = {"training": 2.5, "inference": 1.0}
BACKENDS = ("tensorflow", "jax", "torch")


# ------------------------------------------------------- backend steps


def _tensorflow_steps(layer, x, dy):
    import tensorflow as tf

    x, dy = tf.constant(x), tf.constant(dy)
    params = [v.value for v in layer.trainable_weights]

    @tf.function
    def train(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * dy)
        return tape.gradient(loss, [x] + params)

    @tf.function
    def infer(x):
        return layer(x, training=False)

    double = tf.function(lambda t: t * 2.0)

    # CPU tf.functions return once their outputs are computed.
    return (lambda: train(x, dy)), (lambda: infer(x)), (lambda: double(x))


def _jax_steps(layer, x, dy):
    import jax
    import jax.numpy as jnp

    x, dy = jnp.asarray(x), jnp.asarray(dy)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, x, non_trainable):
        y, new_non_trainable = layer.stateless_call(
            trainable, non_trainable, x, training=True
        )
        return jnp.sum(y * dy), new_non_trainable

    @jax.jit
    def train(trainable, non_trainable, x):
        (_, new_non_trainable), grads = jax.value_and_grad(
            loss, argnums=(0, 1), has_aux=True
        )(trainable, x, non_trainable)
        return grads, new_non_trainable

    @jax.jit
    def infer(trainable, non_trainable, x):
        return layer.stateless_call(
            trainable, non_trainable, x, training=False
        )[0]

    double = jax.jit(lambda t: t * 2.0)

    return (
        lambda: jax.block_until_ready(train(trainable, non_trainable, x)),
        lambda: jax.block_until_ready(infer(trainable, non_trainable, x)),
        lambda: jax.block_until_ready(double(x)),
    )


def _torch_steps(layer, x, dy):
    import keras
    import torch

    # On Keras' device (a GPU where there is one), not copied there each call.
    x, dy = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(dy)
    params = [v.value for v in layer.trainable_weights]
    # CUDA calls return before the GPU is done: wait for it, or the time is
    # only the launching.
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def train():
        inputs = x.detach().requires_grad_(True)
        y = layer(inputs, training=True)
        grads = torch.autograd.grad(y, [inputs] + params, grad_outputs=dy)
        sync()
        return grads

    def infer():
        with torch.no_grad():
            y = layer(x, training=False)
        sync()
        return y

    def double():
        y = x * 2.0
        sync()
        return y

    return train, infer, double


def layer_steps(layer, shape, seed=0):
    import keras

    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 2.0, shape).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    layer.build(shape)
    make = {
        "tensorflow": _tensorflow_steps,
        "jax": _jax_steps,
        "torch": _torch_steps,
    }
    return make[keras.backend.backend()](layer, x, dy)


# ------------------------------------------------------------ benchmark


def compiled_article_model(bn):
    model = article_model(bn)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def run(rounds, quick):
    """The figures for the backend this process runs."""
    import keras

    import bnlayers

    backend = keras.backend.backend()
    rows = []

    def record(what, shape, timings, floor=None):
        (wall, cpu), pair = timings, ("bnlayers", "built-in")
        row = {
            "what": what,
            "shape": list(shape),
            "bnlayers_ms": 1e3 * statistics.median(wall["bnlayers"]),
            "builtin_ms": 1e3 * statistics.median(wall["built-in"]),
            "ratio": median_ratio(*(wall[name] for name in pair)),
            # This process's CPU time: a check on the wall-time ratio on a
            # shared machine (on a GPU it counts the host's work only).
            "ratio_cpu": median_ratio(*(cpu[name] for name in pair)),
        }
        if "pass" in wall:
            # Time over that of one elementwise pass (x * 2: read x, write
            # a tensor of its size), next to the least a step must do.
            row["passes"] = {
                name: median_ratio(wall[name], wall["pass"]) for name in pair
            }
            row["floor_passes"] = floor
        rows.append(row)

    for name, (shape, _) in (QUICK_SHAPES if quick else SHAPES).items():
        ours_train, ours_infer, double = layer_steps(
            bnlayers.BatchNormalization(), shape
        )
        builtin_train, builtin_infer, _ = layer_steps(
            keras.layers.BatchNormalization(), shape
        )
        for step, ours, builtin in (
            ("training", ours_train, builtin_train),
            ("inference", ours_infer, builtin_infer),
        ):
            record(
                f"{name}: {step} step",
                shape,
                interleaved(
                    {"bnlayers": ours, "built-in": builtin, "pass": double},
                    rounds,
                ),
                FLOOR_PASSES[step],
            )

    batch = 8 if quick else 64
    rng = np.random.default_rng(1)
    x = rng.random((batch, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, batch)
    ours = compiled_article_model(bnlayers.BatchNormalization())
    builtin = compiled_article_model(keras.layers.BatchNormalization())
    builtin.set_weights(ours.get_weights())
    models = {"bnlayers": ours, "built-in": builtin}
    record(
        "article model: train_on_batch",
        x.shape,
        interleaved(
            {
                k: (lambda m=m: m.train_on_batch(x, y))
                for k, m in models.items()
            },
            rounds,
        ),
    )
    record(
        "article model: predict_on_batch",
        x.shape,
        interleaved(
            {k: (lambda m=m: m.predict_on_batch(x)) for k, m in models.items()},
            rounds,
        ),
    )
    versions = {"keras": keras.__version__}
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[
        backend
    ]
    versions[module] = importlib.import_module(module).__version__
    return {
        "backend": backend,
        "versions": versions,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"load {(load_average() or ['?'])[0]}, "
        f"{accelerator(backend)}",
        "rounds": rounds,
        "rows": rows,
    }


def markdown(reports):
    lines = []
    for report in reports:
        versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        lines += [
            f"**{report['backend']}** ({versions}; {report['machine']}; "
            f"{report['rounds']} rounds)",
            "",
            "| | shape | bnlayers (ms) | built-in (ms) | ratio | ratio (CPU time) "
            "| bnlayers passes | built-in passes | floor |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in report["rows"]:
            shape = "x".join(str(d) for d in row["shape"])
            passes = row.get("passes")
            extra = (
                f"| {passes['bnlayers']:.1f} | {passes['built-in']:.1f} "
                f"| {row['floor_passes']} |"
                if passes
                else "| | | |"
            )
            lines.append(
                f"| {row['what']} | {shape} | {row['bnlayers_ms']:.3f} | {row['builtin_ms']:.3f} "
                f"| {row['ratio']:.2f} | {row['ratio_cpu']:.2f} " + extra
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--all",
        action="store_true",
        help="each installed backend, one process each",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes, 3 rounds: a smoke test",
    )
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds (default 15; --quick 3)"
    )
    parser.add_argument("--out", help="write PREFIX.md and PREFIX.json")
    # A child of --all reports here.
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 15)
    if rounds < 1:
        parser.error(
            f"--rounds must be at least 1. Received: --rounds={rounds}"
        )

    if args.all:
        reports = []
        with tempfile.TemporaryDirectory() as tmp:
            for backend in BACKENDS:
                if importlib.util.find_spec(backend) is None:
                    print(f"{backend}: not installed, skipped", file=sys.stderr)
                    continue
                out = pathlib.Path(tmp) / f"{backend}.json"
                command = [
                    sys.executable,
                    __file__,
                    "--rounds",
                    str(rounds),
                    "--json",
                    str(out),
                ]
                if args.quick:
                    command.append("--quick")
                subprocess.run(
                    command,
                    env=dict(os.environ, KERAS_BACKEND=backend),
                    check=True,
                )
                reports.append(json.loads(out.read_text()))
    else:
        reports = [run(rounds, args.quick)]
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(reports[0], indent=1))
            return 0

    publish(markdown(reports), reports, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
