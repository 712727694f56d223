"""Feature axes as a list (`axis=[1, 2]`).

Shapes, float64 reference, built-in equivalence, masks, saving.
"""

import os

import keras
import numpy as np
import pytest
from keras import ops

import bn_reference as ref
import bnlayers
from backend_ops import to_numpy
from backend_ops import train_step
from backend_ops import value_and_grads

EPSILON = 1e-3
MOMENTUM = 0.5
# bn_reference.rel_err allowed, about ten times the largest measured on
# TensorFlow, JAX and PyTorch: float32 rounding of sums over at most a few
# hundred elements, against float64 and against the built-in on the
# flattened axes (measured 8.5e-7).
RTOL = 1e-5

CASES = {
    # name: (input shape with batch, axis as passed, feature axes resolved)
    "positions_rank3": ((6, 5, 3), [1, 2], [1, 2]),
    "positions_rank4": ((6, 4, 5, 3), [1, 2], [1, 2]),
    "height_and_channels": ((6, 4, 5, 3), [1, 3], [1, 3]),
    "negative_unsorted": ((6, 4, 5, 3), (-1, -3), [1, 3]),
    "three_axes": ((5, 2, 3, 4), [3, 1, 2], [1, 2, 3]),
    "single_element_list": ((6, 4, 3), [-1], [2]),
}


def _layer(shape, axis, seed=0, **kwargs):
    layer = bnlayers.BatchNormalization(
        axis=axis, momentum=MOMENTUM, epsilon=EPSILON, **kwargs
    )
    layer.build((None,) + shape[1:])
    rng = np.random.default_rng(seed)
    layer.set_weights(
        [
            rng.uniform(0.5, 1.5, w.shape).astype("float32")
            for w in layer.weights
        ]
    )
    return layer


@pytest.mark.parametrize("case", list(CASES))
def test_weights_take_the_shape_of_the_feature_axes(case):
    shape, axis, features = CASES[case]
    layer = _layer(shape, axis)
    expected = tuple(shape[a] for a in features)
    assert [w.name for w in layer.weights] == [
        "gamma",
        "beta",
        "moving_mean",
        "moving_variance",
    ]
    for w in layer.weights:
        assert tuple(w.shape) == expected
    assert layer.compute_output_shape(shape) == shape


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, masked):
    """Training outputs, gradients and moving statistics over 3 steps, then inference."""
    shape, axis, features = CASES[case]
    rng = np.random.default_rng(1)
    layer = _layer(shape, axis)
    moving_mean = layer.moving_mean.numpy().astype("float64")
    moving_var = layer.moving_variance.numpy().astype("float64")
    mask_shape = tuple(d for i, d in enumerate(shape) if i not in features)
    for _ in range(3):
        x = (2.0 + 3.0 * rng.standard_normal(shape)).astype("float32")
        dy = rng.standard_normal(shape).astype("float32")
        mask = rng.random(mask_shape) > 0.3 if masked else None
        expected = ref.batch_norm(
            x,
            features,
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
    x = rng.standard_normal((3,) + shape[1:]).astype("float32")
    param = lambda v: np.expand_dims(
        v.astype("float64"), [i for i in range(len(shape)) if i not in features]
    )
    expected = param(layer.gamma.numpy()) * (x - param(moving_mean)) / np.sqrt(
        param(moving_var) + EPSILON
    ) + param(layer.beta.numpy())
    ref.assert_close(layer(x, training=False), expected, RTOL, "inference")


def _to_single_axis(x, features):
    """Move the feature axes last and flatten them into one: (..., prod)."""
    rest = [i for i in range(len(x.shape)) if i not in features]
    moved = ops.transpose(x, rest + list(features))
    features_size = int(np.prod([x.shape[a] for a in features]))
    return ops.reshape(
        moved, [-1] + [x.shape[a] for a in rest[1:]] + [features_size]
    )


def _from_single_axis(y, features, shape):
    rest = [i for i in range(len(shape)) if i not in features]
    order = rest + list(features)
    y = ops.reshape(y, [-1] + [shape[a] for a in order[1:]])
    return ops.transpose(y, [int(a) for a in np.argsort(order)])


@pytest.mark.parametrize(
    "case", ["positions_rank4", "height_and_channels", "three_axes"]
)
def test_equals_builtin_on_flattened_feature_axes(case):
    """The built-in takes one axis; moving and flattening ours into one must agree."""
    shape, axis, features = CASES[case]
    rng = np.random.default_rng(2)
    ours = _layer(shape, axis)
    flat_shape = tuple(_to_single_axis(ops.zeros(shape), features).shape)
    builtin = keras.layers.BatchNormalization(
        momentum=MOMENTUM, epsilon=EPSILON
    )
    builtin.build((None,) + flat_shape[1:])
    builtin.set_weights([w.reshape(-1) for w in ours.get_weights()])
    for _ in range(3):
        x = (1.0 + rng.standard_normal(shape)).astype("float32")
        dy = rng.standard_normal(shape).astype("float32")
        y_ours, grads_ours = value_and_grads(
            lambda t: ours(t, training=True),
            [x],
            dy,
            [ours.gamma, ours.beta],
            [ours],
        )
        y_builtin, grads_builtin = value_and_grads(
            lambda t: _from_single_axis(
                builtin(_to_single_axis(t, features), training=True),
                features,
                shape,
            ),
            [x],
            dy,
            [builtin.gamma, builtin.beta],
            [builtin],
        )
        ref.assert_close(y_ours, y_builtin, RTOL, "outputs")
        ref.assert_close(grads_ours[0], grads_builtin[0], RTOL, "dx")
        for name, a, b in zip(
            ("gamma", "beta"), grads_ours[1:], grads_builtin[1:], strict=False
        ):
            ref.assert_close(to_numpy(a).reshape(-1), b, RTOL, name)
    for a, b in zip(ours.get_weights(), builtin.get_weights(), strict=False):
        ref.assert_close(a.reshape(-1), b, RTOL, "weights")
    x = rng.standard_normal(shape).astype("float32")
    flat = builtin(_to_single_axis(x, features))
    ref.assert_close(
        ours(x), _from_single_axis(flat, features, shape), RTOL, "inference"
    )


def test_single_element_list_is_the_int_axis():
    rng = np.random.default_rng(3)
    as_list = _layer((6, 4, 3), [-1])
    as_int = _layer((6, 4, 3), -1)
    for _ in range(2):
        x = rng.standard_normal((6, 4, 3)).astype("float32")
        np.testing.assert_array_equal(
            to_numpy(as_list(x, training=True)),
            to_numpy(as_int(x, training=True)),
        )
    for a, b in zip(as_list.get_weights(), as_int.get_weights(), strict=False):
        np.testing.assert_array_equal(a, b)


def test_renorm_with_axis_list():
    """Renorm's extra weights take the same shape; inference uses the moving statistics."""
    rng = np.random.default_rng(4)
    layer = bnlayers.BatchNormalization(
        axis=[1, 2], renorm=True, momentum=0.0, epsilon=EPSILON
    )
    x = (5.0 + 2.0 * rng.standard_normal((16, 3, 4))).astype("float32")
    layer(x, training=True)
    assert [tuple(w.shape) for w in layer.weights] == [(3, 4)] * 7
    expected = ref.batch_norm(
        x, [1, 2], np.ones((3, 4)), np.zeros((3, 4)), EPSILON
    )
    ref.assert_close(
        layer.moving_mean.numpy(), expected["mean"], RTOL, "moving mean"
    )
    ref.assert_close(
        layer.moving_variance.numpy(), expected["var"], RTOL, "moving variance"
    )


@pytest.mark.parametrize("form", ["keras-sequence", "without-features"])
def test_mask_forms_with_several_feature_axes(form):
    """Both mask forms, on axis=[1, 2] with inputs (batch, time, features).

    A Keras sequence mask (batch, time) covers every axis but the last and
    is expanded there, as Keras does whatever the feature axes; a mask
    without the feature axes, (batch,), is expanded at both of them.
    """
    rng = np.random.default_rng(6)
    x = (2.0 + rng.standard_normal((6, 5, 3))).astype("float32")
    mask = rng.random((6, 5) if form == "keras-sequence" else (6,)) > 0.4
    mask[0] = True
    layer = bnlayers.BatchNormalization(
        axis=[1, 2], momentum=0.0, epsilon=EPSILON
    )
    y = to_numpy(layer(x, training=True, mask=mask))
    expected = ref.batch_norm(
        x, [1, 2], np.ones((5, 3)), np.zeros((5, 3)), EPSILON, mask
    )
    unmasked = ref.batch_norm(
        x, [1, 2], np.ones((5, 3)), np.zeros((5, 3)), EPSILON
    )
    assert np.max(np.abs(expected["mean"] - unmasked["mean"])) > 1e-2, (
        "the mask changes nothing"
    )
    ref.assert_close(y, expected["y"], RTOL, "outputs")
    ref.assert_close(
        layer.moving_mean.numpy(), expected["mean"], RTOL, "moving mean"
    )
    ref.assert_close(
        layer.moving_variance.numpy(), expected["var"], RTOL, "moving variance"
    )


def test_mask_of_neither_form_names_both_ranks():
    layer = bnlayers.BatchNormalization(axis=[1, 2])
    x = np.ones((4, 5, 3), "float32")
    with pytest.raises(
        ValueError, match=r"mask.*rank 2.*rank 1.*mask.shape=\(4, 5, 3\)"
    ):
        layer(x, training=True, mask=np.ones((4, 5, 3), bool))


def test_axis_list_in_a_model_trains_and_round_trips(tmp_path):
    rng = np.random.default_rng(5)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.layers.InputLayer(shape=(6, 6, 2)),
            keras.layers.Conv2D(3, 3),
            bnlayers.BatchNormalization(axis=[1, 2], name="positions"),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    x = rng.standard_normal((20, 6, 6, 2)).astype("float32")
    model.fit(
        x,
        rng.standard_normal((20, 2)).astype("float32"),
        batch_size=8,
        epochs=1,
        verbose=0,
    )
    layer = model.get_layer("positions")
    assert tuple(layer.moving_mean.shape) == (4, 4)
    assert not np.allclose(layer.moving_mean.numpy(), 0.0)
    path = os.fspath(tmp_path / "axis_list.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("positions").get_config()["axis"] == [1, 2]
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=False):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    )


@pytest.mark.parametrize("axis", [[1, 2], (3, -1), [2]])
def test_config_round_trip(axis):
    layer = bnlayers.BatchNormalization(axis=axis)
    config = layer.get_config()
    assert config["axis"] == list(axis)
    clone = bnlayers.BatchNormalization.from_config(config)
    assert clone.get_config() == config
    assert (
        keras.layers.deserialize(keras.layers.serialize(layer)).get_config()
        == config
    )


@pytest.mark.parametrize(
    "axis,error",
    [
        ([], TypeError),
        ([1, "2"], TypeError),
        ([1, 2.0], TypeError),
        ([1, True], TypeError),
        ([1, 1], ValueError),
    ],
)
def test_bad_axis_list_is_rejected_at_construction(axis, error):
    with pytest.raises(error, match=r"axis.*Received: axis="):
        bnlayers.BatchNormalization(axis=axis)


@pytest.mark.parametrize(
    "axis,match",
    [
        ([1, 4], "out of range"),
        ([1, -3], "same axis twice"),
        ([-5, 2], "out of range"),
    ],
)
def test_bad_axis_list_is_rejected_at_build(axis, match):
    layer = bnlayers.BatchNormalization(axis=axis)
    with pytest.raises(ValueError, match=match):
        layer.build((None, 4, 5, 3))
    with pytest.raises(ValueError, match=match):
        layer(np.ones((2, 4, 5, 3), "float32"))


def test_feature_axis_of_unknown_size_is_rejected():
    with pytest.raises(ValueError, match="known size"):
        bnlayers.BatchNormalization(axis=[1, 2]).build((None, None, 5))
