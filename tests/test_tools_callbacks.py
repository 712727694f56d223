"""Tests for `PreciseBN` and `FreezeBNStatistics`, against float64 NumPy statistics."""

import keras
import numpy as np
import pytest

import bnlayers
from _tools_helpers import BOTH
from _tools_helpers import OURS
from _tools_helpers import randomize_bn

# Statistics over 64 float32 Dense outputs against float64: measured 3e-7
# relative.
RTOL = 5e-6


def _model(bn, seed=5):
    """Input(5) -> Dense(3) -> BN -> Dense(1): BN's inputs depend on no other BN."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(3, name="dense")(inputs)
    h = bn(name="bn")(h)
    outputs = keras.layers.Dense(1, name="head")(h)
    return randomize_bn(keras.Model(inputs, outputs), seed=seed)


def _data(n=64, seed=6):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 5)) * 2 + 1).astype("float32")
    return x, (x @ rng.normal(size=(5, 1))).astype("float32")


def _population(model, x):
    kernel, bias = (
        np.asarray(w, "float64") for w in model.get_layer("dense").get_weights()
    )
    h = x.astype("float64") @ kernel + bias
    return h.mean(0), h.var(0)


def _moving(model):
    layer = model.get_layer("bn")
    return (
        keras.ops.convert_to_numpy(layer.moving_mean).astype("float64"),
        keras.ops.convert_to_numpy(layer.moving_variance).astype("float64"),
    )


class _Spy(keras.callbacks.Callback):
    """Records, at each epoch end, the moving statistics and the population ones of that moment."""

    def __init__(self, x):
        super().__init__()
        self.x = x
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(
            (
                _moving(self.model),
                _population(self.model, self.x),
                keras.ops.convert_to_numpy(
                    self.model.get_layer("bn").gamma
                ).copy(),
            )
        )


@pytest.mark.parametrize("bn", BOTH, ids=["builtin", "bnlayers"])
def test_precise_bn_sets_population_statistics_at_the_end_and_every_n_epochs(
    bn,
):
    model = _model(bn)
    x, y = _data()
    model.compile(keras.optimizers.Adam(0.05), "mse")
    spy = _Spy(x)
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=3,
        verbose=0,
        callbacks=[
            bnlayers.PreciseBN(x, batch_size=16, every_n_epochs=2, verbose=0),
            spy,
        ],
    )
    for moving, population in zip(
        _moving(model), _population(model, x), strict=True
    ):
        np.testing.assert_allclose(moving, population, rtol=RTOL)
    # At the end of epoch 2 (only), before the spy looked.
    (m1, p1, _), (m2, p2, _), _ = spy.epochs
    np.testing.assert_allclose(m2, p2, rtol=RTOL)
    assert not np.allclose(m1[0], p1[0], rtol=1e-2)


def test_precise_bn_with_ema_matches_the_weights_fit_leaves():
    model = _model(OURS)
    x, y = _data()
    model.compile(
        keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.9), "mse"
    )
    spy = _Spy(x)
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        verbose=0,
        callbacks=[
            bnlayers.PreciseBN(x, steps=4, batch_size=16, verbose=0),
            spy,
        ],
    )
    final = _population(model, x)
    for moving, population in zip(_moving(model), final, strict=True):
        np.testing.assert_allclose(moving, population, rtol=RTOL)
    # The averaged weights differ from the last ones trained, so statistics
    # of the wrong weights would fail the check above (measured 6 % apart).
    raw = spy.epochs[-1][1]
    assert np.max(np.abs(raw[0] - final[0]) / np.sqrt(final[1])) > 0.01


def test_freeze_bn_statistics_trains_the_last_epochs_with_the_moving_statistics():
    model = _model(OURS)
    x, y = _data()
    model.compile(keras.optimizers.Adam(0.05), "mse")
    spy = _Spy(x)
    freeze = bnlayers.FreezeBNStatistics(last_epochs=1)
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[freeze, spy])
    (m1, _, g1), (m2, _, g2), (m3, _, g3) = spy.epochs
    assert not np.allclose(m1[0], m2[0])  # updated in epoch 2
    for before, after in zip(m2, m3, strict=True):
        np.testing.assert_array_equal(before, after)  # frozen in epoch 3
    assert not np.allclose(g2, g3)  # gamma still trained
    layer = model.get_layer("bn")
    assert "call" not in vars(layer) and not freeze.frozen

    # Frozen, training normalizes as inference does: with nothing learned
    # (learning rate 0), fit's loss is evaluate's.
    model.compile(keras.optimizers.SGD(0.0), "mse")
    history = model.fit(
        x,
        y,
        batch_size=64,
        epochs=1,
        verbose=0,
        callbacks=[bnlayers.FreezeBNStatistics(last_epochs=1)],
    )
    inference = model.evaluate(x, y, batch_size=64, verbose=0)
    # float32 sums in another order: measured 1e-7 relative.
    assert history.history["loss"][0] == pytest.approx(inference, rel=1e-5)
    # Unfrozen again: a training epoch normalizes with batch statistics.
    history = model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert history.history["loss"][0] != pytest.approx(inference, rel=1e-2)


def test_freeze_bn_statistics_recalibrates_first_with_data():
    model = _model(OURS)
    x, y = _data()
    model.compile(keras.optimizers.Adam(0.05), "mse")
    spy = _Spy(x)
    callback = bnlayers.FreezeBNStatistics(
        last_epochs=1, data=x, batch_size=64, verbose=0
    )
    model.fit(
        x, y, batch_size=16, epochs=2, verbose=0, callbacks=[callback, spy]
    )
    # Recalibrated at the start of epoch 2, then frozen: the statistics of
    # the weights after epoch 1.
    _, p1, _ = spy.epochs[0]
    for moving, population in zip(_moving(model), p1, strict=True):
        np.testing.assert_allclose(moving, population, rtol=RTOL)


class _BatchSpy(keras.callbacks.Callback):
    """Records after each training batch: the epoch, whether BN is frozen, its moving mean."""

    def __init__(self):
        super().__init__()
        self.epoch = None
        self.batches = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        layer = self.model.get_layer("bn")
        self.batches.append(
            (self.epoch, "call" in vars(layer), _moving(self.model)[0])
        )


def test_precise_bn_during_frozen_epochs_keeps_them_frozen():
    model = _model(OURS)
    x, y = _data()
    model.compile(keras.optimizers.Adam(0.05), "mse")
    spy, end = _BatchSpy(), _Spy(x)
    freeze = bnlayers.FreezeBNStatistics(last_epochs=2)
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=3,
        verbose=0,
        callbacks=[
            freeze,
            bnlayers.PreciseBN(x, batch_size=16, every_n_epochs=1, verbose=0),
            spy,
            end,
        ],
    )
    frozen = [frozen for _, frozen, _ in spy.batches]
    assert frozen == [False] * 4 + [True] * 8  # 4 batches an epoch
    # Epoch 3 trains with the statistics recalibrated at the end of epoch
    # 2, unchanged, not with batch statistics.
    recalibrated = end.epochs[1][0][0]
    for epoch, _, moving_mean in spy.batches:
        if epoch == 2:
            np.testing.assert_array_equal(moving_mean, recalibrated)
    assert "call" not in vars(model.get_layer("bn")) and not freeze.frozen


def test_bad_arguments():
    with pytest.raises(ValueError, match="every_n_epochs=0"):
        bnlayers.PreciseBN(np.zeros((4, 5)), every_n_epochs=0)
    with pytest.raises(ValueError, match="steps=-1"):
        bnlayers.PreciseBN(np.zeros((4, 5)), steps=-1)
    with pytest.raises(ValueError, match="last_epochs=0"):
        bnlayers.FreezeBNStatistics(last_epochs=0)
