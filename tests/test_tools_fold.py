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
def test_fold_article_model_leaves_nothing(bn, mnist_subset, tmp_path, caplog):
    keras.utils.set_random_seed(0)
    model = randomize_bn(article_model(bn()))
    assert np.all(keras.ops.convert_to_numpy(model.layers[1].gamma) > 0)
    x = mnist_subset[2][:256]
    with caplog.at_level("INFO", logger="bnlayers"):
        folded = bnlayers.fold_batchnorm(model)
    # The BN follows a ReLU; its scales are positive, so it passes through
    # the max pooling, and Flatten tiles it over the Dense's rows.
    assert [type(layer).__name__ for layer in folded.layers] == [
        "Conv2D",
        "MaxPooling2D",
        "Flatten",
        "Dense",
    ]
    assert "through 'max_pooling2d" in caplog.text
    ref = infer(model, x)
    out = infer(folded, x)
    # Measured: 7.3e-7 with either BN class (softmax outputs).
    assert relative(out, ref) <= AGREE

    path = tmp_path / "folded.keras"
    folded.save(path)
    np.testing.assert_array_equal(infer(keras.models.load_model(path), x), out)


@pytest.mark.parametrize("bn", BOTH, ids=["keras", "bnlayers"])
def test_fold_article_model_with_a_negative_scale_keeps_keras_layer(
    bn, mnist_subset, caplog
):
    keras.utils.set_random_seed(0)
    model = randomize_bn(article_model(bn(), filters=8))
    weights = model.layers[1].get_weights()
    weights[0][3] = -0.5  # gamma of channel 3
    model.layers[1].set_weights(weights)
    x = mnist_subset[2][:64]
    with caplog.at_level("INFO", logger="bnlayers"):
        folded = bnlayers.fold_batchnorm(model)
    assert "negative in 1 of 8 channels" in caplog.text
    assert [type(layer) for layer in folded.layers] == [
        keras.layers.Conv2D,
        keras.layers.BatchNormalization,
        keras.layers.MaxPooling2D,
        keras.layers.Flatten,
        keras.layers.Dense,
    ]
    fixed = folded.layers[1]
    assert not fixed.trainable and not fixed.trainable_weights
    out = infer(folded, x)
    assert relative(out, infer(model, x)) <= AGREE
    # Frozen: training mode computes the same multiply-add.
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(folded(x, training=True)), out
    )


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
    # Keras' layer where it can express the map (one axis), ours where not.
    assert [type(layer).__name__ for layer in folded.layers] == [
        "Dense",
        "BatchNormalization",
        "Conv1D",
        "BatchNormalization",
        "Conv1D",
        "ChannelAffine",
    ]
    assert not any(layer.trainable for layer in bn_layers(folded))
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
    names = {layer.name: layer for layer in folded.layers}
    assert names["stem"].use_bias and names["res_a"].use_bias
    # Its input also goes to the Add; its output goes to the model's output.
    assert bn_layers(folded) == [names["tapped_bn"], names["after_block_bn"]]
    assert not names["tapped_bn"].trainable
    assert not names["after_block_bn"].trainable
    assert [type(layer).__name__ for layer in names["block"].layers] == [
        "Conv2D",
        "ReLU",
    ]
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
    "depthwise2d": lambda: [
        keras.layers.DepthwiseConv2D(3, strides=2, depth_multiplier=2)
    ],
    "separable1d": lambda: [
        keras.layers.SeparableConv1D(5, 3, depth_multiplier=2, use_bias=False)
    ],
}
_FORWARD_INPUTS = {
    "dense": (6,),
    "dense_rank3": (7, 6),
    "conv1d": (12, 6),
    "conv2d_strided_dilated": (11, 11, 6),
    "conv3d": (5, 5, 5, 6),
    "depthwise2d": (9, 9, 6),
    "separable1d": (12, 6),
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
        "BatchNormalization",
        "Conv2D",
    ]
    assert "'before_c2' merged into the following 'c2'" in caplog.text
    assert "'after_c2' merged into the preceding 'c2'" in caplog.text
    assert "'before_same' kept as a multiply-add" in caplog.text
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
    weights = model.layers[1].get_weights()
    weights[0][2] = -weights[0][2]  # kept as Keras' layer, which must export
    model.layers[1].set_weights(weights)
    folded = bnlayers.fold_batchnorm(model)
    assert type(folded.layers[1]) is BUILTIN
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
    # fold_batchnorm made these before it wrote Keras' own layer instead.
    folded = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3), ChannelAffine()]
    )
    rng = np.random.default_rng(24)
    folded.layers[1].set_weights(
        [
            rng.normal(size=3).astype("float32"),
            rng.normal(size=3).astype("float32"),
        ]
    )
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


# ------------------------------------------- through what lies between

# Each case: (input shape, layers after `Dense(relu)` -> BN (bn_axis) up
# to and including the linear layer the BN merges into, bn_axis, BN kwargs).
L = keras.layers
_THROUGH = {
    "maxpool_flatten_dense": (
        (9, 9, 3),
        lambda: [L.MaxPooling2D(2), L.Flatten(), L.Dense(5)],
        -1,
    ),
    "avgpool_same_conv": (
        (9, 9, 3),
        lambda: [L.AveragePooling2D(2, padding="same"), L.Conv2D(5, 2)],
        -1,
    ),
    "avgpool1d_strided_globalmax": (
        (12, 3),
        lambda: [
            L.AveragePooling1D(3, strides=2),
            L.GlobalMaxPooling1D(),
            L.Dense(5),
        ],
        -1,
    ),
    "maxpool3d_globalavg_keepdims_conv": (
        (4, 4, 4, 3),
        lambda: [
            L.MaxPooling3D(2, padding="same"),
            L.GlobalAveragePooling3D(keepdims=True),
            L.Conv3D(5, 1),
        ],
        -1,
    ),
    "identities": (
        (6, 6, 3),
        lambda: [
            L.Dropout(0.5),
            L.SpatialDropout2D(0.5),
            L.GaussianNoise(1.0),
            L.GaussianDropout(0.5),
            L.AlphaDropout(0.5),
            L.Identity(),
            L.Activation("linear"),
            L.ActivityRegularization(),
            L.UpSampling2D(2, interpolation="bilinear"),
            L.Cropping2D(1),
            L.Conv2D(5, 3),
        ],
        -1,
    ),
    # Flatten of channels-first data: each channel's value is repeated
    # over a block of consecutive rows, not tiled.
    "flatten_channel_major": ((4, 6), lambda: [L.Flatten(), L.Dense(5)], 1),
    "flatten_channels_first": (
        (4, 6),
        lambda: [L.Flatten(data_format="channels_first"), L.Dense(5)],
        1,
    ),
    "reshape_dense": ((4, 6), lambda: [L.Reshape((2, 6)), L.Dense(5)], -1),
    "permute_dense": ((4, 6), lambda: [L.Permute((2, 1)), L.Dense(5)], 1),
    "repeat_vector_conv1d": (
        (6,),
        lambda: [L.RepeatVector(4), L.Conv1D(5, 2)],
        -1,
    ),
}


@pytest.mark.parametrize("case", sorted(_THROUGH))
def test_fold_through_layers_that_commute(case, caplog):
    shape, make, axis = _THROUGH[case]
    model = keras.Sequential(
        [
            keras.Input(shape),
            L.Dense(3 if axis == -1 else shape[-1], activation="relu"),
            OURS(axis=axis, name="bn"),
            *make(),
        ]
    )
    randomize_bn(model, seed=31)
    bn = model.get_layer("bn")
    weights = bn.get_weights()
    weights[0] = np.abs(weights[0])  # positive scales: max pooling commutes
    bn.set_weights(weights)
    with caplog.at_level("INFO", logger="bnlayers"):
        folded = bnlayers.fold_batchnorm(model)
    assert "'bn' merged into the following" in caplog.text
    assert [type(layer) for layer in folded.layers] == [
        type(layer) for layer in model.layers if layer is not bn
    ]
    x = np.random.default_rng(31).normal(size=(6, *shape)).astype("float32")
    # Measured: at most 2.1e-7 of the output over these cases.
    assert relative(infer(folded, x), infer(model, x)) <= AGREE


def test_fold_through_zero_padding_when_offset_is_zero():
    model = keras.Sequential(
        [
            keras.Input((7, 7, 3)),
            L.Conv2D(4, 3, activation="relu"),
            BUILTIN(center=False, name="bn"),
            L.ZeroPadding2D(1),
            L.Conv2D(5, 3, padding="same"),
        ]
    )
    randomize_bn(model, seed=32)
    bn = model.get_layer("bn")
    gamma, _, variance = bn.get_weights()
    bn.set_weights([gamma, np.zeros_like(gamma), variance])  # offset 0
    folded = bnlayers.fold_batchnorm(model)
    assert not bn_layers(folded)
    x = np.random.default_rng(32).normal(size=(4, 7, 7, 3)).astype("float32")
    assert relative(infer(folded, x), infer(model, x)) <= AGREE


def test_fold_into_every_path_of_a_shared_output(caplog):
    inputs = keras.Input((8, 8, 3))
    h = L.Conv2D(4, 3, activation="relu")(inputs)
    h = OURS(name="bn")(h)
    a = L.Dense(3, name="a")(L.Flatten()(L.MaxPooling2D(2)(h)))
    b = L.Dense(3, name="b")(L.GlobalAveragePooling2D()(h))
    c = L.Conv2D(3, 6, name="c")(L.Dropout(0.2)(h))
    model = keras.Model(inputs, [a, b, L.Flatten()(c)])
    randomize_bn(model, seed=33)
    bn = model.get_layer("bn")
    weights = bn.get_weights()
    weights[0] = np.abs(weights[0])
    bn.set_weights(weights)
    with caplog.at_level("INFO", logger="bnlayers"):
        folded = bnlayers.fold_batchnorm(model)
    assert not bn_layers(folded)
    (line,) = [
        m for m in caplog.messages if "'bn' merged into the following" in m
    ]
    assert all(f"'{name}'" in line for name in "abc")
    x = np.random.default_rng(33).normal(size=(4, 8, 8, 3)).astype("float32")
    # Measured: at most 2.2e-7 of each output.
    for out, ref in zip(infer(folded, x), infer(model, x), strict=True):
        assert relative(out, ref) <= AGREE


def _one_path(*after):
    """Dense(relu) -> BN -> `after`, in a Functional model (the BN's name: "bn")."""

    def make():
        inputs = keras.Input((6, 6, 3))
        h = L.Dense(4, activation="relu")(inputs)
        h = OURS(name="bn")(h)
        for layer in after:
            h = layer(h)
        return keras.Model(inputs, h)

    return make


def _two_paths():
    inputs = keras.Input((6, 6, 3))
    h = OURS(name="bn")(L.Dense(4, activation="relu")(inputs))
    a = L.Dense(3)(L.GlobalAveragePooling2D()(h))
    b = L.GlobalAveragePooling2D()(L.ReLU()(h))
    return keras.Model(inputs, L.Add()([a, L.Dense(3)(b)]))


def _through_training_dropout():
    inputs = keras.Input((6, 6, 3))
    h = OURS(name="bn")(L.Dense(4, activation="relu")(inputs))
    h = L.Dropout(0.0)(h, training=True)
    return keras.Model(inputs, L.Dense(3)(h))


def _shared_target():
    inputs = keras.Input((6, 6, 3))
    dense = L.Dense(4)
    h = OURS(name="bn")(L.Dense(4, activation="relu")(inputs))
    return keras.Model(inputs, dense(dense(h)))


# Each case: (model maker, the reason logged, whether the scale is made
# negative in one channel).
_KEPT = {
    "negative_scale_max": (
        _one_path(L.GlobalMaxPooling2D(), L.Dense(3)),
        "a maximum would become a minimum",
        True,
    ),
    "offset_zero_padding": (
        _one_path(L.ZeroPadding2D(1), L.Conv2D(3, 2)),
        "pads with zeros, which the offset would shift",
        False,
    ),
    "offset_same_conv": (
        _one_path(L.Conv2D(3, 3, padding="same")),
        "padding='same'",
        False,
    ),
    "grouped_conv": (
        _one_path(L.Conv2D(4, 3, groups=2)),
        "grouped convolution",
        False,
    ),
    "model_output_after_pooling": (
        _one_path(L.AveragePooling2D(2)),
        "output of the model (after",
        False,
    ),
    "one_path_through_relu": (
        _two_paths,
        "is a ReLU, which does not commute",
        False,
    ),
    "penalty": (
        _one_path(L.ActivityRegularization(l2=0.01), L.Dense(3)),
        "penalizes its inputs",
        False,
    ),
    "varies_across_dense_rows": (
        _one_path(L.Reshape((16, 9)), L.Dense(3)),
        "the map varies along others",
        False,
    ),
    "training_dropout": (_through_training_dropout, "training=True", False),
    "bicubic_upsampling": (
        _one_path(L.UpSampling2D(2, interpolation="bicubic"), L.Conv2D(3, 2)),
        "interpolates with 'bicubic'",
        False,
    ),
    "shared_target": (_shared_target, "called in more than one place", False),
}


@pytest.mark.parametrize("case", sorted(_KEPT))
def test_fold_keeps_what_does_not_commute_as_keras_layer(case, caplog):
    make, reason, negative = _KEPT[case]
    model = randomize_bn(make(), seed=34)
    bn = model.get_layer("bn")
    weights = bn.get_weights()
    weights[0] = np.abs(weights[0])
    if negative:
        weights[0][1] = -weights[0][1]
    bn.set_weights(weights)
    with caplog.at_level("INFO", logger="bnlayers"):
        folded = bnlayers.fold_batchnorm(model)
    assert "'bn' kept as a multiply-add" in caplog.text
    assert reason in caplog.text
    (kept,) = bn_layers(folded)
    assert type(kept) is BUILTIN and not kept.trainable
    x = np.random.default_rng(34).normal(size=(4, 6, 6, 3)).astype("float32")
    # Measured: at most 2.0e-7 of the output over these cases.
    assert relative(infer(folded, x), infer(model, x)) <= AGREE


@pytest.mark.parametrize("epsilon", [1e-3, 1e-5, 0.1, 2.0])
def test_kept_layer_computes_one_multiply_add(epsilon):
    model = keras.Sequential(
        [
            keras.Input((5, 7)),
            L.Dense(7, activation="relu"),
            OURS(epsilon=epsilon, name="bn"),
        ]
    )
    randomize_bn(model, seed=35)
    folded = bnlayers.fold_batchnorm(model)
    kept = folded.get_layer("bn")
    variance = keras.ops.convert_to_numpy(kept.moving_variance)
    # rsqrt(moving_variance + epsilon) is 1: Keras' BN reduces to x * gamma + beta.
    np.testing.assert_array_equal(
        variance.astype("float32") + np.float32(kept.epsilon), 1.0
    )
    x = np.random.default_rng(35).normal(size=(64, 5, 7)).astype("float32")
    hidden = infer(keras.Sequential(folded.layers[:1]), x).astype("float64")
    scale, offset = (
        keras.ops.convert_to_numpy(v).astype("float64")
        for v in (kept.gamma, kept.beta)
    )
    exact = hidden * scale + offset
    out = infer(folded, x)
    # A multiply and an add, each rounded once (or once, fused): within two
    # float32 rounding steps of the exact result.
    bound = (
        2 * np.finfo("float32").eps * (np.abs(hidden * scale) + np.abs(offset))
    )
    assert np.all(np.abs(out - exact) <= bound)
    from bnlayers.tools._common import inference_scale_offset

    want = inference_scale_offset(model.get_layer("bn"))
    np.testing.assert_allclose(scale, want[0], rtol=1.2e-7)
    np.testing.assert_allclose(offset, want[1], rtol=1.2e-7, atol=1e-30)


_BLOCK_BNLAYERS = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "bnlayers":
            raise ImportError(name + " is blocked in this test")

sys.meta_path.insert(0, Block())
try:
    import bnlayers
except ImportError:
    pass
else:
    raise SystemExit("bnlayers was importable")
import keras, numpy as np
for name in sys.argv[2:]:
    model = keras.models.load_model(f"{sys.argv[1]}/{name}.keras")
    x = np.load(f"{sys.argv[1]}/{name}_x.npy")
    np.save(f"{sys.argv[1]}/{name}_out.npy", keras.ops.convert_to_numpy(model(x)))
assert not [m for m in sys.modules if m.split(".")[0] == "bnlayers"]
"""


def test_folded_models_load_and_predict_without_bnlayers(
    tmp_path, mnist_subset
):
    import subprocess
    import sys

    keras.utils.set_random_seed(36)
    article = randomize_bn(article_model(OURS(), filters=8), seed=36)
    weights = article.layers[1].get_weights()
    weights[0][0] = -1.0  # a negative scale: the BN stays, as Keras' layer
    article.layers[1].set_weights(weights)
    models = {
        "article": (article, mnist_subset[2][:16]),
        "residual": (
            _two_paths(),
            np.random.default_rng(36)
            .normal(size=(4, 6, 6, 3))
            .astype("float32"),
        ),
    }
    expected = {}
    for name, (model, x) in models.items():
        if name == "residual":
            randomize_bn(model, seed=36)
        folded = bnlayers.fold_batchnorm(model)
        assert bn_layers(folded)  # something is kept, and must load
        folded.save(tmp_path / f"{name}.keras")
        np.save(tmp_path / f"{name}_x.npy", x)
        expected[name] = infer(folded, x)
    # bnlayers is installed (editable) here: the child blocks its import.
    result = subprocess.run(
        [sys.executable, "-c", _BLOCK_BNLAYERS, str(tmp_path), *models],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in models:
        # The same kernels on the same weights: the same numbers.
        np.testing.assert_array_equal(
            np.load(tmp_path / f"{name}_out.npy"), expected[name]
        )
