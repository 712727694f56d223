"""`fuse_activations`, and a BN layer with a fused activation in
`swap_batchnorm` and `fold_batchnorm`: which layers merge, predictions and
training unchanged, optimizer state carried, Keras' own layers back out."""

import keras
import numpy as np
import pytest

import bnlayers
from _tools_helpers import AGREE
from _tools_helpers import BUILTIN
from _tools_helpers import OURS
from _tools_helpers import randomize_bn
from _tools_helpers import relative
from bnlayers.tools import fuse_activations

L = keras.layers


def _model(bn=BUILTIN):
    """Every case: pairs to merge (ReLU, ReLU(6), Activation by name and by
    function), and BN layers that must stay as they are."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="c1")(inputs)
    x = bn(name="bn_relu")(x)
    x = L.ReLU(name="relu")(x)
    x = L.Conv2D(4, 3, padding="same", name="c2")(x)
    x = bn(name="bn_relu6")(x)
    x = L.ReLU(max_value=6.0, name="relu6")(x)
    x = L.Conv2D(4, 1, name="c3")(x)
    x = bn(name="bn_silu")(x)
    x = L.Activation("swish", name="silu")(x)
    y = L.Conv2D(4, 1, name="c4")(x)
    y = bn(name="bn_gelu")(y)
    y = L.Activation(keras.activations.gelu, name="gelu")(y)
    # Output read twice: stays.
    z = bn(name="bn_shared")(y)
    a = L.Activation("relu", name="shared_relu")(z)
    # Not an activation bnlayers computes: stays.
    b = L.Activation("tanh", name="tanh")(bn(name="bn_tanh")(z))
    # A leaky ReLU: stays.
    c = L.ReLU(negative_slope=0.1, name="leaky")(bn(name="bn_leaky")(a))
    x = L.Add(name="add")([a, b, c, z])
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(3, name="dense")(x)
    return randomize_bn(keras.Model(inputs, outputs, name="m"))


MERGED = {
    "bn_relu": "relu",
    "bn_relu6": "relu6",
    "bn_silu": "silu",
    "bn_gelu": "gelu",
}
GONE = {"relu", "relu6", "silu", "gelu"}


def _data(seed=0, shape=(4, 8, 8, 3)):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("bn", [BUILTIN, OURS], ids=["keras", "bnlayers"])
def test_fuse_merges_the_pairs_and_predicts_the_same(bn):
    model = _model(bn)
    fused = fuse_activations(model)
    names = {layer.name for layer in fused.layers}
    assert not GONE & names
    for layer in fused.layers:
        if layer.name in MERGED:
            assert type(layer) is OURS
            assert layer.activation == MERGED[layer.name]
        elif layer.name.startswith("bn_"):
            assert (
                type(layer) is bn and getattr(layer, "activation", None) is None
            )
    assert len(fused.layers) == len(model.layers) - len(GONE)
    x = _data()
    for training in (False, True):
        expected = keras.ops.convert_to_numpy(model(x, training=training))
        actual = keras.ops.convert_to_numpy(fused(x, training=training))
        # Measured at most 2e-7 (TensorFlow and PyTorch).
        assert relative(actual, expected) < AGREE
    # The original is left as it was.
    assert {"relu", "silu"} <= {layer.name for layer in model.layers}


def test_fuse_sequential_and_nested():
    inner = keras.Sequential(
        [
            keras.Input((6,)),
            L.Dense(5, name="d1"),
            BUILTIN(name="bn1"),
            L.Activation("relu", name="a1"),
            L.Dense(5, name="d2"),
            BUILTIN(name="bn2"),
        ],
        name="inner",
    )
    inputs = keras.Input((6,))
    outputs = L.ReLU(name="outer_relu")(inner(inputs))
    model = randomize_bn(keras.Model(inputs, outputs))
    fused = fuse_activations(model)
    new_inner = fused.get_layer("inner")
    assert [layer.name for layer in new_inner.layers] == [
        "d1",
        "bn1",
        "d2",
        "bn2",
    ]
    assert new_inner.get_layer("bn1").activation == "relu"
    # bn2's output leaves the nested model: the ReLU outside stays.
    assert type(new_inner.get_layer("bn2")) is BUILTIN
    x = _data(shape=(5, 6))
    assert (
        relative(
            keras.ops.convert_to_numpy(fused(x)),
            keras.ops.convert_to_numpy(model(x)),
        )
        < AGREE
    )


def test_fuse_carries_the_optimizer_state():
    model = _model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x, y = _data(1), np.random.default_rng(2).normal(size=(4, 3))
    for _ in range(3):
        model.train_on_batch(x, y)
    fused = fuse_activations(model)
    assert int(keras.ops.convert_to_numpy(fused.optimizer.iterations)) == 3
    for a, b in zip(
        model.optimizer.variables, fused.optimizer.variables, strict=True
    ):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(b), keras.ops.convert_to_numpy(a)
        )
    # The next steps train alike (measured 2e-7 relative between losses).
    for _ in range(2):
        losses = [m.train_on_batch(x, y) for m in (model, fused)]
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_fuse_keras_application():
    """ResNet50: the 33 BN layers followed by Activation("relu") merge;
    the 20 that feed an addition stay."""
    base = keras.applications.ResNet50(
        weights=None, include_top=False, input_shape=(32, 32, 3)
    )
    randomize_bn(base)
    fused = fuse_activations(base)
    with_activation = [
        layer
        for layer in fused.layers
        if getattr(layer, "activation", None) == "relu"
        and isinstance(layer, OURS)
    ]
    assert len(with_activation) == 33
    assert sum(isinstance(layer, BUILTIN) for layer in fused.layers) == 20
    assert len(fused.layers) == len(base.layers) - 33
    x = _data(3, (2, 32, 32, 3))
    expected = keras.ops.convert_to_numpy(base(x, training=False))
    actual = keras.ops.convert_to_numpy(fused(x, training=False))
    # Measured 5.4e-7.
    assert relative(actual, expected) < AGREE


def test_swap_to_keras_writes_the_activation_as_a_layer():
    model = fuse_activations(_model())
    swapped = bnlayers.swap_batchnorm(model, to="keras")
    for name, activation in MERGED.items():
        assert type(swapped.get_layer(name)) is BUILTIN
        after = swapped.get_layer(f"{name}_activation")
        assert type(after) is L.Activation
        assert keras.activations.serialize(after.activation) in (
            activation,
            {"relu6": "relu6"}.get(activation),
        )
    x = _data(4)
    expected = keras.ops.convert_to_numpy(model(x, training=True))
    actual = keras.ops.convert_to_numpy(swapped(x, training=True))
    # Measured 4e-7.
    assert relative(actual, expected) < AGREE
    # And back: bnlayers' layers again, the Activation layers kept.
    back = bnlayers.swap_batchnorm(swapped, to="bnlayers")
    assert (
        relative(
            keras.ops.convert_to_numpy(back(x, training=False)),
            keras.ops.convert_to_numpy(model(x, training=False)),
        )
        < AGREE
    )


def test_fold_keeps_the_activation_as_a_keras_layer():
    """Merged into the convolution before, or kept as Keras' BN: the
    activation stays, as an `Activation`, never carried forward."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="c1")(inputs)
    x = OURS(activation="relu", name="bn1")(x)
    y = L.Conv2D(4, 1, name="c2")(x)
    z = L.Add(name="add")([x, y])
    z = OURS(activation="gelu", name="bn2")(z)
    z = L.MaxPooling2D(name="pool")(z)
    z = L.Flatten(name="flat")(z)
    outputs = L.Dense(3, name="dense")(z)
    model = randomize_bn(keras.Model(inputs, outputs))
    folded = bnlayers.fold_batchnorm(model)
    assert not any(isinstance(layer, OURS) for layer in folded.layers)
    assert type(folded.get_layer("bn1")) is L.Activation
    assert type(folded.get_layer("bn2")) is BUILTIN
    assert type(folded.get_layer("bn2_activation")) is L.Activation
    x = _data(5)
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    actual = keras.ops.convert_to_numpy(folded(x, training=False))
    # Measured 3e-7.
    assert relative(actual, expected) < AGREE


def test_fuse_rejects_what_it_cannot_rebuild():
    with pytest.raises(TypeError, match="Received: model="):
        fuse_activations("model")
