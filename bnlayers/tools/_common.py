"""What several tools share: argument checks, finding BN layers, BN as an affine map."""

import numbers

import keras
import numpy as np
from keras import ops

from bnlayers.batch_normalization import BatchNormalization
from bnlayers.tools import _keras_internals as internals

BUILTIN = keras.layers.BatchNormalization
BATCHNORM_CLASSES = (BUILTIN, BatchNormalization)


def check_model(model, function):
    """The checks every tool starts with: a keras.Model, and a Keras it was checked on."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`{function}` needs a keras.Model (Sequential or Functional). "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    internals.check_version(function)


def check_built(model, function):
    if not model.built:
        raise ValueError(
            f"`{function}` needs a built model (give it an Input, or call it on data "
            f"once) so that its weights exist. Received: model={model.name!r}, not built"
        )


def check_positive(value, name, allow_none=True):
    """Raises unless `value` is a positive int (or None, where `allow_none`)."""
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < 1
    ):
        raise ValueError(
            f"`{name}` must be {'None or ' if allow_none else ''}a positive int. "
            f"Received: {name}={value!r}"
        )


def check_rebuildable(model, function):
    if not internals.is_graph_model(model):
        raise TypeError(
            f"`{function}` works on Sequential and Functional models (nested too); "
            "a subclassed model's layers cannot be rebuilt. "
            f"Received: model={model.name!r} of type {type(model).__name__}"
        )


def is_batchnorm(layer):
    return isinstance(layer, BATCHNORM_CLASSES)


def batchnorm_layers(model):
    """Every distinct BN layer inside `model`, nested ones included, in order."""
    return [
        layer for layer in internals.sublayers(model) if is_batchnorm(layer)
    ]


def contains_batchnorm(layer):
    return any(is_batchnorm(sub) for sub in internals.sublayers(layer))


def to_numpy64(variable):
    return np.asarray(ops.convert_to_numpy(variable), dtype="float64")


def inference_scale_offset(bn):
    """Per-feature `(scale, offset)` with `bn(x, training=False) == x * scale + offset`.

    Computed in float64 so that the only rounding left is the final cast.
    """
    mean = to_numpy64(bn.moving_mean)
    var = to_numpy64(bn.moving_variance)
    scale = 1.0 / np.sqrt(var + bn.epsilon)
    if bn.scale:
        scale = scale * to_numpy64(bn.gamma)
    offset = -mean * scale
    if bn.center:
        offset = offset + to_numpy64(bn.beta)
    return scale, offset
