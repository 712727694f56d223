"""Cross-replica statistics for `synchronized=True`, on every Keras backend.

Where the replicas are and how they talk differs per backend:

- TensorFlow: the replicas of a `tf.distribute` strategy (`MirroredStrategy`,
  `MultiWorkerMirroredStrategy`, ...); `ReplicaContext.all_reduce`.
- PyTorch: the processes of an initialized `torch.distributed` process group
  (gloo, NCCL), as a Keras model wrapped in `DistributedDataParallel` runs;
  `torch.distributed.all_reduce`, made differentiable here.
- JAX: under `keras.distribution.DataParallel` a jitted step sees the
  global batch as one array sharded over the devices of every process, so
  the layer's ordinary statistics already are the global batch's (XLA
  inserts the collectives). Nothing to reduce by hand; replica groups are
  taken over the batch's shards.

The statistics of the global batch are taken around a *shift* every replica
agrees on, with the shifted two-pass correction of Chan, Golub & LeVeque
(1983), the same as `_math.shifted_moments`:

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
cancels to 0 when the mean is large next to the spread. Sums rather than
means are reduced, so a replica with an empty share of an uneven final batch
adds zeros, not NaN.

Replica groups (`replica_group_size=g`): consecutive runs of g replicas
(replica ids 0..g-1, g..2g-1, ...) each normalize with their own group's
statistics. Every replica writes its sums into its group's row of a
``[groups, ...]`` tensor (zeros elsewhere) and the all-reduce is over all
replicas: one collective, ``groups`` times the bytes, and every replica
learns every group's statistics. The moving statistics are updated, on
every replica alike, with the count-weighted mean of the group means and
the pooled within-group variance (the variance the groups were normalized
with, as for ghost batches), so the replicas' copies never drift apart.

Gradients: the shift carries none (``m2`` and ``shift + s1 / n`` do not
depend on it), so only round 2 is differentiated. The gradient of a sum over
replicas is the sum over replicas of the incoming gradients: tf.distribute's
all-reduce has that gradient; on PyTorch `_AllReduceSum` gives it. Every
replica's inputs then get exactly the gradient of one device normalizing the
global batch (of the summed losses of all replicas).
"""

import numbers

from keras import backend
from keras import ops

from bnlayers import _math


def check_replica_group_size(replica_group_size, synchronized):
    """The constructor's check of `replica_group_size`; returns it as an int or None."""
    if replica_group_size is None:
        return None
    if (
        isinstance(replica_group_size, bool)
        or not isinstance(replica_group_size, numbers.Integral)
        or replica_group_size < 1
    ):
        raise ValueError(
            "`replica_group_size` must be None or a positive int. "
            f"Received: replica_group_size={replica_group_size!r}"
        )
    if not synchronized:
        raise ValueError(
            "`replica_group_size` limits synchronized statistics to groups of "
            "replicas and needs `synchronized=True`. "
            f"Received: replica_group_size={replica_group_size}, synchronized=False"
        )
    return int(replica_group_size)


class _Replicas:
    """The replicas one synchronized call reduces over (TensorFlow or PyTorch).

    `count` replicas in all; this one is `index` (a Python int on PyTorch,
    maybe a tensor on TensorFlow); `all_reduce_sum(t)` sums `t` over all of
    them, differentiably.
    """

    def __init__(self, count, index, all_reduce_sum):
        self.count = count
        self.index = index
        self.all_reduce_sum = all_reduce_sum


def _tf_replicas():
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return None
    return _Replicas(
        ctx.num_replicas_in_sync,
        ctx.replica_id_in_sync_group,
        lambda t: ctx.all_reduce(tf.distribute.ReduceOp.SUM, t),
    )


def _torch_all_reduce_sum():
    import torch
    import torch.distributed as dist

    class _AllReduceSum(torch.autograd.Function):
        """Sum over the processes whose backward sums the incoming gradients.

        `dist.all_reduce` alone is in place and invisible to autograd.
        """

        @staticmethod
        def forward(ctx, tensor):
            summed = tensor.detach().clone().contiguous()
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
            return summed

        @staticmethod
        def backward(ctx, grad):
            summed = grad.detach().clone().contiguous()
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
            return summed

    return _AllReduceSum.apply


_TORCH_ALL_REDUCE: list = []  # the autograd.Function's apply, built once


def _torch_replicas():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world <= 1:
        return None
    if not _TORCH_ALL_REDUCE:
        _TORCH_ALL_REDUCE.append(_torch_all_reduce_sum())
    return _Replicas(world, dist.get_rank(), _TORCH_ALL_REDUCE[0])


def replicas():
    """The replicas `synchronized=True` reduces over by hand, or None.

    None outside any strategy or process group, with a single replica, in a
    cross-replica context, and on JAX (where a distributed step already
    sees the global batch): there synchronization needs no collective.
    """
    name = backend.backend()
    if name == "tensorflow":
        return _tf_replicas()
    if name == "torch":
        return _torch_replicas()
    return None


def jax_batch_shards():
    """How many shards the batch is split into under a `keras.distribution` (1 if none)."""
    if backend.backend() != "jax":
        return 1
    from keras import distribution as kd

    current = kd.distribution()
    name = getattr(current, "batch_dim_name", None)
    if current is None or name is None:
        return 1
    mesh = current.device_mesh
    return int(dict(zip(mesh.axis_names, mesh.shape, strict=True))[name])


def _check_groups(replica_count, group_size):
    if group_size is None:
        return 1
    if replica_count % group_size:
        raise ValueError(
            f"`replica_group_size` must divide the number of replicas ({replica_count}). "
            f"Received: replica_group_size={group_size}"
        )
    return replica_count // group_size


def ineligibility(layer):
    """Why a synchronized layer cannot take the fused fast path here, or None."""
    if not layer.synchronized:
        return None
    found = replicas()
    if found is not None:
        return (
            f"synchronized=True with {found.count} replicas (the fused "
            "path sees one replica's batch only)"
        )
    if layer.replica_group_size is not None and jax_batch_shards() > 1:
        return (
            f"replica_group_size={layer.replica_group_size} (the fused path "
            "normalizes the whole batch at once)"
        )
    return None


def synchronized_moments(x, axes, weights, group_size):
    """Statistics for `synchronized=True`, or None where they are the local ones.

    Returns None when there is nothing to synchronize (see `replicas`; on JAX
    without groups the local statistics are the global batch's). Otherwise
    `(count, shift, residual, m2, moving)`: the first four as
    `_math.shifted_moments` gives them (for this replica's group), each
    broadcastable against `x`, and `moving = (count, mean, variance)` for
    the moving statistics (pooled over the groups; the same on every
    replica), with `axes` kept.
    """
    axes = tuple(axes)
    found = replicas()
    if found is not None:
        groups = _check_groups(found.count, group_size)
        return _cross_replica_moments(found, groups, x, axes, weights)
    shards = jax_batch_shards()
    if group_size is None or shards <= 1:
        return None
    return _sharded_group_moments(
        _check_groups(shards, group_size), x, axes, weights
    )


def _local_sums(x, axes, weights):
    """`(count, sum, keep)` of `x` over `axes`; `keep` is None without a mask."""
    if weights is None:
        local_sum = ops.sum(x, axis=axes, keepdims=True)
        local_count = ops.ones_like(local_sum) * ops.cast(
            _math.reduced_size(x, axes), x.dtype
        )
        return local_count, local_sum, None
    keep = ops.broadcast_to(ops.cast(weights, "bool"), ops.shape(x))
    # Masked positions may hold anything, even inf or NaN: select them
    # away rather than multiply them by zero.
    local_sum = ops.sum(
        ops.where(keep, x, ops.zeros_like(x)), axis=axes, keepdims=True
    )
    local_count = ops.sum(ops.cast(keep, x.dtype), axis=axes, keepdims=True)
    return local_count, local_sum, keep


def _cross_replica_moments(found, groups, x, axes, weights):
    """Two all-reduce rounds over every replica; rows per group (see module)."""
    local_count, local_sum, keep = _local_sums(x, axes, weights)
    if groups == 1:

        def reduce(*tensors):
            summed = found.all_reduce_sum(ops.stack(tensors))
            return tuple(summed[i] for i in range(len(tensors)))

        count, total = reduce(local_count, local_sum)
    else:
        group = found.index // (found.count // groups)
        # [groups, 1, ..., 1]: selects this replica's row.
        row = ops.reshape(
            ops.one_hot(group, groups, dtype=x.dtype),
            (groups,) + (1,) * (len(x.shape) + 1),
        )

        def reduce_all(*tensors):
            """[groups, ...] sums of every group, for each tensor."""
            summed = found.all_reduce_sum(row * ops.stack(tensors)[None])
            return tuple(summed[:, i] for i in range(len(tensors)))

        def mine(rows):
            return ops.sum(rows * row[:, 0], axis=0)

        all_counts, all_totals = reduce_all(local_count, local_sum)
        count, total = mine(all_counts), mine(all_totals)
    shift = ops.stop_gradient(total / ops.maximum(count, 1.0))

    centred = x - shift
    if keep is not None:
        centred = ops.where(keep, centred, ops.zeros_like(x))
    local_s1 = ops.sum(centred, axis=axes, keepdims=True)
    local_s2 = ops.sum(ops.square(centred), axis=axes, keepdims=True)
    if groups == 1:
        s1, s2 = reduce(local_s1, local_s2)
        residual, m2 = _math.one_pass_moments(count, s1, s2)
        mean = shift + residual
        return (
            count,
            shift,
            residual,
            m2,
            (count, mean, _math.variance(count, m2)),
        )

    all_s1, all_s2 = reduce_all(local_s1, local_s2)
    s1, s2 = mine(all_s1), mine(all_s2)
    residual, m2 = _math.one_pass_moments(count, s1, s2)
    all_shifts = ops.stop_gradient(all_totals / ops.maximum(all_counts, 1.0))
    all_residuals, all_m2 = _math.one_pass_moments(all_counts, all_s1, all_s2)
    moving = _pooled(all_counts, all_shifts + all_residuals, all_m2)
    return count, shift, residual, m2, moving


def _pooled(counts, means, m2s):
    """Moving-statistics values from per-group triples stacked on axis 0."""
    counts, means, m2s = (ops.stop_gradient(t) for t in (counts, means, m2s))
    count = ops.sum(counts, axis=0)
    safe = ops.maximum(count, 1.0)
    mean = ops.sum(counts * means, axis=0) / safe
    return count, mean, ops.sum(m2s, axis=0) / safe


def _sharded_group_moments(groups, x, axes, weights):
    """Per-group statistics of a batch that is one array over `groups * g` shards.

    Under `DataParallel` replica r holds rows ``[r * b, (r + 1) * b)`` of the
    global batch, so a group of consecutive replicas is a run of consecutive
    rows: split the batch axis into ``(groups, rows)`` and take each group's
    shifted moments. They come back repeated over each group's rows, so they
    broadcast against `x` like ungrouped statistics.
    """
    if 0 not in axes:
        raise ValueError(
            "`replica_group_size` needs the batch axis (0) among the reduced axes. "
            f"Received: reduced axes {axes}"
        )
    batch = ops.shape(x)[0]
    rows = batch // groups
    split = ops.reshape(x, (groups, rows) + tuple(ops.shape(x)[1:]))
    split_axes = tuple(a + 1 for a in axes)
    split_weights = None
    if weights is not None:
        full = ops.broadcast_to(ops.cast(weights, "bool"), ops.shape(x))
        split_weights = ops.reshape(full, ops.shape(split))
    count, shift, residual, m2 = _math.shifted_moments(
        split, split_axes, split_weights
    )
    moving = _pooled(count, shift + residual, m2)

    def per_row(t):
        return ops.reshape(
            ops.repeat(t, rows, axis=1), (batch,) + tuple(ops.shape(t)[2:])
        )

    return (
        per_row(count),
        per_row(shift),
        per_row(residual),
        per_row(m2),
        moving,
    )
