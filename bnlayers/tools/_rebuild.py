"""Rebuilding Sequential and Functional models layer by layer (for swap and fold)."""

import keras

from bnlayers.tools import _keras_internals as internals
from bnlayers.tools._common import check_rebuildable
from bnlayers.tools._common import contains_batchnorm
from bnlayers.tools._common import is_batchnorm
from bnlayers.tools.channel_affine import ChannelAffine

# Stands in the rebuilt graph for a layer left out (its input passes through).
SKIPPED = object()


def copy_layer(layer):
    """A new layer with `layer`'s config, and the weights to give it."""
    return layer.__class__.from_config(layer.get_config()), layer.get_weights()


class Rebuilder:
    """Rebuilds Sequential and Functional models, nested ones included.

    `convert(layer)` returns `(new_layer, weights)` for a leaf layer, where
    `weights` is a list of arrays in the order of `new_layer.weights` or a
    dict from variable name to array. Weights are assigned once the whole
    new model is built (a nested Sequential without an Input is only built
    when the outer model calls it). `skipped` holds the ids of layers to
    leave out of the graph (their input passes through unchanged).
    `convert` may also return `(new_layer, weights, after)`: `after`, a
    layer without weights, is then applied to `new_layer`'s output (a BN
    with a fused activation written as BN then `Activation`).
    """

    def __init__(self, convert, function):
        self.convert = convert
        self.function = function
        self.skipped = set()
        self.pending = []
        self.cache = {}
        self.after = {}

    def rebuild(self, model):
        """The new model, built, with its weights, and marked as called (for `export`)."""
        new = self.model(model)
        for layer, weights in self.pending:
            if isinstance(weights, dict):
                for variable in layer.weights:
                    variable.assign(
                        weights[variable.name].astype(variable.dtype)
                    )
            else:
                layer.set_weights(weights)
        mark_called(new)
        return new

    def model(self, model):
        if isinstance(model, keras.Sequential):
            return self._sequential(model)
        check_rebuildable(model, self.function)
        return keras.models.clone_model(
            model, clone_function=self.layer, call_function=self._call
        )

    def layer(self, layer):
        if id(layer) in self.cache:
            return self.cache[id(layer)]
        if not isinstance(layer, keras.layers.Layer):
            new = layer  # a stateless keras.ops operation in a Functional graph
        elif id(layer) in self.skipped:
            new = SKIPPED
        elif isinstance(layer, keras.Model) and internals.is_graph_model(layer):
            new = self.model(layer)
        else:
            if not is_batchnorm(layer) and contains_batchnorm(layer):
                raise ValueError(
                    f"`{self.function}` cannot reach the BatchNormalization layers inside "
                    f"layer {layer.name!r} of type {type(layer).__name__}: only Sequential "
                    "and Functional models can be rebuilt layer by layer."
                )
            new, weights, *after = self.convert(layer)
            self.pending.append((new, weights))
            if after and after[0] is not None:
                self.after[id(new)] = after[0]
        self.cache[id(layer)] = new
        return new

    def _call(self, layer, *args, **kwargs):
        if layer is SKIPPED:
            return args[0] if args else kwargs["inputs"]
        if isinstance(layer, (ChannelAffine, keras.layers.Activation)):
            # It may stand in for a BN layer (an `Activation` for a BN with
            # an activation folded into the layer before); the `training`
            # and `mask` arguments that layer was called with mean nothing
            # to a fixed multiply-add or an activation.
            outputs = layer(args[0] if args else kwargs["inputs"])
        else:
            outputs = layer(*args, **kwargs)
        after = self.after.get(id(layer))
        return outputs if after is None else after(outputs)

    def _sequential(self, model):
        new_layers = []
        for layer in model.layers:
            new = self.layer(layer)
            if new is not SKIPPED:
                new_layers.append(new)
            if id(new) in self.after:
                new_layers.append(self.after[id(new)])
        first = internals.sequential_input(model)
        if first is not None:
            new_layers.insert(0, first)
        new = keras.Sequential(
            new_layers, name=model.name, trainable=model.trainable
        )
        if model.compiled:
            new.compile_from_config(model.get_compile_config())
        return new


def mark_called(model):
    """Marks a rebuilt graph model as called, as `model.export` requires.

    Keras' ONNX export refuses a model that was never called, although for
    Sequential and Functional models it takes the input signature from the
    graph, not from a call. A real call would cost a forward pass (and, on
    a compiling backend, a compilation per layer) and tell export nothing.
    """
    if model.built and internals.is_graph_model(model):
        internals.mark_called(model)
