"""`bnlayers.BatchNormalization`: a from-scratch drop-in for Keras' own layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from typing import TypeAlias

import keras
from keras import backend
from keras import ops

from bnlayers import _checks
from bnlayers import _fused
from bnlayers import _geometry
from bnlayers import _ghost
from bnlayers import _math
from bnlayers import _moving
from bnlayers import _renorm
from bnlayers import _sync
from bnlayers import _weights

# What the constructor takes for each, as `keras.initializers.get` and the
# like do: a name, a config dict, or an instance.
Initializer: TypeAlias = "str | dict[str, Any] | keras.initializers.Initializer"
Regularizer: TypeAlias = "str | dict[str, Any] | keras.regularizers.Regularizer"
Constraint: TypeAlias = "str | dict[str, Any] | keras.constraints.Constraint"


@keras.saving.register_keras_serializable(package="bnlayers")
class BatchNormalization(keras.layers.Layer):
    """Normalizes each feature with batch statistics in training, moving ones at inference.

    A from-scratch Batch Normalization (Ioffe & Szegedy, 2015),
    interchangeable with `keras.layers.BatchNormalization`: the same
    constructor, weights (names, shapes, order), training and inference
    behaviour, and `.weights.h5` files that load either way; and a fused
    fast path on TensorFlow, JAX and PyTorch, ghost batches, cross-replica
    statistics exact whatever the mean of the data, and lists of axes.

    **In training** (`fit()`, or calling the layer with `training=True`),
    each feature (each index along `axis`) is normalized with the mean and
    variance of the current batch, taken over every other axis:

        y = gamma * (x - mean(x)) / sqrt(var(x) + epsilon) + beta

    and the moving statistics are updated:

        moving_mean = moving_mean * momentum + mean(x) * (1 - momentum)
        moving_variance = moving_variance * momentum + var(x) * (1 - momentum)

    (or, with `debias_moving_statistics=True` or `momentum=None`, with a
    momentum that depends on the step, see below).

    `var` is the biased (population) variance. Both statistics are taken
    on inputs shifted by one of their own values per feature, so they stay
    exact to float32 rounding whatever the mean of the data, on every path
    ([Accuracy](accuracy.md)).

    **At inference** (`evaluate()`, `predict()`, `training=False` or
    `None`), the moving statistics take the place of the batch ones and
    nothing is updated:

        y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta

    **`trainable = False` means inference mode**, as with Keras' own layer:
    it freezes gamma and beta *and* makes the layer normalize with its
    moving statistics, never updated, even with `training=True`, as
    fine-tuning wants. Compile a compiled model again for it to take effect.

    Statistics are computed in float32 for float16 and bfloat16 inputs (and
    under the `mixed_float16` / `mixed_bfloat16` policies), so large values
    do not overflow; the output has the layer's compute dtype. The weights
    are always float32 (or the layer's variable dtype).

    Args:
        axis: Integer, the feature axis (typically the channels axis: -1 for
            `channels_last`, 1 after a `channels_first` convolution). May
            also be a list of axes, e.g. `[1, 2]`, to keep separate
            statistics for every combination of those axes; the weights
            then have the shape of those axes, in increasing axis order.
        momentum: Momentum of the moving averages, in [0, 1]; or None for
            the cumulative average of every batch seen (PyTorch's meaning):
            the moving statistics are then the plain mean of the batch
            statistics of all training steps so far, each batch weighing
            `1 / t` at step `t`. That suits recalibration runs and short
            fine-tunes with fixed weights; while the weights still change,
            the early batches never fade out, so prefer a float there. With
            `renorm`, the moving standard deviation is what is averaged.
            Adds the `moving_count` weight (see `debias_moving_statistics`).
        epsilon: Small float added to the variance to avoid dividing by
            zero; must be > 0.
        center: If True, add the learned offset `beta`.
        scale: If True, multiply by the learned scale `gamma`. When the next
            layer is linear (or a ReLU) this can be turned off, since the
            next layer can do the scaling.
        beta_initializer: Initializer for `beta`.
        gamma_initializer: Initializer for `gamma`.
        moving_mean_initializer: Initializer for the moving mean.
        moving_variance_initializer: Initializer for the moving variance.
        beta_regularizer: Optional regularizer for `beta`.
        gamma_regularizer: Optional regularizer for `gamma`.
        beta_constraint: Optional constraint for `beta`.
        gamma_constraint: Optional constraint for `gamma`.
        renorm: Whether to use Batch Renormalization (Ioffe, 2017): in
            training the batch-normalized values are corrected by `r` and
            `d` taken from moving statistics, and the layer tracks
            `moving_stddev`, `renorm_mean` and `renorm_stddev` in addition.
            Inference is the same either way.
        renorm_clipping: Optional dict with keys among `"rmax"`, `"rmin"`,
            `"dmax"`: the correction `r` is clipped to `[rmin, rmax]` and `d`
            to `[-dmax, dmax]`. Missing keys mean no clipping on that side.
        renorm_momentum: Momentum of the renorm moving averages, in [0, 1]
            (not None: renorm's correction must follow the current
            weights).
        synchronized: If True, the batch statistics are taken over the
            global batch of all replicas, exact whatever the mean of the
            data: on TensorFlow the replicas of a `tf.distribute` strategy,
            on PyTorch the processes of an initialized `torch.distributed`
            process group (two all-reduce rounds, with all-reduced
            gradients), on JAX the devices of a `keras.distribution`
            (a jitted step's batch is one global array). With one replica
            it behaves exactly as False. More in
            [Synchronized statistics](distributed.md#synchronized-statistics-synchronizedtrue).
        virtual_batch_size: None (default) or a positive int. In training,
            the batch is split into consecutive "ghost" batches of this many
            examples, each normalized with its own statistics (Hoffer et
            al., 2017); a batch that is not a multiple ends with one smaller
            ghost batch rather than raising. At inference ghost batches play
            no part, so any batch size works.
            Cannot be combined with `renorm` or `synchronized`. More in
            [Ghost batches](distributed.md#ghost-batches-virtual_batch_size).
        fused: None (default: take the fused fast path whenever it is
            eligible), True (require it; raise if it is not eligible), or
            False (always use the reference `keras.ops` path). The fast
            path computes the same thing in a few fused operations on each
            backend; inference in a graph traced by an exporter is written
            as plain TensorFlow ops, which converters know.
            `bnlayers.fused_eligibility(layer, inputs)` says why a call
            would not take it. What runs on each backend, and when:
            [The fused fast path](performance.md#the-fused-fast-path).
        replica_group_size: None (default: all replicas) or a positive
            int dividing the number of replicas, with `synchronized=True`:
            consecutive groups of this many replicas (ids 0 to g-1, g to
            2g-1, ...) each normalize with their own group's statistics.
            The moving statistics are updated on every replica alike with
            the mean of the groups' means and their pooled variance.
        debias_moving_statistics: If True, the moving statistics are the
            zero-debiased moving average (Adam's bias correction, Haiku's
            `zero_debias`): at step `t` the batch statistic weighs
            `(1 - momentum) / (1 - momentum**t)` instead of
            `1 - momentum`, so the first batch replaces the initializer's
            value and the statistics are a usable estimate from the first
            step on, not after the `1 / (1 - momentum)` steps it takes the
            initial values to fade (100 at the default momentum). The
            estimate is kept in `moving_mean` and `moving_variance`
            themselves: inference needs no correction and the weights move
            to Keras' layer as they are (`bnlayers.swap_batchnorm`). The
            trade: values loaded into the moving statistics before
            training (pretrained ones) are replaced at the first training
            step as the initial values are; with renorm, renorm's own
            averages (`renorm_momentum`) are debiased too. The layer keeps
            a step counter, the non-trainable weight `moving_count` (per
            feature: a batch that a mask leaves a feature out of, or an
            empty batch, is no step for it), last among its weights, and
            saved and restored with them. False (default): Keras' rule.
            Which to pick when: [Training and
            inference](training-inference.md).
        activation: None (default: the outputs are the normalized values,
            as the built-in layer's) or the activation applied to them,
            by its Keras name: `"relu"`, `"relu6"`, `"silu"` (also
            `"swish"`), `"hard_silu"` (also `"hard_swish"`) or `"gelu"`
            (Keras' exact one), or that `keras.activations` function.
            The same as a `keras.layers.Activation` after the layer, in
            one layer: on the fast path the activation is computed in
            the same pass as the normalization, and its gradient for
            `relu` and `relu6` comes from the outputs (nothing more is
            stored); on every path it follows the affine, in the
            statistics dtype, before the cast to the compute dtype.
            `bnlayers.tools.fuse_activations` merges the pairs of an
            existing model.
        **kwargs: Base layer keyword arguments (e.g. `name`, `dtype`).

    Call arguments:
        inputs: Tensor of rank >= 2. Integer and bool inputs are cast to
            floats (float32, or float64 for a float64 layer), as the
            built-in layer does.
        training: Python bool. True normalizes with batch statistics and
            updates the moving ones (unless `trainable` is False); False or
            None uses the moving statistics.
        mask: Optional boolean tensor, as Keras' `Masking` and sequence
            layers produce: the shape of `inputs` without the last axis
            (rank of inputs - 1), expanded along the last axis whatever
            `axis` is, as the built-in layer does. With a list of k feature
            axes, a mask with the shape of `inputs` without all of them
            (rank of inputs - k) is accepted too. Masked-out positions are
            left out of the batch statistics (and so of the moving ones). A
            batch with every position masked yields finite outputs and
            leaves the moving statistics unchanged.

    Reference:
        - Ioffe & Szegedy, 2015, "Batch Normalization: Accelerating Deep
          Network Training by Reducing Internal Covariate Shift",
          https://arxiv.org/abs/1502.03167
        - Ioffe, 2017, "Batch Renormalization", https://arxiv.org/abs/1702.03275
        - Hoffer, Hubara & Soudry, 2017, "Train longer, generalize better"
          (ghost batch normalization), https://arxiv.org/abs/1705.08741

    Example:

    ```python
    import keras
    import bnlayers

    model = keras.Sequential([
        keras.layers.InputLayer(shape=(28, 28, 1)),
        keras.layers.Conv2D(32, (3, 3), activation="relu"),
        bnlayers.BatchNormalization(),
        keras.layers.MaxPooling2D((2, 2)),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax"),
    ])
    ```
    """

    def __init__(
        self,
        axis: int | Sequence[int] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Initializer = "zeros",
        gamma_initializer: Initializer = "ones",
        moving_mean_initializer: Initializer = "zeros",
        moving_variance_initializer: Initializer = "ones",
        beta_regularizer: Regularizer | None = None,
        gamma_regularizer: Regularizer | None = None,
        beta_constraint: Constraint | None = None,
        gamma_constraint: Constraint | None = None,
        renorm: bool = False,
        renorm_clipping: dict[str, float] | None = None,
        renorm_momentum: float = 0.99,
        synchronized: bool = False,
        virtual_batch_size: int | None = None,
        fused: bool | None = None,
        replica_group_size: int | None = None,
        debias_moving_statistics: bool = False,
        activation: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        arguments = {
            k: v for k, v in locals().items() if k in _checks.CONFIG_KEYS
        }
        # Every argument checked and resolved, as an attribute of its name.
        for name, value in _checks.resolve(arguments).items():
            setattr(self, name, value)
        self.supports_masking = True
        # Variables once built (`build`); None before.
        self.gamma: Any = None
        self.beta: Any = None
        self.moving_mean: Any = None
        self.moving_variance: Any = None
        # Built only where an option averages by step (`_moving.counts_steps`).
        self.moving_count: Any = None
        self._feature_axes: list[int] = []
        self._reduction_axes: list[int] = []

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        ndim = len(input_shape)
        self._feature_axes = _geometry.feature_axes(
            self.axis, ndim, input_shape, self.virtual_batch_size
        )
        self._reduction_axes = _geometry.reduction_axes(
            self._feature_axes, ndim
        )
        shape = tuple(input_shape[a] for a in self._feature_axes)
        _weights.create(self, shape)
        self.input_spec = keras.layers.InputSpec(
            ndim=ndim, axes={a: input_shape[a] for a in self._feature_axes}
        )

    def compute_output_shape(
        self, input_shape: tuple[int | None, ...]
    ) -> tuple[int | None, ...]:
        _geometry.feature_axes(
            self.axis, len(input_shape), input_shape, self.virtual_batch_size
        )
        return input_shape

    def call(
        self, inputs: Any, training: bool | None = None, mask: Any = None
    ) -> Any:
        if not backend.is_float_dtype(backend.standardize_dtype(inputs.dtype)):
            # Integer and bool inputs are taken as numbers, as the built-in
            # takes them; cast to the statistics dtype of the compute dtype
            # (never float16, where integers above 65504 overflow).
            inputs = ops.cast(
                inputs, _math.statistics_dtype(self.compute_dtype)
            )
        # From here on `mask` broadcasts against the inputs.
        mask = _geometry.expand_mask(
            mask, len(inputs.shape), self._feature_axes, inputs.shape
        )
        use_batch_statistics = bool(training) and self.trainable

        fast = self._fast_path(inputs, mask)
        if fast is not None:
            return self._fast_call(inputs, use_batch_statistics, fast)

        x = ops.cast(inputs, _math.statistics_dtype(inputs.dtype))
        if use_batch_statistics:
            outputs = self._training_call(x, mask)
        else:
            mean, var, gamma, beta = self._per_feature(
                x, self.moving_mean, self.moving_variance, self.gamma, self.beta
            )
            outputs = _math.normalize(x, mean, var, gamma, beta, self.epsilon)
        # After normalization on every path (ghost batches, renorm, masks).
        outputs = _math.activate(outputs, self.activation)
        return ops.cast(outputs, self.compute_dtype)

    def _per_feature(self, x, *variables):
        """Each variable (or None) in the dtype of `x`, shaped to broadcast against it."""
        shape = _geometry.param_shape(
            self._feature_axes, len(x.shape), self.moving_mean.shape
        )
        return [
            None if v is None else ops.reshape(ops.cast(v, x.dtype), shape)
            for v in variables
        ]

    def _training_call(self, x, mask):
        """Normalize `x` with batch statistics; update the moving ones."""
        gamma, beta = self._per_feature(x, self.gamma, self.beta)
        if self.virtual_batch_size is not None:
            outputs, count, mean, var = _ghost.normalize(
                x,
                mask,
                self.virtual_batch_size,
                self._reduction_axes,
                gamma,
                beta,
                self.epsilon,
            )
        else:
            outputs, count, mean, var = self._batch_normalize(
                x, mask, gamma, beta
            )
        self._update_moving_statistics(count, mean, var)
        return outputs

    def _batch_normalize(self, x, mask, gamma, beta):
        """`(outputs, count, mean, var)` of one batch (across replicas when
        synchronized), with renorm's correction; the statistics returned
        are those the moving ones average in."""
        synced = (
            _sync.synchronized_moments(
                x, self._reduction_axes, mask, self.replica_group_size
            )
            if self.synchronized
            else None
        )
        if synced is None:
            count, shift, residual, m2 = _math.shifted_moments(
                x, self._reduction_axes, mask
            )
            moving = None
        else:
            count, shift, residual, m2, moving = synced
        mean = shift + residual
        var = _math.variance(count, m2)
        if self.renorm:
            # Read before `_moving.update_renorm` assigns them.
            renorm_mean, renorm_stddev = self._per_feature(
                x, self.renorm_mean, self.renorm_stddev
            )
            r, d = _renorm.correction(
                mean,
                var,
                renorm_mean,
                renorm_stddev,
                self.epsilon,
                self.renorm_clipping,
            )
            gamma, beta = _renorm.fold(r, d, gamma, beta)
        # The residual is the part of the mean a float32 shift cannot hold;
        # subtracting the two in turn keeps it (see _math).
        outputs = _math.normalize(
            x - shift, residual, var, gamma, beta, self.epsilon
        )
        # With replica groups the moving statistics pool the groups'.
        if moving is not None:
            count, mean, var = moving
        return outputs, count, mean, var

    def _update_moving_statistics(self, count, mean, var):
        """Average the batch statistics into the moving ones (reference path)."""
        momentum, renorm_momentum, steps = self._step_momenta()
        if self.renorm:
            _moving.update_renorm(
                self, count, mean, var, momentum, renorm_momentum
            )
        else:
            _moving.update(
                count,
                (self.moving_mean, mean, momentum),
                (self.moving_variance, var, momentum),
            )
        if steps is not None:
            _moving.count_step(self.moving_count, count, steps)

    def _fast_path(self, inputs, mask):
        """The backend whose fast path takes this call (see `_fused`), or None."""
        if self.fused is False:
            return None
        name = _fused.fast_backend()
        reason = _fused.ineligibility(
            self, inputs, mask, self._feature_axes, name
        )
        if reason is None:
            return name
        if self.fused:
            raise ValueError(
                f"`fused=True` but the fused fast path cannot be taken here: {reason}. "
                "Pass fused=None to fall back to the reference path automatically."
            )
        return None

    def _fast_call(self, inputs, use_batch_statistics, name):
        momentum, steps = None, None
        if use_batch_statistics:
            momentum, _, steps = self._step_momenta()
        per_step = steps is not None
        params = _fused.Parameters(
            self.gamma if self.scale else None,
            self.beta if self.center else None,
            self.moving_mean,
            self.moving_variance,
            momentum if per_step else None,
        )
        spec = _fused.Spec(
            self._feature_axes[0],
            self.epsilon,
            # (Unused where a per-step momentum is given.)
            0.0 if self.momentum is None else self.momentum,
            self.compute_dtype,
            self.activation,
        )
        if not use_batch_statistics:
            return _fused.inference(inputs, params, spec)
        outputs, new_mean, new_var = _fused.training(inputs, params, spec)
        _moving.update(
            None,
            (self.moving_mean, new_mean, None),
            (self.moving_variance, new_var, None),
        )
        if per_step:
            # The fast path takes one feature axis and no mask: every
            # feature counts the batch unless it is empty.
            _moving.count_step(self.moving_count, ops.size(inputs), steps)
        return outputs

    def _step_momenta(self):
        """This step's `(momentum, renorm_momentum, steps)` (`_moving.step_momenta`)."""
        return _moving.step_momenta(
            self.name,
            self.momentum,
            self.renorm_momentum if self.renorm else None,
            self.debias_moving_statistics,
            self.moving_count,
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(_checks.config(self))
        return config
