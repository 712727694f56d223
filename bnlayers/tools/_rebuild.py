"""Rebuilding Sequential and Functional models layer by layer (for swap and fold)."""

import keras
import numpy as np

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
    """

    def __init__(self, convert, function):
        self.convert = convert
        self.function = function
        self.skipped = set()
        self.pending = []
        self.cache = {}

    def rebuild(self, model):
        """The new model, built, with its weights, and called once (as `export` wants)."""
        new = self.model(model)
        for layer, weights in self.pending:
            if isinstance(weights, dict):
                for variable in layer.weights:
                    variable.assign(
                        weights[variable.name].astype(variable.dtype)
                    )
            else:
                layer.set_weights(weights)
        call_once(new)
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
            new, weights = self.convert(layer)
            self.pending.append((new, weights))
        self.cache[id(layer)] = new
        return new

    def _call(self, layer, *args, **kwargs):
        if layer is SKIPPED:
            return args[0] if args else kwargs["inputs"]
        if isinstance(layer, ChannelAffine):
            # It stands in for a BN layer; the `training` and `mask` arguments
            # that layer was called with mean nothing to a fixed multiply-add.
            return layer(args[0] if args else kwargs["inputs"])
        return layer(*args, **kwargs)

    def _sequential(self, model):
        new_layers = [self.layer(layer) for layer in model.layers]
        new_layers = [layer for layer in new_layers if layer is not SKIPPED]
        first = internals.sequential_input(model)
        if first is not None:
            new_layers.insert(0, first)
        new = keras.Sequential(
            new_layers, name=model.name, trainable=model.trainable
        )
        if model.compiled:
            new.compile_from_config(model.get_compile_config())
        return new


def call_once(model):
    """Calls a built graph model once in inference mode, as `model.export` requires.

    On zeros of batch size 1 where every input's shape is known (and not a
    string), else on symbolic inputs (which computes nothing).
    """
    if not model.built or not internals.is_graph_model(model):
        return
    structure = internals.input_structure(model)
    specs = keras.tree.flatten(structure)
    if all(
        None not in tuple(spec.shape[1:]) and spec.dtype != "string"
        for spec in specs
    ):
        inputs = keras.tree.map_structure(
            lambda spec: np.zeros(
                (1,) + tuple(spec.shape[1:]), dtype=spec.dtype
            ),
            structure,
        )
    else:
        inputs = keras.tree.map_structure(
            lambda spec: keras.Input(batch_shape=spec.shape, dtype=spec.dtype),
            structure,
        )
    model(inputs, training=False)
