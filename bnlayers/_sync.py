"""Cross-replica statistics for `synchronized=True` (TensorFlow's tf.distribute).

The same shifted statistics as `_math.shifted_moments`, over every
replica's batch: the statistics of the global batch are taken around a *shift* that every
replica agrees on, with the shifted two-pass correction of Chan, Golub &
LeVeque (1983):

- round 1 all-reduces the counts and the plain sums (packed in one
  tensor); the global mean they give, rounded to float32, is the shift;
- round 2 all-reduces ``s1 = sum(x - shift)`` and ``s2 = sum((x - shift)^2)``
  (packed in one tensor). Then ``mean = shift + s1 / n`` and
  ``m2 = s2 - s1 * s1 / n``.

Why this is exact: near a large mean, ``x - shift`` is computed without
rounding (the two are within a factor of two of each other), so ``s1`` and
``s2`` are sums of small numbers. ``s1 / n`` is the part of the mean that a
float32 shift cannot hold (up to half a unit in the last place: 0.03 at a
mean of 1e6), and ``- s1 * s1 / n`` removes exactly what that rounding adds
to ``s2``. Merging per-replica (count, mean, m2) triples instead would round
each replica's mean to float32 first, and the spread term
``n_i * (mean_i - mean)^2`` then carries that rounding: a relative error of
1e-2 in the variance at a mean of 1e6, measured.

Two all-reduce rounds per layer call. Keras' built-in synchronized moments
issue three (sum, sum of squares, count) and form E[x^2] - E[x]^2, which
cancels to 0 when the mean is large next to the spread; the one-round packed
version of that formula cancels the same way. Sums rather than means are
reduced, so a replica with an empty share of an uneven final batch adds
zeros, not NaN.

Gradients: the shift carries none (it is a constant as far as the formula
is concerned: ``m2`` and ``shift + s1 / n`` do not depend on it), so only
round 2 is differentiated. `ReplicaContext.all_reduce` is differentiable
(the gradient of a sum over replicas is the sum over replicas of the
incoming gradients), so every replica's inputs get exactly the gradient of
one device normalizing the global batch.
"""

from keras import backend
from keras import ops

from bnlayers import _math


def replica_context():
    """The tf.distribute replica context with more than one replica, or None.

    None outside any strategy, under the default strategy, in a cross-replica
    context, with a single replica, or on a backend other than TensorFlow:
    in all of those `synchronized=True` behaves exactly as False.
    """
    if backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return None
    return ctx


def _all_reduce_sum(ctx, *tensors):
    """Sum each tensor over all replicas in one collective (same shapes)."""
    import tensorflow as tf

    summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, ops.stack(tensors))
    return tuple(summed[i] for i in range(len(tensors)))


def cross_replica_moments(ctx, x, axes, weights=None):
    """Moments of `x` over `axes` and over every replica of `ctx`.

    Args:
        ctx: the replica context, from `replica_context()`.
        x: floating tensor, already in the statistics dtype.
        axes: the axes to reduce over (the batch axis among them).
        weights: optional mask broadcastable to `x`, true where an element
            counts.

    Returns:
        `(count, shift, residual, m2)`, each with `axes` kept: the global
        count, a float32-rounded global mean `shift` (no gradient), the
        small remainder `residual` so that the mean is `shift + residual`,
        and the centred sum of squares around that mean. Normalizing
        ``(x - shift) - residual`` rather than ``x - (shift + residual)``
        keeps the part of the mean that `shift` cannot hold. Where nothing
        counts anywhere, count is 0 and the rest is 0.
    """
    axes = tuple(axes)
    if weights is None:
        local_sum = ops.sum(x, axis=axes, keepdims=True)
        local_count = ops.ones_like(local_sum) * ops.cast(
            _math.reduced_size(x, axes), x.dtype
        )
    else:
        keep = ops.broadcast_to(ops.cast(weights, "bool"), ops.shape(x))
        zeros = ops.zeros_like(x)
        # Masked positions may hold anything, even inf or NaN: select them
        # away rather than multiply them by zero.
        local_sum = ops.sum(ops.where(keep, x, zeros), axis=axes, keepdims=True)
        local_count = ops.sum(ops.cast(keep, x.dtype), axis=axes, keepdims=True)

    count, total = _all_reduce_sum(ctx, local_count, local_sum)
    safe_count = ops.maximum(count, 1.0)
    shift = ops.stop_gradient(total / safe_count)

    centred = x - shift
    if weights is not None:
        centred = ops.where(keep, centred, zeros)
    s1, s2 = _all_reduce_sum(
        ctx,
        ops.sum(centred, axis=axes, keepdims=True),
        ops.sum(ops.square(centred), axis=axes, keepdims=True),
    )
    residual, m2 = _math.one_pass_moments(count, s1, s2)
    return count, shift, residual, m2
