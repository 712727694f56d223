"""Tests for `fold_batchnorm` and `ChannelAffine` (tolerances: see tests/_tools_helpers.py)."""

import json
import zipfile

import keras
import numpy as np
import pytest

import _tools_helpers as helpers
import bnlayers
from _tools_helpers import AGREE
from _tools_helpers import BOTH
from _tools_helpers import BUILTIN
from _tools_helpers import OURS
from _tools_helpers import bn_layers
from _tools_helpers import infer
from _tools_helpers import randomize_bn
from _tools_helpers import relative
from article import article_model
from bnlayers.tools import ChannelAffine


@pytest.fixture
def mobilenet():
    return helpers.mobilenet()


@pytest.mark.parametrize("bn", BOTH, ids=["keras", "bnlayers"])
def test_fold_article_model_becomes_multiply_add(bn, mnist_subset, tmp_path):
    keras.utils.set_random_seed(0)
    model = randomize_bn(article_model(bn()))
    x = mnist_subset[2][:256]
    folded = bnlayers.fold_batchnorm(model)
    # The BN follows a ReLU, so it cannot go into the conv: a multiply-add.
    assert [type(layer).__name__ for layer in folded.layers] == [
        "Conv2D",
        "ChannelAffine",
        "MaxPooling2D",
        "Flatten",
        "Dense",
    ]
    assert not folded.layers[1].trainable_weights
    ref = infer(model, x)
    out = infer(folded, x)
    assert relative(out, ref) <= AGREE
    # No training branch: the same output in training mode.
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(folded(x, training=True)), out
    )

    path = tmp_path / "folded.keras"
    folded.save(path)
    reloaded = keras.models.load_model(path)
    assert type(reloaded.layers[1]) is ChannelAffine
    np.testing.assert_array_equal(infer(reloaded, x), out)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("bn", BOTH, ids=["keras", "bnlayers"])
def test_fold_conv_bn_relu_stack(data_format, bn):
    axis = 1 if data_format == "channels_first" else -1
    # No spatial size equals the 8 filters: keras.ops.add on TensorFlow takes
    # a (1, 8, 1, 1) bias for an NHWC one when the last axis is also 8
    # (Keras 3.15), which breaks channels_first convs with such shapes.
    shape = (3, 13, 11) if data_format == "channels_first" else (13, 11, 3)
    model = keras.Sequential(
        [
            keras.Input(shape),
            keras.layers.Conv2D(8, 3, use_bias=False, data_format=data_format),
            bn(axis=axis),
            keras.layers.ReLU(),
            keras.layers.Conv2D(8, 3, data_format=data_format),
            bn(axis=axis),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(data_format=data_format),
            keras.layers.Dense(4),
            bn(),
        ]
    )
    randomize_bn(model)
    folded = bnlayers.fold_batchnorm(model)
    assert [type(layer).__name__ for layer in folded.layers] == [
        "Conv2D",
        "ReLU",
        "Conv2D",
        "ReLU",
        "GlobalAveragePooling2D",
        "Dense",
    ]
    assert folded.layers[0].use_bias  # a bias is added to carry beta
    x = np.random.default_rng(1).normal(size=(16,) + shape).astype("float32")
    # TensorFlow's CPU kernels have no NCHW convolution; XLA compiles one.
    jit = (
        data_format == "channels_first"
        and keras.backend.backend() == "tensorflow"
    )
    assert relative(infer(folded, x, jit), infer(model, x, jit)) <= AGREE


@pytest.mark.parametrize(
    "make",
    [
        lambda: [keras.Input((20, 3)), keras.layers.Conv1D(6, 3), OURS()],
        lambda: [
            keras.Input((6, 6, 6, 2)),
            keras.layers.Conv3D(4, 3),
            BUILTIN(),
        ],
        lambda: [
            keras.Input((10, 10, 3)),
            keras.layers.DepthwiseConv2D(3, depth_multiplier=2),
            OURS(),
        ],
        lambda: [
            keras.Input((20, 3)),
            keras.layers.DepthwiseConv1D(3, depth_multiplier=3),
            BUILTIN(),
        ],
        lambda: [
            keras.Input((10, 10, 3)),
            keras.layers.SeparableConv2D(5, 3, depth_multiplier=2),
            OURS(),
        ],
        lambda: [
            keras.Input((7, 5)),
            keras.layers.Dense(4, use_bias=False),
            OURS(axis=2),
        ],
        lambda: [
            keras.Input((10, 10, 3)),
            keras.layers.Conv2D(4, 3, groups=1),
            OURS(),
        ],
    ],
    ids=[
        "conv1d",
        "conv3d",
        "depthwise2d",
        "depthwise1d",
        "separable2d",
        "dense_rank3",
        "conv2d",
    ],
)
def test_fold_each_foldable_layer(make):
    model = randomize_bn(keras.Sequential(make()))
    folded = bnlayers.fold_batchnorm(model)
    assert len(folded.layers) == 1 and type(folded.layers[0]) is type(
        model.layers[0]
    )
    shape = (8,) + tuple(model.inputs[0].shape[1:])
    x = np.random.default_rng(2).normal(size=shape).astype("float32")
    assert relative(infer(folded, x), infer(model, x)) <= AGREE


def test_fold_leaves_unfoldable_pairs_as_multiply_add():
    model = keras.Sequential(
        [
            keras.Input((7, 5)),
            keras.layers.Dense(4),
            OURS(axis=1),  # normalizes the time axis, not the Dense's units
            keras.layers.Conv1D(4, 3, activation="tanh", padding="same"),
            BUILTIN(),  # after a non-linear activation, before a 'same' conv
            keras.layers.Conv1D(4, 3, padding="same"),
            OURS(axis=[1, 2]),  # several feature axes
        ]
    )
    randomize_bn(model)
    folded = bnlayers.fold_batchnorm(model)
    assert [type(layer).__name__ for layer in folded.layers] == [
        "Dense",
        "ChannelAffine",
        "Conv1D",
        "ChannelAffine",
        "Conv1D",
        "ChannelAffine",
    ]
    x = np.random.default_rng(4).normal(size=(8, 7, 5)).astype("float32")
    assert relative(infer(folded, x), infer(model, x)) <= AGREE


def test_fold_functional_residual_and_nested():
    keras.utils.set_random_seed(7)
    inputs = keras.Input((10, 10, 4))
    h = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    h = OURS(name="stem_bn")(h)
    h = keras.layers.ReLU()(h)
    # Residual branch: conv -> BN -> relu -> conv -> BN, added to the shortcut.
    r = keras.layers.Conv2D(8, 3, padding="same", name="res_a")(h)
    r = BUILTIN(name="res_a_bn")(r)
    r = keras.layers.ReLU()(r)
    r = keras.layers.Conv2D(8, 3, padding="same", name="res_b")(r)
    r = OURS(name="res_b_bn")(r)
    h = keras.layers.Add()([h, r])
    # A conv whose output also goes elsewhere: folding would change that use.
    t = keras.layers.Conv2D(8, 1, name="tapped")(h)
    tapped_bn = BUILTIN(name="tapped_bn")(t)
    h = keras.layers.Add()([tapped_bn, t])
    block = keras.Sequential(
        [
            keras.Input((10, 10, 8)),
            keras.layers.Conv2D(6, 3),
            OURS(),
            keras.layers.ReLU(),
        ],
        name="block",
    )
    h = block(h)
    h = BUILTIN(name="after_block_bn")(h)  # follows a nested model
    outputs = keras.layers.GlobalAveragePooling2D()(h)
    model = randomize_bn(keras.Model(inputs, outputs))

    folded = bnlayers.fold_batchnorm(model)
    assert not bn_layers(folded)
    names = {layer.name: layer for layer in folded.layers}
    assert names["stem"].use_bias and names["res_a"].use_bias
    assert type(names["tapped_bn"]) is ChannelAffine
    assert type(names["after_block_bn"]) is ChannelAffine
    assert [type(layer).__name__ for layer in names["block"].layers] == [
        "Conv2D",
        "ReLU",
    ]
    assert (
        sum(type(layer) is ChannelAffine for layer in folded._flatten_layers())
        == 2
    )
    x = np.random.default_rng(8).normal(size=(8, 10, 10, 4)).astype("float32")
    assert relative(infer(folded, x), infer(model, x)) <= AGREE


def test_fold_keras_applications_model(mobilenet):
    model, x = mobilenet
    folded = bnlayers.fold_batchnorm(model)
    assert not bn_layers(folded)
    assert not any(type(layer) is ChannelAffine for layer in folded.layers)
    assert relative(infer(folded, x), infer(model, x)) <= AGREE


def test_fold_rejects_bad_input():
    with pytest.raises(TypeError, match="keras.Model"):
        bnlayers.fold_batchnorm("model.keras")
    with pytest.raises(ValueError, match="built"):
        bnlayers.fold_batchnorm(
            keras.Sequential([keras.layers.Dense(2), OURS()])
        )

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    sub = Sub()
    sub(np.zeros((1, 3), "float32"))
    with pytest.raises(TypeError, match="subclassed"):
        bnlayers.fold_batchnorm(sub)


# The BN layer before each of these layers merges into it (by input channel).
_FORWARD = {
    "dense": lambda: [keras.layers.Dense(5)],
    "dense_rank3": lambda: [keras.layers.Dense(5, use_bias=False)],
    "conv1d": lambda: [keras.layers.Conv1D(5, 3)],
    "conv2d_strided_dilated": lambda: [
        keras.layers.Conv2D(5, 3, strides=2, dilation_rate=1),
        keras.layers.Conv2D(4, 2, dilation_rate=2, activation="tanh"),
    ],
    "conv3d": lambda: [keras.layers.Conv3D(4, 2)],
}
_FORWARD_INPUTS = {
    "dense": (6,),
    "dense_rank3": (7, 6),
    "conv1d": (12, 6),
    "conv2d_strided_dilated": (11, 11, 6),
    "conv3d": (5, 5, 5, 6),
}


@pytest.mark.parametrize("case", sorted(_FORWARD))
def test_fold_into_the_following_layer(case, caplog):
    # The ReLU keeps the BN from merging into the layer before it.
    layers = [
        keras.Input(_FORWARD_INPUTS[case]),
        keras.layers.Dense(6),
        keras.layers.ReLU(),
    ]
    model = keras.Sequential(layers + [OURS(name="bn")] + _FORWARD[case]())
    randomize_bn(model, seed=21)
    with caplog.at_level("INFO", logger="bnlayers"):
        folded = bnlayers.fold_batchnorm(model)
    assert [type(layer) for layer in folded.layers] == [
        type(layer) for layer in model.layers if layer.name != "bn"
    ]
    assert folded.layers[2].use_bias  # a bias is added to carry the offsets
    follower = model.layers[3].name
    assert f"'bn' merged into the following '{follower}'" in caplog.text
    x = (
        np.random.default_rng(21)
        .normal(size=(6,) + _FORWARD_INPUTS[case])
        .astype("float32")
    )
    # Measured over 5 seeds: at most 7.8e-7 of the output (two chained convs).
    assert relative(infer(folded, x), infer(model, x)) <= AGREE


def test_fold_into_both_neighbours_and_keep_what_is_not_exact(caplog):
    inputs = keras.Input((9, 9, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inputs)
    h = BUILTIN(name="before_c2")(h)  # merges into c2's input side
    h = keras.layers.Conv2D(6, 3, name="c2")(h)
    h = OURS(name="after_c2")(h)  # merges into c2's output side
    h = keras.layers.ReLU()(h)
    h = OURS(name="before_same")(h)  # 'same' padding: stays a multiply-add
    h = keras.layers.Conv2D(5, 3, padding="same", name="same")(h)
    model = keras.Model(inputs, h)
    randomize_bn(model, seed=22)
    with caplog.at_level("INFO", logger="bnlayers"):
        folded = bnlayers.fold_batchnorm(model)
    assert [type(layer).__name__ for layer in folded.layers] == [
        "InputLayer",
        "Conv2D",
        "Conv2D",
        "ReLU",
        "ChannelAffine",
        "Conv2D",
    ]
    assert "'before_c2' merged into the following 'c2'" in caplog.text
    assert "'after_c2' merged into the preceding 'c2'" in caplog.text
    assert "'before_same' kept as a ChannelAffine" in caplog.text
    assert "padding='same'" in caplog.text
    x = np.random.default_rng(22).normal(size=(4, 9, 9, 3)).astype("float32")
    # Measured over 5 seeds: at most 3.1e-7 of the output.
    assert relative(infer(folded, x), infer(model, x)) <= AGREE


@pytest.mark.backends(
    "tensorflow", reason="tf.saved_model and tf2onnx run on TensorFlow"
)
def test_folded_model_exports_directly(tmp_path):
    import importlib.util

    import tensorflow as tf

    keras.utils.set_random_seed(23)
    model = randomize_bn(article_model(OURS(), filters=4), seed=23)
    folded = bnlayers.fold_batchnorm(model)
    # Exported before anything calls the folded model, as a user would.
    onnx = all(importlib.util.find_spec(m) for m in ("onnxruntime", "tf2onnx"))
    if onnx:
        folded.export(tmp_path / "folded.onnx", format="onnx", verbose=False)
    folded.export(tmp_path / "saved", format="tf_saved_model", verbose=False)

    x = np.random.default_rng(23).uniform(size=(5, 28, 28, 1)).astype("float32")
    expected = infer(folded, x)
    assert relative(expected, infer(model, x)) <= AGREE
    reloaded = tf.saved_model.load(str(tmp_path / "saved"))
    # The same TensorFlow ops on the same weights: the very same numbers.
    np.testing.assert_array_equal(reloaded.serve(x).numpy(), expected)
    if not onnx:
        pytest.skip(
            "onnxruntime and tf2onnx (the export extra) are not installed"
        )
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "folded.onnx"))
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    # Another runtime's kernels: measured at most 2.4e-7 over 3 seeds (outputs <= 1).
    np.testing.assert_allclose(out, expected, rtol=0, atol=2.5e-6)


def test_channel_affine_files_saved_before_the_tools_package_still_load(
    tmp_path,
):
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="relu"), OURS()]
    )
    folded = bnlayers.fold_batchnorm(randomize_bn(model, seed=24))
    assert type(folded.layers[1]) is ChannelAffine
    path = tmp_path / "folded.keras"
    folded.save(path)
    # Files saved when the class lived in the module bnlayers/tools.py name
    # that module; only the registered name has to match.
    legacy = tmp_path / "legacy.keras"
    with (
        zipfile.ZipFile(path) as source,
        zipfile.ZipFile(legacy, "w") as target,
    ):
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                (layer,) = [
                    c
                    for c in config["config"]["layers"]
                    if c["class_name"] == "ChannelAffine"
                ]
                assert layer["registered_name"] == "bnlayers>ChannelAffine"
                layer["module"] = "bnlayers.tools"
                data = json.dumps(config).encode()
            target.writestr(item, data)
    reloaded = keras.models.load_model(legacy)
    assert type(reloaded.layers[1]) is ChannelAffine
    x = np.random.default_rng(24).normal(size=(5, 4)).astype("float32")
    np.testing.assert_array_equal(infer(reloaded, x), infer(folded, x))
