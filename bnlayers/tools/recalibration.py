"""`recalibrate`: moving statistics replaced by exact population statistics over data.

The module is not named after the function so that `bnlayers.tools.recalibrate`
is the function alone, never this module.
"""

import collections
import contextlib
import itertools
import math
import numbers
from typing import Any

import keras
import numpy as np
from keras import backend
from keras import ops

from bnlayers import _geometry
from bnlayers import _math
from bnlayers.tools._common import batchnorm_layers
from bnlayers.tools._common import check_built
from bnlayers.tools._common import check_model
from bnlayers.tools._common import check_positive

_VERBOSE = ("auto", 0, 1, 2)


def recalibrate(
    model: keras.Model,
    data: Any,
    steps: int | None = None,
    *,
    batch_size: int | None = None,
    verbose: str | int = "auto",
) -> keras.Model:
    """Sets every BN layer's moving statistics to the exact population statistics over `data`.

    During training the moving mean and variance are exponential averages
    of past batches, taken while the weights were still changing, and they
    remember their initial values (0 and 1) for about `1 / (1 - momentum)`
    steps: 100 with the default momentum of 0.99. A model trained for a
    short while can therefore classify well while its inference-mode loss
    is poor. Recalibration (fvcore's PreciseBN, Wu & Johnson 2021) runs the
    model over `data` with its weights fixed and sets each layer's
    `moving_mean` and `moving_variance` to the exact mean and (biased)
    variance of that layer's inputs over all of `data`, per feature:
    per-batch moments are merged exactly (Chan et al.) in float64, so the
    variance includes the spread between batches, not just within them.

    What each layer sees: the model runs in inference mode (dropout off,
    augmentation layers off) except the BN layers being recalibrated,
    which normalize with the statistics of the current batch, as in
    training. So each layer's statistics are those of the activations it
    normalized during training, computed in a single pass; a later BN's
    inputs depend on earlier BN layers through their batch statistics, not
    through their new moving ones, so use batches as large as in training.
    Masks are honoured (masked positions are left out), as in training,
    by Keras' rule: a mask covers every axis of the inputs but the last.

    Nothing else changes: weights, gamma and beta, the renorm statistics
    (`renorm_mean`, `renorm_stddev`), the optimizer state and every other
    layer are left exactly as they were. With `renorm=True`, `moving_stddev`
    is set to `sqrt(moving_variance + epsilon)`, as the layer keeps them.
    BN layers with `trainable=False` (frozen, see `freeze_batchnorm`) are
    left as they are, and so are BN layers the data never reaches and
    features that every batch masks out entirely. A model without any BN
    layer to recalibrate is returned unchanged.

    ```python
    model.fit(x_train, y_train, epochs=1, batch_size=64)
    bnlayers.recalibrate(model, x_train, batch_size=64)
    model.evaluate(x_test, y_test)
    ```

    Args:
        model: A built `keras.Model` of any kind (nested models and BN
            layers inside custom layers are found too) with
            `keras.layers.BatchNormalization` or `bnlayers.BatchNormalization`
            layers.
        data: The inputs to compute the statistics over: a `tf.data.Dataset`
            or `keras.utils.PyDataset` of batches, arrays (`x`, or a tuple
            `(x, y)` / `(x, y, sample_weight)`; `x` may be a list or dict of
            arrays for a model with several inputs), or a generator or
            iterator of batches of the same forms. Only `x` is used.
        steps: Optional positive int: use at most this many batches. Needed
            for an endless dataset or generator.
        batch_size: For array data only: the batch size (default 32).
        verbose: `"auto"`, 0, 1 or 2, as in `model.predict`: 0 is silent,
            1 shows a progress bar over the batches, 2 one line at the end.
            `"auto"` means 1.

    Returns:
        `model`, modified in place.
    """
    check_model(model, "recalibrate")
    check_positive(steps, "steps")
    verbose = _check_verbose(verbose)
    check_built(model, "recalibrate")
    layers = _layers_to_recalibrate(model)
    batches, target = _batches(data, steps, batch_size)
    if not layers:
        return model
    _, statistics, _ = _population_moments(
        model, layers, batches, _progbar(target, verbose), ("data", data, steps)
    )
    _assign_population_statistics(layers, statistics)
    return model


def _layers_to_recalibrate(model):
    """The BN layers whose statistics `recalibrate` sets: built and trainable."""
    return [
        layer
        for layer in batchnorm_layers(model)
        if layer.trainable and layer.built
    ]


def _check_verbose(verbose):
    """`verbose` as Progbar takes it; Keras' `predict` takes the same values."""
    if isinstance(verbose, str) and verbose == "auto":
        return 1
    if isinstance(verbose, numbers.Integral) and int(verbose) in (0, 1, 2):
        return int(verbose)  # bools too, as Keras takes them
    raise ValueError(
        f"`verbose` must be one of {_VERBOSE}. Received: verbose={verbose!r}"
    )


# ------------------------------------------------------------------- data


def _batches(data, steps, batch_size):
    """`(iterator over the x part of each batch, number of batches or None)`.

    At most `steps` batches. Bad arguments raise here, before any batch is
    drawn.
    """
    if _is_dataset(data) or isinstance(data, keras.utils.PyDataset):
        if batch_size is not None:
            raise ValueError(
                "`batch_size` is for array data; a dataset is already batched. "
                f"Received: batch_size={batch_size!r} with data of type {type(data).__name__}"
            )
        return _dataset_batches(data, steps)
    if isinstance(data, (np.ndarray, dict, tuple, list)) or _is_array(data):
        return _array_batches(data, steps, batch_size)
    if hasattr(data, "__iter__") or hasattr(data, "__next__"):
        if batch_size is not None:
            raise ValueError(
                "`batch_size` is for array data; a generator yields whole batches. "
                f"Received: batch_size={batch_size!r}"
            )
        return _take(iter(data), steps, unpack=True), steps
    raise TypeError(
        "`data` must be a tf.data.Dataset, a keras.utils.PyDataset, arrays (x, or a "
        "tuple (x, y)), or a generator of batches. "
        f"Received: data={data!r} of type {type(data).__name__}"
    )


def _is_dataset(data):
    if backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return isinstance(data, tf.data.Dataset)


def _is_array(value):
    return (
        hasattr(value, "shape")
        and hasattr(value, "dtype")
        and len(value.shape) > 0
    )


def _dataset_batches(data, steps):
    if _is_dataset(data):
        known = int(data.cardinality())
        iterator = iter(data)
    else:
        known = len(data)
        iterator = (data[i] for i in range(known))
    target = (
        known if known >= 0 else None
    )  # tf.data's -1 / -2: infinite or unknown
    return _take(iterator, steps, unpack=True), _at_most(target, steps)


def _array_batches(data, steps, batch_size):
    leaves = keras.tree.flatten(data)
    if not leaves or not all(_is_array(leaf) for leaf in leaves):
        raise TypeError(
            "`data` given as arrays must hold only arrays (x, or a tuple (x, y) or "
            f"(x, y, sample_weight)). Received: data of type {type(data).__name__}"
        )
    # As in `fit`: a tuple is (x, y[, sample_weight]); a list or dict is
    # the inputs of a model with several.
    x = (
        keras.utils.unpack_x_y_sample_weight(data)[0]
        if isinstance(data, tuple)
        else data
    )
    batch_size = _array_batch_size(batch_size)
    size = int(keras.tree.flatten(x)[0].shape[0])
    iterator = (
        keras.tree.map_structure(lambda a, s=start: a[s : s + batch_size], x)
        for start in range(0, size, batch_size)
    )
    return _take(iterator, steps, unpack=False), _at_most(
        math.ceil(size / batch_size), steps
    )


def _array_batch_size(batch_size):
    """The batch size for array data: 32 unless given, as in `predict`."""
    if batch_size is None:
        return 32
    check_positive(batch_size, "batch_size", allow_none=False)
    return int(batch_size)


def _at_most(count, steps):
    if steps is None:
        return count
    return steps if count is None else min(count, steps)


def _take(iterator, steps, unpack):
    # islice stops before drawing batch `steps + 1`, which a generator may
    # not have or may be costly to make.
    for element in itertools.islice(iterator, steps):
        yield (
            keras.utils.unpack_x_y_sample_weight(element)[0]
            if unpack
            else element
        )


# ------------------------------------------------------- the calibration pass


@contextlib.contextmanager
def _calibration_mode(layers):
    """Hooks `layers` to record their batch moments; yields the record, a dict.

    Each hooked call appends `(count, mean, m2)` per feature to
    `record[i]`, `i` the layer's index in `layers`. Training-mode calls
    would move the statistics; momentum 1 keeps them (and renorm's r and d)
    fixed during the pass, and the snapshot puts back every bit afterwards
    whatever the layer's arithmetic.
    """
    captured: dict[Any, Any] = {}
    snapshot = [
        (v, ops.convert_to_numpy(v))
        for layer in layers
        for v in layer.non_trainable_weights
    ]
    # A `call` set on the instance is another tool's (FreezeBNStatistics'
    # during its frozen epochs): it goes back in place afterwards.
    settings = [
        (
            layer,
            layer.momentum,
            getattr(layer, "renorm_momentum", None),
            vars(layer).get("call"),
        )
        for layer in layers
    ]
    try:
        for i, layer in enumerate(layers):
            layer.call = _moments_hook(i, layer, layer.call, captured)
            layer.momentum = 1.0
            if getattr(layer, "renorm", False):
                layer.renorm_momentum = 1.0
        yield captured
    finally:
        for layer, momentum, renorm_momentum, call in settings:
            if call is not None:
                layer.call = call
            elif "call" in vars(layer):
                del layer.call
            layer.momentum = momentum
            if getattr(layer, "renorm", False):
                layer.renorm_momentum = renorm_momentum
        for variable, value in snapshot:
            variable.assign(value)


def _moments_hook(key, layer, original, captured):
    """A `call` for `layer` that records its inputs' moments, then normalizes as in training."""

    def hook(inputs, training=None, mask=None, **kwargs):
        ndim = len(inputs.shape)
        features = _geometry.feature_axes(layer.axis, ndim)
        reduction = _geometry.reduction_axes(features, ndim)
        x = ops.cast(inputs, _math.statistics_dtype(inputs.dtype))
        weights = _geometry.expand_mask(mask, ndim, features, inputs.shape)
        count, mean, m2 = _math.moments(x, reduction, weights)
        shape = layer.moving_mean.shape
        count = ops.reshape(ops.broadcast_to(count, ops.shape(mean)), shape)
        captured.setdefault(key, []).append(
            (count, ops.reshape(mean, shape), ops.reshape(m2, shape))
        )
        return original(inputs, training=True, mask=mask, **kwargs)

    return hook


def _forward_function(model, captured):
    """One inference-mode pass of `model`, returning what the hooks recorded."""

    def forward(x):
        captured.clear()
        model(x, training=False)
        return dict(captured)

    if backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(forward, reduce_retracing=True)
    return forward


def _population_moments(model, layers, batches, progbar, argument):
    """Runs `model` over `batches` with `layers` recording: `(moments, statistics, batch count)`.

    Per index into `layers` of a layer the data reached, `moments` holds
    each batch's `(count, mean, m2)` and `statistics` their merged `(count,
    mean, variance)`. `argument` is `(name, value, steps)` of the data
    argument, for the error when there are no batches.
    """
    with _calibration_mode(layers) as captured:
        moments, seen = _collect_moments(
            _forward_function(model, captured), batches, progbar
        )
    if not seen:
        name, data, steps = argument
        raise ValueError(
            f"`{name}` yielded no batches, so there is nothing to compute "
            f"statistics over. Received: {name} of type {type(data).__name__}, "
            f"steps={steps!r}"
        )
    statistics = {
        i: _merged_statistics(moments[i])
        for i in range(len(layers))
        if moments.get(i)
    }
    return moments, statistics, seen


def _collect_moments(forward, batches, progbar):
    """Runs `forward` over `batches`: `(moments per layer as float64 arrays, batch count)`."""
    collected = collections.defaultdict(list)
    seen = 0
    for x in batches:
        for key, triples in forward(x).items():
            for triple in triples:
                collected[key].append(
                    [ops.convert_to_numpy(t).astype("float64") for t in triple]
                )
        seen += 1
        _progress_step(progbar, seen)
    _progress_end(progbar, seen)
    return collected, seen


# -------------------------------------------------------------- progress


def _progbar(target, verbose):
    """A progress bar over `target` batches, or None when `verbose` is 0."""
    if not verbose:
        return None
    return keras.utils.Progbar(target, verbose=verbose, unit_name="step")


def _progress_step(progbar, step):
    # Verbose 2 prints only the line at the end, as Keras' `predict` does.
    if progbar is not None and progbar.verbose == 1:
        progbar.update(step, finalize=False)


def _progress_end(progbar, steps):
    """Ends the bar after `steps` batches, as Keras' ProgbarLogger ends `predict`."""
    if progbar is not None and steps:
        if progbar.target is None:
            progbar.target = steps
        progbar.update(progbar.target, finalize=True)


# ------------------------------------------------------------ the result


def _merged_statistics(triples):
    """`(count, mean, variance)` per feature, merged exactly over the batches' moments."""
    # As tensors: PyTorch cannot mix NumPy arrays into its arithmetic.
    count, mean, m2 = (
        ops.convert_to_tensor(np.stack(parts))
        for parts in zip(*triples, strict=True)
    )
    total, mean, m2 = (
        ops.convert_to_numpy(t)[0]
        for t in _math.merge_moments(count, mean, m2, axis=0)
    )
    return total, mean, ops.convert_to_numpy(_math.variance(total, m2))


def _assign_population_statistics(layers, statistics):
    """Sets each trainable layer's statistics to `statistics[i]`, `i` its index."""
    for i, layer in enumerate(layers):
        if layer.trainable and i in statistics:
            _assign_statistics(layer, *statistics[i])


def _assign_statistics(layer, total, mean, var):
    """Sets the moving statistics of the features that some batch counted."""
    counted = total > 0
    targets = [(layer.moving_mean, mean), (layer.moving_variance, var)]
    if getattr(layer, "renorm", False):
        targets.append((layer.moving_stddev, np.sqrt(var + layer.epsilon)))
    for variable, value in targets:
        current = ops.convert_to_numpy(variable)
        variable.assign(np.where(counted, value, current).astype(current.dtype))
