"""Ghost batch normalization (`virtual_batch_size`) against float64 and the built-in."""

import os

import keras
import numpy as np
import pytest
from keras import ops

import bn_reference as ref
import bnlayers
from backend_ops import to_numpy
from backend_ops import train_step
from bnlayers import _ghost

EPSILON = 1e-3
MOMENTUM = 0.5
# bn_reference.rel_err allowed, about ten times the largest measured on
# TensorFlow, JAX and PyTorch. float32 against float64: rounding of sums over
# at most a few hundred elements (measured 4.7e-7).
RTOL = 5e-6
# Against the built-in layer, whose gamma gradient sums in another order
# (measured 2.6e-6).
BUILTIN_RTOL = 3e-5


def _layer(shape, virtual_batch_size, axis=-1, seed=0, **kwargs):
    """A built ghost layer with random gamma, beta and moving statistics."""
    layer = bnlayers.BatchNormalization(
        axis=axis,
        momentum=MOMENTUM,
        epsilon=EPSILON,
        virtual_batch_size=virtual_batch_size,
        **kwargs,
    )
    layer.build((None,) + shape)
    rng = np.random.default_rng(seed)
    layer.set_weights(
        [
            rng.uniform(0.5, 1.5, w.shape).astype("float32")
            for w in layer.weights
        ]
    )
    return layer


def _check_against_reference(layer, batches, virtual_batch_size, mask_fn=None):
    """Several training steps, each checked against `ghost_batch_norm`."""
    rng = np.random.default_rng(1)
    feature_axes = ref.feature_axes_of(layer.axis, batches[0].ndim)
    moving_mean = layer.moving_mean.numpy().astype("float64")
    moving_var = layer.moving_variance.numpy().astype("float64")
    for x in batches:
        mask = None if mask_fn is None else mask_fn(x)
        dy = rng.standard_normal(x.shape).astype("float32")
        expected = ref.ghost_batch_norm(
            x,
            virtual_batch_size,
            feature_axes,
            layer.gamma.numpy(),
            layer.beta.numpy(),
            EPSILON,
            mask,
            dy,
        )
        moving_mean, moving_var = ref.assert_training_step(
            layer,
            train_step(layer, x, dy, mask),
            expected,
            (moving_mean, moving_var),
            MOMENTUM,
            RTOL,
        )


CASES = {
    # name: (batch sizes of the steps, per-example shape, virtual_batch_size, axis)
    "multiple": ((12, 8), (3, 4), 4, -1),
    "short_last_ghost_batch": ((10, 9), (3, 4), 4, -1),
    "last_ghost_batch_of_one": ((9,), (5,), 4, -1),
    "virtual_larger_than_batch": ((5,), (3,), 8, -1),
    "virtual_of_one": ((6,), (3, 2), 1, -1),
    "channels_first_rank4": ((9,), (2, 3, 4), 4, 1),
    "axis_list": ((11,), (3, 4, 2), 4, [1, 3]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case):
    sizes, shape, virtual_batch_size, axis = CASES[case]
    rng = np.random.default_rng(2)
    layer = _layer(shape, virtual_batch_size, axis)
    batches = [
        (3.0 + 2.0 * rng.standard_normal((n,) + shape)).astype("float32")
        for n in sizes
    ]
    _check_against_reference(layer, batches, virtual_batch_size)


def test_masked_matches_float64_reference():
    """Masked positions leave the statistics of their own ghost batch only.

    The second ghost batch of the first step is masked out entirely: it
    contributes nothing, and its outputs stay finite.
    """
    rng = np.random.default_rng(3)
    layer = _layer((5, 3), 4)
    batches = [
        (1.0 + rng.standard_normal((n, 5, 3))).astype("float32")
        for n in (12, 10)
    ]

    def mask_fn(x):
        mask = rng.random(x.shape[:2]) > 0.3
        if len(x) == 12:
            mask[4:8] = False
        return mask

    _check_against_reference(layer, batches, 4, mask_fn)
    y = layer(batches[0], training=True, mask=np.zeros((12, 5), bool))
    assert np.all(np.isfinite(to_numpy(y)))


def test_fully_masked_batch_leaves_moving_statistics_alone():
    layer = _layer((3,), 2)
    before = [w.numpy().copy() for w in layer.weights]
    x = np.ones((5, 3), "float32")
    y = layer(x, training=True, mask=np.zeros((5,), bool))
    assert np.all(np.isfinite(to_numpy(y)))
    for b, w in zip(before, layer.weights, strict=False):
        np.testing.assert_array_equal(w.numpy(), b)


def test_parity_with_builtin_when_virtual_batch_is_the_batch():
    rng = np.random.default_rng(4)
    ours = _layer((4, 4, 3), 8)
    builtin = keras.layers.BatchNormalization(
        momentum=MOMENTUM, epsilon=EPSILON
    )
    builtin.build((None, 4, 4, 3))
    builtin.set_weights(ours.get_weights())
    for _ in range(3):
        x = (2.0 + rng.standard_normal((8, 4, 4, 3))).astype("float32")
        dy = rng.standard_normal(x.shape).astype("float32")
        for got, want, what in zip(
            train_step(ours, x, dy),
            train_step(builtin, x, dy),
            ("outputs", "dx", "dgamma", "dbeta"),
            strict=False,
        ):
            ref.assert_close(got, want, BUILTIN_RTOL, what)
    for got, want in zip(
        ours.get_weights(), builtin.get_weights(), strict=False
    ):
        ref.assert_close(got, want, BUILTIN_RTOL, "weights")


@pytest.mark.parametrize("batch", [1, 3, 7, 16])
def test_inference_ignores_virtual_batches(batch):
    """Any batch size works at inference: the moving statistics normalize it."""
    rng = np.random.default_rng(5)
    ours = _layer((3, 4), 4)
    ours(rng.standard_normal((10, 3, 4)).astype("float32"), training=True)
    builtin = keras.layers.BatchNormalization(epsilon=EPSILON)
    builtin.build((None, 3, 4))
    builtin.set_weights(ours.get_weights())
    x = rng.standard_normal((batch, 3, 4)).astype("float32")
    gamma, beta, mean, var = (w.astype("float64") for w in ours.get_weights())
    expected = gamma * (x - mean) / np.sqrt(var + EPSILON) + beta
    for training in (False, None):
        ref.assert_close(
            ours(x, training=training), expected, RTOL, "inference outputs"
        )
    ref.assert_close(ours(x), builtin(x), BUILTIN_RTOL, "against the built-in")


@pytest.mark.backends(
    "tensorflow", reason="a tf.function trace with a None batch dimension"
)
@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_unknown_batch_dimension_in_tf_function(jit_compile):
    import tensorflow as tf

    """One trace with a None batch dimension serves multiple and non-multiple batches."""
    rng = np.random.default_rng(6)
    traced = _layer((3, 4), 4)
    eager = _layer((3, 4), 4)
    step = tf.function(
        lambda t: traced(t, training=True),
        input_signature=[tf.TensorSpec([None, 3, 4], tf.float32)],
        jit_compile=jit_compile,
    )
    for n in (12, 10, 3):
        x = rng.standard_normal((n, 3, 4)).astype("float32")
        ref.assert_close(step(x), eager(x, training=True), RTOL, f"batch {n}")
    for a, b in zip(traced.get_weights(), eager.get_weights(), strict=False):
        ref.assert_close(a, b, RTOL, "weights")
    assert step.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    """Low-precision inputs: statistics in float32, outputs in the compute dtype."""
    rng = np.random.default_rng(7)
    keras.mixed_precision.set_global_policy(policy)
    try:
        layer = bnlayers.BatchNormalization(virtual_batch_size=4, momentum=0.0)
        x = ops.cast(
            (50.0 + rng.standard_normal((10, 6))).astype("float32"), policy[6:]
        )
        y = layer(x, training=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert keras.backend.standardize_dtype(y.dtype) == policy[6:]
    assert layer.moving_mean.dtype == "float32"
    # float32 holds every float16/bfloat16 value exactly.
    x64 = to_numpy(ops.cast(x, "float32")).astype("float64")
    expected = ref.ghost_batch_norm(
        x64, 4, [1], np.ones(6), np.zeros(6), EPSILON
    )
    # Outputs are rounded to the compute dtype: half a unit in the last place
    # for |y| < 4 is 2**-10 (float16) or 2**-7 (bfloat16).
    half_ulp = 2.0**-10 if policy == "mixed_float16" else 2.0**-7
    y64 = to_numpy(ops.cast(y, "float32")).astype("float64")
    np.testing.assert_allclose(y64, expected["y"], rtol=0, atol=half_ulp)
    # The statistics never went through the low-precision dtype.
    ref.assert_close(
        layer.moving_mean.numpy(), expected["mean"], RTOL, "moving mean"
    )
    ref.assert_close(
        layer.moving_variance.numpy(), expected["var"], RTOL, "moving variance"
    )


def _ghost_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.layers.InputLayer(shape=(3, 4)),
            bnlayers.BatchNormalization(
                virtual_batch_size=4, momentum=MOMENTUM, name="ghost"
            ),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )


def test_fit_with_a_short_last_batch():
    """22 examples in batches of 8: the last batch (6) ends with a ghost batch of 2.

    The ghost layer sees the raw inputs, so its moving statistics after the
    epoch follow from the reference whatever the Dense layer learned.
    """
    rng = np.random.default_rng(8)
    x = (1.0 + 2.0 * rng.standard_normal((22, 3, 4))).astype("float32")
    y = rng.standard_normal((22, 2)).astype("float32")
    model = _ghost_model()
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    mean, var = np.zeros(4), np.ones(4)
    for start in range(0, 22, 8):
        expected = ref.ghost_batch_norm(
            x[start : start + 8], 4, [2], np.ones(4), np.zeros(4), EPSILON
        )
        mean = ref.moving_update(mean, expected["mean"], MOMENTUM)
        var = ref.moving_update(var, expected["var"], MOMENTUM)
    layer = model.get_layer("ghost")
    ref.assert_close(layer.moving_mean.numpy(), mean, RTOL, "moving mean")
    ref.assert_close(
        layer.moving_variance.numpy(), var, RTOL, "moving variance"
    )


def test_keras_file_round_trip(tmp_path):
    """Saved with ghost batches, reloaded with no custom_objects."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((10, 3, 4)).astype("float32")
    model = _ghost_model()
    model(x, training=True)
    path = os.fspath(tmp_path / "ghost.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.get_layer("ghost")
    assert isinstance(layer, bnlayers.BatchNormalization)
    assert layer.virtual_batch_size == 4
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=False):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        model.predict(x[:7], verbose=0), loaded.predict(x[:7], verbose=0)
    )
    # Still ghost batches in training after the reload, short last one included.
    np.testing.assert_array_equal(
        to_numpy(model(x, training=True)), to_numpy(loaded(x, training=True))
    )


def test_config_round_trip():
    layer = bnlayers.BatchNormalization(virtual_batch_size=16, axis=[1, 2])
    config = layer.get_config()
    assert config["virtual_batch_size"] == 16
    clone = bnlayers.BatchNormalization.from_config(config)
    assert clone.get_config() == config
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(clone, bnlayers.BatchNormalization)
    assert clone.get_config() == config
    assert (
        bnlayers.BatchNormalization().get_config()["virtual_batch_size"] is None
    )


@pytest.mark.parametrize("value", [0, -4, 2.5, True, "4"])
def test_bad_virtual_batch_size_is_rejected(value):
    with pytest.raises(
        ValueError, match=r"virtual_batch_size.*Received: virtual_batch_size="
    ):
        bnlayers.BatchNormalization(virtual_batch_size=value)


def test_virtual_batch_size_rejects_incompatible_options():
    with pytest.raises(ValueError, match="renorm"):
        bnlayers.BatchNormalization(virtual_batch_size=4, renorm=True)
    with pytest.raises(ValueError, match="axis"):
        bnlayers.BatchNormalization(virtual_batch_size=4, axis=[0, 2]).build(
            (8, 3, 4)
        )


def test_ghost_normalize_is_the_reference_arithmetic():
    """`_ghost.normalize` alone: outputs and the statistics for the moving averages.

    A batch of 11 in ghost batches of 4 (4, 4, 3), with a mask, on rank-3
    inputs at an offset of 100.
    """
    rng = np.random.default_rng(11)
    x = (100.0 + rng.standard_normal((11, 5, 3))).astype("float32")
    mask = rng.random((11, 5)) > 0.25
    gamma = rng.uniform(0.5, 1.5, 3).astype("float32")
    beta = rng.normal(0.0, 1.0, 3).astype("float32")
    expected = ref.ghost_batch_norm(x, 4, [-1], gamma, beta, 1e-3, mask=mask)

    y, count, mean, var = _ghost.normalize(
        ops.convert_to_tensor(x),
        ops.convert_to_tensor(mask[:, :, None]),
        4,
        [0, 1],
        ops.convert_to_tensor(gamma.reshape(1, 1, 3)),
        ops.convert_to_tensor(beta.reshape(1, 1, 3)),
        1e-3,
    )
    # Measured (TensorFlow, float32): outputs 7.4e-8, mean 7.8e-8, variance
    # 1.2e-7; a value near 100 is known to 2**-24 relative, 6e-8.
    ref.assert_close(to_numpy(y), expected["y"], 1e-6, "output")
    np.testing.assert_array_equal(
        to_numpy(count).reshape(3), np.ravel(expected["count"])
    )
    ref.assert_close(
        to_numpy(mean).reshape(3), np.ravel(expected["mean"]), 1e-6, "mean"
    )
    ref.assert_close(
        to_numpy(var).reshape(3), np.ravel(expected["var"]), 1e-6, "variance"
    )
