"""Tests for the whole-model tools: swap, fold, recalibrate, freeze.

Agreement tolerance for swap and fold: the largest absolute difference of
the outputs is at most `AGREE` times the largest absolute output. float32
has a relative rounding step of 1.2e-7; swapping reorders the normalization
arithmetic and folding reorders the conv sums and rounds `kernel * scale`
once, so a few roundings per term accumulate over sums of up to a few
hundred terms; the largest error measured is about 5e-7 of the output.
"""

import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import bnlayers
from bnlayers.tools import _common
from bnlayers.tools import ChannelAffine

from article import article_model

AGREE = 1e-5
BUILTIN = keras.layers.BatchNormalization
OURS = bnlayers.BatchNormalization
BOTH = [BUILTIN, OURS]


def _bn_layers(model):
    return _common.batchnorm_layers(model)


def _randomize_bn(model, seed=0):
    """Gives every BN layer statistics and affine weights far from their init."""
    rng = np.random.default_rng(seed)
    for layer in _bn_layers(model):
        new = []
        for variable in layer.weights:
            shape = variable.shape
            if variable.name in ("moving_variance",):
                value = rng.uniform(0.3, 3.0, shape)
            elif variable.name in ("moving_stddev", "renorm_stddev"):
                value = rng.uniform(0.5, 2.0, shape)
            elif variable.name == "gamma":
                value = rng.normal(1.0, 0.3, shape)
            else:
                value = rng.normal(0.0, 0.5, shape)
            new.append(value.astype("float32"))
        layer.set_weights(new)
    return model


def _relative(out, ref):
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def _infer(model, x, jit=False):
    if not jit:  # eager: one call costs less than tracing a graph
        return keras.ops.convert_to_numpy(model(x, training=False))
    fn = tf.function(lambda t: model(t, training=False), jit_compile=True)
    return keras.ops.convert_to_numpy(fn(x))


def _classes(model):
    return [type(layer) for layer in model._flatten_layers(include_self=False)]


# -------------------------------------------------------------------- swap


@pytest.fixture(scope="module")
def mobilenet():
    """A keras.applications model with 52 built-in BN layers and random statistics."""
    keras.utils.set_random_seed(3)
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10, classifier_activation=None
    )
    _randomize_bn(model, seed=3)
    x = np.random.default_rng(3).normal(size=(8, 32, 32, 3)).astype("float32")
    return model, x


def test_swap_keras_applications_model_both_ways(mobilenet):
    model, x = mobilenet
    ref = _infer(model, x)
    swapped = bnlayers.swap_batchnorm(model, to="bnlayers")

    old_bn, new_bn = _bn_layers(model), _bn_layers(swapped)
    assert len(old_bn) == len(new_bn) == 52
    assert all(type(layer) is BUILTIN for layer in old_bn)  # the original is untouched
    assert all(type(layer) is OURS for layer in new_bn)
    for old, new in zip(old_bn, new_bn):
        config = new.get_config()
        assert config.pop("virtual_batch_size") is None and config.pop("fused") is None
        assert config == old.get_config()
    # Every weight of every layer carried over bit for bit, in order.
    assert [v.path.split("/", 1)[1] for v in swapped.weights] == [
        v.path.split("/", 1)[1] for v in model.weights
    ]
    for a, b in zip(swapped.weights, model.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    assert [type(layer) for layer in swapped.layers if type(layer) is not OURS] == [
        type(layer) for layer in model.layers if type(layer) is not BUILTIN
    ]
    assert _relative(_infer(swapped, x), ref) <= AGREE

    back = bnlayers.swap_batchnorm(swapped, to="keras")
    assert all(type(layer) is BUILTIN for layer in _bn_layers(back))
    # Same class, same weights, same graph: the very same numbers.
    np.testing.assert_array_equal(_infer(back, x), ref)


def _nested_model(first_bn, second_bn):
    inner_seq = keras.Sequential(
        [keras.layers.Dense(6), first_bn(axis=[-1]) if first_bn is OURS else first_bn(), keras.layers.ReLU()],
        name="inner_seq",
    )
    inner_in = keras.Input((6,))
    inner_fn = keras.Model(
        inner_in, keras.layers.Dense(3)(second_bn(renorm=True, name="renorm_bn")(inner_in)), name="inner_fn"
    )
    inputs = keras.Input((5,))
    h = inner_seq(inputs)
    h = inner_fn(h)
    outputs = second_bn(name="top_bn")(h)
    model = keras.Model(inputs, outputs)
    return _randomize_bn(model, seed=5)


@pytest.mark.parametrize("source, target, to", [(BUILTIN, OURS, "bnlayers"), (OURS, BUILTIN, "keras")])
def test_swap_nested_models_and_renorm(source, target, to):
    model = _nested_model(source, source)
    x = np.random.default_rng(0).normal(size=(16, 5)).astype("float32")
    swapped = bnlayers.swap_batchnorm(model, to=to)
    assert isinstance(swapped.get_layer("inner_seq"), keras.Sequential)
    assert isinstance(swapped.get_layer("inner_fn"), keras.Model)
    layers = _bn_layers(swapped)
    assert len(layers) == 3 and all(type(layer) is target for layer in layers)
    renorm = swapped.get_layer("inner_fn").get_layer("renorm_bn")
    assert renorm.renorm and [v.name for v in renorm.weights][-3:] == [
        "moving_stddev",
        "renorm_mean",
        "renorm_stddev",
    ]
    for a, b in zip(swapped.weights, model.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    assert _relative(_infer(swapped, x), _infer(model, x)) <= AGREE


def test_swap_keeps_compile_config_and_drops_fused():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), OURS(axis=[1], fused=False)])
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


# -------------------------------------------------------------------- fold




@pytest.mark.parametrize("bn", BOTH, ids=["keras", "bnlayers"])
def test_fold_article_model_becomes_multiply_add(bn, mnist_subset, tmp_path):
    keras.utils.set_random_seed(0)
    model = _randomize_bn(article_model(bn()))
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
    ref = _infer(model, x)
    out = _infer(folded, x)
    assert _relative(out, ref) <= AGREE
    # No training branch: the same output in training mode.
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(folded(x, training=True)), out)

    path = tmp_path / "folded.keras"
    folded.save(path)
    reloaded = keras.models.load_model(path)
    assert type(reloaded.layers[1]) is ChannelAffine
    np.testing.assert_array_equal(_infer(reloaded, x), out)


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
    _randomize_bn(model)
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
    jit = data_format == "channels_first" and keras.backend.backend() == "tensorflow"
    assert _relative(_infer(folded, x, jit), _infer(model, x, jit)) <= AGREE


@pytest.mark.parametrize(
    "make",
    [
        lambda: [keras.Input((20, 3)), keras.layers.Conv1D(6, 3), OURS()],
        lambda: [keras.Input((6, 6, 6, 2)), keras.layers.Conv3D(4, 3), BUILTIN()],
        lambda: [keras.Input((10, 10, 3)), keras.layers.DepthwiseConv2D(3, depth_multiplier=2), OURS()],
        lambda: [keras.Input((20, 3)), keras.layers.DepthwiseConv1D(3, depth_multiplier=3), BUILTIN()],
        lambda: [keras.Input((10, 10, 3)), keras.layers.SeparableConv2D(5, 3, depth_multiplier=2), OURS()],
        lambda: [keras.Input((7, 5)), keras.layers.Dense(4, use_bias=False), OURS(axis=2)],
        lambda: [keras.Input((10, 10, 3)), keras.layers.Conv2D(4, 3, groups=1), OURS()],
    ],
    ids=["conv1d", "conv3d", "depthwise2d", "depthwise1d", "separable2d", "dense_rank3", "conv2d"],
)
def test_fold_each_foldable_layer(make):
    model = _randomize_bn(keras.Sequential(make()))
    folded = bnlayers.fold_batchnorm(model)
    assert len(folded.layers) == 1 and type(folded.layers[0]) is type(model.layers[0])
    shape = (8,) + tuple(model.inputs[0].shape[1:])
    x = np.random.default_rng(2).normal(size=shape).astype("float32")
    assert _relative(_infer(folded, x), _infer(model, x)) <= AGREE


def test_fold_leaves_unfoldable_pairs_as_multiply_add():
    model = keras.Sequential(
        [
            keras.Input((7, 5)),
            keras.layers.Dense(4),
            OURS(axis=1),  # normalizes the time axis, not the Dense's units
            keras.layers.Conv1D(4, 3, activation="tanh"),
            BUILTIN(),  # after a non-linear activation
            keras.layers.Conv1D(4, 3),
            OURS(axis=[1, 2]),  # several feature axes
        ]
    )
    _randomize_bn(model)
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
    assert _relative(_infer(folded, x), _infer(model, x)) <= AGREE


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
        [keras.Input((10, 10, 8)), keras.layers.Conv2D(6, 3), OURS(), keras.layers.ReLU()],
        name="block",
    )
    h = block(h)
    h = BUILTIN(name="after_block_bn")(h)  # follows a nested model
    outputs = keras.layers.GlobalAveragePooling2D()(h)
    model = _randomize_bn(keras.Model(inputs, outputs))

    folded = bnlayers.fold_batchnorm(model)
    assert not _bn_layers(folded)
    names = {layer.name: layer for layer in folded.layers}
    assert names["stem"].use_bias and names["res_a"].use_bias
    assert type(names["tapped_bn"]) is ChannelAffine
    assert type(names["after_block_bn"]) is ChannelAffine
    assert [type(layer).__name__ for layer in names["block"].layers] == ["Conv2D", "ReLU"]
    assert sum(type(layer) is ChannelAffine for layer in folded._flatten_layers()) == 2
    x = np.random.default_rng(8).normal(size=(8, 10, 10, 4)).astype("float32")
    assert _relative(_infer(folded, x), _infer(model, x)) <= AGREE


def test_fold_keras_applications_model(mobilenet):
    model, x = mobilenet
    folded = bnlayers.fold_batchnorm(model)
    assert not _bn_layers(folded)
    assert not any(type(layer) is ChannelAffine for layer in folded.layers)
    assert _relative(_infer(folded, x), _infer(model, x)) <= AGREE


def test_fold_rejects_bad_input():
    with pytest.raises(TypeError, match="keras.Model"):
        bnlayers.fold_batchnorm("model.keras")
    with pytest.raises(ValueError, match="built"):
        bnlayers.fold_batchnorm(keras.Sequential([keras.layers.Dense(2), OURS()]))

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


# ------------------------------------------------------------- recalibrate


def _two_bn_model():
    keras.utils.set_random_seed(11)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, name="d1")(inputs)
    h = BUILTIN(name="bn1")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Dropout(0.5)(h)  # off during recalibration, as at inference
    h = keras.layers.Dense(4, name="d2")(h)
    h = OURS(name="bn2")(h)
    outputs = keras.layers.Dense(1, name="head")(h)
    model = keras.Model(inputs, outputs)
    return _randomize_bn(model, seed=11)


def _reference_stats(model, x, batch_size):
    """float64 population statistics of bn1's and bn2's inputs, bn1 using batch statistics."""

    def weights(name):
        return [np.asarray(w, "float64") for w in model.get_layer(name).get_weights()]

    w1, b1 = weights("d1")
    w2, b2 = weights("d2")
    gamma, beta = weights("bn1")[:2]
    eps = model.get_layer("bn1").epsilon
    h1 = x.astype("float64") @ w1 + b1
    h2 = []
    for start in range(0, len(x), batch_size):
        part = h1[start : start + batch_size]
        normed = (part - part.mean(0)) / np.sqrt(part.var(0) + eps) * gamma + beta
        h2.append(np.maximum(normed, 0.0) @ w2 + b2)
    h2 = np.concatenate(h2)
    return (h1.mean(0), h1.var(0)), (h2.mean(0), h2.var(0))


def _moving(model, name):
    layer = model.get_layer(name)
    return (
        keras.ops.convert_to_numpy(layer.moving_mean),
        keras.ops.convert_to_numpy(layer.moving_variance),
    )


def test_recalibrate_gives_exact_population_statistics_and_touches_nothing_else():
    model = _two_bn_model()
    rng = np.random.default_rng(12)
    x = (rng.normal(size=(100, 6)) * 3 + 5).astype("float32")
    y = rng.normal(size=(100, 1)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, batch_size=50, epochs=1, verbose=0)  # gives the optimizer state
    before = {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.weights}
    optimizer = [keras.ops.convert_to_numpy(v).copy() for v in model.optimizer.variables]

    assert bnlayers.recalibrate(model, x, batch_size=32) is model  # last batch: 4

    (m1, v1), (m2, v2) = _reference_stats(model, x, 32)
    # float32 activations against a float64 reference of the same formula.
    for name, (mean, var) in (("bn1", (m1, v1)), ("bn2", (m2, v2))):
        got_mean, got_var = _moving(model, name)
        np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_var, var, rtol=1e-5)
    moving = {"moving_mean", "moving_variance"}
    for v in model.weights:
        if v.name in moving:
            assert not np.array_equal(keras.ops.convert_to_numpy(v), before[v.path])
        else:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), before[v.path])
    for v, value in zip(model.optimizer.variables, optimizer):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), value)
    for name in ("bn1", "bn2"):
        layer = model.get_layer(name)
        assert layer.momentum == 0.99 and "call" not in vars(layer)


def test_recalibrate_accepts_every_data_form_and_steps():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = np.zeros((96, 1), "float32")

    def run(data, **kwargs):
        model = _two_bn_model()
        bnlayers.recalibrate(model, data, **kwargs)
        return _moving(model, "bn1") + _moving(model, "bn2")

    expected = run(x, batch_size=32)

    def generator():
        for start in range(0, 96, 32):
            yield x[start : start + 32], y[start : start + 32]

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return (x[32 * i : 32 * (i + 1)],)

    forms = {
        "tuple": run((x, y), batch_size=32),
        "dataset": run(tf.data.Dataset.from_tensor_slices((x, y)).batch(32)),
        "generator": run(generator()),
        "pydataset": run(Batches()),
        "endless": run(tf.data.Dataset.from_tensor_slices(x).batch(32).repeat(), steps=3),
    }
    for form, got in forms.items():
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=form)

    # steps=2 uses the first 64 examples only.
    model = _two_bn_model()
    bnlayers.recalibrate(model, x, steps=2, batch_size=32)
    (mean, var), _ = _reference_stats(model, x[:64], 32)
    np.testing.assert_allclose(_moving(model, "bn1")[0], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_moving(model, "bn1")[1], var, rtol=1e-5)


def test_recalibrate_multi_input_model_takes_list_or_dict():
    a_in, b_in = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    h = OURS(name="bn")(keras.layers.Concatenate()([a_in, b_in]))
    model = keras.Model([a_in, b_in], h)
    rng = np.random.default_rng(17)
    a = rng.normal(1.0, 2.0, size=(30, 2)).astype("float32")
    b = rng.normal(-3.0, 0.5, size=(30, 3)).astype("float32")
    expected = np.concatenate([a, b], axis=1).astype("float64")
    for data in ([a, b], {"a": a, "b": b}, ([a, b], np.zeros(30))):
        bnlayers.recalibrate(model, data, batch_size=7)
        mean, var = _moving_layer(model.get_layer("bn"))
        np.testing.assert_allclose(mean, expected.mean(0), rtol=1e-5)
        np.testing.assert_allclose(var, expected.var(0), rtol=1e-5)


@pytest.mark.parametrize("bn", BOTH, ids=["keras", "bnlayers"])
def test_recalibrate_leaves_masked_positions_out(bn):
    keras.utils.set_random_seed(14)
    model = keras.Sequential(
        [keras.Input((9,), dtype="int32"), keras.layers.Embedding(20, 4, mask_zero=True), bn()]
    )
    tokens = np.random.default_rng(14).integers(1, 20, size=(24, 9))
    tokens[:, 6:] = 0  # padding
    tokens[::3, 3:] = 0
    bnlayers.recalibrate(model, tokens, batch_size=8)
    table = np.asarray(model.layers[0].embeddings, "float64")
    kept = table[tokens[tokens > 0]]
    mean, var = _moving_layer(model.layers[1])
    np.testing.assert_allclose(mean, kept.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(var, kept.var(0), rtol=1e-5)


def _moving_layer(layer):
    return keras.ops.convert_to_numpy(layer.moving_mean), keras.ops.convert_to_numpy(layer.moving_variance)


@pytest.mark.parametrize("bn", BOTH, ids=["keras", "bnlayers"])
def test_recalibrate_skips_frozen_layers_and_keeps_renorm_state(bn):
    model = keras.Sequential(
        [keras.Input((3,)), bn(renorm=True, name="renorm"), bn(name="frozen"), keras.layers.Dense(2)]
    )
    _randomize_bn(model, seed=15)
    model.get_layer("frozen").trainable = False
    frozen = [keras.ops.convert_to_numpy(v).copy() for v in model.get_layer("frozen").weights]
    renorm = model.get_layer("renorm")
    renorm_state = [keras.ops.convert_to_numpy(v).copy() for v in (renorm.renorm_mean, renorm.renorm_stddev)]
    x = np.random.default_rng(15).normal(2.0, 3.0, size=(40, 3)).astype("float32")

    bnlayers.recalibrate(model, x, batch_size=16)
    for v, value in zip(model.get_layer("frozen").weights, frozen):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), value)
    for v, value in zip((renorm.renorm_mean, renorm.renorm_stddev), renorm_state):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), value)
    mean, var = _moving_layer(renorm)
    np.testing.assert_allclose(mean, x.astype("float64").mean(0), rtol=1e-5)
    np.testing.assert_allclose(var, x.astype("float64").var(0), rtol=1e-5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(renorm.moving_stddev), np.sqrt(var + renorm.epsilon), rtol=1e-6
    )


def test_recalibrate_rejects_bad_input():
    model = _two_bn_model()
    x = np.zeros((8, 6), "float32")
    with pytest.raises(TypeError, match="keras.Model"):
        bnlayers.recalibrate(None, x)
    with pytest.raises(ValueError, match="steps=0"):
        bnlayers.recalibrate(model, x, steps=0)
    with pytest.raises(TypeError, match="data="):
        bnlayers.recalibrate(model, 3.0)
    with pytest.raises(ValueError, match="batch_size=8"):
        bnlayers.recalibrate(model, tf.data.Dataset.from_tensor_slices(x).batch(4), batch_size=8)
    with pytest.raises(ValueError, match="batch_size=0"):
        bnlayers.recalibrate(model, x, batch_size=0)
    with pytest.raises(ValueError, match="no batches"):
        bnlayers.recalibrate(model, iter([]))


@pytest.mark.slow
def test_recalibrate_repairs_the_article_model_after_one_epoch(mnist_subset):
    """One epoch (125 steps of 64): good accuracy, poor loss, until recalibrated."""
    x_train, y_train, x_test, y_test = mnist_subset
    keras.utils.set_random_seed(1)
    model = article_model(OURS())
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=1, batch_size=64, verbose=0)
    loss_before, acc_before = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    bnlayers.recalibrate(model, x_train, batch_size=64)
    loss_after, acc_after = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    # Measured with seed 1: loss 1.43 -> 0.17, accuracy 91.0% -> 94.9%.
    assert loss_before > 0.8 and acc_before > 0.8
    assert loss_after < 0.3
    assert acc_after >= acc_before + 0.01


# ------------------------------------------------------------------ freeze


def test_freeze_then_finetune_leaves_bn_weights_untouched():
    keras.utils.set_random_seed(16)
    inner = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(8), OURS(name="inner_bn"), keras.layers.ReLU()],
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
    _randomize_bn(model, seed=16)

    assert bnlayers.freeze_batchnorm(model) is model
    bns = _bn_layers(model)
    assert len(bns) == 2 and not any(layer.trainable for layer in bns)
    assert all(layer.trainable for layer in model._flatten_layers() if layer not in bns)
    frozen = {v.path: keras.ops.convert_to_numpy(v).copy() for layer in bns for v in layer.weights}
    others = {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.weights if v.path not in frozen}
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
