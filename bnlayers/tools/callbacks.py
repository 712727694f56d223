"""Callbacks for the BN statistics used at inference: PreciseBN, frozen for the last epochs."""

from typing import Any

import keras

from bnlayers.tools._common import batchnorm_layers
from bnlayers.tools._common import check_positive
from bnlayers.tools.recalibration import _check_verbose
from bnlayers.tools.recalibration import recalibrate


class PreciseBN(keras.callbacks.Callback):
    """Recalibrates every BN layer's statistics at the end of `fit` (fvcore's PreciseBN).

    The moving statistics a BN layer keeps during training are an
    exponential average over batches taken while the weights changed; after
    a short training, with small or non-random batches, they are not the
    statistics of the final model's activations, and the model is worse in
    inference mode than in training mode. This callback runs
    `bnlayers.recalibrate(model, data, steps)` when training ends (and, with
    `every_n_epochs`, at the end of every N-th epoch), so the model `fit`
    returns normalizes with the exact population statistics of `data`.

    With an optimizer built with `use_ema=True`, `fit` replaces the weights
    by their moving averages after the last epoch and before the callbacks'
    `on_train_end`; the recalibration runs there, so the statistics are
    those of the averaged weights the model is left with. The statistics
    computed every N epochs are those of the weights of that moment (not
    averaged); `fit` validates before `on_epoch_end`, so validation sees
    them from the next epoch on.

    ```python
    model.fit(
        x_train, y_train, batch_size=64, epochs=5,
        callbacks=[bnlayers.PreciseBN(x_train, steps=200, batch_size=64)],
    )
    ```

    Args:
        data: What to compute the statistics over, as `recalibrate` takes
            it: arrays (`x` or `(x, y)`), a `tf.data.Dataset`, a
            `keras.utils.PyDataset` or a generator (read once per
            recalibration, so a generator serves one; use a dataset for
            `every_n_epochs`). Usually the training data, unaugmented or as
            in training.
        steps: Use at most this many batches of `data` (fvcore's default
            is 200 batches).
        batch_size: For array data: the batch size, best the training one.
        every_n_epochs: Also recalibrate at the end of every N-th epoch,
            before callbacks listed after this one run their
            `on_epoch_end` (a `ModelCheckpoint` after it saves recalibrated
            models).
        verbose: As `recalibrate`'s (`"auto"`: a progress bar).
    """

    def __init__(
        self,
        data: Any,
        steps: int | None = None,
        *,
        batch_size: int | None = None,
        every_n_epochs: int | None = None,
        verbose: str | int = "auto",
    ):
        super().__init__()
        self.data, self.steps, self.batch_size, self.verbose = _settings(
            data, steps, batch_size, verbose
        )
        check_positive(every_n_epochs, "every_n_epochs")
        self.every_n_epochs = every_n_epochs

    def on_epoch_end(self, epoch, logs=None):
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            _recalibrate(self)

    def on_train_end(self, logs=None):
        _recalibrate(self)


class FreezeBNStatistics(keras.callbacks.Callback):
    """Trains the last epochs with every BN layer normalizing by its moving statistics.

    Wu & Johnson's other remedy for the train–inference gap ("Rethinking
    'Batch' in BatchNorm", 2021): for the last `last_epochs` epochs of
    `fit`, each BN layer normalizes with its moving statistics and stops
    updating them, as at inference, while gamma, beta and every other
    weight keep training, so the weights adapt to the very statistics
    inference will use. (Unlike `trainable=False`, which also stops
    training gamma and beta.) When `fit` ends the layers are back to their
    usual behaviour, with the statistics they had when freezing started.

    The statistics frozen are the moving averages of the moment; with few
    steps before freezing, recalibrating first is better: give `data` and
    the statistics are recalibrated (as `recalibrate` does) when freezing
    starts.

    ```python
    model.fit(x, y, epochs=10, callbacks=[bnlayers.FreezeBNStatistics(last_epochs=2)])
    ```

    Args:
        last_epochs: For how many of the last epochs (positive int;
            all of them if `fit` runs fewer).
        data: Optional data to recalibrate over when freezing starts, as
            `PreciseBN` takes it.
        steps: At most this many batches of `data`.
        batch_size: For array `data`: the batch size.
        verbose: For the recalibration, as `recalibrate`'s.
    """

    def __init__(
        self,
        last_epochs: int = 1,
        data: Any = None,
        steps: int | None = None,
        *,
        batch_size: int | None = None,
        verbose: str | int = "auto",
    ):
        super().__init__()
        check_positive(last_epochs, "last_epochs", allow_none=False)
        self.last_epochs = int(last_epochs)
        self.data, self.steps, self.batch_size, self.verbose = _settings(
            data, steps, batch_size, verbose
        )
        self._frozen: list = []

    @property
    def frozen(self) -> bool:
        """Whether the BN layers are frozen now."""
        return bool(self._frozen)

    def on_train_begin(self, logs=None):
        self._frozen = []

    def on_epoch_begin(self, epoch, logs=None):
        epochs = self.params.get("epochs") if self.params else None
        if epochs is None:
            raise ValueError(
                "`FreezeBNStatistics` needs the number of epochs, which `fit` gives its "
                f"callbacks. Received: params={self.params!r}"
            )
        if self._frozen or epoch < epochs - self.last_epochs:
            return
        if self.data is not None:
            _recalibrate(self)
        for layer in batchnorm_layers(self.model):
            if layer.trainable and "call" not in vars(layer):
                layer.call = _inference_call(layer.call)
                self._frozen.append(layer)
        self._retrace()

    def on_train_end(self, logs=None):
        for layer in self._frozen:
            del layer.call
        if self._frozen:
            self._frozen = []
            self._retrace()

    def _retrace(self):
        # `fit` calls `train_function` anew at every step, so a fresh one
        # (traced with the BN layers' new `call`) takes effect at once.
        self.model.make_train_function(force=True)


def _settings(data, steps, batch_size, verbose):
    """What a callback passes on to `recalibrate`, checked now, not when `fit` ends."""
    check_positive(steps, "steps")
    check_positive(batch_size, "batch_size")
    return data, steps, batch_size, _check_verbose(verbose)


def _recalibrate(callback):
    """`recalibrate` of the callback's model over its data, with its settings."""
    recalibrate(
        callback.model,
        callback.data,
        callback.steps,
        batch_size=callback.batch_size,
        verbose=callback.verbose,
    )


def _inference_call(original):
    def call(inputs, training=None, **kwargs):
        return original(inputs, training=False, **kwargs)

    return call
