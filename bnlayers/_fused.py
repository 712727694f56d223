"""The fused fast path of `BatchNormalization`: what runs on each backend.

The layer asks `ineligibility` whether a call can take the fast path, then
calls `training(x, params, spec)` or `inference(x, params, spec)` with the
record of `_contract` (`Parameters`: gamma, beta and the moving
statistics; `Spec`: feature axis, epsilon, momentum, output dtype). They
return what the backend's module computes:

- TensorFlow (`_fast_tf`): one of three forms, by context and size: plain
  TensorFlow ops (eagerly off a GPU, and small tensors in graphs),
  TensorFlow's fused batch-norm kernel `FusedBatchNormV3` (on a GPU, and
  larger tensors in graphs on CPU), or the arithmetic compiled by XLA
  (inside XLA-compiled functions, and in training where the kernel cannot
  take the call). The rule for graphs is `_forms.FormRule`, which users can
  replace (`bnlayers.set_form_rule`).
- JAX (`_fast_jax`): the arithmetic in `jax.numpy` with a hand-written
  backward (`jax.custom_vjp`), compiled by XLA.
- PyTorch (`_fast_torch`): statistics by two pairwise `torch.sum` passes
  over ``x - s``, normalizing by PyTorch ops and the backward by PyTorch's
  native batch-norm backward kernel, under eager autograd.

All compute what the reference path in `_math` computes: statistics in
float32 (float64 for float64 inputs) on values shifted by one sample of the
batch (`_math.shifted_moments`), ``((x - s) - r) * (gamma / sqrt(var +
epsilon)) + beta`` with ``r`` the mean of ``x - s``, the Keras rule for the
moving averages (an empty batch leaves them as they are).

TensorFlow, JAX and PyTorch are imported inside the functions, so that
importing bnlayers on one Keras backend imports no other backend's
framework.
"""

import importlib
from typing import Any

from keras import backend

from bnlayers import _contract
from bnlayers import _fast_tf
from bnlayers import _geometry
from bnlayers import _math

Parameters = _contract.Parameters
Spec = _contract.Spec

KERNEL_MIN_EPSILON = _fast_tf.KERNEL_MIN_EPSILON

# The backends with a fast path, and the module that holds each.
_MODULES = {
    "tensorflow": "bnlayers._fast_tf",
    "jax": "bnlayers._fast_jax",
    "torch": "bnlayers._fast_torch",
}

_FLOAT_DTYPES = _fast_tf.KERNEL_DTYPES + ("float64",)


def fast_backend():
    """The running Keras backend if it has a fast path, else None.

    Returns:
        str | None: "tensorflow", "jax" or "torch"; None on another backend.
    """
    name = backend.backend()
    return name if name in _MODULES else None


def _module(name):
    # Imported when first run: only the running backend's framework loads.
    return importlib.import_module(_MODULES[name])


def _kernel_only():
    """Whether every call takes TensorFlow's kernel: on a GPU, outside XLA."""
    return _fast_tf.gpu_visible() and not _fast_tf.in_xla_context()


def ineligibility(layer, inputs, mask, feature_axes, name):
    """Why this call cannot take the fused fast path, or None if it can.

    Args:
        layer: read for its public configuration only (`renorm`,
            `virtual_batch_size`, `synchronized`, `epsilon`, `axis`).
        inputs: anything with `.shape` and `.dtype` (a tensor, a
            `keras.KerasTensor`, a `tf.TensorSpec`).
        mask: the expanded mask, or None.
        feature_axes: the resolved feature axes.
        name: what `fast_backend()` returned (None: no fast path here).

    Returns:
        str | None: the reason, or None. The rules every backend shares come
        first (what the fast path computes), then TensorFlow's own limits.
    """
    if name is None:
        return f"the Keras backend is {backend.backend()!r}, which has no fused fast path"
    reason = _configuration_reason(layer, mask, feature_axes)
    if reason is not None:
        return reason
    dtype = backend.standardize_dtype(inputs.dtype)
    if not backend.is_float_dtype(dtype):
        # The layer casts integer and bool inputs before this point.
        dtype = _math.statistics_dtype(layer.compute_dtype)
    kernel_only = name == "tensorflow" and _kernel_only()
    dtypes = _fast_tf.KERNEL_DTYPES if kernel_only else _FLOAT_DTYPES
    if dtype not in dtypes:
        return f"inputs of dtype {dtype} (the fused path takes {', '.join(dtypes)})"
    if name != "tensorflow":
        return None
    if kernel_only:
        if layer.epsilon < KERNEL_MIN_EPSILON:
            return (
                f"epsilon={layer.epsilon!r} is below {KERNEL_MIN_EPSILON}, the smallest "
                "TensorFlow's fused kernel accepts on GPUs (cuDNN)"
            )
        return None
    shape = _geometry.static_shape(inputs)
    if None in shape[1:] and not _fast_tf.in_xla_context():
        return (
            f"input shape {shape} has an unknown dimension besides the batch (a "
            "variable length?): the XLA-compiled fast path would compile anew for "
            "every size"
        )
    return None


def _configuration_reason(layer, mask, feature_axes):
    """The rules of `ineligibility` that every backend shares."""
    if mask is not None:
        return "a mask is given (the fused path cannot leave positions out of the statistics)"
    if layer.renorm:
        return "renorm=True (the fused path has no batch renormalization)"
    if layer.virtual_batch_size is not None:
        return (
            f"virtual_batch_size={layer.virtual_batch_size} (the fused path normalizes the "
            "whole batch at once)"
        )
    if layer.synchronized:
        from bnlayers import _sync

        reason = _sync.ineligibility(layer)
        if reason is not None:
            return reason
    if len(feature_axes) != 1:
        return f"axis={layer.axis!r} names several feature axes (the fused path takes one)"
    return None


def training(x, params, spec):
    """Batch normalization with batch statistics, as one fused computation.

    Args:
        x: the inputs (a tensor of the backend), any floating dtype the
            path takes (see `ineligibility`).
        params: a `_contract.Parameters` (variables are read).
        spec: a `_contract.Spec`.

    Returns:
        tuple: ``(y, new_moving_mean, new_moving_variance)``; the moving
        statistics in the statistics dtype, unchanged where the batch is
        empty. Only `y` carries gradients (to `x`, `gamma` and `beta`).
    """
    return _module(backend.backend()).training(x, params, spec)


def inference(x, params, spec):
    """Batch normalization with the moving statistics; arguments as `training`.

    Returns:
        Any: the outputs, a tensor of the backend in `spec.out_dtype`.
    """
    return _module(backend.backend()).inference(x, params, spec)


def describe(layer, inputs, inference):
    """Which fast path a call of `layer` on `inputs` takes, in words.

    On TensorFlow this is the form in a graph that TensorFlow runs op by op
    (a `tf.function`, Keras' `fit` without `jit_compile`).

    Args:
        layer: a built `bnlayers.BatchNormalization` layer.
        inputs: anything with `.shape` and `.dtype`.
        inference: whether the call uses the moving statistics.

    Returns:
        str: e.g. "fused (kernel)", "fused (plain or kernel, by size)",
        "fused (jax)", or "reference".
    """
    name = fast_backend()
    features = _geometry.feature_axes(
        layer.axis, len(inputs.shape), inputs.shape, layer.virtual_batch_size
    )
    if ineligibility(layer, inputs, None, features, name) is not None:
        return "reference"
    if name != "tensorflow":
        return f"fused ({name})"
    spec = Spec(features[0], layer.epsilon, layer.momentum, layer.compute_dtype)
    forms, index = _fast_tf.graph_forms(inputs, spec, inference)
    if index is None:
        return f"fused ({' or '.join(dict.fromkeys(forms))}, by size)"
    return f"fused ({forms[index]})"


# ------------------------------------------------------------------ public


def fused_eligibility(layer: Any, inputs: Any, mask: Any = None) -> str | None:
    """Why `layer` would not take its fused fast path on `inputs`, or None if it would.

    With `fused=None` (the default) a `bnlayers.BatchNormalization` layer
    takes its fused fast path whenever it can, and its reference
    `keras.ops` path otherwise; with `fused=True` it raises instead of
    falling back. The fast path is taken when all of these hold:

    - the Keras backend is TensorFlow, JAX or PyTorch;
    - no mask is given;
    - `renorm=False` and `virtual_batch_size=None`;
    - not `synchronized=True` over several replicas (a `tf.distribute`
      strategy, a `torch.distributed` process group), nor
      `replica_group_size` under a JAX distribution (elsewhere
      `synchronized` changes nothing);
    - a single feature axis (any one);
    - floating inputs: float16, bfloat16, float32 or float64 (on TensorFlow
      float64 not on a GPU, where TensorFlow's fused kernel does not take
      it);
    - on TensorFlow off a GPU, no unknown dimension besides the batch in
      the traced shape (e.g. a variable sequence length): XLA compiles the
      fast path for each input shape it meets (JAX traces concrete shapes
      only);
    - on TensorFlow on a GPU, also `epsilon >= 1.001e-5` (cuDNN's lower
      bound).

    Training and inference (`training=False`, or `trainable=False`) are
    covered; on TensorFlow `tf.function` and `jit_compile=True`, on JAX
    `jax.jit` (Keras' `fit`, `stateless_call`) and eager calls. What runs
    on each backend, and which form TensorFlow takes for which sizes, is
    described on the [performance page](performance.md); on TensorFlow
    `bnlayers.set_form_rule` changes that choice.

    Args:
        layer: a `bnlayers.BatchNormalization` layer, built or not.
        inputs: a tensor, a `keras.KerasTensor` or `tf.TensorSpec` (anything
            with `.shape` and `.dtype`), or an input shape (a tuple; the
            dtype is then the layer's compute dtype).
        mask: the mask the layer would be called with, if any.

    Returns:
        None if the call would take the fast path, else a short reason
            (which does not depend on `layer.fused`: with `fused=False`
            the layer never takes the fast path).
    """
    if isinstance(inputs, (tuple, list)):
        import keras

        inputs = keras.KerasTensor(tuple(inputs), dtype=layer.compute_dtype)
    shape = _geometry.static_shape(inputs)
    features = _geometry.feature_axes(
        layer.axis, len(shape), shape, layer.virtual_batch_size
    )
    return ineligibility(layer, inputs, mask, features, fast_backend())
