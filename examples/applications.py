"""Real architectures swapped to bnlayers: keras.applications models, checked against the built-in.

For each model (ResNet50, DenseNet121, MobileNetV3Small, EfficientNetB0;
`weights=None`, 64x64 inputs, batch 16, 10 classes, logits out), built with
random BN statistics and affine weights, then swapped with
`bnlayers.swap_batchnorm(model, to="bnlayers")`:

- every BN layer is swapped (the count of each class before and after);
- inference: the largest |difference| of the logits, absolute and relative
  to the largest |logit|;
- training mode, float32: the difference of the first loss (batch
  statistics in every BN layer). Models with dropout are skipped here: each
  model draws its own random masks, so their losses differ by design;
- training mode, float64 (both models built under the "float64" dtype
  policy): the loss and the gradient of every weight, each weight's
  max |difference| relative to the built-in's max |gradient| of that weight
  (at least a thousandth of the model's largest, see GRADIENT_FLOOR), the
  largest over all weights reported. Dropout is switched off in both models for this
  (rate 0: same layers, no random masks). float64 is what makes this a test
  of the layer: deep models at initialization are ill-conditioned, and in
  float32 both implementations are far from the exact gradient, each its own
  way (5e-4 to 1e-2 on DenseNet121), so float32 gradients or losses after
  optimizer steps would measure that noise, not the layer. On JAX and
  PyTorch Keras' built-in layer is no float64 reference (see `bounds`): the
  figure is reported there, not checked.

Run from the repository root, on any Keras backend:

    python examples/applications.py                      # the four models
    python examples/applications.py --models MobileNetV3Small --size 32
    KERAS_BACKEND=jax python examples/applications.py

It exits with status 1 when a check is outside its bound (BOUNDS).
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if os.environ.get("KERAS_BACKEND") == "jax":
    # float64 arrays exist in JAX only with x64 on, set before any array is made.
    import jax

    jax.config.update("jax_enable_x64", True)

import numpy as np

MODELS = ("ResNet50", "DenseNet121", "MobileNetV3Small", "EfficientNetB0")
# Bounds, about ten times the largest figure measured (TensorFlow, 2 CPU
# cores, seed 0):
BOUNDS = {
    # logits, relative to the largest |logit|: float32 rounding through ~50
    # layers (measured 1.2e-6 on ResNet50 at 64x64, 8e-7 on MobileNetV3Small
    # at 32x32)
    "prediction_rel": 1e-5,
    # first training-mode loss, float32, relative to the loss (measured on
    # ResNet50 at 64x64: 2.4e-5 absolute, on a loss of a few units)
    "loss32": 1e-4,
    # float64 gradients, largest per-weight relative difference (measured
    # 1e-13 on MobileNetV3Small at 32x32; on ResNet50 at 64x64 the largest
    # differences are on gradients that are zero in exact arithmetic, 1e-15
    # of the model's largest gradient, so 1e-12 against GRADIENT_FLOOR)
    "grad64_rel": 1e-9,
}
# Some gradients are zero in exact arithmetic: the beta of a BN whose output
# goes through a convolution into another BN in training mode, which removes
# any constant shift (MobileNetV3Small's "project" BNs). Computed, they are
# rounding noise (1e-17 against a largest gradient of 1.4; 1e-15 of the
# largest on ResNet50, whose convolutions have biases before their BNs), and
# relative to themselves that noise differs by 100 %. Each weight's
# difference is therefore measured against its own largest gradient or a
# thousandth of the model's largest, whichever is larger.
GRADIENT_FLOOR = 1e-3

# Off TensorFlow, Keras' built-in layer is no float64 reference: it computes
# float64 inputs in float32 (it casts them to
# `keras.backend.result_type(dtype, "float32")`, which is float32 on JAX and
# PyTorch; tests/test_parity.py measures it at about 1e-6 from float64 where
# bnlayers is at 1e-15), and on PyTorch its variance is E[x^2] - E[x]^2,
# which cancels where a bias before the BN makes the mean large next to the
# spread (ResNet50). There the float64 gradient difference measures the
# built-in's error; it is reported, not bounded.


def bounds():
    """BOUNDS on the current Keras backend (None: reported, not bounded)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        return BOUNDS
    return dict(BOUNDS, grad64_rel=None)


def build(name, size=64, seed=0, **options):
    """The keras.applications model `name`, weights=None, 10 logits, BN weights randomized;
    `options` go to its constructor (e.g. dropout_rate=0.0)."""
    import keras

    keras.utils.set_random_seed(seed)
    constructor = getattr(keras.applications, name)
    model = constructor(
        weights=None,
        input_shape=(size, size, 3),
        classes=10,
        classifier_activation=None,
        **options,
    )
    randomize_batchnorm(model, seed)
    return model


def batchnorm_layers(model):
    import keras

    import bnlayers

    kinds = (keras.layers.BatchNormalization, bnlayers.BatchNormalization)
    return [layer for layer in model.layers if isinstance(layer, kinds)]


def count_batchnorm(model):
    """{"keras": n, "bnlayers": m}: the BN layers of each class in `model`."""
    import bnlayers

    layers = batchnorm_layers(model)
    ours = sum(
        isinstance(layer, bnlayers.BatchNormalization) for layer in layers
    )
    return {"keras": len(layers) - ours, "bnlayers": ours}


def randomize_batchnorm(model, seed):
    """Moving statistics and affine weights away from their initial values, gently
    enough that ~50 layers keep the activations finite, so inference compares
    more than an identity."""
    rng = np.random.default_rng(seed)
    for layer in batchnorm_layers(model):
        n = layer.moving_mean.shape
        dtype = layer.moving_mean.dtype
        values = [
            rng.normal(1.0, 0.1, n),
            rng.normal(0.0, 0.1, n),
            rng.normal(0.0, 0.1, n),
            rng.uniform(0.5, 1.5, n),
        ]
        layer.set_weights([v.astype(dtype) for v in values])


def dropout_layers(model):
    import keras

    return [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.Dropout)
    ]


def loss_and_gradients(model, x, y):
    """The training-mode cross-entropy of `model` on (x, y) and its gradient for every
    trainable weight, as NumPy arrays, on the current Keras backend."""
    import keras

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        return float(loss), [g.numpy() for g in grads]
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def compute(trainable):
            logits, _ = model.stateless_call(
                trainable, non_trainable, x, training=True
            )
            return loss_fn(y, logits)

        loss, grads = jax.value_and_grad(compute)(trainable)
        return float(loss), [np.asarray(g) for g in grads]
    if backend == "torch":
        import torch

        params = [v.value for v in model.trainable_variables]
        loss = loss_fn(y, model(x, training=True))
        grads = torch.autograd.grad(loss, params)
        return float(loss.detach()), [g.detach().cpu().numpy() for g in grads]
    raise ValueError(
        f"Unsupported Keras backend. Received: backend={backend!r}"
    )


def relative_differences(ours, reference):
    """Each weight's max |difference| relative to the built-in's max |gradient| of that weight,
    floored at GRADIENT_FLOOR times the largest |gradient| of the model."""
    largest = max(float(np.max(np.abs(g))) for g in reference)
    return [
        float(np.max(np.abs(a - b)))
        / max(float(np.max(np.abs(b))), GRADIENT_FLOOR * largest)
        for a, b in zip(ours, reference, strict=True)
    ]


def check(name, size=64, batch=16, seed=0, **options):
    """The figures for one architecture; see the module's docstring. `options` go to the
    model's constructor."""
    import keras

    import bnlayers

    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 255.0, (batch, size, size, 3))
    y = rng.integers(0, 10, batch)
    result = {"model": name, "size": size, "batch": batch}

    builtin = build(name, size, seed, **options)
    swapped = bnlayers.swap_batchnorm(builtin, to="bnlayers")
    result["bn_before"] = count_batchnorm(builtin)
    result["bn_after"] = count_batchnorm(swapped)
    result["dropout_layers"] = len(dropout_layers(builtin))

    x32 = x.astype("float32")
    reference = keras.ops.convert_to_numpy(builtin(x32, training=False))
    ours = keras.ops.convert_to_numpy(swapped(x32, training=False))
    difference = float(np.max(np.abs(ours - reference)))
    result["prediction_abs"] = difference
    result["prediction_rel"] = difference / float(np.max(np.abs(reference)))

    if result["dropout_layers"]:
        result["loss32"] = None
        result["loss32_skipped"] = (
            f"{result['dropout_layers']} Dropout layers draw different masks in each model"
        )
    else:
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        losses = [
            float(loss_fn(y, m(x32, training=True))) for m in (builtin, swapped)
        ]
        result["loss32"] = abs(losses[1] - losses[0]) / abs(losses[0])
        result["loss32_value"] = losses[0]

    policy, floatx = keras.config.dtype_policy(), keras.config.floatx()
    try:
        keras.config.set_floatx("float64")  # the Input layers' dtype
        keras.config.set_dtype_policy("float64")
        builtin = build(name, size, seed, **options)
        swapped = bnlayers.swap_batchnorm(builtin, to="bnlayers")
        for layer in dropout_layers(builtin) + dropout_layers(swapped):
            layer.rate = (
                0.0  # no random masks: the same function in both models
            )
        loss_k, grads_k = loss_and_gradients(builtin, x, y)
        loss_b, grads_b = loss_and_gradients(swapped, x, y)
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)
    if any(g.dtype != np.float64 for g in grads_k + grads_b):
        raise RuntimeError(
            f"{name}: a float64 model gave gradients of another dtype"
        )
    result["loss64"] = abs(loss_b - loss_k)
    result["weights"] = len(grads_k)
    result["grad64_rel"] = max(relative_differences(grads_b, grads_k))
    return result


def failures(result):
    """The checks of `result` outside their bounds, as sentences."""
    found = []
    before, after = result["bn_before"], result["bn_after"]
    if (
        before["bnlayers"]
        or after["keras"]
        or after["bnlayers"] != before["keras"]
    ):
        found.append(
            f"BN layers not all swapped: {before} before, {after} after"
        )
    if before["keras"] == 0:
        found.append("no BN layer in the model")
    for key in ("prediction_rel", "loss32", "grad64_rel"):
        value = result.get(key)
        bound = bounds()[key]
        if value is not None and bound is not None and not value <= bound:
            found.append(f"{key} {value:.2e} > {bound:.0e}")
    return found


def row(result):
    loss32 = (
        "skipped (dropout)"
        if result["loss32"] is None
        else f"{result['loss32']:.1e}"
    )
    return (
        f"| {result['model']} | {result['bn_after']['bnlayers']}/{result['bn_before']['keras']} "
        f"| {result['prediction_abs']:.1e} ({result['prediction_rel']:.1e}) | {loss32} "
        f"| {result['loss64']:.1e} | {result['grad64_rel']:.1e} ({result['weights']} weights) |"
    )


HEADER = (
    "| model | BN swapped | logits max abs diff (relative) | first loss diff, float32 "
    "| loss diff, float64 | gradients max rel diff, float64 |\n|---|---|---|---|---|---|"
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        default=list(MODELS),
        metavar="NAME",
        help=f"architectures to check (default: all of {', '.join(MODELS)})",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=64,
        help="input height and width (default 64)",
    )
    parser.add_argument(
        "--batch", type=int, default=16, help="batch size (default 16)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of weights and data (default 0)",
    )
    args = parser.parse_args(argv)
    if args.size < 32 or args.batch < 2:
        parser.error(
            f"--size must be >= 32 and --batch >= 2. Received: {args.size}, {args.batch}"
        )

    import time

    import keras

    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}")
    print(HEADER)
    failed = []
    for name in args.models:
        started = time.perf_counter()
        result = check(name, args.size, args.batch, args.seed)
        print(
            row(result) + f"  <!-- {time.perf_counter() - started:.0f} s -->",
            flush=True,
        )
        if result["loss32"] is None:
            print(
                f"<!-- {name}: first float32 loss skipped: {result['loss32_skipped']} -->"
            )
        failed += [f"{name}: {problem}" for problem in failures(result)]
    for problem in failed:
        print(f"applications.py: check failed: {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
