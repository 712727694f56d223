"""Tests for `recalibrate`: statistics against float64 NumPy references."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import bnlayers
from _tools_helpers import BOTH
from _tools_helpers import BUILTIN
from _tools_helpers import OURS
from _tools_helpers import randomize_bn
from article import article_model


def _two_bn_model():
    keras.utils.set_random_seed(11)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, name="d1")(inputs)
    h = BUILTIN(name="bn1")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Dropout(0.5)(
        h
    )  # off during recalibration, as at inference
    h = keras.layers.Dense(4, name="d2")(h)
    h = OURS(name="bn2")(h)
    outputs = keras.layers.Dense(1, name="head")(h)
    model = keras.Model(inputs, outputs)
    return randomize_bn(model, seed=11)


def _reference_stats(model, x, batch_size):
    """float64 population statistics of bn1's and bn2's inputs, bn1 using batch statistics."""

    def weights(name):
        return [
            np.asarray(w, "float64")
            for w in model.get_layer(name).get_weights()
        ]

    w1, b1 = weights("d1")
    w2, b2 = weights("d2")
    gamma, beta = weights("bn1")[:2]
    eps = model.get_layer("bn1").epsilon
    h1 = x.astype("float64") @ w1 + b1
    h2 = []
    for start in range(0, len(x), batch_size):
        part = h1[start : start + batch_size]
        normed = (part - part.mean(0)) / np.sqrt(
            part.var(0) + eps
        ) * gamma + beta
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
    model.fit(
        x, y, batch_size=50, epochs=1, verbose=0
    )  # gives the optimizer state
    before = {
        v.path: keras.ops.convert_to_numpy(v).copy() for v in model.weights
    }
    optimizer = [
        keras.ops.convert_to_numpy(v).copy() for v in model.optimizer.variables
    ]

    assert (
        bnlayers.recalibrate(model, x, batch_size=32) is model
    )  # last batch: 4

    (m1, v1), (m2, v2) = _reference_stats(model, x, 32)
    # float32 activations against a float64 reference of the same formula.
    for name, (mean, var) in (("bn1", (m1, v1)), ("bn2", (m2, v2))):
        got_mean, got_var = _moving(model, name)
        np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_var, var, rtol=1e-5)
    moving = {"moving_mean", "moving_variance"}
    for v in model.weights:
        if v.name in moving:
            assert not np.array_equal(
                keras.ops.convert_to_numpy(v), before[v.path]
            )
        else:
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(v), before[v.path]
            )
    for v, value in zip(model.optimizer.variables, optimizer, strict=True):
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
        "endless": run(
            tf.data.Dataset.from_tensor_slices(x).batch(32).repeat(), steps=3
        ),
    }
    for form, got in forms.items():
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=form)

    # steps=2 uses the first 64 examples only.
    model = _two_bn_model()
    bnlayers.recalibrate(model, x, steps=2, batch_size=32)
    (mean, var), _ = _reference_stats(model, x[:64], 32)
    np.testing.assert_allclose(
        _moving(model, "bn1")[0], mean, rtol=1e-5, atol=1e-6
    )
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
        [
            keras.Input((9,), dtype="int32"),
            keras.layers.Embedding(20, 4, mask_zero=True),
            bn(),
        ]
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
    return keras.ops.convert_to_numpy(
        layer.moving_mean
    ), keras.ops.convert_to_numpy(layer.moving_variance)


@pytest.mark.parametrize("bn", BOTH, ids=["keras", "bnlayers"])
def test_recalibrate_skips_frozen_layers_and_keeps_renorm_state(bn):
    model = keras.Sequential(
        [
            keras.Input((3,)),
            bn(renorm=True, name="renorm"),
            bn(name="frozen"),
            keras.layers.Dense(2),
        ]
    )
    randomize_bn(model, seed=15)
    model.get_layer("frozen").trainable = False
    frozen = [
        keras.ops.convert_to_numpy(v).copy()
        for v in model.get_layer("frozen").weights
    ]
    renorm = model.get_layer("renorm")
    renorm_state = [
        keras.ops.convert_to_numpy(v).copy()
        for v in (renorm.renorm_mean, renorm.renorm_stddev)
    ]
    x = (
        np.random.default_rng(15)
        .normal(2.0, 3.0, size=(40, 3))
        .astype("float32")
    )

    bnlayers.recalibrate(model, x, batch_size=16)
    for v, value in zip(model.get_layer("frozen").weights, frozen, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), value)
    for v, value in zip(
        (renorm.renorm_mean, renorm.renorm_stddev), renorm_state, strict=True
    ):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), value)
    mean, var = _moving_layer(renorm)
    np.testing.assert_allclose(mean, x.astype("float64").mean(0), rtol=1e-5)
    np.testing.assert_allclose(var, x.astype("float64").var(0), rtol=1e-5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(renorm.moving_stddev),
        np.sqrt(var + renorm.epsilon),
        rtol=1e-6,
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
        bnlayers.recalibrate(
            model, tf.data.Dataset.from_tensor_slices(x).batch(4), batch_size=8
        )
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
    model.compile(
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=1, batch_size=64, verbose=0)
    loss_before, acc_before = model.evaluate(
        x_test, y_test, batch_size=500, verbose=0
    )
    bnlayers.recalibrate(model, x_train, batch_size=64)
    loss_after, acc_after = model.evaluate(
        x_test, y_test, batch_size=500, verbose=0
    )
    # Measured with seed 1: loss 1.43 -> 0.17, accuracy 91.0% -> 94.9%.
    assert loss_before > 0.8 and acc_before > 0.8
    assert loss_after < 0.3
    assert acc_after >= acc_before + 0.01


@pytest.mark.parametrize("bn", BOTH, ids=["keras", "bnlayers"])
def test_recalibrate_expands_masks_at_the_last_axis_as_keras_does(bn):
    # Keras' rule: a (batch, time) mask leaves out whole positions, even
    # when BN normalizes the time axis (axis=1) and reduces the channels.
    keras.utils.set_random_seed(18)
    model = keras.Sequential(
        [keras.Input((5, 3)), keras.layers.Masking(0.0), bn(axis=1)]
    )
    x = (
        np.random.default_rng(18)
        .normal(2.0, 1.5, size=(12, 5, 3))
        .astype("float32")
    )
    x[::2, 3:] = 0.0  # padding at the end of every other sequence
    x[1::4, 1] = 0.0
    bnlayers.recalibrate(model, x, batch_size=4, verbose=0)
    kept = np.any(x != 0.0, axis=-1)  # (batch, time)
    values = x.astype("float64")
    mean = [values[kept[:, t], t].mean() for t in range(5)]
    var = [values[kept[:, t], t].var() for t in range(5)]
    got_mean, got_var = _moving_layer(model.layers[-1])
    # float32 moments of at most 36 values against float64: measured at
    # most 9e-8 (relative) over 5 seeds.
    np.testing.assert_allclose(got_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(got_var, var, rtol=1e-6)


def _progress(text):
    """The progress output with colours, times and rates replaced by `T`."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    text = re.sub(r"\d+(\.\d+)?(s|ms|us)(/step)?", "T", text)
    return [
        line.strip() for line in re.split(r"[\r\n\x08]+", text) if line.strip()
    ]


def test_recalibrate_verbose_shows_progress_as_predict_does(capsys):
    model = _two_bn_model()
    # Two batches of the same shape: one trace per call.
    x = np.random.default_rng(19).normal(size=(64, 6)).astype("float32")
    shown = {}
    for verbose in ("auto", 0, 1, 2):
        model.predict(x, batch_size=32, verbose=verbose)
        expected = _progress(capsys.readouterr().out)
        bnlayers.recalibrate(model, x, batch_size=32, verbose=verbose)
        got = shown[verbose] = _progress(capsys.readouterr().out)
        if verbose == 0:
            assert got == expected == []
        else:
            # predict's last line is recalibrate's: "2/2 ━━━━ T T" or "2/2 - T - T".
            assert got[-1] == expected[-1] and got[-1].startswith("2/2 "), (
                verbose
            )
        if verbose == 2:
            assert len(got) == 1
    bnlayers.recalibrate(
        model, x, batch_size=32
    )  # the default is predict's, "auto"
    assert _progress(capsys.readouterr().out)[-1] == shown["auto"][-1]


def test_recalibrate_rejects_bad_verbose():
    model = _two_bn_model()
    with pytest.raises(ValueError, match="verbose=3"):
        bnlayers.recalibrate(model, np.zeros((4, 6), "float32"), verbose=3)
    with pytest.raises(ValueError, match="verbose='loud'"):
        bnlayers.recalibrate(model, np.zeros((4, 6), "float32"), verbose="loud")
