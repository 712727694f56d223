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
"""

import math

from keras import ops


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
