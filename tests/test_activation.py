"""`BatchNormalization(activation=...)`: the same as the layer followed by
that Keras activation, on the reference path and inside the fast path of
every backend (on TensorFlow in each of its three forms), in outputs,
gradients and moving statistics; in configs and `.keras` files.
"""

import contextlib

import keras
import numpy as np
import pytest

import bn_reference as ref
import bnlayers
from backend_ops import BACKEND
from backend_ops import HAS_FAST_PATH
from backend_ops import to_numpy
from backend_ops import value_and_grads

ACTIVATIONS = ["relu", "relu6", "silu", "hard_silu", "gelu"]

# The paths a call can take: the reference keras.ops path, and the fast
# path (on TensorFlow in each form, forced by a form rule in a graph).
if BACKEND == "tensorflow":
    PATHS = ["reference", "plain", "compiled", "kernel"]
elif HAS_FAST_PATH:
    PATHS = ["reference", "fused"]
else:
    PATHS = ["reference"]


@contextlib.contextmanager
def _path(name):
    """The TensorFlow form rule for `name` (kernel: as on a GPU), undone after."""
    if BACKEND != "tensorflow" or name in ("reference", "fused"):
        yield
        return
    from bnlayers import _fast_tf

    gpu_visible = _fast_tf.gpu_visible
    if name == "kernel":
        _fast_tf.gpu_visible = lambda: True
    previous = bnlayers.set_form_rule(name)
    try:
        yield
    finally:
        bnlayers.set_form_rule(previous)
        _fast_tf.gpu_visible = gpu_visible


def _call(fn, x, dy, variables, layers):
    """Outputs and gradients of `sum(fn(x) * dy)` for `x` and `variables`,
    in a graph on TensorFlow (where the form rule decides)."""
    if BACKEND != "tensorflow":
        return value_and_grads(fn, [x], dy, variables, layers)
    import tensorflow as tf

    @tf.function
    def step(x, dy):
        return value_and_grads(fn, [x], dy, variables)

    return step(tf.constant(x), tf.constant(dy))


def _pair(activation, path, dtype, shape, **kwargs):
    """The fused layer and its unfused twin (the reference path, then the
    Keras activation), with equal weights."""
    fused = bnlayers.BatchNormalization(
        activation=activation,
        fused=path != "reference",
        momentum=0.8,
        dtype=dtype,
        **kwargs,
    )
    plain = bnlayers.BatchNormalization(
        fused=False, momentum=0.8, dtype=dtype, **kwargs
    )
    rng = np.random.default_rng(1)
    for layer in (fused, plain):
        layer.build(shape)
    channels = shape[-1]
    weights = [
        rng.uniform(0.5, 2.0, channels),
        rng.normal(0.0, 0.5, channels),
        rng.normal(0.0, 0.3, channels),
        rng.uniform(0.5, 2.0, channels),
    ]
    for layer in (fused, plain):
        layer.set_weights([w.astype(dtype) for w in weights])
    return fused, plain


def _compare(activation, path, dtype, training, tol, shape=(6, 5, 5, 4)):
    rng = np.random.default_rng(2)
    # Scaled so that every activation sees both of its sides (relu6 its
    # upper bound too).
    x = (rng.normal(size=shape) * 3.0 + 1.0).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    fused, plain = _pair(activation, path, dtype, shape)
    act = keras.activations.get(activation)
    results = []
    with _path(path):
        for layer, fn in (
            (fused, lambda t: fused(t, training=training)),
            (plain, lambda t: act(plain(t, training=training))),
        ):
            y, grads = _call(fn, x, dy, [layer.gamma, layer.beta], [layer])
            results.append(
                [to_numpy(y)]
                + [to_numpy(g) for g in grads]
                + [to_numpy(v) for v in layer.non_trainable_weights]
            )
    names = ["y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance"]
    for name, a, e in zip(names, *results, strict=True):
        ref.assert_close(a, e, tol, f"{activation} {path} {name}")


@pytest.mark.needs_x64
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("path", [p for p in PATHS if p != "kernel"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float64_equals_bn_then_activation(activation, path, training):
    """float64: outputs, gradients and moving statistics within 1e-9 of the
    unfused pair on every path (measured at most 1.1e-15 on each backend)."""
    _compare(activation, path, "float64", training, 1e-9)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize(
    # On TensorFlow the float64 test covers the other forms; the kernel
    # takes float32 only. On JAX float64 needs jax_enable_x64.
    "path",
    ["kernel"] if BACKEND == "tensorflow" else PATHS,
)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float32_equals_bn_then_activation(activation, path, training):
    """float32: within float32 rounding of the unfused pair (measured at
    most 9.3e-7)."""
    _compare(activation, path, "float32", training, 1e-5)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_mixed_precision(activation, float32_policy_after):
    """Under mixed_float16 the activation is computed in float32, before
    the cast, on every path: the fused layer's float16 outputs are the
    unfused pair's within float16 rounding (measured 3.2e-4)."""
    keras.config.set_dtype_policy("mixed_float16")
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(8, 3, 3, 4)) * 3).astype("float16")
    outputs = []
    for fused in (None, False):
        layer = bnlayers.BatchNormalization(activation=activation, fused=fused)
        outputs.append(to_numpy(layer(x, training=True)).astype("float64"))
        assert keras.backend.standardize_dtype(outputs[-1].dtype) == "float64"
    expected = to_numpy(
        keras.activations.get(activation)(
            keras.ops.cast(
                bnlayers.BatchNormalization(fused=False, dtype="float32")(
                    x.astype("float32"), training=True
                ),
                "float32",
            )
        )
    )
    for actual in outputs:
        ref.assert_close(actual, expected, 3e-3, f"mixed {activation}")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"virtual_batch_size": 2},
        {"renorm": True},
        {"axis": [1, 3]},
        {"debias_moving_statistics": True},
        {"momentum": None},
    ],
    ids=["ghost", "renorm", "axes", "debias", "cumulative"],
)
def test_with_other_options(kwargs):
    """Ghost batches, renorm and several axes (reference path), per-step
    moving averages (fast path too): the activation follows the
    normalization (measured 0 difference)."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 3, 3, 4)).astype("float32")
    fused = bnlayers.BatchNormalization(activation="silu", **kwargs)
    plain = bnlayers.BatchNormalization(**kwargs)
    for _ in range(2):
        y = to_numpy(fused(x, training=True))
        expected = to_numpy(keras.activations.silu(plain(x, training=True)))
        ref.assert_close(y, expected, 1e-6, "options")
    for a, e in zip(fused.weights, plain.weights, strict=True):
        ref.assert_close(to_numpy(a), to_numpy(e), 1e-6, f"options {a.name}")


def test_mask_leaves_positions_out_and_activates():
    """With a mask the statistics skip masked positions; the activation
    then applies to every output, as after the unfused pair."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 5, 4)).astype("float32")
    mask = np.array([[1, 1, 1, 0, 0]] * 3, bool)
    fused = bnlayers.BatchNormalization(activation="relu6")
    plain = bnlayers.BatchNormalization()
    y = to_numpy(fused(x, training=True, mask=mask))
    expected = to_numpy(
        keras.activations.relu6(plain(x, training=True, mask=mask))
    )
    ref.assert_close(y, expected, 1e-6, "mask")


@pytest.mark.parametrize(
    "given, name",
    [
        ("relu", "relu"),
        ("swish", "silu"),
        ("hard_swish", "hard_silu"),
        (keras.activations.gelu, "gelu"),
        (keras.activations.hard_swish, "hard_silu"),
        (None, None),
    ],
)
def test_names_and_config_round_trip(given, name):
    layer = bnlayers.BatchNormalization(activation=given)
    assert layer.activation == name
    config = layer.get_config()
    assert config["activation"] == name
    assert bnlayers.BatchNormalization.from_config(config).activation == name


@pytest.mark.parametrize(
    "value",
    ["tanh", "Relu", "leaky_relu", 3, keras.activations.tanh, lambda x: x],
)
def test_bad_activation_raises_naming_it(value):
    with pytest.raises(ValueError, match=r"Received: activation="):
        bnlayers.BatchNormalization(activation=value)


def test_default_config_has_no_activation():
    """Without it the layer is Keras' own: the config says None."""
    assert bnlayers.BatchNormalization().get_config()["activation"] is None


def test_keras_file_round_trip(tmp_path):
    """A model with a fused activation saves and loads with it, predicting
    the same."""
    model = keras.Sequential(
        [
            keras.Input((4, 4, 3)),
            keras.layers.Conv2D(5, 3, padding="same"),
            bnlayers.BatchNormalization(activation="hard_swish"),
        ]
    )
    x = np.random.default_rng(6).normal(size=(2, 4, 4, 3)).astype("float32")
    model(x, training=True)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[-1].activation == "hard_silu"
    np.testing.assert_array_equal(
        to_numpy(loaded.predict(x, verbose=0)),
        to_numpy(model.predict(x, verbose=0)),
    )


@pytest.mark.backends("torch", "tensorflow", reason="second-order autograd")
@pytest.mark.parametrize(
    "path", [p for p in PATHS if p not in ("reference", "kernel")]
)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_second_order_gradients(activation, path):
    """A gradient of the gradient through the fused activation (a gradient
    penalty): as through the unfused pair (measured at most 1.4e-15)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6, 5, 4)) * 2.0
    dy = rng.normal(size=x.shape)
    results = []
    for fused in (True, False):
        layer = bnlayers.BatchNormalization(
            activation=activation if fused else None,
            fused=fused,
            dtype="float64",
        )
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 4))
        layer.beta.assign(np.linspace(-0.5, 0.5, 4))
        act = keras.activations.get(activation)

        def fn(t, layer=layer, fused=fused, act=act):
            y = layer(t, training=True)
            return y if fused else act(y)

        with _path(path):
            results.append(_penalty_gradients(fn, x, dy, layer.gamma))
    for a, b in zip(*results, strict=True):
        ref.assert_close(a, b, 1e-9, f"{activation} {path} second order")


def _penalty_gradients(fn, x, dy, gamma):
    """Gradients for `x` and `gamma` of sum(d(sum(fn(x) * dy))/dx ** 2)."""
    if BACKEND == "torch":
        import torch

        t = torch.tensor(x, requires_grad=True)
        y = fn(t)
        (dx,) = torch.autograd.grad(y, [t], torch.tensor(dy), create_graph=True)
        grads = torch.autograd.grad((dx**2).sum(), [t, gamma.value])
        return [ref.as_float64(g) for g in grads]
    import tensorflow as tf

    @tf.function
    def step(t):
        with tf.GradientTape() as outer:
            outer.watch(t)
            with tf.GradientTape() as inner:
                inner.watch(t)
                loss = tf.reduce_sum(fn(t) * dy)
            penalty = tf.reduce_sum(inner.gradient(loss, t) ** 2)
        return outer.gradient(penalty, [t, gamma.value])

    return [g.numpy() for g in step(tf.constant(x))]


def _small_model(dtype):
    L = keras.layers
    inputs = keras.Input((6, 6, 3), dtype=dtype)
    x = L.Conv2D(4, 3, padding="same", use_bias=False, dtype=dtype)(inputs)
    x = bnlayers.BatchNormalization(dtype=dtype)(x)
    x = L.Activation("relu", dtype=dtype)(x)
    x = L.Conv2D(5, 1, use_bias=False, dtype=dtype)(x)
    x = bnlayers.BatchNormalization(dtype=dtype)(x)
    x = L.ReLU(max_value=6.0, dtype=dtype)(x)
    x = L.Conv2D(5, 1, use_bias=False, dtype=dtype)(x)
    x = bnlayers.BatchNormalization(dtype=dtype)(x)
    x = L.Activation("gelu", dtype=dtype)(x)
    outputs = L.Dense(2, dtype=dtype)(L.GlobalAveragePooling2D(dtype=dtype)(x))
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize(
    "dtype, tol",
    [
        # The goal: 1e-9. Measured 0 on TensorFlow and PyTorch (the same
        # operations in the same order), 6.5e-15 on JAX (jax_enable_x64).
        pytest.param("float64", 1e-9, marks=pytest.mark.needs_x64),
        # Measured 0 on TensorFlow and PyTorch, 1.5e-6 on JAX (XLA orders
        # the fused computation's sums differently).
        ("float32", 2e-5),
    ],
)
def test_model_gradients_equal_the_unfused_model(dtype, tol):
    """A model whose BN layers took their activations (`fuse_activations`)
    has the gradients of the unfused model, for every weight."""
    keras.utils.set_random_seed(8)
    model = _small_model(dtype)
    fused = bnlayers.fuse_activations(model)
    assert (
        sum(
            getattr(layer, "activation", None) is not None
            and isinstance(layer, bnlayers.BatchNormalization)
            for layer in fused.layers
        )
        == 3
    )
    rng = np.random.default_rng(9)
    x = rng.normal(size=(4, 6, 6, 3)).astype(dtype)
    dy = rng.normal(size=(4, 2)).astype(dtype)
    results = []
    for m in (model, fused):
        y, grads = value_and_grads(
            lambda t, m=m: m(t, training=True),
            [x],
            dy,
            m.trainable_weights,
            [m],
        )
        results.append([to_numpy(y)] + [to_numpy(g) for g in grads])
    assert (
        len(results[0]) == len(results[1]) == 2 + len(model.trainable_weights)
    )
    for i, (a, e) in enumerate(zip(*results, strict=True)):
        ref.assert_close(a, e, tol, f"model {dtype} #{i}")
