"""The per-step momentum of the moving statistics' optional averages.

With ``debias_moving_statistics=True`` or ``momentum=None`` a layer keeps a
count `t` of the batches that updated its moving statistics (per feature:
a feature that a mask leaves out of a batch does not count it) and averages
the batch statistic `b` in with a weight that depends on `t`:

    moving = moving * m_t + b * (1 - m_t),  with 1 - m_t = w_t

- zero-debiased (Adam's bias correction, Haiku's ``zero_debias``):
  ``w_t = (1 - m) / (1 - m**t)``. The result is the exponential moving
  average with momentum `m` divided by ``1 - m**t``, the weight it gives
  the batches seen so far; the initial value carries no weight
  (``w_1 = 1``), so it is an estimate from the first step on, kept in the
  moving variables themselves (inference needs no correction).
- cumulative (PyTorch's ``momentum=None``): ``w_t = 1 / t``, the plain mean
  of every batch statistic seen.

`step_momentum` computes ``m_t`` from `t` in the counter's dtype; the
layer hands it to every path (the reference path's update and the fast
paths' fused loops, through `_contract.Parameters.momentum`).

The one update of the moving variables for every path, `update`, and
renorm's, `update_renorm`, are here too: pure functions of the variables
and the batch values, which assign the variables.
"""

import math

from keras import backend
from keras import ops

from bnlayers import _math
from bnlayers import _renorm


def step_momentum(momentum, steps):
    """``m_t`` for the counts `steps` (a tensor, each >= 1), per element.

    Args:
        momentum: the layer's momentum, a float in [0, 1] (zero-debiased
            average), or None (cumulative average).
        steps: the count `t` of the step being taken, a floating tensor.

    Returns:
        A tensor like `steps`. With momentum 1 the statistics never move
        (``m_t = 1``), as without debiasing; with momentum 0 each batch
        replaces them (``m_t = 0``).
    """
    if momentum is None:
        # (t - 1) / t: the numerator is exact, so m_t is one rounding away.
        return (steps - 1.0) / steps
    if momentum >= 1.0:
        return ops.ones_like(steps)
    if momentum <= 0.0:
        return ops.zeros_like(steps)
    # 1 - m**t as -expm1(t * log(m)): the direct form cancels when m**t is
    # near 1 (m = 0.999, t = 2: 3e-5 relative in float32); this one stays
    # within a few ulps.
    remaining = -ops.expm1(steps * math.log(momentum))
    return 1.0 - (1.0 - momentum) / remaining


def counts_steps(momentum, debias):
    """Whether the moving averages' weights depend on the step count."""
    return momentum is None or debias


def step_momenta(layer_name, momentum, renorm_momentum, debias, counter):
    """This step's `(momentum, renorm_momentum, steps)`.

    `momentum` and `renorm_momentum` (None without renorm) as given where
    no option counts steps (`counts_steps`); else per-feature tensors and
    the count `steps` of this step (the `counter` variable plus one), which
    `count_step` stores.
    """
    if not counts_steps(momentum, debias):
        return momentum, renorm_momentum, None
    if counter is None:
        raise ValueError(
            f"Layer {layer_name!r} was built without a step counter, which "
            "`momentum=None` and `debias_moving_statistics=True` need: set "
            "them in the constructor, not after the layer is built. "
            f"Received: momentum={momentum!r}, "
            f"debias_moving_statistics={debias!r}"
        )
    steps = ops.convert_to_tensor(counter) + 1.0
    if renorm_momentum is not None and debias:
        renorm_momentum = step_momentum(renorm_momentum, steps)
    return step_momentum(momentum, steps), renorm_momentum, steps


def count_step(counter, count, steps):
    """The `counter` takes `steps` where `count` (per feature, or one
    number for all) is positive: an empty or fully masked batch is no
    step."""
    counted = ops.convert_to_tensor(count) > 0
    shape = counter.shape
    if len(counted.shape):
        counted = ops.reshape(counted, shape)
    else:
        counted = ops.broadcast_to(counted, shape)
    counter.assign(ops.where(counted, steps, ops.convert_to_tensor(counter)))


def update(count, *updates):
    """The one update of the moving statistics, for every path.

    Each update is `(variable, value, momentum)`: `value` is a batch
    statistic, averaged in by the Keras rule (`_math.moving_average`) with
    `momentum` (a float, or a per-feature tensor: the per-step momentum of
    `step_momenta`), or with momentum None the new moving value itself, as
    the fast path's fused loops average it (with `Parameters.momentum` or
    `Spec.momentum`). Where `count` (per feature) is 0, a fully masked or
    empty batch, the variable keeps its value; None: the caller applied
    that rule. Returns the averaged values, before the `count` rule.
    """
    counted = None
    averaged = []
    for variable, value, momentum in updates:
        if tuple(value.shape) != tuple(variable.shape):
            value = ops.reshape(value, variable.shape)
        if momentum is not None or count is not None:
            current = ops.cast(variable, value.dtype)
        if momentum is not None:
            if not isinstance(momentum, float):
                momentum = ops.reshape(
                    ops.cast(momentum, value.dtype), variable.shape
                )
            value = _math.moving_average(current, value, momentum)
        averaged.append(value)
        if count is not None:
            if counted is None:
                # Counts are per feature on every path.
                counted = ops.reshape(count > 0, variable.shape)
            value = ops.where(counted, value, current)
        # (A cast of the same dtype still costs a Keras op per call.)
        if backend.standardize_dtype(value.dtype) != variable.dtype:
            value = ops.cast(value, variable.dtype)
        variable.assign(value)
    return averaged


def update_renorm(layer, count, mean, var, momentum, renorm_momentum):
    """Renorm's statistics of `layer`: means and standard deviations, each
    at its momentum; the inference variance follows the moving stddev."""
    stddev = _renorm.stddev(var, layer.epsilon)
    *_, moving_stddev = update(
        count,
        (layer.renorm_mean, mean, renorm_momentum),
        (layer.renorm_stddev, stddev, renorm_momentum),
        (layer.moving_mean, mean, momentum),
        (layer.moving_stddev, stddev, momentum),
    )
    variance = _renorm.variance(moving_stddev, layer.epsilon)
    update(count, (layer.moving_variance, variance, None))
