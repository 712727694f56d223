"""Where a user swapping in bnlayers would meet a difference from the built-in layer.

Each test compares with `keras.layers.BatchNormalization` on the same
inputs: masks from a `Masking` layer with the features on axis 1, integer
and bool inputs, and (TensorFlow) eager calls on many batch sizes.
"""

import logging

import keras
import numpy as np
import pytest
from keras import ops

import bnlayers
from backend_ops import to_numpy

# float32 against float32, the same arithmetic in another order: a few
# 1e-7 of the largest value (measured below 1e-6); 1e-5 leaves margin.
RTOL = 1e-5


def _pair(**kwargs):
    return bnlayers.BatchNormalization(
        **kwargs
    ), keras.layers.BatchNormalization(**kwargs)


def _assert_close(ours, theirs, what):
    ours, theirs = (
        to_numpy(ours).astype("float64"),
        to_numpy(theirs).astype("float64"),
    )
    scale = max(1.0, float(np.max(np.abs(theirs))))
    np.testing.assert_allclose(
        ours, theirs, rtol=0, atol=RTOL * scale, err_msg=what
    )


@pytest.mark.parametrize(
    "shape", [(5, 2, 3), (5, 3, 3, 2)], ids=["rank3", "rank4"]
)
def test_masking_layer_mask_with_features_on_axis_1(shape):
    """Keras' masks drop the last axis, whatever the feature axis: expanded there."""
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 10.0, shape).astype("float32")
    x[:, 1] = 0.0
    # One example keeps feature 1, so that every feature has statistics.
    x[0, 1] = 1.0
    inputs = ops.convert_to_tensor(x)
    # What a Masking layer attaches to its outputs (passed explicitly: JAX
    # arrays cannot carry a mask).
    mask = keras.layers.Masking().compute_mask(inputs)
    assert tuple(mask.shape) == shape[:-1]
    ours, theirs = _pair(axis=1, momentum=0.0)
    for training in (True, False):
        y_ours = ours(inputs, training=training, mask=mask)
        y_theirs = theirs(inputs, training=training, mask=mask)
        _assert_close(y_ours, y_theirs, f"outputs, training={training}")
    _assert_close(ours.moving_mean, theirs.moving_mean, "moving mean")
    _assert_close(
        ours.moving_variance, theirs.moving_variance, "moving variance"
    )
    unmasked = bnlayers.BatchNormalization(axis=1, momentum=0.0)
    unmasked(x, training=True)
    assert not np.allclose(
        to_numpy(unmasked.moving_mean), to_numpy(ours.moving_mean), rtol=1e-2
    )


@pytest.mark.parametrize("dtype", ["int32", "uint8", "bool"])
def test_integer_and_bool_inputs_are_cast_like_the_builtin(dtype):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2 if dtype == "bool" else 200, (8, 5, 3)).astype(dtype)
    ours, theirs = _pair(momentum=0.5)
    for training in (True, False, True):
        y_ours = ours(ops.convert_to_tensor(x), training=training)
        y_theirs = theirs(ops.convert_to_tensor(x), training=training)
        assert keras.backend.standardize_dtype(y_ours.dtype) == "float32"
        _assert_close(y_ours, y_theirs, f"outputs, training={training}")
    _assert_close(ours.moving_mean, theirs.moving_mean, "moving mean")
    _assert_close(
        ours.moving_variance, theirs.moving_variance, "moving variance"
    )


@pytest.mark.backends(
    "tensorflow", reason="tf.function tracing and XLA compilation"
)
def test_eager_calls_on_many_batch_sizes_trace_nothing():
    """Eager calls with a new batch size each time: no tracing, no warning.

    Eagerly the fast path is plain ops; its XLA-compiled functions are left
    to traced code (fit(), tf.function), traced once for the traced shape.
    """
    import tensorflow as tf

    from bnlayers import _fast_tf

    records = []

    class Capture(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    layer = bnlayers.BatchNormalization(fused=True)
    rng = np.random.default_rng(2)

    def calls(sizes):
        for n in sizes:
            x = tf.constant(rng.standard_normal((n, 4, 3)).astype("float32"))
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=n % 2 == 0)
            tape.gradient(y, [x] + layer.trainable_weights)

    handler = Capture()
    tf.get_logger().addHandler(handler)
    try:
        calls(range(3, 13))
    finally:
        tf.get_logger().removeHandler(handler)
    assert not [m for m in records if "retracing" in m], records

    compiled = _fast_tf._compiled_training()
    before = [f.experimental_get_tracing_count() for f in compiled]
    calls(range(13, 23))
    # Eager calls run plain ops: 10 more batch sizes compiled nothing.
    assert [f.experimental_get_tracing_count() for f in compiled] == before
