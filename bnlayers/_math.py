"""The arithmetic of batch normalization, once, as pure functions over `keras.ops`.

Every layer in bnlayers is a thin shell around these functions: they take
tensors and return tensors, hold no state and know nothing about Keras
layers, so they can be tested on their own against a float64 NumPy reference.

Statistics are carried as *moment triples* ``(count, mean, m2)``: the number
of (unmasked) elements, their mean, and the centred sum of squares
``m2 = sum((x - mean) ** 2)``. Triples of disjoint groups merge exactly
(Chan, Golub & LeVeque, 1979), which is what ghost batches and cross-replica
synchronization both need; ``variance = m2 / count``. Every mean and sum of
squares is taken around the group's own mean (two passes), so the variance
stays right for inputs whose mean is large next to their spread, where the
one-pass ``E[x^2] - E[x]^2`` cancels to zero.
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


def moments(x, axes, weights=None):
    """Moment triple of `x` over `axes`, with dimensions kept.

    Args:
        x: floating tensor, already in the statistics dtype.
        axes: the axes to reduce over.
        weights: optional mask broadcastable to `x`: true (or nonzero)
            where an element counts, false where it is masked out.

    Returns:
        `(count, mean, m2)`, each broadcastable to `x`. Where no element
        counts, `count` is 0 and `mean` and `m2` are 0 (never NaN).
    """
    axes = tuple(axes)
    if weights is None:
        count = ops.cast(reduced_size(x, axes), x.dtype)
        # Not ops.mean: on PyTorch it averages float64 in float32.
        mean = ops.sum(x, axis=axes, keepdims=True) / count
        # The variance's derivative with respect to the mean is zero at the
        # mean, so the mean needs no gradient path through the second pass.
        centred = x - ops.stop_gradient(mean)
        m2 = ops.sum(ops.square(centred), axis=axes, keepdims=True)
        return count, mean, m2

    keep = ops.broadcast_to(ops.cast(weights, "bool"), ops.shape(x))
    # Masked positions may hold anything (padding, even inf or NaN): select
    # them away rather than multiply them by zero.
    zeros = ops.zeros_like(x)
    count = ops.sum(ops.cast(keep, x.dtype), axis=axes, keepdims=True)
    mean = ops.sum(ops.where(keep, x, zeros), axis=axes, keepdims=True)
    mean = mean / ops.maximum(count, 1.0)
    centred = ops.where(keep, x - ops.stop_gradient(mean), zeros)
    m2 = ops.sum(ops.square(centred), axis=axes, keepdims=True)
    return count, mean, m2


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
