"""`fold_batchnorm`: an inference-only copy with BN merged into adjacent linear layers."""

import collections
import functools
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
from bnlayers.tools.swap import activation_after

logger = logging.getLogger("bnlayers")

L = keras.layers
_CONVS = (L.Conv1D, L.Conv2D, L.Conv3D)
_DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)
_SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)
# Layers a following BN merges into (by output channel).
_FOLDABLE_BEFORE = (L.Dense,) + _CONVS + _DEPTHWISE + _SEPARABLE
# Layers a preceding BN merges into (by input channel).
_FOLDABLE_AFTER = _FOLDABLE_BEFORE

# Layers that a per-channel affine map `x * scale + offset` passes through
# unchanged, at inference. Exact types: a subclass may compute anything.
_IDENTITIES = (
    L.Dropout,
    L.SpatialDropout1D,
    L.SpatialDropout2D,
    L.SpatialDropout3D,
    L.GaussianNoise,
    L.GaussianDropout,
    L.AlphaDropout,
    L.Identity,
)
# Each output is a maximum over a window of one channel: commutes where the
# scale is >= 0 (a negative scale turns the maximum into a minimum).
_MAX_POOLS = (L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D)
_GLOBAL_MAX_POOLS = (
    L.GlobalMaxPooling1D,
    L.GlobalMaxPooling2D,
    L.GlobalMaxPooling3D,
)
# Each output is a weighted mean of one channel's values with weights that
# sum to 1: Keras' average pooling divides by the number of real values in
# each window on every backend (padded positions are not counted), and a
# mask only changes which values are averaged. Commutes with any affine map.
_AVERAGE_POOLS = (L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D)
_GLOBAL_AVERAGE_POOLS = (
    L.GlobalAveragePooling1D,
    L.GlobalAveragePooling2D,
    L.GlobalAveragePooling3D,
)
# Each output is one channel's value at some position or, for bilinear
# interpolation, a mean with weights summing to 1 (other interpolations
# are left out: their kernels are not all checked here).
_SELECTIONS = (
    L.Cropping1D,
    L.Cropping2D,
    L.Cropping3D,
    L.UpSampling1D,
    L.UpSampling2D,
    L.UpSampling3D,
)
# Add positions of value 0: commute only with an affine map that keeps 0 at 0.
_ZERO_PADDINGS = (L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D)


def fold_batchnorm(model: keras.Model) -> keras.Model:
    """Returns an inference-only copy of `model` with batch normalization folded away.

    At inference a BN layer is a fixed per-feature affine map,
    `x * scale + offset` with `scale = gamma / sqrt(moving_variance +
    epsilon)` and `offset = beta - moving_mean * scale`. This function
    removes that work from the model, trying for each BN layer in turn:

    1. **Into the layer before.** A BN layer that is the only consumer of
       the output of a `Dense`, `Conv1D/2D/3D`, `DepthwiseConv1D/2D` or
       `SeparableConv1D/2D` layer with a linear activation, and normalizes
       its channel axis (last for `channels_last`, 1 for
       `channels_first`), is merged into its kernel and bias (a bias is
       added if it had none).
    2. **Into the layers after, through what lies between.** Otherwise the
       affine map is carried forward, along every path its output takes,
       through layers that commute with it, to a layer of those types (a
       `Conv` with `groups=1`), where it is merged into the kernel (each
       input channel's slice times its scale) and the bias (the offsets
       passed through the kernel). It passes, at inference, through
       identities (dropout and noise layers, `Identity`, a linear
       `Activation`, `ActivityRegularization` without a penalty), average
       pooling, max pooling where every scale is >= 0, cropping,
       upsampling, zero padding where every offset is 0, and `Flatten`,
       `Reshape`, `Permute`, `RepeatVector`; pooling and padding need a
       map that varies along the channel axis only. A convolution with
       `padding="same"` or `"causal"` takes the map only where every
       offset is 0. Each condition is in
       [Whole-model tools](tools.md#fold_batchnorm-bn-gone-for-inference).
       The move is made only where every path allows it; a BN output that
       is also a model output, or that reaches any other layer (a `ReLU`,
       an `Add`, a `Concatenate`, ...), stays.
    3. **Kept.** Every other BN layer (one followed by a `ReLU`, as in
       pre-activation ResNets, or one after a `Concatenate`, as in
       DenseNet) becomes a frozen `keras.layers.BatchNormalization`
       computing exactly `x * scale + offset` (`gamma = scale`,
       `beta = offset`, `moving_mean = 0`, and `moving_variance + epsilon`
       exactly 1), so the folded model needs only Keras to load, and
       exporters see a layer they all know. A `bnlayers.BatchNormalization`
       over several axes becomes a `bnlayers.tools.ChannelAffine`, which
       needs bnlayers to load.

    A `bnlayers.BatchNormalization` with a fused `activation` is merged
    into the layer before it (case 1) or kept (case 3), never carried
    forward; its activation stays, as a `keras.layers.Activation` after
    the merged layer (named as the BN layer) or after the kept one (named
    after it, with `_activation`). Which case each BN layer took, and why,
    is logged at INFO level on the `"bnlayers"` logger.

    The folding is computed in float64 and rounded once, so the copy
    predicts what the original predicts in inference mode within float32
    rounding; the original is left as it was. The copy comes back built,
    ready for `predict` and `copy.export(path, format=...)` in every
    format, and compiled as the original was, so that `evaluate` works;
    training it would not train batch normalization, which is gone.

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
        A new `keras.Model` of the same kind, whose only BN layers are the
        frozen multiply-adds of case 3.
    """
    check_model(model, "fold_batchnorm")
    check_rebuildable(model, "fold_batchnorm")
    check_built(model, "fold_batchnorm")
    plan = _plan(model)
    rebuilder = Rebuilder(
        functools.partial(_convert, plan=plan), "fold_batchnorm"
    )
    rebuilder.skipped = plan.merged
    return rebuilder.rebuild(model)


def _convert(layer, plan):
    """`layer` for the folded copy, as `plan` decided."""
    key = id(layer)
    if key in plan.following or key in plan.preceding:
        return _merged(layer, plan.preceding.get(key), plan.following.get(key))
    if key in plan.activations:
        return keras.layers.Activation(
            layer.activation, name=layer.name, dtype=layer.dtype_policy
        ), []
    if is_batchnorm(layer):
        return _fixed_affine(layer) + (activation_after(layer),)
    return copy_layer(layer)


def _fixed_affine(bn):
    """The Keras layer (or, for several axes, the bnlayers one) computing `bn` at inference."""
    if not bn.built:
        raise ValueError(
            f"`fold_batchnorm` needs every BN layer built; {bn.name!r} is not."
        )
    scale, offset = inference_scale_offset(bn)
    ndim = bn.input_spec.ndim if bn.input_spec is not None else None
    if ndim:
        axes = _geometry.feature_axes(bn.axis, ndim)
    else:
        axes = (
            list(bn.axis) if isinstance(bn.axis, (list, tuple)) else [bn.axis]
        )
    if len(axes) != 1:
        config = {"axis": bn.axis, "name": bn.name, "dtype": bn.dtype_policy}
        return ChannelAffine.from_config(config), [scale, offset]
    epsilon = 1e-3
    layer = L.BatchNormalization(
        axis=axes[0],
        epsilon=epsilon,
        name=bn.name,
        dtype=bn.dtype_policy,
        trainable=False,
    )
    variable_dtype = np.dtype(
        keras.backend.standardize_dtype(bn.moving_variance.dtype)
    )
    variance = _unit_variance(epsilon, variable_dtype)
    weights = {
        "gamma": scale,
        "beta": offset,
        "moving_mean": np.zeros_like(scale),
        "moving_variance": np.full_like(scale, variance),
    }
    return layer, weights


def _unit_variance(epsilon, dtype):
    """The `dtype` value `v` closest to `1 - epsilon` with `v + epsilon == 1` in `dtype`.

    Then `rsqrt(v + epsilon)` is exactly 1 and Keras' BN computes
    `x * gamma + beta` with no rounding of its own.
    """
    one, eps = dtype.type(1), dtype.type(epsilon)
    v = dtype.type(one - eps)
    for _ in range(8):
        total = dtype.type(v + eps)
        if total == one:
            return v
        v = np.nextafter(
            v, dtype.type(-np.inf) if total > one else dtype.type(np.inf)
        )
    raise AssertionError(
        f"no variance sums to 1 with epsilon={epsilon} in {dtype}"
    )


def _merged(layer, bn_before, bn_after):
    """`layer` with an affine map before it (input side) and/or a BN after it merged in.

    `bn_before` is `(scale, offset)` over `layer`'s input channels.
    """
    config = layer.get_config()
    config["use_bias"] = True
    weights = {v.name: to_numpy64(v) for v in layer.weights}
    weights.setdefault("bias", 0.0)
    if bn_before is not None:
        _merge_input_affine(layer, weights, *bn_before)
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
    """`layer(x * scale + offset)` as `layer'(x)`: Dense, or a convolution padding
    nothing or with offsets 0.

    Every output position then sums the whole kernel over real inputs (or
    the offsets are 0), so the offsets add the same amount everywhere.
    """
    name = "depthwise_kernel" if isinstance(layer, _SEPARABLE) else "kernel"
    # (*kernel_size, in_channels, out_channels), or for a depthwise kernel
    # (*kernel_size, in_channels, multiplier).
    kernel = weights[name]
    weights[name] = kernel * scale[:, None]
    # The kernel summed over its positions: (in_channels, out_channels).
    summed = kernel.reshape((-1,) + kernel.shape[-2:]).sum(axis=0)
    if isinstance(layer, _DEPTHWISE + _SEPARABLE):
        # Depthwise output channel c * multiplier + m reads input channel c.
        shift = (offset[:, None] * summed).reshape(-1)
        if isinstance(layer, _SEPARABLE):
            pointwise = weights["pointwise_kernel"]
            shift = shift @ pointwise.reshape(-1, pointwise.shape[-1])
        weights["bias"] = weights["bias"] + shift
    else:
        weights["bias"] = weights["bias"] + offset @ summed


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


class _Plan:
    """What happens to each BN layer, by id."""

    def __init__(self):
        self.following = {}  # id(linear layer) -> the BN after it, merged in
        self.preceding = {}  # id(linear layer) -> (scale, offset) over its inputs
        self.merged = set()  # BN layers left out of the copy
        self.kept = set()  # BN layers that stay as a fixed multiply-add
        # BN layers with a fused activation merged into the layer before:
        # only their activation stays, as a Keras `Activation` layer.
        self.activations = set()


def _plan(model):
    """Decides, for each BN call, where its affine map goes, and logs why."""
    usage = _graph_usage(model)
    plan = _Plan()
    for graph in graphs(model):
        outcomes = collections.defaultdict(list)
        for bn, in_key, out_key, problem in graph.bn_calls():
            outcome = _place(graph, bn, in_key, out_key, problem, usage, plan)
            outcomes[outcome].append(bn.name)
        if outcomes:
            kept = outcomes["kept"]
            logger.info(
                "fold_batchnorm: model %r: %d BN layers, %d merged into the layer "
                "before, %d into the layers after, %d kept as multiply-adds%s",
                graph.model.name,
                sum(len(v) for v in outcomes.values()),
                len(outcomes["before"]),
                len(outcomes["after"]),
                len(kept),
                f" ({', '.join(map(repr, kept))})" if kept else "",
            )
    return plan


def _place(graph, bn, in_key, out_key, problem, usage, plan):
    """Plans one BN call; returns "before", "after" or "kept"."""
    producer = problem or graph.producer(in_key)
    backward = _problem_before(producer, bn, usage)
    if backward is None:
        plan.following[id(producer)] = bn
        if getattr(bn, "activation", None) is None:
            plan.merged.add(id(bn))
        else:
            plan.activations.add(id(bn))
        logger.info(
            "fold_batchnorm: %r merged into the preceding %r",
            bn.name,
            producer.name,
        )
        return "before"
    targets: list[tuple] = []
    passed: list[str] = []
    if problem is None and getattr(bn, "activation", None) is not None:
        # The activation follows the affine map: nothing carried past it.
        problem = f"it has the activation {bn.activation!r}"
    forward = problem or _problem_forward(
        graph, bn, in_key, out_key, usage, targets, passed
    )
    if forward is None:
        for layer, scale, offset in targets:
            plan.preceding[id(layer)] = (scale, offset)
        plan.merged.add(id(bn))
        through = f" through {', '.join(map(repr, passed))}" if passed else ""
        logger.info(
            "fold_batchnorm: %r merged into the following %s (input side)%s",
            bn.name,
            ", ".join(repr(layer.name) for layer, _, _ in targets),
            through,
        )
        return "after"
    plan.kept.add(id(bn))
    logger.info(
        "fold_batchnorm: %r kept as a multiply-add: not into the preceding layer "
        "(%s), nor forward (%s)",
        bn.name,
        backward,
        forward,
    )
    return "kept"


def graphs(model):
    """The graphs of `model` and of the Sequential or Functional models
    nested in it, each as a `_SequentialGraph` or `_FunctionalGraph`."""
    models = [model] + [
        sub
        for sub in internals.sublayers(model)
        if internals.is_graph_model(sub)
    ]
    return [
        _SequentialGraph(m)
        if isinstance(m, keras.Sequential)
        else _FunctionalGraph(m)
        for m in models
    ]


class _SequentialGraph:
    """A Sequential model's layers as a graph; a key is a layer's index (its output)."""

    def __init__(self, model):
        self.model = model
        self.layers = list(model.layers)

    def bn_calls(self):
        for i, layer in enumerate(self.layers):
            if is_batchnorm(layer):
                yield layer, i - 1, i, None

    def producer(self, key):
        return self.layers[key] if key >= 0 else "it is the model's first layer"

    def consumers(self, key):
        if key + 1 < len(self.layers):
            return [(self.layers[key + 1], key + 1, 1, {})]
        return []

    def is_output(self, key):
        return key == len(self.layers) - 1

    def shape(self, key):
        """The shape of the tensor `key` without its batch axis, or None if unknown."""
        try:
            if key < 0:
                return tuple(self.layers[0].input.shape[1:])
            return tuple(self.layers[key].output.shape[1:])
        except (AttributeError, ValueError):
            return None


class _FunctionalGraph:
    """A Functional model's own graph; a key is the id of a symbolic tensor."""

    def __init__(self, model):
        self.model = model
        self.nodes = internals.graph_nodes(model)
        self.readers = collections.defaultdict(list)
        self.tensors = {}
        for node in self.nodes:
            for tensor in (*node.input_tensors, *node.output_tensors):
                self.tensors[id(tensor)] = tensor
            for tensor in node.input_tensors:
                self.readers[id(tensor)].append(node)
        self.outputs = {id(t) for t in model.outputs}

    def bn_calls(self):
        for node in self.nodes:
            if node.is_input or not is_batchnorm(node.operation):
                continue
            if len(node.input_tensors) != 1 or len(node.output_tensors) != 1:
                yield node.operation, None, None, "it takes several inputs"
                continue
            yield (
                node.operation,
                id(node.input_tensors[0]),
                id(node.output_tensors[0]),
                None,
            )

    def producer(self, key):
        if len(self.readers[key]) != 1 or key in self.outputs:
            return "its input goes to other layers too"
        return internals.producer(self.tensors[key])

    def consumers(self, key):
        return [
            (
                node.operation,
                id(node.output_tensors[0])
                if len(node.output_tensors) == 1
                else None,
                len(node.input_tensors),
                node.arguments.kwargs,
            )
            for node in self.readers[key]
        ]

    def is_output(self, key):
        return key in self.outputs

    def shape(self, key):
        return tuple(self.tensors[key].shape[1:])


def _problem_before(producer, bn, usage):
    """Why `bn(producer(x))` cannot be merged into `producer`, or None if it can."""
    if isinstance(producer, str):
        return producer
    name = repr(producer.name)
    if type(producer) not in _FOLDABLE_BEFORE:
        return f"{name} is {_a(type(producer))}, not a Dense or convolution"
    common = _common_problem(producer, bn, usage)
    if common:
        return common
    if keras.activations.serialize(producer.activation) != "linear":
        return f"{name} has a non-linear activation"
    return _axis_problem(producer, bn, "outputs")


def _problem_forward(graph, bn, in_key, out_key, usage, targets, passed):
    """Why `bn`'s map cannot be carried to the linear layers after it, or None.

    Where it can, `targets` receives `(layer, scale, offset)` for each
    layer it merges into (over that layer's input channels) and `passed`
    the names of the layers it passes through.
    """
    if usage[id(bn)] != 1:
        return "it is called in more than one place"
    if not bn.built:
        return "it is not built"
    shape = graph.shape(in_key)
    if shape is None:
        if bn.input_spec is None or bn.input_spec.ndim is None:
            return "its input rank is unknown"
        shape = (None,) * (bn.input_spec.ndim - 1)
    axes = _geometry.feature_axes(bn.axis, len(shape) + 1)
    if 0 in axes:
        return "it normalizes the batch axis"
    # The map as arrays over the features (no batch axis), broadcasting
    # along the axes it does not vary on.
    scale, offset = inference_scale_offset(bn)
    param = [1] * len(shape)
    for a, size in zip(axes, scale.shape, strict=True):
        param[a - 1] = size
    scale, offset = scale.reshape(param), offset.reshape(param)
    return _carry(graph, out_key, scale, offset, usage, targets, passed)


def _carry(graph, key, scale, offset, usage, targets, passed):
    """Carries `x * scale + offset` on tensor `key` along every path to linear layers."""
    if graph.is_output(key):
        return "its output is an output of the model" + _after(passed)
    users = graph.consumers(key)
    if not users:
        return "its output is not used" + _after(passed)
    for layer, out_key, n_inputs, kwargs in users:
        name = repr(layer.name)
        if n_inputs != 1:
            return f"{name} takes several inputs"
        if type(layer) in _FOLDABLE_AFTER:
            problem, vectors = _into_linear(layer, scale, offset, usage)
            if problem:
                return problem
            targets.append((layer, *vectors))
            continue
        problem, carried = _through(
            layer, scale, offset, graph.shape(key), kwargs
        )
        if problem:
            return problem
        if out_key is None:
            return f"{name} has several outputs"
        passed.append(layer.name)
        next_scale, next_offset = carried
        problem = _carry(
            graph, out_key, next_scale, next_offset, usage, targets, passed
        )
        if problem:
            return problem
    return None


def _a(kind):
    """ "a ReLU", "an Add": a class name with its article."""
    name = kind.__name__
    return f"{'an' if name[0] in 'AEIOU' else 'a'} {name}"


def _after(passed):
    return f" (after {', '.join(map(repr, passed))})" if passed else ""


def _into_linear(layer, scale, offset, usage):
    """`(problem, (scale, offset))`: the map over `layer`'s input channels, or why not."""
    name = repr(layer.name)
    if usage[id(layer)] != 1:
        return f"{name} is called in more than one place", None
    if not layer.built:
        return f"{name} is not built", None
    if getattr(layer, "lora_enabled", False) or getattr(
        layer, "quantization_mode", None
    ):
        return f"{name} is quantized or has LoRA weights", None
    axis = _feature_channel_axis(layer, scale.ndim)
    scale_c, offset_c = _per_channel(scale, axis), _per_channel(offset, axis)
    if scale_c is None or offset_c is None:
        return (
            f"{name} takes channels on one axis and the map varies along others",
            None,
        )
    if isinstance(layer, _CONVS) and layer.groups != 1:
        return (
            f"{name} is a grouped convolution (groups={layer.groups})",
            None,
        )
    if not isinstance(layer, L.Dense):
        if layer.padding != "valid" and np.any(offset_c != 0):
            return (
                f"{name} pads with zeros (padding={layer.padding!r}), which merging "
                "the offset would shift",
                None,
            )
    kernel = (
        layer.depthwise_kernel
        if isinstance(layer, _SEPARABLE)
        else layer.kernel
    )
    channels = kernel.shape[-2]
    if scale_c.size not in (1, channels):
        return (
            f"{name} takes {channels} channels, the map has {scale_c.size}",
            None,
        )
    return None, (
        np.broadcast_to(scale_c, (channels,)),
        np.broadcast_to(offset_c, (channels,)),
    )


def _through(layer, scale, offset, shape, kwargs):
    """`(problem, (scale, offset))`: the map after `layer`, where `layer` commutes with it."""
    name = repr(layer.name)
    kind = type(layer)
    if kind is L.ActivityRegularization:
        # Its penalty is its activity regularizer; without one it is an identity.
        if not layer.l1 and not layer.l2:
            return None, (scale, offset)
        return (
            f"{name} penalizes its inputs (l1={layer.l1}, l2={layer.l2})",
            None,
        )
    if getattr(layer, "activity_regularizer", None) is not None:
        return f"{name} has an activity regularizer", None
    if kwargs.get("training") is True:
        return f"{name} is called with training=True", None
    if kind in _IDENTITIES:
        return None, (scale, offset)
    if kind is L.Activation:
        if keras.activations.serialize(layer.activation) == "linear":
            return None, (scale, offset)
    elif (
        kind
        in _MAX_POOLS
        + _GLOBAL_MAX_POOLS
        + _AVERAGE_POOLS
        + _GLOBAL_AVERAGE_POOLS
    ):
        return _through_pooling(layer, scale, offset)
    elif kind in _SELECTIONS or kind in _ZERO_PADDINGS:
        if getattr(layer, "interpolation", "nearest") not in (
            "nearest",
            "bilinear",
        ):
            return f"{name} interpolates with {layer.interpolation!r}", None
        axis = _feature_channel_axis(layer, scale.ndim)
        scale_c, offset_c = (
            _per_channel(scale, axis),
            _per_channel(offset, axis),
        )
        if scale_c is None or offset_c is None:
            return f"{name} moves values along axes the map varies on", None
        if kind in _ZERO_PADDINGS and np.any(offset_c != 0):
            return f"{name} pads with zeros, which the offset would shift", None
        return None, _along(axis, scale.ndim, scale_c, offset_c)
    elif kind in (L.Flatten, L.Reshape):
        if shape is None or None in shape:
            return f"{name} reshapes inputs of an unknown shape {shape}", None
        full = [np.broadcast_to(a, shape) for a in (scale, offset)]
        if kind is L.Flatten:
            if layer.data_format == "channels_first" and len(shape) > 0:
                full = [np.moveaxis(a, 0, -1) for a in full]
            return None, tuple(a.reshape(-1) for a in full)
        return None, tuple(a.reshape(layer.target_shape) for a in full)
    elif kind is L.Permute:
        order = [d - 1 for d in layer.dims]
        return None, (np.transpose(scale, order), np.transpose(offset, order))
    elif kind is L.RepeatVector:
        return None, (scale[None], offset[None])
    return (
        f"{name} is {_a(kind)}, which does not commute with x * scale + offset",
        None,
    )


def _through_pooling(layer, scale, offset):
    name = repr(layer.name)
    kind = type(layer)
    axis = _feature_channel_axis(layer, scale.ndim)
    scale_c, offset_c = _per_channel(scale, axis), _per_channel(offset, axis)
    if scale_c is None or offset_c is None:
        return f"{name} pools along axes the map varies on", None
    if kind in _MAX_POOLS + _GLOBAL_MAX_POOLS and np.any(scale_c < 0):
        return (
            f"{name} takes maxima, and the scale is negative in "
            f"{int(np.sum(scale_c < 0))} of {scale_c.size} channels (a maximum "
            "would become a minimum)",
            None,
        )
    if kind in _GLOBAL_MAX_POOLS + _GLOBAL_AVERAGE_POOLS and not layer.keepdims:
        return None, (scale_c, offset_c)
    return None, _along(axis, scale.ndim, scale_c, offset_c)


def _along(axis, rank, *vectors):
    """Each vector as an array of `rank` axes that varies along `axis` only."""
    param = [1] * rank
    param[axis] = vectors[0].size
    return tuple(v.reshape(param) for v in vectors)


def _per_channel(values, axis):
    """`values` as a vector along `axis`, or None if it varies along another axis."""
    moved = np.moveaxis(values, axis, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    if np.all(rows == rows[:1]):
        return rows[0]
    return None


def _feature_channel_axis(layer, rank):
    """The channel axis of `layer`'s inputs, counted without the batch axis."""
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return 0
    return rank - 1


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
