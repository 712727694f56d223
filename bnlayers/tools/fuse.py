"""`fuse_activations`: a copy of a model with each BN and its activation as one layer."""

import logging

import keras

from bnlayers import _checks
from bnlayers.batch_normalization import BatchNormalization
from bnlayers.tools._common import BATCHNORM_CLASSES
from bnlayers.tools._common import check_built
from bnlayers.tools._common import check_model
from bnlayers.tools._common import check_rebuildable
from bnlayers.tools._rebuild import Rebuilder
from bnlayers.tools._rebuild import copy_layer
from bnlayers.tools.fold import _graph_usage
from bnlayers.tools.fold import graphs
from bnlayers.tools.swap import _carry_optimizer_state

logger = logging.getLogger("bnlayers")


def fuse_activations(model: keras.Model) -> keras.Model:
    """Returns a copy of `model` with every BN layer and the activation after it as one layer.

    Keras models write a convolution, a `BatchNormalization` layer and its
    activation as three layers (`keras.applications` ResNet50, DenseNet121,
    EfficientNetB0, MobileNetV3 among them). Each pair of a BN layer
    (`keras.layers.BatchNormalization` or `bnlayers.BatchNormalization`)
    and the activation layer that alone reads its output becomes one
    `bnlayers.BatchNormalization(activation=...)`, which computes the
    activation in the same pass as the normalization on the fast path
    (`BatchNormalization`'s `activation` argument). The activation layers
    merged:

    - `keras.layers.Activation` with `"relu"`, `"relu6"`, `"silu"` /
      `"swish"`, `"hard_silu"` / `"hard_swish"` or `"gelu"` (exact), as
      names or as those `keras.activations` functions;
    - `keras.layers.ReLU()` and `keras.layers.ReLU(max_value=6)` (no
      negative slope, threshold 0).

    A pair is merged only where the BN layer's output goes to that one
    activation layer and nowhere else (not also a model output), each is
    called once, the BN layer has no activation yet, and both have the same
    dtype policy. Every other layer is copied with its config and weights;
    BN layers without an activation after them are copied as they are
    (a Keras one stays Keras'). The merged layer keeps the BN layer's name,
    config and weights. The copy predicts and trains as the original
    (within float32 rounding, the reference and fast paths ordering their
    arithmetic differently). If the original was compiled the copy is
    compiled with the same settings and the optimizer's state carried
    over, as `swap_batchnorm` does. Which pairs were merged is logged at
    INFO level on the `"bnlayers"` logger.

    `swap_batchnorm(copy, to="keras")` turns each merged layer back into
    Keras' BN layer followed by an `Activation` layer.

    ```python
    base = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3))
    model = bnlayers.tools.fuse_activations(base)
    ```

    Args:
        model: A built Sequential or Functional `keras.Model` (nested ones
            too).

    Returns:
        A new `keras.Model` of the same kind, with new layers.
    """
    check_model(model, "fuse_activations")
    check_rebuildable(model, "fuse_activations")
    check_built(model, "fuse_activations")
    pairs = _pairs(model)

    def convert(layer):
        activation = pairs.get(id(layer))
        if activation is None:
            return copy_layer(layer)
        config = layer.get_config()
        config["activation"] = activation
        return BatchNormalization.from_config(config), layer.get_weights()

    rebuilder = Rebuilder(convert, "fuse_activations")
    rebuilder.skipped = pairs.skipped
    new = rebuilder.rebuild(model)
    _carry_optimizer_state(model, new, "fuse_activations")
    return new


class _Pairs(dict):
    """id(BN layer) -> the activation's name; `skipped`: the activation layers' ids."""

    def __init__(self):
        super().__init__()
        self.skipped = set()


def activation_of(layer):
    """The name of the activation `layer` computes (a layer of its own),
    or None if it is not one that `BatchNormalization` can fuse."""
    if type(layer) is keras.layers.Activation:
        try:
            return _checks.activation(layer.activation)
        except ValueError:
            return None
    if type(layer) is keras.layers.ReLU:
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            return None
        if layer.max_value is None:
            return "relu"
        if float(layer.max_value) == 6.0:
            return "relu6"
    return None


def _pairs(model):
    """The BN layers to merge with the activation after them, and why not elsewhere."""
    usage = _graph_usage(model)
    pairs = _Pairs()
    for graph in graphs(model):
        for bn, _, out_key, problem in graph.bn_calls():
            if problem is not None or id(bn) in pairs:
                continue
            reason = _problem(graph, bn, out_key, usage)
            if isinstance(reason, tuple):
                layer, name = reason
                pairs[id(bn)] = name
                pairs.skipped.add(id(layer))
                logger.info(
                    "fuse_activations: %r merged with the following %r (%s)",
                    bn.name,
                    layer.name,
                    name,
                )
            else:
                logger.info(
                    "fuse_activations: %r left as it is: %s", bn.name, reason
                )
    return pairs


def _problem(graph, bn, out_key, usage):
    """`(activation layer, name)` for a BN call that can take its activation,
    else why not."""
    if type(bn) not in BATCHNORM_CLASSES:
        return f"it is a subclass ({type(bn).__name__})"
    if getattr(bn, "activation", None) is not None:
        return "it has an activation already"
    if usage[id(bn)] != 1:
        return "it is called in several places"
    if graph.is_output(out_key):
        return "its output is a model output"
    consumers = graph.consumers(out_key)
    if len(consumers) != 1:
        return "its output goes to several layers, or none"
    layer, _, inputs, _ = consumers[0]
    name = (
        activation_of(layer) if isinstance(layer, keras.layers.Layer) else None
    )
    if name is None:
        return f"{layer.name!r} is not an activation it can take"
    if inputs != 1 or usage[id(layer)] != 1:
        return f"{layer.name!r} is called in several places"
    if layer.dtype_policy.name != bn.dtype_policy.name:
        return f"{layer.name!r} has another dtype policy"
    return layer, name
