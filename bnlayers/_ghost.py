"""Ghost batch normalization (Hoffer et al., 2017) as pure functions over `keras.ops`.

In training the batch is split into consecutive ghost batches of `size`
examples, each normalized with its own statistics (`_math`). The batch axis
is padded up to a multiple of `size` and the padding masked out, so a batch
that is not a multiple ends with one smaller ghost batch and the same code
serves both cases.
"""

from keras import ops

from bnlayers import _math


def _grouped(x, mask, size):
    """`x` and where it counts, reshaped to `(groups, size, *x.shape[1:])`."""
    shape = ops.shape(x)
    ndim = len(x.shape)
    batch = shape[0]
    pad = (-batch) % size
    keep = ops.reshape(
        ops.ones(shape[:1], dtype="bool"), [-1] + [1] * (ndim - 1)
    )
    if mask is not None:
        keep = ops.logical_and(keep, ops.cast(mask, "bool"))
    keep = ops.broadcast_to(keep, shape)
    padding = [(0, pad)] + [(0, 0)] * (ndim - 1)
    grouped_shape = [(batch + pad) // size, size] + list(shape[1:])
    xg = ops.reshape(ops.pad(x, padding), grouped_shape)
    kg = ops.reshape(
        ops.pad(keep, padding, constant_values=False), grouped_shape
    )
    return xg, kg


def normalize(x, mask, size, reduction_axes, gamma, beta, epsilon):
    """Normalize each ghost batch of `x` with its own statistics.

    Args:
        x: floating inputs, already in the statistics dtype; axis 0 is the
            batch.
        mask: None, or true where an element counts, broadcastable to `x`.
        size: the number of examples of a ghost batch (the last may have
            fewer).
        reduction_axes: the axes of `x` the statistics are taken over
            (axis 0 among them).
        gamma, beta: per-feature tensors shaped to broadcast against `x`,
            or None.
        epsilon: added to the variance.

    Returns:
        `(outputs, count, mean, variance)`: the outputs, with the shape of
        `x`, and the statistics of the whole batch for the moving averages:
        the number of counted elements, the mean over all ghost batches and
        their pooled (count-weighted) within-batch variance, i.e. the
        variance the ghost batches were normalized with. Each with the
        reduced axes kept (and a leading axis of size 1).
    """
    shape = ops.shape(x)
    xg, kg = _grouped(x, mask, size)
    # Axis 0 of the inputs became axes 0 (groups) and 1 (within a group).
    group_axes = [1] + [a + 1 for a in reduction_axes if a != 0]
    count, shift, residual, m2 = _math.shifted_moments(xg, group_axes, kg)

    def expand(t):
        return None if t is None else ops.expand_dims(t, 0)

    var = _math.variance(count, m2)
    yg = _math.normalize(
        xg - shift, residual, var, expand(gamma), expand(beta), epsilon
    )
    outputs = ops.reshape(yg, [-1] + list(shape[1:]))[: shape[0]]

    total, mean, _ = _math.merge_moments(count, shift + residual, m2, axis=0)
    pooled_var = ops.sum(m2, axis=0, keepdims=True) / ops.maximum(total, 1.0)
    return outputs, total, mean, pooled_var
