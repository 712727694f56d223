"""Tests for `freeze_batchnorm`."""

import keras
import numpy as np
import pytest

import bnlayers
from _tools_helpers import BUILTIN
from _tools_helpers import OURS
from _tools_helpers import bn_layers
from _tools_helpers import randomize_bn


def test_freeze_then_finetune_leaves_bn_weights_untouched():
    keras.utils.set_random_seed(16)
    inner = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(8),
            OURS(name="inner_bn"),
            keras.layers.ReLU(),
        ],
        name="inner",
    )
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, name="first")(inputs)
    h = BUILTIN(name="top_bn")(h)
    h = inner(h)
    outputs = keras.layers.Dense(1, name="head")(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(16)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    randomize_bn(model, seed=16)

    assert bnlayers.freeze_batchnorm(model) is model
    bns = bn_layers(model)
    assert len(bns) == 2 and not any(layer.trainable for layer in bns)
    assert all(
        layer.trainable for layer in model._flatten_layers() if layer not in bns
    )
    frozen = {
        v.path: keras.ops.convert_to_numpy(v).copy()
        for layer in bns
        for v in layer.weights
    }
    others = {
        v.path: keras.ops.convert_to_numpy(v).copy()
        for v in model.weights
        if v.path not in frozen
    }
    # Inference mode even when called in training mode.
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model(x, training=True)),
        keras.ops.convert_to_numpy(model(x, training=False)),
    )

    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    for v in model.weights:
        value = keras.ops.convert_to_numpy(v)
        if v.path in frozen:
            np.testing.assert_array_equal(value, frozen[v.path])
        else:
            assert not np.array_equal(value, others[v.path]), v.path
    with pytest.raises(TypeError, match="keras.Model"):
        bnlayers.freeze_batchnorm([model])
