"""The fast path of `BatchNormalization` on PyTorch: a few native kernels per call.

Keras' torch backend runs eagerly under autograd, so a call costs what its
chain of operations costs: every elementwise op is a pass over the data in
the forward and another in the backward. Here a training step is one
subtraction, one reduction and one native batch-norm kernel forward, and
one native batch-norm backward kernel; an inference step is two passes.

Every single feature axis fits PyTorch's batch-norm layout by a reshape
alone (no data moves): features last become a matrix (rows, C); features
at axis k become (before, C, after), the (N, C, L) layout.

What the native kernels are trusted with, and what not (measured with
torch 2.13 on CPU, against float64):

- Statistics: `torch.native_batch_norm(training=True)` sums in float32, so
  even on values shifted by one sample its variance at a (64, 26, 26, 32)
  input was 6.6e-6 relative off at offset 0 and 4.9e-5 at 1e6, and its
  outputs 1.5e-5 off. `torch.var_mean` (accumulated in float64 on CPU) on
  ``d = x - s``, with `s` each feature's first sample
  (`_math.choose_shift`), is within 6e-8 at every offset: the statistics
  come from it.
- Normalizing: the kernel computes ``x * a + (beta - mean * a)``, not
  subtract-first, so fed raw inputs near 1e6 its outputs are 0.03 off.
  Fed ``d``, whose values are of the order of the spread, that form is
  exact to rounding: training normalizes ``d`` with the batch statistics
  of ``d`` (mean ``r``, the residual) through the kernel's inference mode.
  Inference subtracts the moving mean first and scales after
  (``torch.addcmul``), as the reference path does.
- Gradients: `torch.native_batch_norm_backward` with the saved ``r`` and
  ``1 / sqrt(var + epsilon)``; its float32 sums are well within the
  gradients' tolerance.

float16 and bfloat16 inputs are promoted to float32 by the subtraction
that shifts them (statistics in float32, as on the reference path);
float64 stays float64. Outputs are cast to the layer's compute dtype.

PyTorch is imported inside the functions, so that importing bnlayers on
another Keras backend does not import it.
"""

from keras import backend

from bnlayers import _math

DTYPES = ("float16", "bfloat16", "float32", "float64")


def _layout(x, axis):
    """`x` viewed as (rows, C) or (before, C, after), and the reduction dims."""
    shape = x.shape
    channels = shape[axis]
    if axis == x.dim() - 1:
        return x.reshape(-1, channels), (0,)
    before = 1
    for d in shape[:axis]:
        before *= d
    return x.reshape(before, channels, -1), (0, 2)


def _per_feature(v, view):
    """A per-feature vector shaped to broadcast against `view`."""
    return v.reshape(-1) if view.dim() == 2 else v.reshape(-1, 1)


def _vector(v, dtype):
    """A Keras variable (or tensor) as a torch tensor of `dtype`, grads kept."""
    if v is None:
        return None
    from keras import ops

    return ops.convert_to_tensor(v).to(dtype)


def _torch_dtype(dtype):
    import torch

    return getattr(torch, backend.standardize_dtype(dtype))


def _statistics_dtype(x):
    return _torch_dtype(_math.statistics_dtype(x.dtype))


def _normalize_function():
    import torch

    class Normalize(torch.autograd.Function):
        """Batch normalization of shifted values `d`, statistics taken here.

        Returns the outputs, the mean of `d` (the residual) and the biased
        variance; only the outputs carry gradients.
        """

        @staticmethod
        def forward(ctx, d, gamma, beta, dims, epsilon):
            with torch.no_grad():
                var, residual = torch.var_mean(d, dim=dims, correction=0)
            invstd = torch.rsqrt(var + epsilon)
            # The kernel's inference mode with the batch statistics of `d`:
            # one pass, and `d` is small, so its x * a + b form is exact.
            y = torch.native_batch_norm(
                d, gamma, beta, residual, var, False, 0.0, epsilon
            )[0]
            ctx.save_for_backward(d, gamma, residual, invstd)
            ctx.dims, ctx.epsilon = dims, epsilon
            ctx.mark_non_differentiable(residual, var)
            return y, residual, var

        @staticmethod
        def backward(ctx, dy, _dresidual, _dvar):
            d, gamma, residual, invstd = ctx.saved_tensors
            need_d, need_gamma, need_beta = ctx.needs_input_grad[:3]
            if torch.is_grad_enabled():
                # A gradient of the gradient was asked for (create_graph):
                # the same derivative in differentiable ops, with the
                # statistics recomputed from `d` so that their dependence on
                # `d` is in the graph.
                dd, dgamma, dbeta = _differentiable_backward(
                    dy, d, gamma, ctx.dims, ctx.epsilon
                )
            else:
                dd, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
                    dy.contiguous(),
                    d,
                    gamma,
                    None,
                    None,
                    residual,
                    invstd,
                    True,
                    ctx.epsilon,
                    [need_d, need_gamma and gamma is not None, need_beta],
                )
            return (
                dd if need_d else None,
                dgamma if need_gamma else None,
                dbeta if need_beta else None,
                None,
                None,
            )

    return Normalize


def _differentiable_backward(dy, d, gamma, dims, epsilon):
    import torch

    n = d.numel() // d.shape[1]
    residual = d.mean(dim=dims, keepdim=True)
    centred = d - residual
    var = (centred * centred).mean(dim=dims, keepdim=True)
    invstd = torch.rsqrt(var + epsilon)
    xhat = centred * invstd
    dbeta = dy.sum(dim=dims)
    dgamma = (dy * xhat).sum(dim=dims)
    scale = invstd if gamma is None else invstd * _per_feature(gamma, d)
    dd = scale * (
        dy
        - _per_feature(dbeta, d) / n
        - xhat * _per_feature(dgamma, d) / n
    )
    return dd, dgamma, dbeta


_NORMALIZE = None


def _normalize():
    global _NORMALIZE
    if _NORMALIZE is None:
        _NORMALIZE = _normalize_function()
    return _NORMALIZE


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
):
    """Batch normalization with batch statistics; as `_fused.training`."""
    import torch

    dtype = _statistics_dtype(x)
    gamma, beta = _vector(gamma, dtype), _vector(beta, dtype)
    with torch.no_grad():
        moving_mean = _vector(moving_mean, dtype)
        moving_variance = _vector(moving_variance, dtype)
    view, dims = _layout(x, axis)
    if view.numel() == 0:
        # No statistics: what the reference path computes (outputs of the
        # empty shape, gradients of zeros), moving statistics unchanged.
        y = view.to(dtype) * torch.rsqrt(torch.tensor(epsilon, dtype=dtype))
        if gamma is not None:
            y = y * _per_feature(gamma, view)
        if beta is not None:
            y = y + _per_feature(beta, view)
        return y.reshape(x.shape).to(_torch_dtype(out_dtype)), moving_mean, moving_variance
    # Each feature's first sample; its subtraction also promotes float16
    # and bfloat16 inputs to float32 in the same pass.
    if view.dim() == 2:
        shift = view[:1].detach().to(dtype)
    else:
        shift = view[:1, :, :1].detach().to(dtype)
    d = torch.sub(view, shift)
    y, residual, var = _normalize().apply(d, gamma, beta, dims, epsilon)
    with torch.no_grad():
        mean = shift.reshape(-1) + residual
        new_mean = _math.moving_average(moving_mean, mean, momentum)
        new_var = _math.moving_average(moving_variance, var, momentum)
    return y.reshape(x.shape).to(_torch_dtype(out_dtype)), new_mean, new_var


def inference(
    x,
    gamma,
    beta,
    moving_mean,
    moving_variance,
    axis,
    epsilon,
    out_dtype,
):
    """Batch normalization with the moving statistics; as `_fused.inference`."""
    import torch

    dtype = _statistics_dtype(x)
    view, _ = _layout(x, axis)
    mean = _per_feature(_vector(moving_mean, dtype), view)
    scale = torch.rsqrt(_vector(moving_variance, dtype) + epsilon)
    if gamma is not None:
        scale = scale * _vector(gamma, dtype)
    scale = _per_feature(scale, view)
    # Subtract first: (x - mean) is of the order of the spread, where
    # x * scale + (beta - mean * scale) would round at the size of x.
    centred = torch.sub(view, mean)
    if beta is None:
        y = centred * scale
    else:
        y = torch.addcmul(_per_feature(_vector(beta, dtype), view), centred, scale)
    return y.reshape(x.shape).to(_torch_dtype(out_dtype))
