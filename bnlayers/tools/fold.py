"""`fold_batchnorm`: an inference-only copy with BN merged into adjacent linear layers."""

import collections
import logging

import keras
import numpy as np

from bnlayers import _geometry
from bnlayers.tools import _keras_internals as internals
from bnlayers.tools._common import check_built
from bnlayers.tools._common import check_model
from bnlayers.tools._common import check_rebuildable
from bnlayers.tools._common import inference_scale_offset
from bnlayers.tools._common import is_batchnorm
from bnlayers.tools._common import to_numpy64
from bnlayers.tools._rebuild import Rebuilder
from bnlayers.tools._rebuild import copy_layer
from bnlayers.tools.channel_affine import ChannelAffine

logger = logging.getLogger("bnlayers")

_CONVS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
# Layers a following BN merges into (by output channel).
_FOLDABLE_BEFORE = (keras.layers.Dense,) + _CONVS + _DEPTHWISE + _SEPARABLE
# Layers a preceding BN merges into (by input channel).
_FOLDABLE_AFTER = (keras.layers.Dense,) + _CONVS


def fold_batchnorm(model: keras.Model) -> keras.Model:
    """Returns an inference-only copy of `model` with batch normalization folded away.

    At inference a BN layer is a fixed per-feature affine map,
    `x * scale + offset` with `scale = gamma / sqrt(moving_variance +
    epsilon)` and `offset = beta - moving_mean * scale`. This function
    removes that work from the model:

    - a BN layer that directly follows a `Dense`, `Conv1D`, `Conv2D`,
      `Conv3D`, `DepthwiseConv1D`, `DepthwiseConv2D`, `SeparableConv1D` or
      `SeparableConv2D` layer with a linear activation, normalizes that
      layer's channel axis (last for `channels_last`, 1 for
      `channels_first`), and is the only consumer of its output, is merged
      into that layer's kernel and bias (a bias is added if it had none);
    - otherwise, a BN layer whose output goes only to a `Dense` layer (BN
      on its last axis) or to a `Conv1D`, `Conv2D` or `Conv3D` layer with
      `padding="valid"` and `groups=1` (BN on its channel axis) is merged
      into that layer: each input channel's kernel slice is multiplied by
      its scale, and the offsets, passed through the kernel, are added to
      the bias. With `padding="same"` or `"causal"` this would not be
      exact (the zeros padded at the borders would be shifted too), so
      such a BN stays a multiply-add;
    - every other BN layer (for instance one after a ReLU and before a
      pooling layer, as in the article's `Conv2D(..., activation="relu")`,
      BN, `MaxPooling2D`) becomes a `bnlayers.tools.ChannelAffine`: a
      multiply-add with fixed weights, no statistics and no training
      branch.

    Which case each BN layer took, and why a layer was not merged, is
    logged at INFO level on the `"bnlayers"` logger, one line per layer
    (`logging.basicConfig(level=logging.INFO)` shows them).

    The folding is computed in float64 and rounded once, so the copy
    predicts what the original predicts in inference mode within float32
    rounding. The original model is left as it was. The copy comes back
    built and ready for `copy.export(path, format=...)` in every format
    (Keras' export otherwise refuses a model that was never called). It is
    meant for `predict` and export; if the original was compiled the copy
    is compiled with the same settings so that `evaluate` works too.
    Training it would not train batch
    normalization, which is gone.

    ```python
    fast = bnlayers.fold_batchnorm(model)
    fast.predict(x_test)
    ```

    Args:
        model: A built Sequential or Functional `keras.Model` (nested ones
            too) with `keras.layers.BatchNormalization` or
            `bnlayers.BatchNormalization` layers. BN layers inside other
            kinds of layers cannot be reached and raise a `ValueError`.

    Returns:
        A new `keras.Model` of the same kind, without BN layers.
    """
    check_model(model, "fold_batchnorm")
    check_rebuildable(model, "fold_batchnorm")
    check_built(model, "fold_batchnorm")
    following, preceding = _plan(model)

    def convert(layer):
        if id(layer) in following or id(layer) in preceding:
            return _merged(
                layer, preceding.get(id(layer)), following.get(id(layer))
            )
        if is_batchnorm(layer):
            return _channel_affine(layer)
        return copy_layer(layer)

    rebuilder = Rebuilder(convert, "fold_batchnorm")
    merged = (*following.values(), *preceding.values())
    rebuilder.skipped = {id(bn) for bn in merged}
    return rebuilder.rebuild(model)


def _channel_affine(bn):
    if not bn.built:
        raise ValueError(
            f"`fold_batchnorm` needs every BN layer built; {bn.name!r} is not."
        )
    scale, offset = inference_scale_offset(bn)
    config = {"axis": bn.axis, "name": bn.name, "dtype": bn.dtype_policy}
    return ChannelAffine.from_config(config), [scale, offset]


def _merged(layer, bn_before, bn_after):
    """`layer` with a BN before it (input side) and/or after it (output side) merged in."""
    config = layer.get_config()
    config["use_bias"] = True
    weights = {v.name: to_numpy64(v) for v in layer.weights}
    weights.setdefault("bias", 0.0)
    if bn_before is not None:
        _merge_input_affine(layer, weights, *inference_scale_offset(bn_before))
    if bn_after is not None:
        _merge_output_affine(layer, weights, *inference_scale_offset(bn_after))
    weights["bias"] = np.broadcast_to(
        weights["bias"], (_output_channels(layer),)
    )
    return layer.__class__.from_config(config), weights


def _output_channels(layer):
    if isinstance(layer, keras.layers.Dense):
        return layer.units
    if isinstance(layer, _DEPTHWISE):
        kernel = layer.kernel.shape
        return kernel[-2] * kernel[-1]
    return layer.filters


def _merge_input_affine(layer, weights, scale, offset):
    """`layer(x * scale + offset)` as `layer'(x)`: Dense or a Conv with valid padding."""
    kernel = weights["kernel"]  # (*kernel_size, in_channels, out_channels)
    weights["kernel"] = kernel * scale[:, None]
    # Every output position sums the whole kernel over real inputs (no
    # padding), so the offsets add the same amount everywhere.
    # (in_channels, out_channels): the kernel summed over its positions.
    per_channel = kernel.reshape((-1,) + kernel.shape[-2:]).sum(axis=0)
    weights["bias"] = weights["bias"] + offset @ per_channel


def _merge_output_affine(layer, weights, scale, offset):
    """`layer(x) * scale + offset` as `layer'(x)`."""
    if isinstance(layer, _DEPTHWISE):
        # Kernel (*kernel_size, in_channels, multiplier); output channel
        # c * multiplier + m comes from input channel c, multiplier m.
        kernel = weights["kernel"]
        weights["kernel"] = kernel * scale.reshape(kernel.shape[-2:])
    elif isinstance(layer, _SEPARABLE):
        weights["pointwise_kernel"] = weights["pointwise_kernel"] * scale
    else:
        weights["kernel"] = weights["kernel"] * scale
    weights["bias"] = weights["bias"] * scale + offset


# ------------------------------------------------------------------ planning


def _plan(model):
    """`(following, preceding)`: id(layer) -> the BN that follows / precedes it, merged in.

    Logs the case each BN layer takes.
    """
    usage = _graph_usage(model)
    following, preceding = {}, {}
    for m in [model] + [
        sub
        for sub in internals.sublayers(model)
        if internals.is_graph_model(sub)
    ]:
        for bn, producer, consumer in _neighbours(m):
            backward = _problem_before(producer, bn, usage)
            forward = (
                _problem_after(bn, consumer, usage)
                if backward
                else "not needed"
            )
            if backward is None:
                following[id(producer)] = bn
                logger.info(
                    "fold_batchnorm: %r merged into the preceding %r",
                    bn.name,
                    producer.name,
                )
            elif forward is None:
                preceding[id(consumer)] = bn
                logger.info(
                    "fold_batchnorm: %r merged into the following %r (input side)",
                    bn.name,
                    consumer.name,
                )
            else:
                logger.info(
                    "fold_batchnorm: %r kept as a ChannelAffine: not into the preceding layer "
                    "(%s), nor into the following one (%s)",
                    bn.name,
                    backward,
                    forward,
                )
    return following, preceding


def _neighbours(model):
    """`(bn, producer, consumer)` for each BN call in `model`'s own graph.

    `producer` (or `consumer`) is the layer whose output is the BN's only
    input (whose only input is the BN's output), where that tensor goes
    nowhere else; a string saying why not otherwise.
    """
    if isinstance(model, keras.Sequential):
        yield from _sequential_neighbours(model.layers)
    else:
        yield from _functional_neighbours(model)


def _sequential_neighbours(layers):
    for i, layer in enumerate(layers):
        if is_batchnorm(layer):
            producer = (
                layers[i - 1] if i > 0 else "it is the model's first layer"
            )
            consumer = (
                layers[i + 1]
                if i + 1 < len(layers)
                else "it is the model's last layer"
            )
            yield layer, producer, consumer


def _functional_neighbours(model):
    # Which nodes read each tensor (reads as a model output are checked apart).
    nodes = internals.graph_nodes(model)
    consumers = collections.defaultdict(list)
    for node in nodes:
        for tensor in node.input_tensors:
            consumers[id(tensor)].append(node)
    outputs = {id(t) for t in model.outputs}
    for node in nodes:
        if node.is_input or not is_batchnorm(node.operation):
            continue
        if len(node.input_tensors) != 1:
            yield (
                node.operation,
                "it takes several inputs",
                "it takes several inputs",
            )
            continue
        tensor = node.input_tensors[0]
        if len(consumers[id(tensor)]) != 1 or id(tensor) in outputs:
            producer = "its input goes to other layers too"
        else:
            producer = internals.producer(tensor)
        out = node.output_tensors[0]
        users = consumers[id(out)]
        if len(users) != 1 or id(out) in outputs:
            consumer = "its output goes to several places, or out of the model"
        elif len(users[0].input_tensors) != 1:
            consumer = f"{users[0].operation.name!r} takes several inputs"
        else:
            consumer = users[0].operation
        yield node.operation, producer, consumer


def _problem_before(producer, bn, usage):
    """Why `bn(producer(x))` cannot be merged into `producer`, or None if it can."""
    if isinstance(producer, str):
        return producer
    name = repr(producer.name)
    if type(producer) not in _FOLDABLE_BEFORE:
        return (
            f"{name} is a {type(producer).__name__}, not a Dense or convolution"
        )
    common = _common_problem(producer, bn, usage)
    if common:
        return common
    if keras.activations.serialize(producer.activation) != "linear":
        return f"{name} has a non-linear activation"
    return _axis_problem(producer, bn, "outputs")


def _problem_after(bn, consumer, usage):
    """Why `consumer(bn(x))` cannot be merged into `consumer`, or None if it can."""
    if isinstance(consumer, str):
        return consumer
    name = repr(consumer.name)
    if type(consumer) not in _FOLDABLE_AFTER:
        return f"{name} is a {type(consumer).__name__}, not a Dense or Conv1D/2D/3D"
    common = _common_problem(consumer, bn, usage)
    if common:
        return common
    if isinstance(consumer, _CONVS):
        if consumer.padding != "valid":
            return (
                f"{name} pads with zeros (padding={consumer.padding!r}), which merging "
                "the offset would shift"
            )
        if consumer.groups != 1:
            return f"{name} is a grouped convolution (groups={consumer.groups})"
    return _axis_problem(consumer, bn, "takes")


def _common_problem(layer, bn, usage):
    name = repr(layer.name)
    if usage[id(bn)] != 1 or usage[id(layer)] != 1:
        return f"it or {name} is called in more than one place"
    if not layer.built or not bn.built:
        return f"it or {name} is not built"
    if getattr(layer, "lora_enabled", False) or getattr(
        layer, "quantization_mode", None
    ):
        return f"{name} is quantized or has LoRA weights"
    return None


def _axis_problem(layer, bn, verb):
    ndim = bn.input_spec.ndim if bn.input_spec is not None else None
    if ndim is None:
        return "its input rank is unknown"
    channel = _channel_axis(layer, ndim)
    axes = _geometry.feature_axes(bn.axis, ndim)
    if axes != [channel]:
        return f"it normalizes axes {axes} and {layer.name!r} {verb} channels on axis {channel}"
    return None


def _channel_axis(layer, ndim):
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return 1
    return ndim - 1


def _graph_usage(model, usage=None, seen=None):
    """How many places in the graphs of `model` (nested ones once each) call each layer."""
    usage = collections.Counter() if usage is None else usage
    seen = set() if seen is None else seen
    if id(model) in seen:
        return usage
    seen.add(id(model))
    if isinstance(model, keras.Sequential):
        operations = list(model.layers)
    elif internals.is_graph_model(model):
        operations = [
            node.operation
            for node in internals.graph_nodes(model)
            if not node.is_input
        ]
    else:
        return usage
    for op in operations:
        usage[id(op)] += 1
        if isinstance(op, keras.Model):
            _graph_usage(op, usage, seen)
    return usage
