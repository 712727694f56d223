"""The fused fast path of `BatchNormalization` on JAX.

The same computation as the reference path (`_math`) and TensorFlow's XLA
path (`_fused`), in `jax.numpy` with a hand-written backward
(`jax.custom_vjp`), compiled by XLA (`jax.jit`):

- statistics in float32 (float64 for float64 inputs) on values shifted by
  each feature's first sample (`_math.choose_shift`): ``d = x - s``, the
  residual mean ``r = mean(d)``, the variance ``mean((d - r) ** 2)``; the
  outputs ``(d - r) * (gamma / sqrt(var + epsilon)) + beta``. No sum sees
  the offset of the data, so the path is exact at any mean.
- the backward takes ``sum(dy)`` and ``sum(dy * (d - r))`` and writes the
  input gradient in one more loop, recomputing ``d - r`` from `x` where
  autodiff of the forward would store it. The two sums are two reductions
  (each reads `dy` once, the second reads `x` too): XLA's CPU backend runs
  a one-pass reduction of both (a variadic `lax.reduce`) as a scalar loop,
  measured 4x to 7x slower at convolution shapes.

What a training step costs is set by how XLA's CPU backend fuses it: every
reduction reads its operand expression straight from `x` and `dy`, and
the only full-size array written is the input gradient (see `_own_copy`),
against three temporaries for the built-in layer's step.

In training the inputs are seen as a matrix (rows, features) when the
features are the last axis, else as (before, features, after): a reshape,
no data moves, and reductions over merged axes measured fastest.

Called inside a trace (Keras' `fit`, `stateless_call` under `jax.jit`) the
jitted functions here are inlined into the caller's computation; called
eagerly (op by op) each is one compiled call, cached per shape and dtype as
any JAX operation is.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from keras import backend
from keras import ops

from bnlayers import _geometry
from bnlayers import _math


def _stats_axes(x, feature):
    return tuple(i for i in range(x.ndim) if i != feature)


def _per_feature(v, x, feature):
    return v.reshape(_geometry.vector_shape(x.ndim, feature))


def _first_sample(x, feature):
    """Each feature's first element (`_math.choose_shift`); 0 for an empty batch.

    Shapes are static under JAX, so the empty case is decided here, in Python.
    """
    if x.size == 0:
        return jnp.zeros((x.shape[feature],), x.dtype)
    return x[tuple(slice(None) if i == feature else 0 for i in range(x.ndim))]


def _count(x, feature):
    """Elements per feature, at least 1 (an empty batch gives zeros, not NaN)."""
    return max(x.size // max(x.shape[feature], 1), 1)


# Up to 2^16 elements the inputs stay in the caches and a full-size
# temporary costs less than the small loops that `_own_copy` adds; above,
# the copies win. A training step without the copies, over one with them
# (2 cores, AMD EPYC, 15 to 31 interleaved rounds): 0.88x to 0.94x at
# (256, 128) and (16, 2, 2, 512), 0.86x to 0.98x at 65,536 elements
# ((16, 2, 2, 1024), (64, 1024), (16, 4, 4, 256)), but 1.15x to 1.35x from
# 81,920 to 131,072 elements ((16, 2, 2, 1280), (16, 4, 4, 384), (16, 4, 4,
# 480), (16, 8, 8, 96), (16, 8, 8, 128)).
_COPIES_MIN_SIZE = (1 << 16) + 1


def _copies(x, activation):
    """Whether the loops over `x` broadcast copies of their own (`_own_copy`).

    Not with an activation: its input, recomputed in every loop of the
    backward, changes how XLA fuses them, and the step without copies
    measured faster at every size (same machine, 9 to 15 rounds, over the
    step with them: 0.67x to 0.97x from (16, 2, 2, 1024) to (64, 26, 26,
    32) with relu, silu or hard swish, 1.0x at (32, 56, 56, 64) with relu).
    """
    return activation is None and x.size >= _COPIES_MIN_SIZE


def _own_copy(v, token, copies):
    """`v` itself, as a value of its own that XLA does not merge with `v`.

    XLA's CPU reductions (YNNPACK fusions) read expressions of the inputs
    and of per-feature vectors in one pass, computing nothing full-size
    beforehand. But a per-feature vector that several full-size loops
    broadcast is broadcast once, into a full-size temporary that each of
    them then reads: at the article's shape the shift and the residual
    cost four such temporaries in a training step, and a step without them
    measured twice as fast. So each loop broadcasts a copy of its own:
    ``v + 0 * token``, which is `v` bit for bit wherever `token` (a
    statistic of the same feature, computed before the loop) is finite,
    and which XLA cannot fold (``0 * token`` is NaN for an infinite
    `token`, where that feature's outputs are NaN anyway). Where `copies`
    is false (`_copies`), `v` itself.
    """
    return v + 0.0 * token if copies else v


def _activate(y, activation):
    """`y` through the activation named by `Spec.activation` (Keras' definitions)."""
    if activation is None:
        return y
    if activation == "gelu":
        return jax.nn.gelu(y, approximate=False)
    return getattr(jax.nn, activation)(y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _normalize(x, gamma, beta, feature, epsilon, out_dtype, activation):
    """`(y, shift, residual, var)` for `x` with its features on axis `feature`."""
    return _normalize_forward(
        x, gamma, beta, feature, epsilon, out_dtype, activation
    )[0]


def _normalize_forward(x, gamma, beta, feature, epsilon, out_dtype, activation):
    xf = x.astype(gamma.dtype)
    axes = _stats_axes(xf, feature)
    n = _count(xf, feature)
    shift = _per_feature(_first_sample(xf, feature), xf, feature)
    copies = _copies(xf, activation)
    # Two passes on shifted values (_math.shifted_moments), each one read of
    # x: the variance's error does not depend on how far the first sample
    # lies from the mean.
    residual = jnp.sum(xf - shift, axes, keepdims=True) / n
    centred = (xf - _own_copy(shift, residual, copies)) - residual
    var = jnp.sum(jnp.square(centred), axes, keepdims=True) / n
    inv = jax.lax.rsqrt(var + epsilon)
    centred = (xf - _own_copy(shift, var, copies)) - _own_copy(
        residual, var, copies
    )
    y = centred * (inv * _per_feature(gamma, xf, feature)) + _per_feature(
        beta, xf, feature
    )
    y = _activate(y, activation)
    statistics = (shift.reshape(-1), residual.reshape(-1), var.reshape(-1))
    # beta (a vector) is kept for the backward to recompute the activation's
    # input from x: no full-size tensor is stored besides x.
    return (y.astype(out_dtype),) + statistics, (x, gamma, beta) + statistics


def _normalize_backward(
    feature, epsilon, out_dtype, activation, saved, cotangents
):
    del out_dtype
    x, gamma, beta, shift, residual, var = saved
    # Only y carries gradients; the statistics go to the moving averages,
    # which are not differentiated (the caller stops their gradient).
    dtype = gamma.dtype
    xf = x.astype(dtype)
    dy = cotangents[0].astype(dtype)
    axes = _stats_axes(xf, feature)
    n = _count(xf, feature)
    shift, residual = (
        _per_feature(shift, xf, feature),
        _per_feature(residual, xf, feature),
    )
    inv = _per_feature(jax.lax.rsqrt(var + epsilon), xf, feature)
    copies = _copies(xf, activation)
    if activation is not None:
        # The activation's input recomputed from x (XLA fuses it into the
        # loops that read x and dy), and its derivative applied to dy.
        pre = ((xf - shift) - residual) * (
            inv * _per_feature(gamma, xf, feature)
        ) + _per_feature(beta, xf, feature)
        dy = jax.vjp(lambda v: _activate(v, activation), pre)[1](dy)[0]
    # The two sums; (x - shift) - residual as in the forward, exact at any
    # offset.
    dbeta = jnp.sum(dy, axes, keepdims=True)
    # The tokens of the copies depend on x: with an upstream gradient that
    # XLA knows (a constant), dbeta would be folded, and the copy with it.
    centred = (xf - _own_copy(shift, inv, copies)) - _own_copy(
        residual, inv, copies
    )
    dgamma = jnp.sum(dy * centred, axes, keepdims=True) * inv
    # With xhat = (x - mean) * inv and the statistics depending on x, the
    # derivative of gamma * xhat + beta is
    # gamma * inv * (dy - mean(dy) - xhat * mean(dy * xhat)), and
    # sum(dy * xhat) is dgamma.
    centred = (xf - _own_copy(shift, dgamma, copies)) - _own_copy(
        residual, dgamma, copies
    )
    scale = _per_feature(gamma, xf, feature) * inv
    dx = scale * (dy - dbeta / n - centred * (inv * dgamma / n))
    return dx.astype(x.dtype), dgamma.reshape(-1), dbeta.reshape(-1)


_normalize.defvjp(_normalize_forward, _normalize_backward)


_STATIC = ("axis", "epsilon", "out_dtype", "activation")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _training(
    x,
    gamma,
    beta,
    moving_mean,
    moving_var,
    momentum,
    axis,
    epsilon,
    out_dtype,
    activation,
):
    xm = x.reshape(_geometry.merged_shape(x.shape, axis))
    y, shift, residual, var = _normalize(
        xm, gamma, beta, 1, epsilon, out_dtype, activation
    )
    mean = jax.lax.stop_gradient(shift + residual)
    var = jax.lax.stop_gradient(var)
    if x.size == 0:
        # An empty batch leaves the moving statistics as they are.
        new_mean, new_var = moving_mean, moving_var
    else:
        new_mean = _math.moving_average(moving_mean, mean, momentum)
        new_var = _math.moving_average(moving_var, var, momentum)
    return y.reshape(x.shape), new_mean, new_var


@functools.partial(jax.jit, static_argnames=_STATIC)
def _inference(x, gamma, beta, mean, var, axis, epsilon, out_dtype, activation):
    # In the inputs' own shape: one elementwise loop, which XLA fuses with
    # its neighbours (a convolution before, a pooling after); a reshape in
    # the middle of such a fusion measured 1.3x slower (the article's model,
    # predict_on_batch).
    xf = x.astype(gamma.dtype)
    # The mean is subtracted before scaling, as in the reference path
    # (x * a + b would lose digits when the mean is large next to the spread).
    scale = jax.lax.rsqrt(var + epsilon) * gamma
    y = (xf - _per_feature(mean, xf, axis)) * _per_feature(
        scale, xf, axis
    ) + _per_feature(beta, xf, axis)
    # Autodiff of the activation here: inference steps are not trained
    # through often enough to be worth a backward of their own.
    return _activate(y, activation).astype(out_dtype)


def _arguments(x, params, axis):
    """Arrays in the statistics dtype; gamma and beta filled where None."""
    x = ops.convert_to_tensor(x)
    dtype = _math.statistics_dtype(x.dtype)
    channels = x.shape[axis]

    def per_feature(v, fill):
        if v is None:
            return jnp.full((channels,), fill, dtype)
        return ops.convert_to_tensor(v).astype(dtype)

    return (
        x,
        per_feature(params.gamma, 1.0),
        per_feature(params.beta, 0.0),
        ops.convert_to_tensor(params.moving_mean).astype(dtype),
        ops.convert_to_tensor(params.moving_variance).astype(dtype),
    )


def _static(spec):
    """The static arguments of the jitted functions."""
    return {
        "axis": spec.axis,
        "epsilon": float(spec.epsilon),
        "out_dtype": np.dtype(backend.standardize_dtype(spec.out_dtype)),
        "activation": spec.activation,
    }


def training(x, params, spec):
    """`_fused.training` on JAX.

    Returns:
        tuple: ``(y, new_moving_mean, new_moving_variance)``.
    """
    x, gamma, beta, moving_mean, moving_variance = _arguments(
        x, params, spec.axis
    )
    if params.momentum is None:
        momentum = jnp.asarray(spec.momentum, gamma.dtype)
    else:
        # A per-step momentum (one per feature): a traced argument.
        momentum = ops.convert_to_tensor(params.momentum).astype(gamma.dtype)
    return _training(
        x, gamma, beta, moving_mean, moving_variance, momentum, **_static(spec)
    )


def inference(x, params, spec):
    """`_fused.inference` on JAX.

    Returns:
        jax.Array: the outputs.
    """
    return _inference(*_arguments(x, params, spec.axis), **_static(spec))
