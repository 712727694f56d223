"""`swap_batchnorm`: a copy of a model with the other BN implementation."""

import functools
import warnings

import keras

from bnlayers.batch_normalization import BatchNormalization
from bnlayers.tools import _keras_internals as internals
from bnlayers.tools._common import BATCHNORM_CLASSES
from bnlayers.tools._common import BUILTIN
from bnlayers.tools._common import check_built
from bnlayers.tools._common import check_model
from bnlayers.tools._common import check_rebuildable
from bnlayers.tools._common import is_batchnorm
from bnlayers.tools._rebuild import Rebuilder
from bnlayers.tools._rebuild import copy_layer

_SWAP_TARGETS = {"bnlayers": BatchNormalization, "keras": BUILTIN}
# Config keys of bnlayers.BatchNormalization that the built-in does not have,
# with the value that means "as the built-in does".
_BNLAYERS_ONLY_DEFAULTS = {
    "virtual_batch_size": None,
    "replica_group_size": None,
}
# `fused` only picks the kernel that computes the same result, so any value
# carries over to the built-in (which picks its own kernel); `activation`
# becomes an `Activation` layer after the built-in one (`activation_after`).
_BNLAYERS_ONLY_DROPPED = ("fused", "activation")
# How the moving statistics are averaged: the built-in has neither option,
# so it gets its own rule (and momentum) with the statistics as they are,
# and a warning says so. The step counter is no weight of the built-in.
_KERAS_MOMENTUM = 0.99


def _averaging_dropped(layer, config):
    """Takes the moving-average options out of `config`; a warning if any was on."""
    dropped = []
    if config.pop("debias_moving_statistics", False):
        dropped.append("debias_moving_statistics=True")
    if config.get("momentum", _KERAS_MOMENTUM) is None:
        config["momentum"] = _KERAS_MOMENTUM
        dropped.append(
            f"momentum=None (the copy has momentum={_KERAS_MOMENTUM})"
        )
    if dropped:
        warnings.warn(
            f"swap_batchnorm(to='keras'): layer {layer.name!r} has "
            f"{' and '.join(dropped)}, which keras.layers.BatchNormalization does "
            "not have. The copy keeps the moving statistics as they are (the "
            "estimate so far) but averages further batches by Keras' rule.",
            stacklevel=4,
        )


def _builtin_weights(layer):
    """`layer`'s weights without its step counter, which the built-in lacks."""
    counter = getattr(layer, "moving_count", None)
    return [
        value
        for variable, value in zip(
            layer.weights, layer.get_weights(), strict=True
        )
        if variable is not counter
    ]


def _builtin_config(layer):
    """The config of bnlayers BN `layer` as the built-in layer takes it."""
    config = layer.get_config()
    for key, default in _BNLAYERS_ONLY_DEFAULTS.items():
        value = config.pop(key, default)
        if value != default:
            raise ValueError(
                f"Layer {layer.name!r} has {key}={value!r}, which keras.layers."
                "BatchNormalization cannot represent; swap_batchnorm(to='keras') "
                f"only converts layers with {key}={default!r}."
            )
    for key in _BNLAYERS_ONLY_DROPPED:
        config.pop(key, None)
    _averaging_dropped(layer, config)
    axis = config["axis"]
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise ValueError(
                f"Layer {layer.name!r} has axis={axis!r}: keras.layers.BatchNormalization "
                "takes a single feature axis, so swap_batchnorm(to='keras') cannot "
                "convert a list of several axes."
            )
        config["axis"] = int(axis[0])
    return config


def activation_after(layer):
    """The `keras.layers.Activation` that computes `layer`'s fused
    activation after a layer without one (None if it has none)."""
    name = getattr(layer, "activation", None)
    if name is None:
        return None
    return keras.layers.Activation(
        name, name=f"{layer.name}_activation", dtype=layer.dtype_policy
    )


def swap_batchnorm(model: keras.Model, to: str = "bnlayers") -> keras.Model:
    """Returns a copy of `model` in which every BN layer is the chosen implementation.

    Every `keras.layers.BatchNormalization` and `bnlayers.BatchNormalization`
    layer, in the model and in the models nested inside it, becomes the
    implementation named by `to`, with the same config (name, axis,
    momentum, epsilon, initializers, ...) and the same weights (gamma,
    beta, moving statistics, and the renorm ones). Every other layer is
    copied with its config and weights. The copy predicts what the original
    predicts (within float32 rounding, since the two implementations order
    their arithmetic differently). The original model is left as it was.
    If it was compiled, the copy is compiled with the same settings, and
    the optimizer's state (step count, moments, ...) is carried over, so
    that training the copy continues where the original left off; where it
    cannot be carried (see below), a warning says so and the copy's
    optimizer starts afresh.

    This is how an existing model, for instance one from
    `keras.applications`, adopts bnlayers:

    ```python
    base = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3))
    model = bnlayers.swap_batchnorm(base, to="bnlayers")
    ```

    Converting to the built-in layer needs settings it can represent:
    `virtual_batch_size` must be None and `axis` a single axis (an int or a
    list of one); `fused` only chooses bnlayers' kernel and is dropped. A
    layer with a fused `activation` becomes the built-in layer followed by
    a `keras.layers.Activation` (named after it, with `_activation`).
    Anything else raises a `ValueError` naming the layer. A layer with
    `debias_moving_statistics=True` or `momentum=None` converts with its
    moving statistics as they are (they hold the estimate) and a warning:
    the built-in averages further batches by its own rule (momentum 0.99
    where it was None), and the step counter is left behind.

    The optimizer's state is carried over variable by variable: the copy's
    optimizer is built for the copy's counterparts of the variables the
    original's was built for, in the same order, so each slot (Adam's
    moments, say) lands on the same weight. This needs the original's
    optimizer to have been built for variables of this model only, and the
    same trainable variables in both models (as after a swap, unless
    `trainable` was changed after compiling).

    Args:
        model: A built Sequential or Functional `keras.Model`; models nested
            inside it may be either too. BN layers inside other kinds of
            layers (a subclassed layer or model) cannot be reached and raise
            a `ValueError`.
        to: `"bnlayers"` for `bnlayers.BatchNormalization`, or `"keras"` for
            `keras.layers.BatchNormalization`.

    Returns:
        A new `keras.Model` of the same kind, with new layers.
    """
    check_model(model, "swap_batchnorm")
    if to not in _SWAP_TARGETS:
        raise ValueError(
            f"`to` must be one of {sorted(_SWAP_TARGETS)}. Received: to={to!r}"
        )
    check_rebuildable(model, "swap_batchnorm")
    check_built(model, "swap_batchnorm")
    target = _SWAP_TARGETS[to]
    convert = functools.partial(_convert, target=target)
    new = Rebuilder(convert, "swap_batchnorm").rebuild(model)
    _carry_optimizer_state(model, new)
    return new


def _convert(layer, target):
    """`layer` for the rebuilt model: a BN layer as `target`, any other copied."""
    if not is_batchnorm(layer):
        return copy_layer(layer)
    if type(layer) not in BATCHNORM_CLASSES:
        raise ValueError(
            f"Layer {layer.name!r} is a subclass ({type(layer).__name__}) of a "
            "BatchNormalization class; swap_batchnorm only converts the classes "
            "themselves, since a subclass may compute something else."
        )
    if isinstance(layer, BatchNormalization) and target is BUILTIN:
        return (
            target.from_config(_builtin_config(layer)),
            _builtin_weights(layer),
            activation_after(layer),
        )
    return target.from_config(layer.get_config()), layer.get_weights()


def _carry_optimizer_state(old, new, function="swap_batchnorm"):
    """Gives `new`'s optimizer the state of `old`'s, slot for slot; warns where it cannot."""
    optimizer = getattr(old, "optimizer", None) if old.compiled else None
    if optimizer is None or not optimizer.built:
        return  # nothing learned yet: a fresh optimizer is the same
    reason = _optimizer_mismatch(old, new)
    if reason is None:
        targets = _counterparts(
            old, new, internals.optimizer_targets(optimizer)
        )
        if not new.optimizer.built:
            new.optimizer.build(targets)
        elif [id(v) for v in internals.optimizer_targets(new.optimizer)] != [
            id(v) for v in targets
        ]:
            reason = "the copy's optimizer is built for other variables"
    if reason is None:
        reason = _assign_all(optimizer.variables, new.optimizer.variables)
    if reason is not None:
        warnings.warn(
            f"{function} could not carry the optimizer state of model {old.name!r} "
            f"over to the copy ({reason}); the copy's {type(new.optimizer).__name__} "
            "starts afresh (step 0, no moments), so training the copy does not continue "
            "where the original left off.",
            stacklevel=3,
        )


def _optimizer_mismatch(old, new):
    if not new.compiled or getattr(new, "optimizer", None) is None:
        return "the copy is not compiled"
    if type(new.optimizer) is not type(old.optimizer):
        return "the copy's optimizer is of another class"
    if len(old.weights) != len(new.weights):
        return "the copy has another number of variables"
    known = {id(v) for v in old.weights}
    if any(
        id(v) not in known for v in internals.optimizer_targets(old.optimizer)
    ):
        return "the optimizer also trains variables of another model"
    return None


def _counterparts(old, new, variables):
    index = {id(v): i for i, v in enumerate(old.weights)}
    return [new.weights[index[id(v)]] for v in variables]


def _assign_all(sources, targets):
    if len(sources) != len(targets) or any(
        tuple(a.shape) != tuple(b.shape)
        for a, b in zip(sources, targets, strict=True)
    ):
        return "the two optimizers' variables differ in number or shape"
    for source, target in zip(sources, targets, strict=True):
        target.assign(keras.ops.convert_to_numpy(source))
    return None
