"""What a call of the fused fast path hands to a backend's module.

`_fused` builds one `Spec` (the static part, hashable: a cache key and a
static argument of `jax.jit`) and one `Parameters` (the tensors) per call
and passes both to `_fast_tf`, `_fast_jax` or `_fast_torch`, whose
`training(x, params, spec)` returns ``(y, new_moving_mean,
new_moving_variance)`` and `inference(x, params, spec)` the outputs.
A fused activation is `Spec.activation`, a Keras name (None for none),
applied by each backend to its outputs after the affine.

Room is left, by design, for what later work adds:

- a momentum given per step as a tensor (debiased or cumulative moving
  averages) is `Parameters.momentum`, beside the statistics it updates;
- statistics reduced across replicas need a reduction in `Spec` (which
  replicas, how) that each backend applies to its sums.
"""

from typing import Any
from typing import NamedTuple


class Spec(NamedTuple):
    """The static part of a fast-path call.

    Attributes:
        axis: the one feature axis, non-negative.
        epsilon: added to the variance.
        momentum: the moving averages' momentum (Keras' rule); unused in
            inference, and where `Parameters.momentum` is given.
        out_dtype: the outputs' dtype (the layer's compute dtype), a
            standardized name.
        activation: the activation applied to the outputs, after the
            affine and before the cast to `out_dtype`, by its Keras name
            (one of `_checks.ACTIVATIONS`), or None for none.
    """

    axis: int
    epsilon: float
    momentum: float
    out_dtype: str
    activation: str | None = None


class Parameters(NamedTuple):
    """The tensors of a fast-path call (variables are read by the backend).

    Attributes:
        gamma: the per-feature scale, or None for none.
        beta: the per-feature offset, or None for none.
        moving_mean: the moving mean (a vector).
        moving_variance: the moving variance (a vector).
        momentum: this step's momentum, a tensor of the moving statistics'
            shape (`_moving.step_momentum`: debiased or cumulative
            averages), which takes the place of `Spec.momentum`; or None
            (the default): `Spec.momentum`. Unused in inference.
    """

    gamma: Any
    beta: Any
    moving_mean: Any
    moving_variance: Any
    momentum: Any = None
