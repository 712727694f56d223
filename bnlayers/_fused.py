"""The fused fast path of `BatchNormalization` on TensorFlow, JAX and PyTorch.

Tensors in, tensors out: `training(x, gamma, beta, moving_mean,
moving_variance, axis, epsilon, momentum, ...)` returns the outputs and the
updated moving statistics, `inference(...)` the outputs; the layer owns the
geometry (which `axis`), the dtypes and assigns the moving statistics.
`ineligibility(...)` is the one place that decides whether a call can take
this path; `implementation()` picks one implementation of the same
computation, by backend (two on TensorFlow):

- ``"xla"`` and ``"kernel"``, on the TensorFlow backend: the arithmetic
  written out in TensorFlow ops and compiled by XLA, or TensorFlow's fused
  batch-norm kernel (on a GPU, outside XLA); see `_fast_tf`.
- ``"jax"``, on the JAX backend: the same arithmetic in `jax.numpy` with a
  hand-written backward (`jax.custom_vjp`), compiled by XLA; see
  `_fast_jax`.
- ``"torch"``, on the PyTorch backend: statistics by two pairwise
  `torch.sum` passes over ``x - s``, normalizing by PyTorch ops and the
  backward by PyTorch's native batch-norm backward kernel, under eager
  autograd; see `_fast_torch`.

All compute what the reference path in `_math` computes: statistics in
float32 (float64 for float64 inputs) on values shifted by one sample of the
batch (`_math.shifted_moments`), ``((x - s) - r) * (gamma / sqrt(var +
epsilon)) + beta`` with ``r`` the mean of ``x - s``, the Keras rule for the
moving averages.

TensorFlow, JAX and PyTorch are imported inside the functions, so that
importing bnlayers on one Keras backend imports no other backend's
framework.
"""

import importlib

from keras import backend

from bnlayers import _fast_tf
from bnlayers import _geometry
from bnlayers import _math

_KERNEL_DTYPES = _fast_tf.KERNEL_DTYPES
_FLOAT_DTYPES = _KERNEL_DTYPES + ("float64",)

# The backends whose fast path is a module written in that backend's
# framework (`_fast_jax`, `_fast_torch`), imported when it first runs.
_OTHER_FRAMEWORKS = ("jax", "torch")


def _other_framework(implementation):
    return importlib.import_module(f"bnlayers._fast_{implementation}")


KERNEL_MIN_EPSILON = _fast_tf.KERNEL_MIN_EPSILON


def implementation():
    """The fast path's implementation for this backend and context, or None.

    On TensorFlow, "kernel" (FusedBatchNormV3) when a GPU is visible and
    not under XLA, else "xla". Under XLA it is always "xla": XLA's lowering
    of the kernel loses the variance (see `_fast_tf`). The device probe is
    `_fast_tf.gpu_visible`, which the tests replace to run the kernel
    branch on CPU.
    On JAX, "jax" (`_fast_jax`); on PyTorch, "torch" (`_fast_torch`). None
    on a backend with no fast path. Only the running backend's framework
    is imported.
    """
    name = backend.backend()
    if name in _OTHER_FRAMEWORKS:
        return name
    if name != "tensorflow":
        return None
    if _fast_tf.in_xla_context():
        return "xla"
    return "kernel" if _fast_tf.gpu_visible() else "xla"


# The input dtypes each implementation takes: the XLA, JAX and PyTorch
# paths compute in the statistics dtype of `_math`, float64 included.
_DTYPES = {
    "kernel": _KERNEL_DTYPES,
    "xla": _FLOAT_DTYPES,
    "jax": _FLOAT_DTYPES,
    "torch": _FLOAT_DTYPES,
}


def ineligibility(layer, inputs, mask, feature_axes, implementation):
    """Why this call cannot take the fused fast path, or None if it can.

    `layer` is read for its public configuration only (`renorm`,
    `virtual_batch_size`, `synchronized`, `epsilon`, `axis`); `inputs` is
    anything with `.shape` and `.dtype` (a tensor, a KerasTensor, a
    `tf.TensorSpec`); `feature_axes` are the resolved feature axes;
    `implementation` is what `implementation()` returned (None: no fast
    path on this backend). The rules every implementation shares come first
    (what the fast path computes), then each implementation's own limits.
    """
    if implementation is None:
        return f"the Keras backend is {backend.backend()!r}, which has no fused fast path"
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
    dtype = backend.standardize_dtype(inputs.dtype)
    if not backend.is_float_dtype(dtype):
        # The layer casts integer and bool inputs before this point.
        dtype = _math.statistics_dtype(layer.compute_dtype)
    dtypes = _DTYPES[implementation]
    if dtype not in dtypes:
        return f"inputs of dtype {dtype} (the fused path takes {', '.join(dtypes)})"

    # Each implementation's own limits.
    if implementation == "xla":
        shape = _geometry.static_shape(inputs)
        if None in shape[1:] and not _fast_tf.in_xla_context():
            return (
                f"input shape {shape} has an unknown dimension besides the batch (a "
                "variable length?): the XLA-compiled fast path would compile anew for "
                "every size"
            )
    if implementation == "kernel" and layer.epsilon < KERNEL_MIN_EPSILON:
        return (
            f"epsilon={layer.epsilon!r} is below {KERNEL_MIN_EPSILON}, the smallest "
            "TensorFlow's fused kernel accepts on GPUs (cuDNN)"
        )
    return None


def training(
    x,
    gamma,
    beta,
    moving_mean,
    moving_variance,
    axis,
    epsilon,
    momentum,
    out_dtype,
    implementation,
):
    """Batch normalization with batch statistics, as one fused computation.

    Args:
        x: the inputs (a tensor of the backend), any floating dtype the
            path takes (see `ineligibility`).
        gamma, beta: per-feature vectors, or None for no scale / offset.
        moving_mean, moving_variance: the current moving statistics
            (vectors; variables are read).
        axis: the one feature axis, non-negative.
        epsilon, momentum: Python floats.
        out_dtype: the dtype of the outputs (the layer's compute dtype).
        implementation: "xla", "kernel", "jax" or "torch", from
            `implementation()`.

    Returns:
        `(y, new_moving_mean, new_moving_variance)`; the moving statistics
        in the statistics dtype, unchanged where the batch is empty. Only
        `y` carries gradients (to `x`, `gamma` and `beta`).
    """
    args = (x, gamma, beta, moving_mean, moving_variance, axis, epsilon)
    if implementation in _OTHER_FRAMEWORKS:
        return _other_framework(implementation).training(
            *args, momentum, out_dtype
        )
    return _fast_tf.training(
        *args, momentum, out_dtype, kernel=implementation == "kernel"
    )


def inference(
    x,
    gamma,
    beta,
    moving_mean,
    moving_variance,
    axis,
    epsilon,
    out_dtype,
    implementation,
):
    """Batch normalization with the moving statistics; arguments as `training`."""
    args = (x, gamma, beta, moving_mean, moving_variance, axis, epsilon)
    if implementation in _OTHER_FRAMEWORKS:
        return _other_framework(implementation).inference(*args, out_dtype)
    return _fast_tf.inference(
        *args, out_dtype, kernel=implementation == "kernel"
    )


# ------------------------------------------------------------------ public


def fused_eligibility(layer, inputs, mask=None):
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
    `jax.jit` (Keras' `fit`, `stateless_call`) and eager calls. On
    TensorFlow the fast path is TensorFlow's fused batch-norm kernel on a
    GPU (cuDNN), the same computation compiled by XLA inside XLA-compiled
    functions, and off a GPU whichever of the kernel, the compiled
    computation and plain ops measured fastest for the call (see the
    `fused` argument); on JAX it is that computation in `jax.numpy` with a
    hand-written backward, compiled by XLA; on PyTorch it is a few native kernels per
    eager call, with autograd (`_fast_torch`).

    Args:
        layer: a `bnlayers.BatchNormalization` layer, built or not.
        inputs: a tensor, a `keras.KerasTensor` or `tf.TensorSpec` (anything
            with `.shape` and `.dtype`), or an input shape (a tuple; the
            dtype is then the layer's compute dtype).
        mask: the mask the layer would be called with, if any.

    Returns:
        None if the call would take the fast path, else a short reason.
        The answer does not depend on `layer.fused`: with `fused=False` the
        layer never takes it.
    """
    if isinstance(inputs, (tuple, list)):
        import keras

        inputs = keras.KerasTensor(tuple(inputs), dtype=layer.compute_dtype)
    shape = _geometry.static_shape(inputs)
    features = _geometry.feature_axes(
        layer.axis, len(shape), shape, layer.virtual_batch_size
    )
    return ineligibility(layer, inputs, mask, features, implementation())
