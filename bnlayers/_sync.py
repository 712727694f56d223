"""Cross-replica statistics for `synchronized=True` (TensorFlow's tf.distribute).

The per-replica moment triples are merged with the same exact formula as
`_math.merge_moments`, expressed as sums so that it runs on all-reduces:

- round 1 sums the counts and the count-weighted means (one packed tensor),
  which gives every replica the global count and mean;
- round 2 sums each replica's ``m2 + n * (mean - global_mean)^2``, which is
  its centred sum of squares around the *global* mean.

Two all-reduce rounds per layer call. Keras' built-in synchronized moments
issue three (sum, sum of squares, count) and form E[x^2] - E[x]^2, which
cancels to 0 when the mean is large next to the spread; nothing here
subtracts two large numbers. `ReplicaContext.all_reduce` is differentiable
(its gradient is itself an all-reduce), so gradients flow to every replica's
inputs exactly as for one device normalizing the global batch.
"""

from keras import backend
from keras import ops


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


def cross_replica_moments(count, mean, m2):
    """Merge a moment triple over all replicas; unchanged with no replicas."""
    ctx = replica_context()
    if ctx is None:
        return count, mean, m2
    import tensorflow as tf

    count = ops.broadcast_to(ops.cast(count, mean.dtype), ops.shape(mean))
    packed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, ops.stack([count, count * mean]))
    total, weighted_sum = packed[0], packed[1]
    global_mean = weighted_sum / ops.maximum(total, 1.0)
    local_m2 = m2 + count * ops.square(mean - global_mean)
    global_m2 = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_m2)
    return total, global_mean, global_m2
