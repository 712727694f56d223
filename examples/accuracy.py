"""Accuracy of batch normalization on data far from zero: bnlayers vs the built-in layer.

One training step on float32 inputs whose mean is an offset (0 to 1e6) and
whose spread is 0.5 to 2 per feature, compared with float64 computed on the
same float32 inputs: the largest output error (absolute; the outputs have
unit scale), the moving variance's relative error (momentum 0, so it is the
batch variance) and the gradients' error (relative to the largest term).
bnlayers is run on every path of the backend (TensorFlow: `fused=None` and
`fused=False`, eager, `tf.function` and `jit_compile=True`; JAX: eager and
jitted; PyTorch: eager) and the worst figure is shown. Run it under each
backend:

    KERAS_BACKEND=tensorflow python examples/accuracy.py
    KERAS_BACKEND=jax python examples/accuracy.py
    KERAS_BACKEND=torch python examples/accuracy.py
    python examples/accuracy.py --densenet    # also DenseNet121's gradients (TensorFlow)
    python examples/accuracy.py --out acc-tf  # also writes acc-tf.md and acc-tf.json

`--densenet` adds the gradients of every weight of DenseNet121
(`keras.applications`, `weights=None`, 64x64 inputs, batch 16, training
mode) in float32 against the same model in float64, median over 5 seeds,
with the built-in layer and with bnlayers (`fused=None` and `fused=False`).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import statistics  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import _reference as ref  # noqa: E402
import bnlayers  # noqa: E402
from _common import publish  # noqa: E402
from _reference import BACKEND  # noqa: E402
from _reference import to_numpy  # noqa: E402

OFFSETS = (0.0, 1e2, 1e4, 1e6)
SHAPES = ((16, 5, 5, 4), (64, 8))


def paths():
    if BACKEND == "tensorflow":
        return [
            (f, e) for f in (None, False) for e in ("eager", "function", "jit")
        ]
    if BACKEND == "jax":
        return [(None, "eager"), (None, "jit")]
    return [(None, "eager")]


def data(shape, offset, seed):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    spread = rng.uniform(0.5, 2.0, c)
    x = (
        offset + rng.uniform(-1, 1, c) + spread * rng.standard_normal(shape)
    ).astype("float32")
    return x, rng.standard_normal(shape).astype("float32")


def errors(make_layer, execution, x, dy, policy):
    """(output error, variance relative error, gradient error) of one step."""
    layer = make_layer()
    layer.build(x.shape)
    c = x.shape[-1]
    rng = np.random.default_rng(7)
    weights = [
        rng.uniform(0.5, 1.5, c).astype("float32"),
        rng.uniform(-0.5, 0.5, c).astype("float32"),
        np.zeros(c, "float32"),
        np.ones(c, "float32"),
    ]
    layer.set_weights(weights)
    y, dx, dgamma, dbeta = ref.training_step(layer, execution)(x, dy)
    x_in = x
    if policy != "float32":
        x_in = to_numpy(
            keras.ops.cast(keras.ops.cast(x, layer.compute_dtype), "float32")
        )
    y_ref, g_ref, var_ref = ref.batch_norm_step(
        x_in, weights[0], weights[1], layer.epsilon, dy
    )
    f32 = lambda t: to_numpy(keras.ops.cast(t, "float32")).astype(np.float64)  # noqa: E731
    out = float(np.max(np.abs(f32(y) - y_ref)))
    var = float(np.max(np.abs(f32(layer.moving_variance) / var_ref - 1)))
    grad = max(
        float(np.max(np.abs(f32(dx) - g_ref["x"]))) / g_ref["x_scale"],
        ref.rel_err(f32(dgamma), g_ref["gamma"]),
        ref.rel_err(f32(dbeta), g_ref["beta"]),
    )
    return out, var, grad


def table():
    rows = []
    cases = [(s, o, "float32") for s in SHAPES for o in OFFSETS]
    cases += [
        ((16, 5, 5, 4), 1e3, p) for p in ("mixed_float16", "mixed_bfloat16")
    ]
    for shape, offset, policy in cases:
        keras.config.set_dtype_policy(policy)
        x, dy = data(shape, offset, seed=int(offset) % 97)
        builtin = errors(
            lambda: keras.layers.BatchNormalization(momentum=0.0),
            "eager",
            x,
            dy,
            policy,
        )
        ours = [
            errors(
                lambda f=f: bnlayers.BatchNormalization(momentum=0.0, fused=f),
                e,
                x,
                dy,
                policy,
            )
            for f, e in paths()
        ]
        worst = tuple(max(o[i] for o in ours) for i in range(3))
        rows.append((shape, offset, policy, builtin, worst))
        keras.config.set_dtype_policy("float32")
    return rows


def densenet_gradients(seeds=5):
    """Median over seeds of the float32 gradients' error against float64 (all weights)."""
    import tensorflow as tf

    from bnlayers.tools import swap_batchnorm

    def build(dtype):
        keras.config.set_dtype_policy(dtype)
        model = keras.applications.DenseNet121(
            weights=None, input_shape=(64, 64, 3), classes=10
        )
        keras.config.set_dtype_policy("float32")
        return model

    def grads(model, x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = keras.losses.sparse_categorical_crossentropy(y, logits)
            loss = tf.reduce_sum(loss)
        return np.concatenate(
            [
                np.ravel(g.numpy()).astype(np.float64)
                for g in tape.gradient(loss, model.trainable_variables)
            ]
        )

    results = {
        "built-in": [],
        "bnlayers fused=None": [],
        "bnlayers fused=False": [],
    }
    for seed in range(seeds):
        keras.utils.set_random_seed(seed)
        model32 = build("float32")
        model64 = build("float64")
        model64.set_weights(
            [w.astype(np.float64) for w in model32.get_weights()]
        )
        rng = np.random.default_rng(seed)
        x = rng.uniform(0, 1, (16, 64, 64, 3)).astype("float32")
        y = rng.integers(0, 10, 16)
        g64 = grads(model64, tf.constant(x, tf.float64), y)
        scale = float(np.max(np.abs(g64)))
        results["built-in"].append(
            float(np.max(np.abs(grads(model32, x, y) - g64))) / scale
        )
        for fused in (None, False):
            swapped = swap_batchnorm(model32, to="bnlayers")
            for layer in swapped.layers:
                if isinstance(layer, bnlayers.BatchNormalization):
                    layer.fused = fused
            err = float(np.max(np.abs(grads(swapped, x, y) - g64))) / scale
            results[f"bnlayers fused={fused}"].append(err)
        print(
            f"  seed {seed}: "
            + ", ".join(f"{k} {v[-1]:.2e}" for k, v in results.items()),
            flush=True,
        )
    return {k: statistics.median(v) for k, v in results.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--densenet", action="store_true", help="also DenseNet121's gradients"
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--no-table", action="store_true", help="skip the offset table"
    )
    parser.add_argument(
        "--out",
        metavar="PREFIX",
        help="write the offset table to PREFIX.md and PREFIX.json "
        "(docs/figures/plot.py draws the accuracy chart from such files)",
    )
    args = parser.parse_args(argv)
    header = (
        f"Keras {keras.__version__}, backend {BACKEND}; bnlayers paths: "
        + ", ".join(f"fused={f} {e}" for f, e in paths())
    )
    print(header)
    rows = [] if args.no_table else table()
    lines = list(table_lines(rows)) if rows else []
    for line in lines:
        print(line, flush=True)
    if args.out and rows:
        publish(
            "\n".join([header, *lines]) + "\n",
            report(rows, argv),
            args.out,
        )
    if args.densenet:
        if BACKEND != "tensorflow":
            print("--densenet runs on TensorFlow only")
            return
        print()
        print(
            f"DenseNet121 float32 gradients vs float64 (median of {args.seeds} seeds):"
        )
        for name, err in densenet_gradients(args.seeds).items():
            print(f"  {name}: {err:.2e}")


def report(rows, argv):
    """The offset table as data (what `--out` writes as JSON)."""
    names = ("output", "variance", "gradients")

    def figures(values):
        # NaN (the built-in's outputs at large offsets on PyTorch) as null.
        return {
            n: (None if v != v else float(v))
            for n, v in zip(names, values, strict=True)
        }

    return {
        "command": " ".join(
            [
                "python examples/accuracy.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "backend": BACKEND,
        "keras": keras.__version__,
        "paths": [f"fused={f} {e}" for f, e in paths()],
        "rows": [
            {
                "offset": offset,
                "shape": list(shape),
                "policy": policy,
                "built-in": figures(b),
                "bnlayers": figures(o),
            }
            for shape, offset, policy, b, o in rows
        ],
    }


def table_lines(rows):
    yield ""
    yield (
        "| offset | shape | policy | built-in output | built-in variance | built-in gradients "
        "| bnlayers output | bnlayers variance | bnlayers gradients |"
    )
    yield "|---|---|---|---|---|---|---|---|---|"
    for shape, offset, policy, b, o in rows:
        yield (
            f"| {offset:g} | {shape} | {policy} | {b[0]:.1e} | {b[1]:.1e} | {b[2]:.1e} "
            f"| {o[0]:.1e} | {o[1]:.1e} | {o[2]:.1e} |"
        )


if __name__ == "__main__":
    main()
