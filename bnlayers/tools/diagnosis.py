"""`diagnose`: how far each BN layer's moving statistics are from the data, and what that costs.

Also a command line, on a saved `.keras` file and an `.npz` of inputs
(and optional labels):

    python -m bnlayers.tools.diagnose_cli model.keras data.npz
    bnlayers-diagnose model.keras data.npz --batch-size 64 --plot gap.png

It prints the report and exits with status 0 if the model is healthy, 1 if
not, 2 for a bad argument or file.
"""

import argparse
import contextlib
import dataclasses
import itertools
import math
import sys
from typing import Any

import keras
import numpy as np
from keras import backend
from keras import ops

from bnlayers.tools import _keras_internals as internals
from bnlayers.tools import recalibration as _recal
from bnlayers.tools._common import batchnorm_layers
from bnlayers.tools._common import check_built
from bnlayers.tools._common import check_model
from bnlayers.tools._common import check_positive
from bnlayers.tools._common import to_numpy64

# The thresholds, from measurements on the article's model (Conv2D, BN,
# pooling, Dense) trained on the bundled MNIST data with Adam 1e-3 at batch
# 64 (seed 0), diagnosed on the 8,000 training images at batch 64:
#
#   steps   accuracy gap   loss: inference / population   error typical / worst
#   10      22.8 points    2.02 / 0.60                    0.96 / 0.97
#   100      5.4           1.58 / 0.18                    0.94 / 0.95
#   500      0.2           0.101 / 0.028                  0.56 / 0.61
#   1500     0.0           0.001 / 0.001                  0.014 / 0.075
#   (1500: 500 steps, then 1000 more in another data order)
#
# The 500-step model still has moving variances about 5 times the
# population's: 0.99**500 = 0.0066 of their initial 1 is left, against
# population variances of 1e-4 to 2e-3. A layer is stale when its typical
# channel's output error is above 0.1 or its worst channel's above 0.3.
# The model's gap is too large when it changes the model's decisions: above
# 1 accuracy point, or, without labels, when more than 1 % of the predicted
# classes change; for a model that is not a classifier, when the loss rises
# by more than 5 % (relative). Stale statistics that leave a classifier's
# decisions as they are (the 500-step model: 0.2 points, loss 3.6 times the
# population one) are a warning, not a verdict: the report says so.
STALE_TYPICAL = 0.1
STALE_WORST = 0.3
ACCURACY_GAP = 1.0  # points
CHANGED_PREDICTIONS = 0.01
LOSS_RISE = 0.05
# How far one batch's statistics are from the population's (the same error,
# typical channel, RMS over batches). For n independent values per channel
# it is about sqrt(1.5 / n): 0.3 for batches of 16 samples into a Dense
# layer (a convolution sees many positions per sample, so far less). Above
# it, the batch statistics of training are noisy.
BATCH_NOISE = 0.3
# A channel is collapsed when its inputs' standard deviation is below 1 %
# of sqrt(epsilon) (a constant input, usually a dead ReLU unit: the
# article's model has live channels with variances down to 0.1 epsilon)
# or when |gamma| is below COLLAPSED_GAMMA (a constant output).
COLLAPSED_VARIANCE = 1e-4  # times epsilon
COLLAPSED_GAMMA = 1e-3

_DROPOUTS = (
    keras.layers.Dropout,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)


@dataclasses.dataclass(frozen=True)
class Flag:
    """One finding about a BN layer: what is wrong and what to do about it.

    The kinds, and what raises each:

    - `stale`: the typical channel's output error is above 0.1 or the
      worst channel's above 0.3 (measured on the article's MNIST model at
      batch 64: 0.96 / 0.97 after 10 steps, where inference mode loses 23
      accuracy points; 0.56 / 0.61 after 500 steps, where the accuracy
      gap is 0.2 points but the loss 3.6 times the population one; 0.014 /
      0.075 after 1,500 steps, no gap);
    - `non-finite`: NaN or infinite moving or population statistics;
    - `collapsed`: channels whose input variance is below 1e-4 epsilon or
      whose |gamma| is below 1e-3;
    - `frozen`: `trainable=False`: training and `recalibrate` leave its
      statistics as they are;
    - `after-dropout`: the layer's input comes straight from a Dropout
      layer, whose variance in training differs from inference;
    - `small-batches`: normalizing with a single batch's statistics instead
      of the population's gives an output error (typical channel, RMS over
      the batches) above 0.3, what batches of 16 independent samples give.

    Attributes:
        kind: `"stale"`, `"non-finite"`, `"collapsed"`, `"frozen"`,
            `"after-dropout"` or `"small-batches"`.
        problem: Whether it makes the layer unhealthy (non-finite
            statistics do, and stale ones where the model's outputs are
            beyond the thresholds; the others are warnings about where a gap
            comes from or will come from).
        message: What was found, with the figures.
        fix: What to do.
    """

    kind: str
    problem: bool
    message: str
    fix: str


@dataclasses.dataclass(frozen=True)
class LayerDiagnosis:
    """One BN layer's moving statistics against the population statistics of the data.

    Per channel, with `m, v` the moving mean and variance, `mu, s2` the
    population mean and variance and `eps` the layer's epsilon:

    - `mean_shift = |m - mu| / sqrt(s2 + eps)`: population standard
      deviations;
    - `variance_ratio = (v + eps) / (s2 + eps)`: 1 is right;
    - `error`: the RMS difference over the data between the layer's
      normalized output in inference mode and with the population
      statistics, in units of that normalized output,
      `sqrt((r - 1)**2 + d**2)` with `r = sqrt((s2 + eps) / (v + eps))` and
      `d = (mu - m) / sqrt(v + eps)`.

    The worst channel is the one with the largest `error`; the typical
    figures are medians over channels.
    """

    name: str
    path: str
    class_name: str
    channels: int
    healthy: bool
    flags: tuple[Flag, ...]
    worst_channel: int
    error_worst: float
    error_typical: float
    mean_shift_worst: float
    mean_shift_typical: float
    variance_ratio_worst: float
    variance_ratio_typical: float
    batch_noise: float
    collapsed_channels: int
    trainable: bool
    population_mean: np.ndarray = dataclasses.field(repr=False)
    population_variance: np.ndarray = dataclasses.field(repr=False)
    error: np.ndarray = dataclasses.field(repr=False)
    mean_shift: np.ndarray = dataclasses.field(repr=False)
    variance_ratio: np.ndarray = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class ModelEffect:
    """What the layers' gap does to the model's outputs over the data.

    `*_inference` is the model as it is in inference mode, `*_population`
    the same weights with every trainable BN layer's moving statistics
    replaced by the population statistics (what `recalibrate` would give).
    Accuracy is in percent; `None` where it does not apply (no labels, not
    a classifier). `changed_predictions` is the fraction of samples whose
    predicted class differs (classifiers), `output_change` the RMS
    difference of the outputs over their RMS with population statistics.
    """

    loss_inference: float | None
    loss_population: float | None
    accuracy_inference: float | None
    accuracy_population: float | None
    changed_predictions: float | None
    output_change: float

    @property
    def accuracy_gap(self) -> float | None:
        """Population minus inference-mode accuracy, in points."""
        if self.accuracy_inference is None or self.accuracy_population is None:
            return None
        return self.accuracy_population - self.accuracy_inference

    @property
    def loss_rise(self) -> float | None:
        """Inference-mode loss over the population-statistics loss, minus 1."""
        if self.loss_inference is None or not self.loss_population:
            return None
        return self.loss_inference / self.loss_population - 1.0

    @property
    def decisions_hold(self) -> bool | None:
        """Whether a classifier decides as with the population statistics:
        accuracy at most 1 point lower, or without labels at most 1 % of the
        predicted classes changed; None for a model that is not a classifier."""
        gap = self.accuracy_gap
        if gap is not None:
            return gap <= ACCURACY_GAP
        if self.changed_predictions is not None:
            return self.changed_predictions <= CHANGED_PREDICTIONS
        return None

    @property
    def acceptable(self) -> bool:
        """Whether the gap is within the thresholds: a classifier's decisions
        hold (`decisions_hold`); another model's loss rises by at most 5 %."""
        decisions = self.decisions_hold
        if decisions is not None:
            return decisions
        rise = self.loss_rise
        return rise is None or rise <= LOSS_RISE


class DiagnosisReport:
    """What `diagnose` found; `print(report)` shows it as a table, worst layer first.

    Attributes:
        layers: One `LayerDiagnosis` per BN layer the data reached, in the
            model's order.
        effect: The `ModelEffect` on the outputs, or None for a model with
            several outputs.
        healthy: Whether every layer is healthy and the model's gap is
            within the thresholds.
        samples: How many samples the statistics are over.
        batches: In how many batches.
        unreached: Names of BN layers the data never reached.
    """

    def __init__(self, model_name, layers, effect, samples, batches, unreached):
        self.model_name = model_name
        self.layers = list(layers)
        self.effect = effect
        self.samples = samples
        self.batches = batches
        self.unreached = list(unreached)
        self.healthy = all(layer.healthy for layer in self.layers) and (
            effect is None or effect.acceptable
        )

    def worst_first(self):
        """The layers, largest worst-channel error first (non-finite ones first of all)."""
        return sorted(
            self.layers,
            key=lambda layer: (
                -(
                    math.inf
                    if not math.isfinite(layer.error_worst)
                    else layer.error_worst
                )
            ),
        )

    def __repr__(self):
        return (
            f"<DiagnosisReport {self.model_name!r}: {len(self.layers)} BN "
            f"layer{'s' if len(self.layers) != 1 else ''}, "
            f"{'healthy' if self.healthy else 'unhealthy'}>"
        )

    def __str__(self):
        lines = [
            f"Batch normalization diagnosis of {self.model_name!r}: "
            f"{len(self.layers)} BN layer{'s' if len(self.layers) != 1 else ''}, "
            f"{self.samples} samples in {self.batches} batches: "
            + ("HEALTHY" if self.healthy else "UNHEALTHY"),
        ]
        if self.effect is not None:
            lines.append(_effect_line(self.effect))
        header = (
            "layer",
            "error worst (ch)",
            "typical",
            "mean shift worst/typ",
            "var ratio worst/typ",
            "healthy",
            "flags",
        )
        rows = [header]
        for layer in self.worst_first():
            rows.append(
                (
                    layer.name,
                    f"{layer.error_worst:.3f} ({layer.worst_channel})",
                    f"{layer.error_typical:.3f}",
                    f"{layer.mean_shift_worst:.2f} / {layer.mean_shift_typical:.2f}",
                    f"{layer.variance_ratio_worst:.2f} / {layer.variance_ratio_typical:.2f}",
                    "yes" if layer.healthy else "NO",
                    ", ".join(flag.kind for flag in layer.flags) or "-",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            lines.append(
                "  ".join(
                    cell.ljust(width)
                    for cell, width in zip(row, widths, strict=True)
                ).rstrip()
            )
        details = [
            f"- {layer.name}: {flag.message} Fix: {flag.fix}"
            for layer in self.worst_first()
            for flag in layer.flags
        ]
        if self.effect is not None and not self.effect.acceptable:
            details.append(
                "- model: the inference-mode outputs differ from those with the "
                "population statistics beyond the thresholds. Fix: "
                "bnlayers.recalibrate(model, training_data), or the "
                "bnlayers.PreciseBN callback during fit."
            )
        elif (
            self.effect is not None
            and self.effect.loss_rise is not None
            and self.effect.loss_rise > LOSS_RISE
        ):
            details.append(
                "- model: its decisions hold, but its inference-mode loss is "
                f"{self.effect.loss_rise + 1:.2f} times that with population "
                "statistics. Fix, for calibrated outputs: "
                "bnlayers.recalibrate(model, training_data)."
            )
        if self.unreached:
            details.append(
                f"- not reached by the data, not diagnosed: {', '.join(self.unreached)}"
            )
        if details:
            lines.append("")
            lines.extend(details)
        return "\n".join(lines)

    def plot(self, path=None, ax=None):
        """A bar chart of each layer's worst and typical channel error (needs matplotlib).

        Args:
            path: Optional file to save the figure to.
            ax: Optional matplotlib Axes to draw into.

        Returns:
            The matplotlib Figure.
        """
        try:
            import matplotlib

            if ax is None and path is not None:
                matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError(
                "`DiagnosisReport.plot` needs matplotlib (pip install matplotlib)."
            ) from error
        if ax is None:
            figure, ax = plt.subplots(
                figsize=(max(4.0, 0.6 * len(self.layers) + 2), 3.5)
            )
        else:
            figure = ax.figure
        positions = np.arange(len(self.layers))
        ax.bar(
            positions - 0.2,
            [layer.error_worst for layer in self.layers],
            0.4,
            label="worst channel",
            color=[
                "C3" if not layer.healthy else "C0" for layer in self.layers
            ],
        )
        ax.bar(
            positions + 0.2,
            [layer.error_typical for layer in self.layers],
            0.4,
            label="typical channel",
            color="C7",
        )
        ax.axhline(
            STALE_WORST, color="C3", lw=0.8, ls="--", label="stale (worst)"
        )
        ax.axhline(
            STALE_TYPICAL, color="C1", lw=0.8, ls=":", label="stale (typical)"
        )
        ax.set_xticks(positions)
        ax.set_xticklabels(
            [layer.name for layer in self.layers], rotation=45, ha="right"
        )
        ax.set_ylabel("inference-mode output error")
        ax.set_title(f"{self.model_name}: moving vs population statistics")
        ax.legend(fontsize="small")
        figure.tight_layout()
        if path is not None:
            figure.savefig(path, dpi=120)
        return figure


def _effect_line(effect):
    parts = []
    if effect.accuracy_inference is not None:
        parts.append(
            f"accuracy {effect.accuracy_inference:.1f} % in inference mode, "
            f"{effect.accuracy_population:.1f} % with population statistics "
            f"(gap {effect.accuracy_gap:.1f} points)"
        )
    if effect.loss_inference is not None:
        parts.append(
            f"loss {effect.loss_inference:.4g} vs {effect.loss_population:.4g}"
        )
    if effect.changed_predictions is not None:
        parts.append(
            f"{100 * effect.changed_predictions:.1f} % of predictions change"
        )
    parts.append(f"output change {effect.output_change:.3f}")
    return "Model: " + "; ".join(parts)


def diagnose(
    model: keras.Model,
    x: Any,
    y: Any = None,
    *,
    batch_size: int | None = None,
    steps: int | None = None,
    loss: Any = None,
    verbose: str | int = 0,
) -> DiagnosisReport:
    """Compares every BN layer's moving statistics with the population statistics of `x`.

    A model that does well in training mode and worse in inference mode
    nearly always has moving statistics that are not those of its data:
    they lag behind the weights early in training (the moving average
    remembers its start for about `1 / (1 - momentum)` steps), they are
    noisy when batches are small, and they are wrong when batches are not
    drawn at random. `diagnose` runs the model over `x` as `recalibrate`
    does (BN layers normalizing with the statistics of each batch, the
    rest in inference mode), computes each layer's exact population
    statistics in float64, and reports per layer and channel how far the
    moving statistics are from them (see `LayerDiagnosis`) and, for the
    model, the loss and accuracy in inference mode against the same
    weights with the population statistics (see `ModelEffect`).

    Use the data and batch size the model was trained with: population
    statistics are those of the activations each layer normalized in
    training.

    Each layer gets flags, each with the fix it suggests: `stale`,
    `non-finite`, `collapsed`, `frozen`, `after-dropout` and `small-batches`
    (see `Flag` for what raises each).

    Non-finite statistics make a layer unhealthy; stale ones do too, unless
    the model's outputs are within the thresholds, where the stale flag
    stays as a warning with what it costs. The model is healthy when every
    layer is and the gap leaves its decisions as they are: a classifier's
    inference-mode accuracy at most 1 point below that with population
    statistics (without labels: at most 1 % of the predicted classes
    change); for other models, a loss at most 5 % higher.

    The model is left exactly as it was: statistics are swapped in for the
    comparison and every BN variable is restored afterwards.

    ```python
    report = bnlayers.diagnose(model, x_train, y_train, batch_size=64)
    print(report)
    if not report.healthy:
        bnlayers.recalibrate(model, x_train, batch_size=64)
    ```

    Args:
        model: A built `keras.Model` of any kind with
            `keras.layers.BatchNormalization` or `bnlayers.BatchNormalization`
            layers (nested ones too).
        x: As in `model.evaluate`: arrays (a list or dict of arrays for
            several inputs), a `tf.data.Dataset`, a `keras.utils.PyDataset`
            or a generator yielding inputs or `(inputs, labels)`. A
            generator is read once and its batches kept in memory.
        y: Labels for array `x`, optional.
        batch_size: For array data only: the batch size (default 32).
        steps: Optional positive int: use at most this many batches.
        loss: The loss to compare (a name or a `keras.losses.Loss`);
            default: the model's compiled loss, else sparse or plain
            categorical crossentropy for class labels and mean squared
            error otherwise.
        verbose: 0 (default) or 1 for progress bars, 2 for a line per pass.

    Returns:
        A `DiagnosisReport`.
    """
    check_model(model, "diagnose")
    check_positive(steps, "steps")
    verbose = _recal._check_verbose(verbose) if verbose != 0 else 0
    check_built(model, "diagnose")
    layers = _layers_to_diagnose(model)
    source = _Source(x, y, batch_size, steps)
    passes = _passes(model, layers, source, verbose, x)
    return _report(model, layers, passes, loss)


def _layers_to_diagnose(model):
    layers = [layer for layer in batchnorm_layers(model) if layer.built]
    if not layers:
        raise ValueError(
            "`diagnose` found no BatchNormalization layer (keras.layers or "
            f"bnlayers) in the model. Received: model={model.name!r}"
        )
    return layers


def _report(model, layers, passes, loss):
    """The `DiagnosisReport` of what the passes over the data found."""
    diagnosed = [
        _diagnose_layer(model, layer, passes.statistics[i], passes.moments[i])
        for i, layer in enumerate(layers)
        if i in passes.statistics
    ]
    unreached = [
        layer.name
        for i, layer in enumerate(layers)
        if i not in passes.statistics
    ]
    effect = _effect(passes.current, passes.population, loss, model)
    if effect is not None and effect.acceptable:
        diagnosed = [_without_verdict(layer, effect) for layer in diagnosed]
    return DiagnosisReport(
        model.name,
        diagnosed,
        effect,
        passes.current.samples,
        passes.batches,
        unreached,
    )


def _without_verdict(layer, effect):
    """`layer` with its `stale` flag turned into a warning: the model's
    outputs are within the thresholds, so the stale statistics do not make
    it unhealthy, but what they cost is said."""
    flags = []
    for flag in layer.flags:
        if flag.kind == "stale":
            cost = (
                f" The model's decisions hold (accuracy {effect.accuracy_gap:.1f} "
                "points below that with population statistics)"
                if effect.accuracy_gap is not None
                else " The model's outputs are within the thresholds"
            )
            flag = dataclasses.replace(
                flag, problem=False, message=flag.message + cost + "."
            )
        flags.append(flag)
    return dataclasses.replace(
        layer,
        flags=tuple(flags),
        healthy=not any(flag.problem for flag in flags),
    )


# ------------------------------------------------------------------- data


class _Source:
    """The data as `evaluate` takes it, readable more than once: batches of `(x, y or None)`."""

    def __init__(self, x, y, batch_size, steps):
        self.steps = steps
        if _recal._is_dataset(x) or isinstance(x, keras.utils.PyDataset):
            self._reject(y, "y", x)
            self._reject(batch_size, "batch_size", x)
            self._kind = "dataset"
            self._data = x
            self.target = _recal._dataset_batches(x, steps)[1]
        elif isinstance(x, (np.ndarray, dict, list, tuple)) or _recal._is_array(
            x
        ):
            if isinstance(x, tuple):
                if y is not None:
                    raise ValueError(
                        "`x` is a tuple, read as (inputs, labels), and `y` is given too. "
                        "Pass the inputs as a list for a model with several inputs. "
                        f"Received: x of type tuple, y of type {type(y).__name__}"
                    )
                x, y = keras.utils.unpack_x_y_sample_weight(x)[:2]
            leaves = keras.tree.flatten(x)
            if not leaves or not all(_recal._is_array(leaf) for leaf in leaves):
                raise TypeError(
                    "`x` given as arrays must hold only arrays. "
                    f"Received: x of type {type(x).__name__}"
                )
            batch_size = _recal._array_batch_size(batch_size)
            size = int(leaves[0].shape[0])
            if (
                y is not None
                and int(np.shape(keras.tree.flatten(y)[0])[0]) != size
            ):
                raise ValueError(
                    "`x` and `y` must hold the same number of samples. Received: "
                    f"{size} inputs and {np.shape(keras.tree.flatten(y)[0])[0]} labels"
                )
            self._kind = "arrays"
            self._data = (x, y, batch_size, size)
            self.target = _recal._at_most(math.ceil(size / batch_size), steps)
        elif hasattr(x, "__iter__") or hasattr(x, "__next__"):
            self._reject(y, "y", x)
            self._reject(batch_size, "batch_size", x)
            self._kind = "cached"
            self._data = [
                self._split(element)
                for element in itertools.islice(iter(x), steps)
            ]
            self.target = len(self._data)
        else:
            raise TypeError(
                "`x` must be arrays, a tf.data.Dataset, a keras.utils.PyDataset or a "
                f"generator of batches. Received: x={x!r} of type {type(x).__name__}"
            )

    @staticmethod
    def _reject(value, name, x):
        if value is not None:
            raise ValueError(
                f"`{name}` is for array data; a dataset or generator brings its own "
                f"batches and labels. Received: {name} of type {type(value).__name__} "
                f"with x of type {type(x).__name__}"
            )

    @staticmethod
    def _split(element):
        if isinstance(element, tuple):
            x, y, _ = keras.utils.unpack_x_y_sample_weight(element)
            return x, y
        return element, None

    def batches(self):
        if self._kind == "cached":
            yield from self._data
        elif self._kind == "dataset":
            if _recal._is_dataset(self._data):
                iterator = iter(self._data)
            else:
                iterator = (self._data[i] for i in range(len(self._data)))
            for element in itertools.islice(iterator, self.steps):
                yield self._split(element)
        else:
            x, y, batch_size, size = self._data
            starts = range(0, size, batch_size)
            for start in itertools.islice(starts, self.steps):
                cut = slice(start, start + batch_size)
                yield (
                    keras.tree.map_structure(lambda a, c=cut: a[c], x),
                    None
                    if y is None
                    else keras.tree.map_structure(
                        lambda a, c=cut: np.asarray(a)[c], y
                    ),
                )

    def inputs(self):
        return (x for x, _ in self.batches())


@contextlib.contextmanager
def _progress(source, verbose, name):
    if verbose:
        print(f"diagnose: {name}")
    yield _recal._progbar(source.target, verbose)


# ------------------------------------------------------------ the passes


def _inference_function(model):
    def forward(x):
        return model(x, training=False)

    if backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(forward, reduce_retracing=True)
    return forward


@dataclasses.dataclass
class _Outputs:
    outputs: list
    labels: list
    samples: int
    several: bool


@dataclasses.dataclass
class _Passes:
    """What the three passes over the data give."""

    current: _Outputs  # the model's outputs in inference mode, as it is
    moments: dict  # per index into the layers: each batch's (count, mean, m2)
    statistics: dict  # per index: the merged (count, mean, variance)
    batches: int
    population: _Outputs  # the outputs with the population statistics


def _passes(model, layers, source, verbose, x):
    """The three runs over the data: as it is, recording, with population statistics."""
    forward = _inference_function(model)
    with _progress(source, verbose, "inference mode") as progbar:
        current = _outputs(forward, source, progbar)
    with _progress(source, verbose, "population statistics") as progbar:
        moments, statistics, seen = _recal._population_moments(
            model, layers, source.inputs(), progbar, ("x", x, source.steps)
        )
    with _population_statistics(layers, statistics):
        with _progress(
            source, verbose, "population statistics, inference"
        ) as progbar:
            population = _outputs(forward, source, progbar)
    return _Passes(current, moments, statistics, seen, population)


def _outputs(forward, source, progbar):
    outputs, labels = [], []
    samples = 0
    several = False
    for step, (x, y) in enumerate(source.batches(), 1):
        out = forward(x)
        if not _is_single(out):
            several = True
            out = keras.tree.flatten(out)[0]
        out = np.asarray(ops.convert_to_numpy(out))
        outputs.append(out)
        labels.append(None if y is None else keras.tree.flatten(y))
        samples += out.shape[0]
        _recal._progress_step(progbar, step)
    _recal._progress_end(progbar, len(outputs))
    return _Outputs(outputs, labels, samples, several)


def _is_single(out):
    return not isinstance(out, (list, tuple, dict))


@contextlib.contextmanager
def _population_statistics(layers, statistics):
    """Trainable layers with their population statistics (as `recalibrate` sets them)."""
    snapshot = [
        (v, ops.convert_to_numpy(v))
        for layer in layers
        for v in layer.non_trainable_weights
    ]
    try:
        _recal._assign_population_statistics(layers, statistics)
        yield
    finally:
        for variable, value in snapshot:
            variable.assign(value)


# ------------------------------------------------------------ the findings


def _diagnose_layer(model, layer, merged, triples):
    """One layer's `LayerDiagnosis`, from its population statistics and its batches' moments."""
    total, mean, var = merged
    eps = float(layer.epsilon)
    moving_mean = to_numpy64(layer.moving_mean).reshape(-1)
    moving_var = to_numpy64(layer.moving_variance).reshape(-1)
    mean = np.asarray(mean, "float64").reshape(-1)
    var = np.asarray(var, "float64").reshape(-1)
    counted = np.asarray(total).reshape(-1) > 0
    with np.errstate(all="ignore"):
        pop_std = np.sqrt(var + eps)
        shift = np.abs(moving_mean - mean) / pop_std
        ratio = (moving_var + eps) / (var + eps)
        r = pop_std / np.sqrt(moving_var + eps)
        d = (mean - moving_mean) / np.sqrt(moving_var + eps)
        error = np.sqrt((r - 1.0) ** 2 + d**2)
        noise = _batch_noise(triples, mean, var, eps)
    error = np.where(counted, error, 0.0)
    finite = bool(
        np.all(np.isfinite(moving_mean))
        and np.all(np.isfinite(moving_var))
        and np.all(np.isfinite(mean[counted]))
        and np.all(np.isfinite(var[counted]))
    )
    figures: dict[str, Any] = dict(
        _summary(error, shift, ratio, counted, finite),
        batch_noise=noise,
        collapsed_channels=_collapsed_channels(layer, var, counted, eps),
        population_mean=mean,
        population_variance=var,
        error=error,
        mean_shift=shift,
        variance_ratio=ratio,
    )
    flags = _flags(model, layer, finite, figures)
    return LayerDiagnosis(
        name=layer.name,
        path=layer.path,
        class_name=f"{type(layer).__module__.split('.')[0]}.{type(layer).__name__}",
        channels=int(mean.size),
        healthy=not any(flag.problem for flag in flags),
        flags=tuple(flags),
        trainable=bool(layer.trainable),
        **figures,
    )


def _summary(error, shift, ratio, counted, finite):
    """The worst and the typical (median) channel's figures, by `LayerDiagnosis`' names."""
    if finite:
        worst = int(np.argmax(error))
        error_worst = float(error[worst])
        error_typical = (
            float(np.median(error[counted])) if counted.any() else 0.0
        )
    else:
        bad = ~np.isfinite(error)
        worst = int(np.argmax(bad)) if bad.any() else int(np.argmax(error))
        error_worst = math.inf
        error_typical = float(np.nanmedian(np.where(bad, np.nan, error)))
    log_ratio = np.abs(np.log(ratio))
    return dict(
        worst_channel=worst,
        error_worst=error_worst,
        error_typical=error_typical,
        mean_shift_worst=float(np.max(shift)) if finite else math.inf,
        mean_shift_typical=float(np.median(shift[counted]))
        if counted.any()
        else 0.0,
        variance_ratio_worst=float(ratio[int(np.nanargmax(log_ratio))])
        if finite
        else math.nan,
        variance_ratio_typical=float(np.median(ratio[counted]))
        if counted.any()
        else 1.0,
    )


def _collapsed_channels(layer, var, counted, eps):
    """How many counted channels have a constant input or a gamma near 0."""
    collapsed = var < COLLAPSED_VARIANCE * eps
    if layer.scale:
        collapsed = collapsed | (
            np.abs(to_numpy64(layer.gamma).reshape(-1)) < COLLAPSED_GAMMA
        )
    return int((collapsed & counted).sum())


def _batch_noise(triples, mean, var, eps):
    """The typical channel's RMS output error of normalizing with one batch's statistics.

    In the units of `LayerDiagnosis.error`: how far each batch's mean and
    variance are from the population's, as the layer's output sees it.
    """
    if len(triples) < 2:
        return 0.0
    counts, means, m2s = (
        np.stack([np.asarray(t[k], "float64").reshape(-1) for t in triples])
        for k in range(3)
    )
    with np.errstate(all="ignore"):
        batch_std = np.sqrt(m2s / counts + eps)
        r = np.sqrt(var + eps) / batch_std
        d = (mean - means) / batch_std
        squared = np.where(counts > 0, (r - 1.0) ** 2 + d**2, np.nan)
        spread = np.sqrt(np.nanmean(squared, axis=0))
    spread = spread[np.isfinite(spread)]
    return float(np.median(spread)) if spread.size else 0.0


def _flags(model, layer, finite, figures):
    """The findings about one layer, in the order the report lists them."""
    found = (
        _statistics_flag(layer, finite, figures),
        _collapsed_flag(figures["collapsed_channels"]),
        _frozen_flag(layer),
        _after_dropout_flag(model, layer),
        _small_batches_flag(figures["batch_noise"]),
    )
    return [flag for flag in found if flag is not None]


def _statistics_flag(layer, finite, figures):
    """`non-finite` or `stale` moving statistics, or None."""
    if not finite:
        return Flag(
            "non-finite",
            True,
            "NaN or infinite moving or population statistics.",
            "find where the activations or weights become non-finite (a lower "
            "learning rate, gradient clipping, mixed-precision loss scaling); "
            "then bnlayers.recalibrate(model, training_data).",
        )
    typical, worst = figures["error_typical"], figures["error_worst"]
    if not (typical > STALE_TYPICAL or worst > STALE_WORST):
        return None
    channel = figures["worst_channel"]
    shift = float(figures["mean_shift"][channel])
    ratio = float(figures["variance_ratio"][channel])
    return Flag(
        "stale",
        True,
        f"moving statistics far from the data's: output error {typical:.3f} "
        f"(typical channel), {worst:.3f} (channel {channel}: mean shifted by "
        f"{shift:.2f} population std, variance ratio {ratio:.2f}).",
        "the layer is frozen (trainable=False), so neither training nor "
        "recalibrate update it: set trainable=True and recalibrate, or leave "
        "it frozen only where its statistics fit the new data."
        if not layer.trainable
        else "bnlayers.recalibrate(model, training_data) after training, or the "
        "bnlayers.PreciseBN callback in fit; or freeze the statistics for the last "
        "epochs (bnlayers.FreezeBNStatistics).",
    )


def _collapsed_flag(collapsed):
    if not collapsed:
        return None
    return Flag(
        "collapsed",
        False,
        f"{collapsed} channel{'s' if collapsed != 1 else ''} with input variance "
        f"below {COLLAPSED_VARIANCE:g} epsilon or |gamma| below {COLLAPSED_GAMMA:g}: "
        "a constant output.",
        "usually dead ReLU units before the layer or weight decay on gamma; "
        "a lower learning rate or less decay on gamma, or prune the channels.",
    )


def _frozen_flag(layer):
    if layer.trainable:
        return None
    return Flag(
        "frozen",
        False,
        "trainable=False: it normalizes with its moving statistics in training "
        "too and neither fit nor recalibrate changes them.",
        "intended when fine-tuning on little data; otherwise set trainable=True.",
    )


def _after_dropout_flag(model, layer):
    dropout = _dropout_before(model, layer)
    if dropout is None:
        return None
    return Flag(
        "after-dropout",
        False,
        f"its input comes straight from {dropout!r}: in training the dropout "
        "scales the variance the layer normalizes, at inference it does not.",
        "move the dropout after the BN layer (or to the end of the block); "
        "bnlayers.recalibrate computes statistics with dropout off.",
    )


def _small_batches_flag(noise):
    if not noise > BATCH_NOISE:
        return None
    return Flag(
        "small-batches",
        False,
        f"one batch's statistics are {noise:.2f} from the population's (output "
        "error, typical channel): the batch statistics used in training are noisy "
        "(use the training batch size for the diagnosis).",
        "larger batches (or synchronized=True across devices), renorm=True, or "
        "a normalization that does not use the batch (GroupNormalization); "
        "recalibrate after training.",
    )


def _dropout_before(model, layer):
    """The name of the dropout layer feeding `layer` directly, or None."""
    del model
    try:
        producer = internals.producer(layer.input)
    except (AttributeError, ValueError):  # not called once in a graph
        return None
    if (
        isinstance(producer, _DROPOUTS)
        and float(getattr(producer, "rate", 0)) > 0
    ):
        return producer.name
    return None


def _effect(current, population, loss, model):
    if current.several or not current.outputs:
        return None
    a = np.concatenate(current.outputs).astype("float64")
    b = np.concatenate(population.outputs).astype("float64")
    with np.errstate(all="ignore"):
        output_change = float(
            np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b**2)), 1e-30)
        )
    classifier = a.ndim >= 2 and a.shape[-1] > 1
    changed = (
        float(np.mean(np.argmax(a, -1) != np.argmax(b, -1)))
        if classifier
        else None
    )
    labels = current.labels
    if any(y is None for y in labels) or not labels:
        return ModelEffect(None, None, None, None, changed, output_change)
    y = np.concatenate(
        [np.asarray(ops.convert_to_numpy(part[0])) for part in labels]
    )
    loss_fn = _loss(loss, model, y, a)
    losses = [
        _mean_loss(loss_fn, y, out) if loss_fn is not None else None
        for out in (a, b)
    ]
    accuracies = [_accuracy(y, out) if classifier else None for out in (a, b)]
    return ModelEffect(
        losses[0],
        losses[1],
        accuracies[0],
        accuracies[1],
        changed,
        output_change,
    )


def _loss(loss, model, y, outputs):
    if loss is None:
        compiled = getattr(model, "loss", None)
        if compiled is not None and not isinstance(compiled, (list, dict)):
            loss = compiled
    if loss is not None:
        return keras.losses.get(loss)
    probabilities = bool(
        np.all(outputs >= 0) and np.allclose(outputs.sum(-1), 1.0, atol=1e-3)
    )
    if outputs.ndim >= 2 and outputs.shape[-1] > 1:
        if y.ndim == outputs.ndim and y.shape[-1] == outputs.shape[-1]:
            return keras.losses.CategoricalCrossentropy(
                from_logits=not probabilities
            )
        if np.issubdtype(y.dtype, np.integer) or np.all(y == np.round(y)):
            return keras.losses.SparseCategoricalCrossentropy(
                from_logits=not probabilities
            )
    return keras.losses.MeanSquaredError()


def _mean_loss(loss_fn, y, outputs, chunk=1024):
    total = 0.0
    for start in range(0, len(y), chunk):
        part = slice(start, start + chunk)
        value = loss_fn(
            ops.convert_to_tensor(y[part]),
            ops.convert_to_tensor(outputs[part].astype("float32")),
        )
        # A loss function gives one value per sample, a Loss object their mean.
        total += float(np.mean(ops.convert_to_numpy(value))) * len(y[part])
    return total / len(y)


def _accuracy(y, outputs):
    predicted = np.argmax(outputs, -1)
    if y.ndim == outputs.ndim and y.shape[-1] == outputs.shape[-1]:
        truth = np.argmax(y, -1)
    else:
        truth = y.reshape(predicted.shape)
    return float(100.0 * np.mean(predicted == truth))


# ------------------------------------------------------------ command line


def main(argv=None):
    """The command line: `python -m bnlayers.tools.diagnose_cli model.keras data.npz`."""
    parser = argparse.ArgumentParser(
        prog="bnlayers-diagnose",
        description="Diagnose the batch normalization layers of a saved Keras model: "
        "how far their moving statistics are from the population statistics of the "
        "data, and what that does to the model's outputs. Exit status: 0 healthy, "
        "1 unhealthy, 2 bad arguments or files.",
    )
    parser.add_argument("model", help="a saved .keras model file")
    parser.add_argument(
        "data",
        help="an .npz file with the inputs (key 'x', or the only array) and "
        "optional labels (key 'y')",
    )
    parser.add_argument(
        "--x-key", default=None, help="the inputs' key in the .npz"
    )
    parser.add_argument(
        "--y-key", default=None, help="the labels' key in the .npz"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--plot", default=None, help="save a plot of the gap here"
    )
    parser.add_argument("--verbose", type=int, default=0, choices=(0, 1, 2))
    args = parser.parse_args(argv)
    try:
        model = _load_model(args.model)
        x, y = _load_data(args.data, args.x_key, args.y_key)
        if not batchnorm_layers(model):
            raise _UsageError(
                f"{args.model}: the model {model.name!r} holds no BatchNormalization layer"
            )
        report = diagnose(
            model,
            x,
            y,
            batch_size=args.batch_size,
            steps=args.steps,
            verbose=args.verbose,
        )
    except _UsageError as error:
        print(f"bnlayers-diagnose: error: {error}", file=sys.stderr)
        return 2
    print(report)
    if args.plot:
        report.plot(path=args.plot)
        print(f"plot saved to {args.plot}")
    return 0 if report.healthy else 1


class _UsageError(Exception):
    pass


def _load_model(path):
    import pathlib

    import bnlayers  # noqa: F401  (registers bnlayers.BatchNormalization)

    if not pathlib.Path(path).is_file():
        raise _UsageError(f"{path}: no such file")
    try:
        model = keras.saving.load_model(path)
    except Exception as error:  # Keras raises many kinds for a bad file
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if len(first) > 160:  # Keras' messages run on with advice about formats
            first = first[: first.rfind(". ", 0, 160) + 1] or first[:160]
        raise _UsageError(
            f"{path}: not a Keras model file that loads ({type(error).__name__}: "
            f"{first[:200]})"
        ) from error
    if not isinstance(model, keras.Model):
        raise _UsageError(
            f"{path}: holds a {type(model).__name__}, not a keras.Model"
        )
    return model


def _load_data(path, x_key, y_key):
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise _UsageError(
            f"{path}: not an .npz file that loads ({error})"
        ) from error
    if not hasattr(data, "files"):
        raise _UsageError(
            f"{path}: a single array, not an .npz file of named arrays"
        )
    with data:
        keys = list(data.files)
        if x_key is None:
            x_key = (
                "x" if "x" in keys else (keys[0] if len(keys) == 1 else None)
            )
        if x_key is None or x_key not in keys:
            raise _UsageError(
                f"{path}: no inputs found; name them 'x' or pass --x-key. "
                f"Keys in the file: {keys}"
            )
        if y_key is None:
            y_key = "y" if "y" in keys else None
        elif y_key not in keys:
            raise _UsageError(
                f"{path}: no key {y_key!r}. Keys in the file: {keys}"
            )
        return data[x_key], (data[y_key] if y_key else None)
