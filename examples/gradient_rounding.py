"""How far float32 gradients of a deep model are from float64, with either BN layer.

A keras.applications model (default DenseNet121; `weights=None`, 64x64
inputs, batch 16, random BN statistics and affine weights as in
`applications.py`) in training mode, on TensorFlow: the gradient of the
cross-entropy for every trainable weight, computed in float32 with the
built-in layer, with bnlayers (`fused=None`: its fast path) and with
bnlayers' reference path (`fused=False`), each in a `tf.function` as `fit`
runs it, against the same model in float64 with the built-in layer (in
float64 the two layers agree to about 1e-13: `applications.py`).

Two measures per seed: the *global* error, ||g32 - g64|| / ||g64|| over all
weights at once, and the *per-weight* one, each weight's max |difference|
relative to its own largest gradient (floored as in `applications.py`),
the median over the weights. The table gives each measure's median over
the seeds.

Deep models at initialization are ill-conditioned: float32 rounding in any
layer is amplified through the rest, so these figures measure the model as
much as the layer. They say whether bnlayers' shifted statistics make the
float32 gradients worse or better than the built-in's, not whether either
is "right".

    python examples/gradient_rounding.py                 # DenseNet121, 5 seeds
    python examples/gradient_rounding.py --model ResNet50 --seeds 3
"""

import argparse
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# The shared modules beside this file, also when this file is loaded by path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from applications import MODELS  # noqa: E402
from applications import batchnorm_layers  # noqa: E402
from applications import build  # noqa: E402
from applications import relative_differences  # noqa: E402

LAYERS = ("built-in", "bnlayers", "bnlayers fused=False")


def gradients(model, x, y):
    """The training-mode loss gradients of every trainable weight, in a tf.function."""
    import keras
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def compute(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    return [g.numpy() for g in compute(tf.constant(x), tf.constant(y))]


def models(name, size, seed):
    """{layer: float32 model}, all with the same weights."""
    import bnlayers

    builtin = build(name, size, seed)
    reference_path = bnlayers.swap_batchnorm(builtin, to="bnlayers")
    for layer in batchnorm_layers(reference_path):
        layer.fused = False
    return {
        "built-in": builtin,
        "bnlayers": bnlayers.swap_batchnorm(builtin, to="bnlayers"),
        "bnlayers fused=False": reference_path,
    }


def errors(name, size, batch, seed):
    """{layer: (global error, median per-weight error)} for one seed."""
    import keras

    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 255.0, (batch, size, size, 3))
    y = rng.integers(0, 10, batch)
    policy, floatx = keras.config.dtype_policy(), keras.config.floatx()
    try:
        keras.config.set_floatx("float64")
        keras.config.set_dtype_policy("float64")
        reference = gradients(build(name, size, seed), x, y)
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)
    flat = np.concatenate([g.ravel() for g in reference])
    result = {}
    for layer, model in models(name, size, seed).items():
        grads = gradients(model, x.astype("float32"), y)
        diff = np.concatenate(
            [
                (a.astype("float64") - b).ravel()
                for a, b in zip(grads, reference, strict=True)
            ]
        )
        result[layer] = (
            float(np.linalg.norm(diff) / np.linalg.norm(flat)),
            statistics.median(relative_differences(grads, reference)),
        )
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="DenseNet121")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.size < 32 or args.batch < 2:
        parser.error(
            "--seeds must be >= 1, --size >= 32 and --batch >= 2. Received: "
            f"--seeds={args.seeds}, --size={args.size}, --batch={args.batch}"
        )
    import keras

    if keras.backend.backend() != "tensorflow":
        parser.error(
            "needs the TensorFlow backend (its built-in layer is the float64 "
            f"reference). Received: KERAS_BACKEND={keras.backend.backend()}"
        )
    runs = [
        errors(args.model, args.size, args.batch, seed)
        for seed in range(args.seeds)
    ]
    print(
        f"{args.model}, {args.size}x{args.size}, batch {args.batch}, "
        f"{args.seeds} seeds: float32 gradients against float64, median "
        "over the seeds"
    )
    print("| layer | global error | per-weight error (median) |")
    print("|---|---:|---:|")
    for layer in LAYERS:
        g = statistics.median(run[layer][0] for run in runs)
        w = statistics.median(run[layer][1] for run in runs)
        print(f"| {layer} | {g:.2e} | {w:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
