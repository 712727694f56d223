"""The arithmetic of batch normalization, once, as pure functions over `keras.ops`.

Every layer in bnlayers is a thin shell around these functions: they take
tensors and return tensors, hold no state and know nothing about Keras
layers, so they can be tested on their own against a float64 NumPy reference.

Statistics are carried as *moment triples* ``(count, mean, m2)``: the number
of (unmasked) elements, their mean, and the centred sum of squares
``m2 = sum((x - mean) ** 2)``. Triples of disjoint groups merge exactly
(Chan, Golub & LeVeque, 1979), which is what ghost batches and cross-replica
synchronization both need; ``variance = m2 / count``. Every mean and sum of
squares is taken on values shifted by a per-feature sample near the mean
(`shifted_moments`), so neither the mean nor the variance sees the offset of
the data: both stay exact to rounding whatever the mean, where a plain sum
loses digits and the one-pass ``E[x^2] - E[x]^2`` cancels to zero.
"""

from keras import backend
from keras import ops

_LOW_PRECISION = ("float16", "bfloat16")


def statistics_dtype(dtype):
    """The dtype statistics are computed in for inputs of `dtype`.

    float16 and bfloat16 have too little range and precision for sums over a
    batch, so they are promoted to float32; float32 and float64 stay as they
    are.
    """
    dtype = backend.standardize_dtype(dtype)
    if dtype in _LOW_PRECISION:
        return "float32"
    # Not backend.result_type(dtype, "float32"): off TensorFlow, Keras' type
    # promotion maps float64 to float32 (JAX's rule without x64), which would
    # take float64 statistics in float32 on PyTorch.
    return "float64" if dtype == "float64" else "float32"


def reduced_size(x, axes):
    """Number of elements of `x` over `axes`, as a Python int when static."""
    shape = ops.shape(x)
    size = 1
    for axis in axes:
        size = size * shape[axis]
    return size


def _first_sample(x, axes):
    """Per-feature value of the first element along `axes` (0 for an empty batch).

    A sum over a slice of one element rather than the slice itself, so the
    result has size 1 along `axes` even when the batch is empty.
    """
    index = tuple(
        slice(0, 1) if i in axes else slice(None) for i in range(len(x.shape))
    )
    return ops.sum(x[index], axis=axes, keepdims=True)


def choose_shift(x, axes, weights=None):
    """The per-feature shift `s` of `shifted_moments`, with no gradient.

    Without a mask, the first element along `axes`: free to take, and any
    float32 value within a factor of two of it (every element, when the
    mean is large next to the spread) is subtracted from it exactly
    (Sterbenz's lemma), so ``x - s`` carries no rounding at all there; near
    zero it carries at most half an ulp of ``|x - s|``, which is of the
    order of the spread. With a mask the first element may be masked out
    (padding, even inf or NaN), so the shift is the midrange of the
    unmasked elements, ``min + (max - min) / 2``: within the range of the
    data, so the same holds, and computed by order-independent reductions,
    so it is the same number bit for bit wherever a compiler recomputes it.
    (A float32 mean is not: under `jax.jit`, XLA recomputed a masked mean
    for the backward pass in another summation order, and the input
    gradient at an offset of 1e6 came out 6e-4 off.) Where nothing counts
    the shift is 0. Either way ``|s - mean|`` is at most the range of the
    data, which bounds the one-pass form's error (`one_pass_moments`); the
    two-pass form of `shifted_moments` does not depend on it.
    """
    axes = tuple(axes)
    if weights is None:
        return ops.stop_gradient(_first_sample(x, axes))
    keep = ops.broadcast_to(ops.cast(weights, "bool"), ops.shape(x))
    big = ops.cast(float("inf"), x.dtype)
    high = ops.max(ops.where(keep, x, -big), axis=axes, keepdims=True)
    low = ops.min(ops.where(keep, x, big), axis=axes, keepdims=True)
    shift = low + (high - low) / 2.0
    counted = ops.any(keep, axis=axes, keepdims=True)
    return ops.stop_gradient(ops.where(counted, shift, ops.zeros_like(shift)))


def shifted_moments(x, axes, weights=None):
    """Statistics of `x` over `axes`, taken on ``x - s`` for a shift `s` near the mean.

    Args:
        x: floating tensor, already in the statistics dtype.
        axes: the axes to reduce over.
        weights: optional mask broadcastable to `x`: true (or nonzero)
            where an element counts, false where it is masked out; masked
            elements may hold anything, inf and NaN included.

    Returns:
        `(count, shift, residual, m2)`, each with `axes` kept: the number of
        counted elements; the shift `s` of `choose_shift` (no gradient);
        the mean of ``x - s`` (so the mean is ``shift + residual``); and
        ``m2 = sum((x - mean) ** 2)``. Normalize ``(x - shift) - residual``
        (`normalize(x - shift, residual, var, ...)`), never
        ``x - (shift + residual)``: the residual holds the part of the mean
        that a float32 number near the offset cannot. Where nothing counts,
        count, residual and m2 are 0 (never NaN).

    Why it is exact at any offset: a plain float32 mean of values near an
    offset `c` is off by about ``log2(n) * eps * c`` (0.5 at c = 1e6 for
    a few hundred elements), and a variance taken around it is off by the
    square of that. Here every sum is a sum of ``x - s``, numbers of the
    order of the spread, so the offset never enters the rounding.

    The form is two passes on shifted values: ``residual = sum(d) / n`` and
    ``m2 = sum((d - residual) ** 2)`` with ``d = x - s``, whose error does
    not depend on how far `s` is from the mean (float32, per-feature
    spread 0.5 to 2, shapes (16, 5, 5, 4) and (64, 8), measured: variance
    within 8e-7 relative and outputs within 1.2e-6 of float64 at offsets 0
    to 1e6). Fast paths that want one read of `x` for both sums use `one_pass_moments`.
    """
    axes = tuple(axes)
    shift = choose_shift(x, axes, weights)
    d = x - shift
    if weights is None:
        count = ops.cast(reduced_size(x, axes), x.dtype)
        # Not ops.mean: on PyTorch it averages float64 in float32.
        residual = ops.sum(d, axis=axes, keepdims=True) / ops.maximum(
            count, 1.0
        )
        # The variance's derivative with respect to the mean is zero at the
        # mean, so the residual needs no gradient path through m2.
        m2 = ops.sum(
            ops.square(d - ops.stop_gradient(residual)),
            axis=axes,
            keepdims=True,
        )
        count = ops.ones_like(residual) * count
        return count, shift, residual, m2
    keep = ops.broadcast_to(ops.cast(weights, "bool"), ops.shape(x))
    zeros = ops.zeros_like(x)
    count = ops.sum(ops.cast(keep, x.dtype), axis=axes, keepdims=True)
    residual = ops.sum(ops.where(keep, d, zeros), axis=axes, keepdims=True)
    residual = residual / ops.maximum(count, 1.0)
    centred = ops.where(keep, d - ops.stop_gradient(residual), zeros)
    m2 = ops.sum(ops.square(centred), axis=axes, keepdims=True)
    return count, shift, residual, m2


def one_pass_moments(count, s1, s2):
    """`(residual, m2)` from the sums ``s1 = sum(d)`` and ``s2 = sum(d ** 2)`` of shifted values.

    ``m2 = s2 - s1 ** 2 / n``: one read of `x` gives both sums. With
    ``d = x - s`` the cancellation is that of the shifted values only, so
    the relative error of m2 is about ``eps * (1 + (s - mean) ** 2 / var)``
    times the sums' own rounding growth: with `s` one sample of the batch,
    a few ulps unless that sample lies many standard deviations out (at
    30 standard deviations, 1e3 ulps). For fast paths that read `x` once
    for both sums; TensorFlow's XLA path measured faster with two passes
    (its CPU reductions materialize their operand either way).
    """
    residual = s1 / ops.maximum(count, 1.0)
    # Cauchy-Schwarz keeps s2 >= s1^2 / n; rounding may cross it by an ulp
    # when every value is the same.
    m2 = ops.maximum(s2 - s1 * residual, 0.0)
    return residual, m2


def moments(x, axes, weights=None):
    """Moment triple `(count, mean, m2)` of `x` over `axes`, with dimensions kept.

    `shifted_moments` with the mean put back together (``shift +
    residual``, rounded to the statistics dtype): for merging triples and
    for moving statistics. To normalize, use `shifted_moments` itself.
    Where no element counts, `count`, `mean` and `m2` are 0 (never NaN).
    """
    count, shift, residual, m2 = shifted_moments(x, axes, weights)
    return count, shift + residual, m2


def variance(count, m2):
    """Biased (population) variance from a moment triple; 0 where empty."""
    return m2 / ops.maximum(count, 1.0)


def merge_moments(count, mean, m2, axis):
    """Merge the moment triples stacked along `axis` into one, exactly.

    The merged mean is the count-weighted mean of the group means, and the
    merged sum of squares adds each group's own ``m2`` to its spread around
    the merged mean: ``M2 = sum(m2_i) + sum(n_i * (mean_i - mean)^2)``. No
    difference of large, nearly equal numbers is formed, so the result is as
    exact as the groups' own triples. Empty groups (count 0) contribute
    nothing.

    Returns the merged `(count, mean, m2)` with `axis` kept (size 1).
    """
    total = ops.sum(count, axis=axis, keepdims=True)
    safe_total = ops.maximum(total, 1.0)
    merged_mean = ops.sum(count * mean, axis=axis, keepdims=True) / safe_total
    spread = count * ops.square(mean - merged_mean)
    merged_m2 = ops.sum(m2 + spread, axis=axis, keepdims=True)
    return total, merged_mean, merged_m2


def normalize(x, mean, var, gamma, beta, epsilon):
    """`gamma * (x - mean) / sqrt(var + epsilon) + beta`.

    `gamma` and `beta` may be None (no scale, no offset). The per-channel
    factor is formed first so the full-size work is one subtract, one
    multiply and one add; subtracting the mean before scaling keeps the
    output accurate when the mean is large next to the spread.
    """
    inv = ops.rsqrt(var + epsilon)
    if gamma is not None:
        inv = inv * gamma
    y = (x - mean) * inv
    if beta is not None:
        y = y + beta
    return y


def moving_average(moving, value, momentum):
    """`moving * momentum + value * (1 - momentum)`, the Keras update rule."""
    return moving * momentum + value * (1.0 - momentum)


def activate(y, activation):
    """`y` through the named activation (`_checks.ACTIVATIONS`), or `y` for None.

    Keras' own definitions: `gelu` is the exact one (`erf`), as
    `keras.activations.gelu` computes by default; `hard_silu` is
    ``x * relu6(x + 3) / 6``.
    """
    if activation is None:
        return y
    if activation == "gelu":
        return ops.gelu(y, approximate=False)
    return getattr(ops, activation)(y)
