"""The fast path of `BatchNormalization` on PyTorch: a few native kernels per call.

Keras' torch backend runs eagerly under autograd, so a call costs what its
chain of operations costs: every elementwise op is a pass over the data in
the forward and usually another in the backward. Here a training step is
a subtraction (the shift), the centred values squared into one buffer,
two pairwise reductions and one folded pass into that buffer for the
outputs, then PyTorch's native batch-norm backward kernel; an inference
step is one or two passes.

Every single feature axis fits PyTorch's batch-norm layout by a reshape
alone (no data moves): features last become a matrix (rows, C); features
at axis k become (before, C, after), the (N, C, L) layout.

What PyTorch's own kernels are trusted with, and what not (measured with
torch 2.13 on CPU, against float64):

- Statistics: `torch.native_batch_norm(training=True)` sums in float32
  one element after another, so even on values shifted by one sample its
  variance at a (64, 26, 26, 32) input was 6.6e-6 relative off at offset
  0 and 4.9e-5 at 1e6, and its outputs 1.5e-5 off. `torch.sum` sums
  pairwise: two passes over ``d = x - s``, with `s` each feature's first
  sample (`_math.choose_shift`), ``r = mean(d)`` and ``mean((d - r)^2)``,
  give the variance within 5e-7 relative at every offset up to 1e6, also
  when the first sample lies 10 standard deviations out. (`torch.var_mean`
  is as exact but measured 5x slower on CPU; `torch.linalg.vector_norm`
  sums one element after another; one pass, ``mean(d^2) - r^2``, loses
  digits when the first sample lies far out.)
- Normalizing: the kernel computes ``x * a + (beta - mean * a)``, which
  rounds at the size of ``x * a``: fed raw inputs near 1e6 its outputs
  are 0.03 off. Training folds too, but on the shifted values, in one
  pass ``d * a + (beta - r * a)`` into the buffer that held the centred
  values: that rounds at the size of ``r * a``, how far a feature's first
  sample lies from the mean in output units, which is at most that
  sample's own output (n * var >= (x0 - mean)^2), so the outputs stay
  within float32 rounding of the largest of them, at any offset.
  Inference subtracts the mean first, except that on CPU
  for tensors of 2^17 elements or more it takes the folded one pass
  ``x * a + (beta - mean * a)`` when every feature's ``|mean * a|`` is at
  most 16, where it is within 2e-6 of the subtract-first outputs (one
  pass instead of two, and fresh buffers of that size cost page faults).
- Gradients: `native_batch_norm_backward` with the saved ``r`` and
  ``1 / sqrt(var + epsilon)``: it forms ``(d - r) * invstd`` itself, and
  its float32 sums of ``dy`` and ``dy * xhat`` stay within 6e-7 of
  float64. A gradient of the gradient (`create_graph=True`) is taken
  through the same derivative written in differentiable ops.

float16 and bfloat16 inputs are promoted to float32 by the subtraction
that shifts them (statistics in float32, as on the reference path);
float64 stays float64. Outputs are cast to the layer's compute dtype.

PyTorch is imported inside the functions, so that importing bnlayers on
another Keras backend does not import it.
"""

from keras import backend

from bnlayers import _geometry
from bnlayers import _math


def _layout(x, axis):
    """`x` viewed as (rows, C) or (before, C, after), and the reduction dims."""
    shape = x.shape
    channels = shape[axis]
    if axis == x.dim() - 1:
        # (Even a reshape to the same shape costs microseconds per call.)
        return (x if x.dim() == 2 else x.reshape(-1, channels)), (0,)
    # (Sizes spelled out: -1 is ambiguous for an empty batch.)
    return x.reshape(_geometry.merged_shape(shape, axis)), (0, 2)


def _per_feature(v, view):
    """A per-feature vector shaped to broadcast against `view`."""
    return v if view.dim() == 2 else v.reshape(-1, 1)


def _tensor(v, dtype):
    """A Keras variable (or tensor) as a torch tensor of `dtype`, grads kept."""
    if v is None:
        return None
    # A Keras variable's `.value` is its torch tensor (a Parameter when
    # trainable), which autograd differentiates.
    v = getattr(v, "value", v)
    return v if v.dtype == dtype else v.to(dtype)


def _restore(y, x, out_dtype):
    """`y` in the shape of `x` and `out_dtype` (skipping the no-op calls,
    which still cost microseconds each; while tracing, comparing traced
    sizes would warn, so the reshape is kept)."""
    import torch

    if torch.jit.is_tracing() or y.shape != x.shape:
        y = y.reshape(x.shape)
    return y if y.dtype == out_dtype else y.to(out_dtype)


_DTYPES: dict = {}

# The activations whose gradient is a mask read from their outputs: y in
# (lower, upper) exactly where the activation's input is.
_MASKED = {"relu": (0.0, None), "relu6": (0.0, 6.0)}


def _activate(y, activation, inplace):
    """`y` through the activation named by `Spec.activation` (Keras'
    definitions), into `y` itself where `inplace`."""
    import torch
    import torch.nn.functional as F

    if activation is None:
        return y
    if activation == "relu":
        return F.relu(y, inplace=inplace)
    if activation == "relu6":
        return F.hardtanh(y, 0.0, 6.0, inplace=inplace)
    if activation == "silu":
        return F.silu(y, inplace=inplace)
    if activation == "hard_silu":
        return F.hardswish(y, inplace=inplace)
    if inplace:
        return torch.ops.aten.gelu.out(y, out=y)
    return F.gelu(y)


def _activation_backward(dy, y, pre, activation):
    """``dy * activation'(pre)``, from the outputs `y` for relu and relu6
    (`pre` may then be None), else from the activation's input `pre`."""
    import torch

    if activation in _MASKED and pre is None:
        lower, upper = _MASKED[activation]
        if upper is None:
            return torch.ops.aten.threshold_backward(dy, y, lower)
        return torch.ops.aten.hardtanh_backward(dy, y, lower, upper)
    if activation == "relu":
        return torch.ops.aten.threshold_backward(dy, pre, 0.0)
    if activation == "relu6":
        return torch.ops.aten.hardtanh_backward(dy, pre, 0.0, 6.0)
    if activation == "silu":
        return torch.ops.aten.silu_backward(dy, pre)
    if activation == "hard_silu":
        return torch.ops.aten.hardswish_backward(dy, pre)
    return torch.ops.aten.gelu_backward(dy, pre)


def _dtypes(x_dtype, out_dtype):
    """(statistics dtype, output dtype) as torch dtypes, looked up once."""
    key = (x_dtype, out_dtype)
    found = _DTYPES.get(key)
    if found is None:
        import torch

        found = (
            getattr(torch, _math.statistics_dtype(x_dtype)),
            getattr(torch, backend.standardize_dtype(out_dtype)),
        )
        _DTYPES[key] = found
    return found


def _normalize_function():
    import torch

    class Normalize(torch.autograd.Function):
        """Batch normalization of shifted values `d`, statistics taken here.

        Returns the outputs, the mean of `d` (the residual) and the biased
        variance; only the outputs carry gradients.
        """

        @staticmethod
        def forward(ctx, d, gamma, beta, dims, epsilon, activation, keep_y):
            # (Autograd does not record inside `forward`.) Two passes over
            # `d`, see the module docstring: torch's sums are pairwise, and
            # centred values make the variance independent of how far the
            # shift lies from the mean.
            residual = d.mean(dim=dims)
            buffer = d - _per_feature(residual, d)
            var = buffer.square_().mean(dim=dims)
            invstd = torch.rsqrt(var + epsilon)
            scale = invstd if gamma is None else invstd * gamma
            y = _normalized(d, residual, scale, beta, buffer)
            # relu and relu6 are computed in place, on the buffer this
            # function owns, and take their gradient's mask from the
            # outputs (`keep_y`: they are the outputs returned; with
            # outputs in another dtype the backward recomputes their input
            # from `d`, no float32 copy is kept). Other activations keep
            # their input, the buffer, for the backward (the tensor that
            # the built-in layer followed by the activation keeps too):
            # recomputing it there would cost two passes over the data.
            saved_y = saved_pre = None
            if activation is None or activation in _MASKED:
                y = _activate(y, activation, True)
                saved_y = y if activation is not None and keep_y else None
            else:
                saved_pre = y
                y = _activate(y, activation, False)
            ctx.save_for_backward(
                d, gamma, beta, residual, invstd, saved_y, saved_pre
            )
            ctx.dims, ctx.epsilon = dims, epsilon
            ctx.activation = activation
            ctx.mark_non_differentiable(residual, var)
            return y, residual, var

        @staticmethod
        def backward(ctx, dy, _dresidual, _dvar):
            d, gamma, beta, *_ = ctx.saved_tensors
            need_d, need_gamma, need_beta = ctx.needs_input_grad[:3]
            activation = ctx.activation
            if torch.is_grad_enabled():
                # A gradient of the gradient was asked for (create_graph):
                # the same derivative in differentiable ops, with the
                # statistics recomputed from `d` so that their dependence on
                # `d` is in the graph.
                dd, dgamma, dbeta = _differentiable_backward(
                    dy, d, gamma, beta, ctx.dims, ctx.epsilon, activation
                )
            else:
                dd, dgamma, dbeta = _kernel_backward(
                    ctx, dy, (need_d, need_gamma, need_beta)
                )
            return (
                dd if need_d else None,
                dgamma if need_gamma else None,
                dbeta if need_beta else None,
                None,
                None,
                None,
                None,
            )

    return Normalize


def _kernel_backward(ctx, dy, needs):
    """`Normalize`'s backward without a graph: the activation's derivative,
    then PyTorch's batch-norm backward kernel on the saved tensors."""
    import torch

    d, gamma, beta, residual, invstd, y, pre = ctx.saved_tensors
    if ctx.activation is not None:
        if y is None and pre is None:
            # relu or relu6 with outputs in another dtype.
            scale = invstd if gamma is None else invstd * gamma
            pre = _normalized(d, residual, scale, beta, None)
        dy = _activation_backward(dy, y, pre, ctx.activation)
    # The kernel forms (d - residual) * invstd itself, subtract-first; its
    # float32 sums of dy and dy * xhat stay well within the gradients'
    # tolerance.
    return torch.ops.aten.native_batch_norm_backward(
        dy.contiguous(),
        d,
        gamma,
        None,
        None,
        residual,
        invstd,
        True,
        ctx.epsilon,
        list(needs),
    )


def _differentiable_backward(dy, d, gamma, beta, dims, epsilon, activation):
    import torch

    n = d.numel() // d.shape[1]
    residual = d.sum(dim=dims, keepdim=True) / n
    centred = d - residual
    var = (centred * centred).sum(dim=dims, keepdim=True) / n
    invstd = torch.rsqrt(var + epsilon)
    xhat = centred * invstd
    if activation is not None:
        # dy * activation'(pre), with pre (and so the derivative) a
        # differentiable function of d, gamma and beta.
        pre = xhat if gamma is None else xhat * _per_feature(gamma, d)
        if beta is not None:
            pre = pre + _per_feature(beta, d)
        if not pre.requires_grad:
            pre = pre.detach().requires_grad_()
        (dy,) = torch.autograd.grad(
            _activate(pre, activation, False), pre, dy, create_graph=True
        )
    dbeta = dy.sum(dim=dims)
    dgamma = (dy * xhat).sum(dim=dims)
    scale = invstd if gamma is None else invstd * _per_feature(gamma, d)
    dd = scale * (
        dy - _per_feature(dbeta, d) / n - xhat * _per_feature(dgamma, d) / n
    )
    return dd, dgamma, dbeta


_NORMALIZE = None


def _normalize():
    global _NORMALIZE
    if _NORMALIZE is None:
        _NORMALIZE = _normalize_function()
    return _NORMALIZE


def training(x, params, spec):
    """`_fused.training` on PyTorch.

    Returns:
        tuple: ``(y, new_moving_mean, new_moving_variance)``.
    """
    import torch

    epsilon, momentum = spec.epsilon, spec.momentum
    dtype, out_dtype = _dtypes(x.dtype, spec.out_dtype)
    gamma, beta = _tensor(params.gamma, dtype), _tensor(params.beta, dtype)
    view, dims = _layout(x, spec.axis)
    # (The moving statistics are not trainable: no gradient is recorded.)
    moving_mean = _tensor(params.moving_mean, dtype)
    moving_variance = _tensor(params.moving_variance, dtype)
    if view.numel() == 0:
        # No statistics: what the reference path computes (outputs of the
        # empty shape, gradients of zeros), moving statistics unchanged.
        y = view.to(dtype) * (1.0 / epsilon**0.5)
        if gamma is not None:
            y = y * _per_feature(gamma, view)
        if beta is not None:
            y = y + _per_feature(beta, view)
        y = _activate(y, spec.activation, False)
        return _restore(y, x, out_dtype), moving_mean, moving_variance
    # Each feature's first sample; its subtraction also promotes float16
    # and bfloat16 inputs to float32 in the same pass.
    shift = _tensor(
        (view[0] if view.dim() == 2 else view[0, :, 0]).detach(), dtype
    )
    d = torch.sub(view, _per_feature(shift, view))
    keep_y = out_dtype == dtype
    y, residual, var = _normalize().apply(
        d, gamma, beta, dims, epsilon, spec.activation, keep_y
    )
    # The Keras rule, moving * momentum + batch * (1 - momentum), in two
    # operations each; `residual` and `var` carry no gradient.
    mean = shift + residual
    if params.momentum is not None:
        # A per-step momentum, one per feature (a tensor).
        step = _tensor(params.momentum, dtype)
        new_mean = moving_mean * step + mean * (1.0 - step)
        new_var = moving_variance * step + var * (1.0 - step)
        return _restore(y, x, out_dtype), new_mean, new_var
    new_mean = torch.add(moving_mean * momentum, mean, alpha=1.0 - momentum)
    new_var = torch.add(moving_variance * momentum, var, alpha=1.0 - momentum)
    return _restore(y, x, out_dtype), new_mean, new_var


def inference(x, params, spec):
    """`_fused.inference` on PyTorch.

    Returns:
        torch.Tensor: the outputs.
    """
    import torch

    dtype, out_dtype = _dtypes(x.dtype, spec.out_dtype)
    gamma, beta = _tensor(params.gamma, dtype), _tensor(params.beta, dtype)
    view, _ = _layout(x, spec.axis)
    with torch.no_grad():
        mean = _tensor(params.moving_mean, dtype)
        invstd = torch.rsqrt(
            _tensor(params.moving_variance, dtype) + spec.epsilon
        )
    scale = invstd if gamma is None else invstd * gamma
    if _foldable(view, mean, scale):
        # One pass, x * scale + (beta - mean * scale). (torch's batch-norm
        # kernel computes the same, at twice the fixed cost per call.)
        if view.dtype not in (dtype, out_dtype):
            view = view.to(dtype)
        y = _normalized(view, mean, scale, beta, None)
        y = _activate(y, spec.activation, not _recorded(x, gamma, beta))
        return _restore(y, x, out_dtype)
    # Subtract first: (x - mean) is of the order of the spread, where the
    # folded form would round at the size of x.
    centred = torch.sub(view, _per_feature(mean, view))
    # Without autograd recording, the centred buffer takes the outputs.
    recorded = _recorded(x, gamma, beta)
    y = _scale_and_offset(centred, scale, beta, None if recorded else centred)
    # In place where autograd records nothing (the buffer is this call's).
    y = _activate(y, spec.activation, not recorded)
    return _restore(y, x, out_dtype)


def _recorded(x, gamma, beta):
    """Whether autograd records operations on these (then nothing in place)."""
    import torch

    return torch.is_grad_enabled() and (
        x.requires_grad
        or (gamma is not None and gamma.requires_grad)
        or (beta is not None and beta.requires_grad)
    )


def _normalized(d, mean, scale, beta, out):
    """``(d - mean) * scale + beta`` in one pass, folded:
    ``d * scale + (beta - mean * scale)``, into `out` if given (where this
    is exact: the module docstring)."""
    folded = mean * scale
    offset = -folded if beta is None else beta - folded
    return _scale_and_offset(d, scale, offset, out)


def _scale_and_offset(centred, scale, beta, out):
    """``centred * scale + beta``, per feature, into `out` if given."""
    import torch

    scale = _per_feature(scale, centred)
    if beta is None:
        return torch.mul(centred, scale, out=out)
    return torch.addcmul(_per_feature(beta, centred), centred, scale, out=out)


# How far from zero ``mean * scale`` may lie, per feature, for the folded
# form ``x * scale + (beta - mean * scale)``: its rounding adds about
# eps * 2 * |mean * scale| to the outputs' own (float32: 2e-6 at the bound,
# against the 1e-5 goal), the price of one pass over the data instead of
# two. Beyond it (large offsets), the outputs are computed subtract-first.
_FOLD_BOUND = 16.0


# Below this many elements a second pass over the data costs less than the
# few small operations that decide whether the folded form may be used.
_FOLD_MIN_SIZE = 1 << 17


def _foldable(view, mean, scale):
    """Whether inference on `view` may take the folded form.

    On CPU only, for tensors of `_FOLD_MIN_SIZE` elements or more, and
    where every feature's ``|mean * scale|`` is within `_FOLD_BOUND`:
    reading that answer costs nothing on CPU, while on a GPU it would wait
    for the device (and the second pass is cheap there). Never while
    tracing a graph (ONNX export, torch.compile), which would keep the
    branch of the traced data.
    """
    import torch

    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if view.device.type != "cpu" or view.numel() < _FOLD_MIN_SIZE:
        return False
    return (mean * scale).detach().abs().max().item() <= _FOLD_BOUND
