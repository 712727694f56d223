"""Tests for `swap_batchnorm` (tolerances: see tests/_tools_helpers.py)."""

import warnings

import keras
import numpy as np
import pytest

import _tools_helpers as helpers
import bnlayers
from _tools_helpers import AGREE
from _tools_helpers import BUILTIN
from _tools_helpers import OURS
from _tools_helpers import bn_layers
from _tools_helpers import infer
from _tools_helpers import randomize_bn
from _tools_helpers import relative


@pytest.fixture
def mobilenet():
    return helpers.mobilenet()


def test_swap_keras_applications_model_both_ways(mobilenet):
    model, x = mobilenet
    ref = infer(model, x)
    swapped = bnlayers.swap_batchnorm(model, to="bnlayers")

    old_bn, new_bn = bn_layers(model), bn_layers(swapped)
    assert len(old_bn) == len(new_bn) == 52
    assert all(
        type(layer) is BUILTIN for layer in old_bn
    )  # the original is untouched
    assert all(type(layer) is OURS for layer in new_bn)
    for old, new in zip(old_bn, new_bn, strict=True):
        config = new.get_config()
        assert (
            config.pop("virtual_batch_size") is None
            and config.pop("fused") is None
            and config.pop("replica_group_size") is None
            and config.pop("debias_moving_statistics") is False
            and config.pop("activation") is None
        )
        assert config == old.get_config()
    # Every weight of every layer carried over bit for bit, in order.
    assert [v.path.split("/", 1)[1] for v in swapped.weights] == [
        v.path.split("/", 1)[1] for v in model.weights
    ]
    for a, b in zip(swapped.weights, model.weights, strict=True):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        )
    assert [
        type(layer) for layer in swapped.layers if type(layer) is not OURS
    ] == [type(layer) for layer in model.layers if type(layer) is not BUILTIN]
    assert relative(infer(swapped, x), ref) <= AGREE

    back = bnlayers.swap_batchnorm(swapped, to="keras")
    assert all(type(layer) is BUILTIN for layer in bn_layers(back))
    # Same class, same weights, same graph: the very same numbers.
    np.testing.assert_array_equal(infer(back, x), ref)


def _nested_model(first_bn, second_bn):
    inner_seq = keras.Sequential(
        [
            keras.layers.Dense(6),
            first_bn(axis=[-1]) if first_bn is OURS else first_bn(),
            keras.layers.ReLU(),
        ],
        name="inner_seq",
    )
    inner_in = keras.Input((6,))
    inner_fn = keras.Model(
        inner_in,
        keras.layers.Dense(3)(
            second_bn(renorm=True, name="renorm_bn")(inner_in)
        ),
        name="inner_fn",
    )
    inputs = keras.Input((5,))
    h = inner_seq(inputs)
    h = inner_fn(h)
    outputs = second_bn(name="top_bn")(h)
    model = keras.Model(inputs, outputs)
    return randomize_bn(model, seed=5)


@pytest.mark.parametrize(
    "source, target, to",
    [(BUILTIN, OURS, "bnlayers"), (OURS, BUILTIN, "keras")],
)
def test_swap_nested_models_and_renorm(source, target, to):
    model = _nested_model(source, source)
    x = np.random.default_rng(0).normal(size=(16, 5)).astype("float32")
    swapped = bnlayers.swap_batchnorm(model, to=to)
    assert isinstance(swapped.get_layer("inner_seq"), keras.Sequential)
    assert isinstance(swapped.get_layer("inner_fn"), keras.Model)
    layers = bn_layers(swapped)
    assert len(layers) == 3 and all(type(layer) is target for layer in layers)
    renorm = swapped.get_layer("inner_fn").get_layer("renorm_bn")
    assert renorm.renorm and [v.name for v in renorm.weights][-3:] == [
        "moving_stddev",
        "renorm_mean",
        "renorm_stddev",
    ]
    for a, b in zip(swapped.weights, model.weights, strict=True):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        )
    assert relative(infer(swapped, x), infer(model, x)) <= AGREE


def test_swap_keeps_compile_config_and_drops_fused():
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3), OURS(axis=[1], fused=False)]
    )
    model.compile(optimizer="sgd", loss="mse")
    swapped = bnlayers.swap_batchnorm(model, to="keras")
    assert swapped.compiled and swapped.get_compile_config()["loss"] == "mse"
    assert swapped.layers[1].axis == 1


def test_swap_rejects_bad_input():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), OURS()])
    with pytest.raises(ValueError, match="to='torch'"):
        bnlayers.swap_batchnorm(model, to="torch")
    with pytest.raises(TypeError, match="keras.Model"):
        bnlayers.swap_batchnorm(keras.layers.Dense(3))
    ghost = keras.Sequential([keras.Input((4,)), OURS(virtual_batch_size=2)])
    with pytest.raises(ValueError, match="virtual_batch_size=2"):
        bnlayers.swap_batchnorm(ghost, to="keras")
    multi = keras.Sequential([keras.Input((3, 4)), OURS(axis=[1, 2])])
    with pytest.raises(ValueError, match=r"axis=\[1, 2\]"):
        bnlayers.swap_batchnorm(multi, to="keras")
    with pytest.raises(ValueError, match="built"):
        bnlayers.swap_batchnorm(keras.Sequential([keras.layers.Dense(3)]))

    class MyBN(BUILTIN):
        pass

    sub = keras.Sequential([keras.Input((4,)), MyBN()])
    with pytest.raises(ValueError, match="subclass"):
        bnlayers.swap_batchnorm(sub)

    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.bn = BUILTIN()

        def call(self, x):
            return self.bn(x)

    hidden = keras.Sequential([keras.Input((4,)), Block(name="block")])
    with pytest.raises(ValueError, match="'block'"):
        bnlayers.swap_batchnorm(hidden)


def _trained(kind, bn):
    """A small model trained 4 Adam steps; its data for one more step."""
    keras.utils.set_random_seed(31)
    # No bias before the BN: its gradient is rounding noise, which Adam
    # scales up to steps of the learning rate, differently in each model.
    layers = [
        keras.layers.Dense(8, use_bias=False),
        bn(name="bn"),
        keras.layers.ReLU(),
    ]
    layers.append(keras.layers.Dense(1))
    if kind == "sequential":
        model = keras.Sequential([keras.Input((5,))] + layers)
    else:
        inputs = keras.Input((5,))
        h = inputs
        for layer in layers:
            h = layer(h)
        model = keras.Model(inputs, h)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    rng = np.random.default_rng(31)
    x = rng.normal(size=(5, 32, 5)).astype("float32")
    y = rng.normal(size=(5, 32, 1)).astype("float32")
    for i in range(4):
        model.train_on_batch(x[i], y[i])
    return model, x[4], y[4]


@pytest.mark.parametrize(
    "kind, source, to",
    [("sequential", BUILTIN, "bnlayers"), ("functional", OURS, "keras")],
)
def test_swap_carries_the_optimizer_state_so_training_continues(
    kind, source, to
):
    model, x, y = _trained(kind, source)
    swapped = bnlayers.swap_batchnorm(model, to=to)
    old, new = model.optimizer.variables, swapped.optimizer.variables
    assert [v.name for v in new] == [v.name for v in old]
    assert int(keras.ops.convert_to_numpy(swapped.optimizer.iterations)) == 4
    for a, b in zip(old, new, strict=True):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(b), keras.ops.convert_to_numpy(a)
        )
    # The next step on both, then the loss of the one after. The two BN
    # implementations round differently: measured at most 6e-8 between the
    # weights and 7.8e-8 (relative) between the losses. With a fresh Adam,
    # as before the state was carried, they were 1.7e-2 and 2.8e-2 apart.
    first = [m.train_on_batch(x, y) for m in (model, swapped)]
    assert first[1] == pytest.approx(first[0], rel=1e-6)
    for a, b in zip(model.weights, swapped.weights, strict=True):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(b),
            keras.ops.convert_to_numpy(a),
            rtol=0,
            atol=6e-7,
        )
    second = [m.train_on_batch(x, y) for m in (model, swapped)]
    assert second[1] == pytest.approx(second[0], rel=1e-6)


def test_swap_warns_when_the_optimizer_state_cannot_be_carried():
    model, _, _ = _trained("functional", BUILTIN)
    # Frozen after training: the copy's optimizer trains fewer variables
    # than the original's has slots for.
    model.get_layer("bn").trainable = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        swapped = bnlayers.swap_batchnorm(model)
    assert any(
        "could not carry the optimizer state" in str(w.message) for w in caught
    )
    assert int(keras.ops.convert_to_numpy(swapped.optimizer.iterations)) == 0


@pytest.mark.parametrize("version", ["3.17.0", "3.14.2", "4.0.0"])
def test_tools_refuse_a_keras_they_were_not_checked_against(
    version, monkeypatch
):
    from bnlayers.tools import _keras_internals

    model = keras.Sequential([keras.Input((4,)), OURS()])
    monkeypatch.setattr(_keras_internals, "_installed", lambda: version)
    for tool in (
        bnlayers.swap_batchnorm,
        bnlayers.fold_batchnorm,
        bnlayers.freeze_batchnorm,
        lambda m: bnlayers.recalibrate(m, np.zeros((2, 4), "float32")),
    ):
        with pytest.raises(
            RuntimeError, match=rf"3\.15 and 3\.16.*keras=={version}"
        ):
            tool(model)
    for accepted in ("3.15.9", "3.16.0.dev2026102704"):
        monkeypatch.setattr(
            _keras_internals, "_installed", lambda v=accepted: v
        )
        bnlayers.freeze_batchnorm(model)
