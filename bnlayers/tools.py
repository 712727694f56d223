"""Whole-model tools for batch normalization: swap, fold, recalibrate, freeze.

The jobs people do with BN layers in finished models, which PyTorch, timm
and fvcore have tools for and Keras does not:

- `swap_batchnorm(model, to=...)`: a copy of the model with every BN layer
  turned into `bnlayers.BatchNormalization` or the built-in one.
- `fold_batchnorm(model)`: an inference-only copy with BN merged into the
  preceding linear layer where possible, a fixed multiply-add elsewhere.
- `recalibrate(model, data)`: the moving statistics replaced by the exact
  population statistics over `data` (as fvcore's PreciseBN does).
- `freeze_batchnorm(model)`: every BN layer in inference mode and
  non-trainable, for fine-tuning.

Each works on `keras.layers.BatchNormalization` and
`bnlayers.BatchNormalization` alike, in Sequential and Functional models
and in models nested inside them.
"""

import collections
import itertools
import numbers

import keras
import numpy as np
from keras import backend
from keras import ops

# Functional is the class of every model built with the functional API; it
# is not exported, but `keras.models.clone_model` dispatches on it too.
from keras.src.models.functional import Functional

from bnlayers import _math
from bnlayers.batch_normalization import BatchNormalization

_BUILTIN = keras.layers.BatchNormalization
_BATCHNORM_CLASSES = (_BUILTIN, BatchNormalization)
_SWAP_TARGETS = {"bnlayers": BatchNormalization, "keras": _BUILTIN}
# Config keys of bnlayers.BatchNormalization that the built-in does not have,
# with the value that means "as the built-in does".
_BNLAYERS_ONLY_DEFAULTS = {"virtual_batch_size": None}
# `fused` only picks the kernel that computes the same result, so any value
# carries over to the built-in (which picks its own kernel).
_BNLAYERS_ONLY_DROPPED = ("fused",)


# ---------------------------------------------------------------- helpers


def _check_model(model, function):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`{function}` needs a keras.Model (Sequential or Functional). "
            f"Received: model={model!r} of type {type(model).__name__}"
        )


def _check_built(model, function):
    if not model.built:
        raise ValueError(
            f"`{function}` needs a built model (give it an Input, or call it on data "
            f"once) so that its weights exist. Received: model={model.name!r}, not built"
        )


def _check_rebuildable(model, function):
    if not isinstance(model, (keras.Sequential, Functional)):
        raise TypeError(
            f"`{function}` works on Sequential and Functional models (nested too); "
            f"a subclassed model's layers cannot be rebuilt. Received: model={model.name!r} "
            f"of type {type(model).__name__}"
        )


def _is_batchnorm(layer):
    return isinstance(layer, _BATCHNORM_CLASSES)


def _batchnorm_layers(model):
    """Every distinct BN layer inside `model`, nested ones included, in order."""
    return [layer for layer in model._flatten_layers(include_self=False) if _is_batchnorm(layer)]


def _feature_axes(layer, ndim):
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return sorted(int(a) % ndim for a in axes)


def _to_numpy64(variable):
    return np.asarray(ops.convert_to_numpy(variable), dtype="float64")


def _inference_scale_offset(bn):
    """Per-feature `(scale, offset)` with `bn(x, training=False) == x * scale + offset`.

    Computed in float64 so that the only rounding left is the final cast.
    """
    mean = _to_numpy64(bn.moving_mean)
    var = _to_numpy64(bn.moving_variance)
    scale = 1.0 / np.sqrt(var + bn.epsilon)
    if bn.scale:
        scale = scale * _to_numpy64(bn.gamma)
    offset = -mean * scale
    if bn.center:
        offset = offset + _to_numpy64(bn.beta)
    return scale, offset


def _contains_batchnorm(layer):
    return any(_is_batchnorm(sub) for sub in layer._flatten_layers(include_self=False))


# ---------------------------------------------------------- ChannelAffine


@keras.saving.register_keras_serializable(package="bnlayers")
class ChannelAffine(keras.layers.Layer):
    """A fixed per-feature multiply-add: `outputs = inputs * scale + offset`.

    What a BatchNormalization layer computes at inference, with its four
    per-feature vectors reduced to two. `fold_batchnorm` puts one in place
    of every BN layer it cannot merge into a preceding linear layer. It has
    no statistics and no training behaviour: it computes the same thing in
    training and inference, and its two weights are not trainable.

    Args:
        axis: Integer or list of integers, the feature axes (as the BN
            layer's `axis`). `scale` and `offset` have the shape of those
            axes.
        **kwargs: Base layer keyword arguments (e.g. `name`, `dtype`).

    Inputs in float16 or bfloat16 are computed in float32 and cast back, as
    the BN layers do.
    """

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        if isinstance(axis, (list, tuple)):
            axis = [int(a) for a in axis]
        elif isinstance(axis, numbers.Integral) and not isinstance(axis, bool):
            axis = int(axis)
        else:
            raise TypeError(f"`axis` must be an int or a list of ints. Received: axis={axis!r}")
        self.axis = axis
        self.supports_masking = True
        self._feature_axes = None

    def build(self, input_shape):
        ndim = len(input_shape)
        axes = self.axis if isinstance(self.axis, list) else [self.axis]
        for a in axes:
            if not -ndim <= a < ndim:
                raise ValueError(
                    f"`axis` {a} is out of range for inputs of rank {ndim}. "
                    f"Received: axis={self.axis!r}, input_shape={tuple(input_shape)}"
                )
        self._feature_axes = _feature_axes(self, ndim)
        shape = tuple(input_shape[a] for a in self._feature_axes)
        self.scale = self.add_weight(
            shape=shape, name="scale", initializer="ones", trainable=False, autocast=False
        )
        self.offset = self.add_weight(
            shape=shape, name="offset", initializer="zeros", trainable=False, autocast=False
        )

    def call(self, inputs):
        ndim = len(inputs.shape)
        param_shape = [1] * ndim
        for i, a in enumerate(self._feature_axes):
            param_shape[a] = self.scale.shape[i]
        dtype = _math.statistics_dtype(inputs.dtype)
        x = ops.cast(inputs, dtype)
        scale = ops.reshape(ops.cast(self.scale, dtype), param_shape)
        offset = ops.reshape(ops.cast(self.offset, dtype), param_shape)
        return ops.cast(x * scale + offset, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"axis": self.axis})
        return config


# ----------------------------------------------------- rebuilding models


class _Rebuilder:
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
        new = self.model(model)
        for layer, weights in self.pending:
            if isinstance(weights, dict):
                for variable in layer.weights:
                    variable.assign(weights[variable.name].astype(variable.dtype))
            else:
                layer.set_weights(weights)
        return new

    def model(self, model):
        if isinstance(model, keras.Sequential):
            return self._sequential(model)
        _check_rebuildable(model, self.function)
        return keras.models.clone_model(model, clone_function=self.layer, call_function=self._call)

    def layer(self, layer):
        if id(layer) in self.cache:
            return self.cache[id(layer)]
        if not isinstance(layer, keras.layers.Layer):
            new = layer  # a stateless keras.ops operation in a Functional graph
        elif id(layer) in self.skipped:
            new = _SKIPPED
        elif isinstance(layer, keras.Model) and isinstance(layer, (keras.Sequential, Functional)):
            new = self.model(layer)
        else:
            if not _is_batchnorm(layer) and _contains_batchnorm(layer):
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
        if layer is _SKIPPED:
            return args[0] if args else kwargs["inputs"]
        if isinstance(layer, ChannelAffine):
            # It stands in for a BN layer; the `training` and `mask` arguments
            # that layer was called with mean nothing to a fixed multiply-add.
            return layer(args[0] if args else kwargs["inputs"])
        return layer(*args, **kwargs)

    def _sequential(self, model):
        new_layers = [self.layer(layer) for layer in model.layers]
        new_layers = [layer for layer in new_layers if layer is not _SKIPPED]
        first = model._layers[0] if model._layers else None
        if isinstance(first, keras.layers.InputLayer):
            new_layers.insert(
                0,
                keras.Input(
                    batch_shape=first.batch_shape,
                    dtype=first._dtype,
                    name=first.name,
                    optional=first.optional,
                ),
            )
        new = keras.Sequential(new_layers, name=model.name, trainable=model.trainable)
        if model.compiled:
            new.compile_from_config(model.get_compile_config())
        return new


_SKIPPED = object()


def _copy_layer(layer):
    new = layer.__class__.from_config(layer.get_config())
    return new, layer.get_weights()


# ------------------------------------------------------------------- swap


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


def swap_batchnorm(model, to="bnlayers"):
    """Returns a copy of `model` in which every BN layer is the chosen implementation.

    Every `keras.layers.BatchNormalization` and `bnlayers.BatchNormalization`
    layer, in the model and in the models nested inside it, becomes the
    implementation named by `to`, with the same config (name, axis,
    momentum, epsilon, initializers, ...) and the same weights (gamma,
    beta, moving statistics, and the renorm ones). Every other layer is
    copied with its config and weights. The copy predicts what the original
    predicts (within float32 rounding, since the two implementations order
    their arithmetic differently). The original model is left as it was.
    If it was compiled, the copy is compiled with the same settings (and a
    fresh optimizer).

    This is how an existing model, for instance one from
    `keras.applications`, adopts bnlayers:

    ```python
    base = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3))
    model = bnlayers.swap_batchnorm(base, to="bnlayers")
    ```

    Converting to the built-in layer needs settings it can represent:
    `virtual_batch_size` must be None and `axis` a single axis (an int or a
    list of one); `fused` only chooses bnlayers' kernel and is dropped.
    Anything else raises a `ValueError` naming the layer.

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
    _check_model(model, "swap_batchnorm")
    if to not in _SWAP_TARGETS:
        raise ValueError(
            f"`to` must be one of {sorted(_SWAP_TARGETS)}. Received: to={to!r}"
        )
    _check_rebuildable(model, "swap_batchnorm")
    _check_built(model, "swap_batchnorm")
    target = _SWAP_TARGETS[to]

    def convert(layer):
        if not _is_batchnorm(layer):
            return _copy_layer(layer)
        if type(layer) not in _BATCHNORM_CLASSES:
            raise ValueError(
                f"Layer {layer.name!r} is a subclass ({type(layer).__name__}) of a "
                "BatchNormalization class; swap_batchnorm only converts the classes "
                "themselves, since a subclass may compute something else."
            )
        if isinstance(layer, BatchNormalization) and target is _BUILTIN:
            config = _builtin_config(layer)
        else:
            config = layer.get_config()
        return target.from_config(config), layer.get_weights()

    return _Rebuilder(convert, "swap_batchnorm").rebuild(model)


# ------------------------------------------------------------------- fold


def _output_channel_axis(producer, ndim):
    if getattr(producer, "data_format", "channels_last") == "channels_first":
        return 1
    return ndim - 1


def _fold_kernels(producer, scale, offset):
    """New weights (by variable name) of `producer` with `x * scale + offset` merged in."""
    weights = {v.name: _to_numpy64(v) for v in producer.weights}
    bias = weights.get("bias", 0.0)
    if isinstance(producer, _DEPTHWISE):
        # Kernel (*kernel_size, in_channels, multiplier); output channel
        # c * multiplier + m comes from input channel c, multiplier m.
        kernel = weights["kernel"]
        weights["kernel"] = kernel * scale.reshape(kernel.shape[-2:])
    elif isinstance(producer, _SEPARABLE):
        weights["pointwise_kernel"] = weights["pointwise_kernel"] * scale
    else:
        weights["kernel"] = weights["kernel"] * scale
    weights["bias"] = bias * scale + offset
    return weights


_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_FOLDABLE = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
) + _DEPTHWISE + _SEPARABLE


def _can_fold(producer, bn):
    """Whether `bn(producer(x))` can be merged into the producer's weights."""
    if type(producer) not in _FOLDABLE or not producer.built or not bn.built:
        return False
    if keras.activations.serialize(producer.activation) != "linear":
        return False
    if getattr(producer, "lora_enabled", False) or getattr(producer, "quantization_mode", None):
        return False
    ndim = bn.input_spec.ndim if bn.input_spec is not None else None
    if ndim is None:
        return False
    axes = _feature_axes(bn, ndim)
    return axes == [_output_channel_axis(producer, ndim)]


def _graph_usage(model, usage=None, seen=None):
    """How many places in the graphs of `model` (nested ones once each) call each layer."""
    usage = collections.Counter() if usage is None else usage
    seen = set() if seen is None else seen
    if id(model) in seen:
        return usage
    seen.add(id(model))
    if isinstance(model, keras.Sequential):
        operations = list(model.layers)
    elif isinstance(model, Functional):
        operations = [node.operation for node in _nodes(model) if not node.is_input]
    else:
        return usage
    for op in operations:
        usage[id(op)] += 1
        if isinstance(op, keras.Model):
            _graph_usage(op, usage, seen)
    return usage


def _nodes(model):
    return [node for nodes in model._nodes_by_depth.values() for node in nodes]


def _fold_pairs(model, usage):
    """`[(producer, bn)]` for the BN layers of `model`'s own graph that can be folded."""
    pairs = []
    if isinstance(model, keras.Sequential):
        layers = model.layers
        candidates = list(zip(layers[:-1], layers[1:]))
    else:
        nodes = _nodes(model)
        consumers = collections.Counter(id(t) for n in nodes for t in n.input_tensors)
        consumers.update(id(t) for t in model.outputs)
        candidates = []
        for node in nodes:
            if node.is_input or not _is_batchnorm(node.operation):
                continue
            if len(node.input_tensors) != 1:
                continue
            tensor = node.input_tensors[0]
            if consumers[id(tensor)] != 1:
                continue
            candidates.append((tensor._keras_history.operation, node.operation))
    for producer, bn in candidates:
        if not _is_batchnorm(bn) or usage[id(bn)] != 1 or usage[id(producer)] != 1:
            continue
        if _can_fold(producer, bn):
            pairs.append((producer, bn))
    return pairs


def fold_batchnorm(model):
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
    - every other BN layer (for instance one after a ReLU, as in
      `Conv2D(..., activation="relu")` followed by BN) becomes a
      `bnlayers.tools.ChannelAffine`: a multiply-add with fixed weights,
      no statistics and no training branch.

    The folding is computed in float64 and rounded once, so the copy
    predicts what the original predicts in inference mode within float32
    rounding. The original model is left as it was. The copy is meant for
    `predict`; if the original was compiled the copy is compiled with the
    same settings so that `evaluate` works too. Training it would not
    train batch normalization, which is gone.

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
    _check_model(model, "fold_batchnorm")
    _check_rebuildable(model, "fold_batchnorm")
    _check_built(model, "fold_batchnorm")
    usage = _graph_usage(model)
    folded = {}  # id(producer) -> bn
    models = [model] + [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, (keras.Sequential, Functional))
    ]
    for m in models:
        for producer, bn in _fold_pairs(m, usage):
            folded[id(producer)] = bn

    def convert(layer):
        if id(layer) in folded:
            config = layer.get_config()
            config["use_bias"] = True
            scale, offset = _inference_scale_offset(folded[id(layer)])
            return layer.__class__.from_config(config), _fold_kernels(layer, scale, offset)
        if _is_batchnorm(layer):
            if not layer.built:
                raise ValueError(
                    f"`fold_batchnorm` needs every BN layer built; {layer.name!r} is not."
                )
            scale, offset = _inference_scale_offset(layer)
            config = {"axis": layer.axis, "name": layer.name, "dtype": layer.dtype_policy}
            return ChannelAffine.from_config(config), [scale, offset]
        return _copy_layer(layer)

    rebuilder = _Rebuilder(convert, "fold_batchnorm")
    rebuilder.skipped = {id(bn) for bn in folded.values()}
    return rebuilder.rebuild(model)


# ------------------------------------------------------------ recalibrate


def _batches(data, steps, batch_size):
    """Yields the `x` part of each batch of `data`, at most `steps` of them."""
    unpack = keras.utils.unpack_x_y_sample_weight
    is_dataset = False
    if backend.backend() == "tensorflow":
        import tensorflow as tf

        is_dataset = isinstance(data, tf.data.Dataset)

    def is_array(value):
        return hasattr(value, "shape") and hasattr(value, "dtype") and len(value.shape) > 0

    def leaves_are_arrays(value):
        leaves = keras.tree.flatten(value)
        return bool(leaves) and all(is_array(leaf) for leaf in leaves)

    if is_dataset or isinstance(data, keras.utils.PyDataset):
        if batch_size is not None:
            raise ValueError(
                "`batch_size` is for array data; a dataset is already batched. "
                f"Received: batch_size={batch_size!r} with data of type {type(data).__name__}"
            )
        if is_dataset:
            iterator = iter(data)
        else:
            iterator = (data[i] for i in range(len(data)))
    elif isinstance(data, (np.ndarray, dict, tuple, list)) or is_array(data):
        if not leaves_are_arrays(data):
            raise TypeError(
                "`data` given as arrays must hold only arrays (x, or a tuple (x, y) or "
                f"(x, y, sample_weight)). Received: data of type {type(data).__name__}"
            )
        # As in `fit`: a tuple is (x, y[, sample_weight]); a list or dict is
        # the inputs of a model with several.
        x = unpack(data)[0] if isinstance(data, tuple) else data
        if batch_size is None:
            batch_size = 32
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}")
        size = int(keras.tree.flatten(x)[0].shape[0])
        iterator = (
            keras.tree.map_structure(lambda a: a[start : start + batch_size], x)
            for start in range(0, size, batch_size)
        )
        return _take(iterator, steps, unpack=False)
    elif hasattr(data, "__iter__") or hasattr(data, "__next__"):
        if batch_size is not None:
            raise ValueError(
                "`batch_size` is for array data; a generator yields whole batches. "
                f"Received: batch_size={batch_size!r}"
            )
        iterator = iter(data)
    else:
        raise TypeError(
            "`data` must be a tf.data.Dataset, a keras.utils.PyDataset, arrays (x, or a "
            "tuple (x, y)), or a generator of batches. "
            f"Received: data={data!r} of type {type(data).__name__}"
        )
    return _take(iterator, steps, unpack=True)


def _take(iterator, steps, unpack):
    # islice stops before drawing batch `steps + 1`, which a generator may
    # not have or may be costly to make.
    for element in itertools.islice(iterator, steps):
        yield keras.utils.unpack_x_y_sample_weight(element)[0] if unpack else element


def recalibrate(model, data, steps=None, *, batch_size=None):
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
    Masks are honoured (masked positions are left out), as in training.

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

    Returns:
        `model`, modified in place.
    """
    _check_model(model, "recalibrate")
    if steps is not None and (
        isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1
    ):
        raise ValueError(f"`steps` must be None or a positive int. Received: steps={steps!r}")
    _check_built(model, "recalibrate")
    layers = [layer for layer in _batchnorm_layers(model) if layer.trainable and layer.built]
    batches = _batches(data, steps, batch_size)
    if not layers:
        return model

    captured = {}

    def make_hook(key, layer, original):
        def hook(inputs, training=None, mask=None, **kwargs):
            ndim = len(inputs.shape)
            axes = _feature_axes(layer, ndim)
            reduction = [a for a in range(ndim) if a not in axes]
            x = ops.cast(inputs, _math.statistics_dtype(inputs.dtype))
            weights = None
            if mask is not None:
                weights = mask
                for a in axes:
                    weights = ops.expand_dims(weights, a)
            count, mean, m2 = _math.moments(x, reduction, weights)
            shape = layer.moving_mean.shape
            count = ops.reshape(ops.broadcast_to(count, ops.shape(mean)), shape)
            captured.setdefault(key, []).append(
                (count, ops.reshape(mean, shape), ops.reshape(m2, shape))
            )
            return original(inputs, training=True, mask=mask, **kwargs)

        return hook

    def forward(x):
        captured.clear()
        model(x, training=False)
        return dict(captured)

    if backend.backend() == "tensorflow":
        import tensorflow as tf

        forward = tf.function(forward, reduce_retracing=True)

    # Training-mode calls would move the statistics; momentum 1 keeps them
    # (and renorm's r and d) fixed during the pass, and the snapshot puts
    # back every bit afterwards whatever the layer's arithmetic.
    snapshot = [(v, ops.convert_to_numpy(v)) for layer in layers for v in layer.non_trainable_weights]
    momenta = [(layer, layer.momentum, getattr(layer, "renorm_momentum", None)) for layer in layers]
    collected = collections.defaultdict(list)
    seen_batches = 0
    try:
        for i, layer in enumerate(layers):
            layer.call = make_hook(str(i), layer, layer.call)
            layer.momentum = 1.0
            if getattr(layer, "renorm", False):
                layer.renorm_momentum = 1.0
        for x in batches:
            seen_batches += 1
            for key, triples in forward(x).items():
                for triple in triples:
                    collected[key].append([ops.convert_to_numpy(t).astype("float64") for t in triple])
    finally:
        for layer, momentum, renorm_momentum in momenta:
            if "call" in vars(layer):
                del layer.call
            layer.momentum = momentum
            if getattr(layer, "renorm", False):
                layer.renorm_momentum = renorm_momentum
        for variable, value in snapshot:
            variable.assign(value)

    if not seen_batches:
        raise ValueError(
            "`data` yielded no batches, so there is nothing to compute statistics "
            f"over. Received: data of type {type(data).__name__}, steps={steps!r}"
        )
    for i, layer in enumerate(layers):
        triples = collected.get(str(i))
        if not triples:
            continue
        # As tensors: PyTorch cannot mix NumPy arrays into its arithmetic.
        count, mean, m2 = (ops.convert_to_tensor(np.stack(parts)) for parts in zip(*triples))
        total, mean, m2 = (
            ops.convert_to_numpy(t)[0] for t in _math.merge_moments(count, mean, m2, axis=0)
        )
        var = ops.convert_to_numpy(_math.variance(total, m2))
        counted = total > 0
        for variable, value in ((layer.moving_mean, mean), (layer.moving_variance, var)):
            current = ops.convert_to_numpy(variable)
            variable.assign(np.where(counted, value, current).astype(current.dtype))
        if getattr(layer, "renorm", False):
            current = ops.convert_to_numpy(layer.moving_stddev)
            stddev = np.sqrt(var + layer.epsilon)
            layer.moving_stddev.assign(np.where(counted, stddev, current).astype(current.dtype))
    return model


# ----------------------------------------------------------------- freeze


def freeze_batchnorm(model):
    """Freezes every BN layer of `model` for fine-tuning; the rest is left as it is.

    Each `keras.layers.BatchNormalization` and `bnlayers.BatchNormalization`
    layer in the model (nested models and custom layers included) gets
    `trainable = False`. By the Keras rule for batch normalization this
    does two things: gamma and beta are no longer trained, *and* the layer
    runs in inference mode even inside `fit()`, normalizing with its moving
    statistics and never updating them. This is what fine-tuning a
    pretrained model on a small dataset wants: the statistics learned on
    the large dataset stay, and small fine-tuning batches cannot disturb
    them. Other layers keep their `trainable` setting.

    Freeze before `compile()`; if the model was already compiled, compile
    it again for the change to take effect.

    ```python
    bnlayers.freeze_batchnorm(model)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x_small, y_small, epochs=3)
    ```

    Args:
        model: A `keras.Model` of any kind.

    Returns:
        `model`, modified in place.
    """
    _check_model(model, "freeze_batchnorm")
    for layer in _batchnorm_layers(model):
        layer.trainable = False
    return model
