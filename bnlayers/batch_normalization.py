"""`bnlayers.BatchNormalization`: a from-scratch drop-in for Keras' own layer."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any
from typing import TypeAlias

import keras
from keras import backend
from keras import constraints
from keras import initializers
from keras import ops
from keras import regularizers

from bnlayers import _geometry
from bnlayers import _math
from bnlayers import _sync

_RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")

# What the constructor takes for each, as `keras.initializers.get` and the
# like do: a name, a config dict, or an instance.
Initializer: TypeAlias = "str | dict[str, Any] | keras.initializers.Initializer"
Regularizer: TypeAlias = "str | dict[str, Any] | keras.regularizers.Regularizer"
Constraint: TypeAlias = "str | dict[str, Any] | keras.constraints.Constraint"


def _check_fraction(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a float in [0, 1]. Received: {name}={value!r}"
        )
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1]. Received: {name}={value!r}"
        )
    return float(value)


def _check_axis(axis):
    """An int, or a non-empty list of distinct ints (returned as a list)."""
    if isinstance(axis, numbers.Integral) and not isinstance(axis, bool):
        return int(axis)
    if isinstance(axis, (list, tuple)) and axis:
        if all(
            isinstance(a, numbers.Integral) and not isinstance(a, bool)
            for a in axis
        ):
            if len(set(int(a) for a in axis)) != len(axis):
                raise ValueError(
                    f"`axis` must not repeat an axis. Received: axis={axis!r}"
                )
            return [int(a) for a in axis]
    raise TypeError(
        "`axis` must be an int or a non-empty list of ints. "
        f"Received: axis={axis!r}"
    )


def _check_renorm_clipping(renorm_clipping):
    if renorm_clipping is None:
        return None
    if not isinstance(renorm_clipping, dict):
        raise TypeError(
            "`renorm_clipping` must be a dict with keys among "
            f"{list(_RENORM_CLIPPING_KEYS)}. Received: renorm_clipping={renorm_clipping!r}"
        )
    # Each message also carries the built-in layer's phrase ("Received
    # invalid keys", "rmax should be", "dmax should be non-negative"), so
    # that code and tests matching the built-in's errors match these.
    unknown = sorted(
        set(renorm_clipping) - set(_RENORM_CLIPPING_KEYS), key=repr
    )
    if unknown:
        raise ValueError(
            f"Unknown keys {unknown} in `renorm_clipping`; the keys are "
            f"{list(_RENORM_CLIPPING_KEYS)}. Received invalid keys for `renorm_clipping`: "
            f"renorm_clipping={renorm_clipping!r}"
        )
    rmax = renorm_clipping.get("rmax")
    rmin = renorm_clipping.get("rmin")
    dmax = renorm_clipping.get("dmax")
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(
            "`renorm_clipping` needs rmax >= rmin (rmax should be greater than or equal "
            f"to rmin). Received: renorm_clipping={renorm_clipping!r} (rmax={rmax}, rmin={rmin})"
        )
    if dmax is not None and dmax < 0:
        raise ValueError(
            "`renorm_clipping` needs dmax >= 0 (dmax should be non-negative). "
            f"Received: renorm_clipping={renorm_clipping!r} (dmax={dmax})"
        )
    return dict(renorm_clipping)


def _clone_initializer(initializer):
    """A fresh copy, so a seeded initializer used twice draws the same values."""
    if isinstance(initializer, initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer


@keras.saving.register_keras_serializable(package="bnlayers")
class BatchNormalization(keras.layers.Layer):
    """Normalizes each feature with batch statistics in training, moving ones at inference.

    A from-scratch implementation of Batch Normalization (Ioffe & Szegedy,
    2015) that is interchangeable with `keras.layers.BatchNormalization`:
    the same constructor, the same weights (names, shapes, order), the same
    training and inference behaviour, and `.weights.h5` files that load
    either way. On top of that it adds a fused fast path on TensorFlow, JAX
    and PyTorch, ghost batches (`virtual_batch_size`), cross-replica
    statistics that stay exact whatever the mean of the data, and a list of
    feature axes.

    **In training** (`fit()`, or calling the layer with `training=True`),
    each feature (each index along `axis`) is normalized with the mean and
    variance of the current batch, taken over every other axis:

        y = gamma * (x - mean(x)) / sqrt(var(x) + epsilon) + beta

    and the moving statistics are updated:

        moving_mean = moving_mean * momentum + mean(x) * (1 - momentum)
        moving_variance = moving_variance * momentum + var(x) * (1 - momentum)

    `var` is the biased (population) variance. Both statistics are taken
    on the inputs shifted by one of their own values per feature, and the
    normalization subtracts the shift first, so they stay exact to float32
    rounding whatever the mean of the data (e.g. mean 1e6, standard
    deviation 1), on every path.

    **At inference** (`evaluate()`, `predict()`, `training=False` or
    `None`), the moving statistics take the place of the batch ones and
    nothing is updated:

        y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta

    **`trainable = False` means inference mode.** As with Keras' own layer,
    setting `layer.trainable = False` (directly, or on a model that contains
    the layer) freezes gamma and beta *and* makes the layer normalize with
    its moving statistics even when called with `training=True`; the moving
    statistics are then never updated. This is what fine-tuning wants. If
    the model was already compiled, compile it again for the change to take
    effect.

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
        momentum: Momentum of the moving averages, in [0, 1].
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
        renorm_momentum: Momentum of the renorm moving averages, in [0, 1].
        synchronized: If True, the batch statistics are taken over the
            global batch of all replicas, exact whatever the mean of the
            data: on TensorFlow the replicas of a `tf.distribute` strategy,
            on PyTorch the processes of an initialized `torch.distributed`
            process group (two all-reduce rounds, with all-reduced
            gradients), on JAX the devices of a `keras.distribution`
            (a jitted step's batch is one global array). With one replica
            it behaves exactly as False.
        virtual_batch_size: None (default) or a positive int. In training,
            the batch is split into consecutive "ghost" batches of this many
            examples, each normalized with its own statistics (Hoffer et
            al., 2017). A batch that is not a multiple ends with one smaller
            ghost batch rather than raising: the last batch of an epoch in
            `fit()` is usually short, and tf-keras, whose reshape needed a
            multiple (at inference too), failed there.
            Its examples are normalized with the statistics of fewer
            examples (with rank-2 inputs a last ghost batch of one example
            outputs `beta`, as any batch of one does); a batch size that is
            a multiple, or `drop_remainder=True`, avoids that. The moving mean is updated with
            the mean over all ghost batches and the moving variance with
            their pooled (count-weighted) within-batch variance, i.e. the
            variance the ghost batches were normalized with. At inference
            ghost batches play no part, so any batch size works. Cannot be
            combined with `renorm` or `synchronized`.
        fused: None (default: take the fused fast path whenever it is
            eligible), True (require it; raise if it is not eligible), or
            False (always use the reference `keras.ops` path). The fast
            path computes the same thing in a few fused loops. On
            TensorFlow: on a GPU with TensorFlow's fused batch-norm kernel
            (cuDNN); under `jit_compile=True` with the arithmetic compiled
            by XLA; off a GPU, in a `tf.function` (Keras' `fit`,
            `evaluate`, `predict`) with the same fused kernel for features
            on the last axis in float16, bfloat16 or float32 (in
            inference up to 2**20 elements), the arithmetic compiled by
            XLA otherwise, and as plain TensorFlow ops for tensors of
            fewer than 2**17 elements and in eager calls (whatever
            measured fastest). On JAX: the arithmetic in `jax.numpy`
            with a hand-written backward, compiled by XLA, under `jax.jit`
            and eagerly alike. On PyTorch: a few native kernels per call
            (statistics by pairwise sums on values shifted by one sample,
            normalizing by a couple of elementwise passes, the backward by
            PyTorch's batch-norm kernel) in place of the reference path's
            chain of small eager operations. It is eligible on every one of
            the three backends with a single feature axis, no mask, no
            `renorm`, no `virtual_batch_size`, no `synchronized=True` over
            several replicas (TensorFlow, PyTorch) and no
            `replica_group_size` under a JAX distribution;
            `bnlayers.fused_eligibility(layer, inputs)` gives the reason
            when it is not. On TensorFlow off a GPU, inference in a graph
            traced by an exporter (`model.export` for SavedModel, LiteRT
            and ONNX, `tf.saved_model.save`, TensorFlow's LiteRT converter,
            tf2onnx) is written as plain TensorFlow ops, which converters
            know.
        replica_group_size: None (default: all replicas) or a positive
            int dividing the number of replicas, with `synchronized=True`:
            consecutive groups of this many replicas (ids 0 to g-1, g to
            2g-1, ...) each normalize with their own group's statistics.
            The moving statistics are updated on every replica alike with
            the mean of the groups' means and their pooled variance.
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

    # The configuration, as `__init__` resolves it.
    axis: int | list[int]
    momentum: float
    epsilon: float
    center: bool
    scale: bool
    beta_initializer: Any
    gamma_initializer: Any
    moving_mean_initializer: Any
    moving_variance_initializer: Any
    beta_regularizer: Any
    gamma_regularizer: Any
    beta_constraint: Any
    gamma_constraint: Any
    renorm: bool
    renorm_clipping: dict[str, float] | None
    renorm_momentum: float
    synchronized: bool
    virtual_batch_size: int | None
    fused: bool | None
    replica_group_size: int | None

    def __init__(
        self,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.axis = _check_axis(axis)
        self.momentum = _check_fraction("momentum", momentum)
        if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
            raise TypeError(
                f"`epsilon` must be a positive float. Received: epsilon={epsilon!r}"
            )
        if not float(epsilon) > 0.0:
            raise ValueError(
                f"`epsilon` must be > 0. Received: epsilon={epsilon!r}"
            )
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(
            moving_variance_initializer
        )
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)

        self.renorm = bool(renorm)
        self.renorm_clipping = _check_renorm_clipping(renorm_clipping)
        if self.renorm and self.renorm_clipping is None:
            self.renorm_clipping = {}
        self.renorm_momentum = _check_fraction(
            "renorm_momentum", renorm_momentum
        )

        self.synchronized = bool(synchronized)

        if virtual_batch_size is not None:
            if (
                isinstance(virtual_batch_size, bool)
                or not isinstance(virtual_batch_size, numbers.Integral)
                or virtual_batch_size < 1
            ):
                raise ValueError(
                    "`virtual_batch_size` must be None or a positive int. "
                    f"Received: virtual_batch_size={virtual_batch_size!r}"
                )
            virtual_batch_size = int(virtual_batch_size)
            if self.renorm:
                raise ValueError(
                    "`virtual_batch_size` cannot be combined with `renorm=True`. "
                    f"Received: virtual_batch_size={virtual_batch_size}, renorm=True"
                )
            if self.synchronized:
                raise ValueError(
                    "`virtual_batch_size` cannot be combined with `synchronized=True`: "
                    "ghost batches are per-replica by definition. "
                    f"Received: virtual_batch_size={virtual_batch_size}, synchronized=True"
                )
        self.virtual_batch_size = virtual_batch_size

        if fused not in (None, True, False):
            raise ValueError(
                f"`fused` must be None, True or False. Received: fused={fused!r}"
            )
        self.fused = fused
        self.replica_group_size = _sync.check_replica_group_size(
            replica_group_size, self.synchronized
        )

        self.supports_masking = True
        # Variables once built (`build`); None before.
        self.gamma: Any = None
        self.beta: Any = None
        self.moving_mean: Any = None
        self.moving_variance: Any = None
        self._feature_axes: list[int] = []
        self._reduction_axes: list[int] = []

    # ------------------------------------------------------------------ build

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        ndim = len(input_shape)
        self._feature_axes = _geometry.feature_axes(
            self.axis, ndim, input_shape, self.virtual_batch_size
        )
        self._reduction_axes = _geometry.reduction_axes(
            self._feature_axes, ndim
        )
        shape = tuple(input_shape[a] for a in self._feature_axes)

        if self.scale:
            self.gamma = self.add_weight(
                shape=shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        self.moving_mean = self.add_weight(
            shape=shape,
            name="moving_mean",
            initializer=self.moving_mean_initializer,
            trainable=False,
            autocast=False,
        )
        self.moving_variance = self.add_weight(
            shape=shape,
            name="moving_variance",
            initializer=self.moving_variance_initializer,
            trainable=False,
            autocast=False,
        )
        if self.renorm:
            # Renorm tracks standard deviations, started at the square root
            # of what the variance initializer gives (as Keras does).
            def stddev_initializer(shape, dtype=None):
                variance_init = _clone_initializer(
                    self.moving_variance_initializer
                )
                return ops.sqrt(variance_init(shape, dtype=dtype))

            self.moving_stddev = self.add_weight(
                shape=shape,
                name="moving_stddev",
                initializer=stddev_initializer,
                trainable=False,
                autocast=False,
            )
            self.renorm_mean = self.add_weight(
                shape=shape,
                name="renorm_mean",
                initializer=_clone_initializer(self.moving_mean_initializer),
                trainable=False,
                autocast=False,
            )
            self.renorm_stddev = self.add_weight(
                shape=shape,
                name="renorm_stddev",
                initializer=stddev_initializer,
                trainable=False,
                autocast=False,
            )
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

    # ------------------------------------------------------------------- call

    def _prepare_call_inputs(self, inputs, mask):
        """Floating inputs, and the mask expanded to broadcast against them."""
        if not backend.is_float_dtype(backend.standardize_dtype(inputs.dtype)):
            # Integer and bool inputs are taken as numbers, as the built-in
            # takes them; cast to the statistics dtype of the compute dtype
            # (never float16, where integers above 65504 overflow).
            inputs = ops.cast(
                inputs, _math.statistics_dtype(self.compute_dtype)
            )
        weights = _geometry.expand_mask(
            mask, len(inputs.shape), self._feature_axes, inputs.shape
        )
        return inputs, weights

    def call(
        self, inputs: Any, training: bool | None = None, mask: Any = None
    ) -> Any:
        inputs, weights = self._prepare_call_inputs(inputs, mask)
        use_batch_statistics = bool(training) and self.trainable

        fast = self._fast_path(inputs, weights)
        if fast is not None:
            return self._fast_call(inputs, use_batch_statistics, fast)

        ndim = len(inputs.shape)
        param_shape = _geometry.param_shape(
            self._feature_axes, ndim, self.moving_mean.shape
        )
        stats_dtype = _math.statistics_dtype(inputs.dtype)
        x = ops.cast(inputs, stats_dtype)

        def per_feature(variable):
            return ops.reshape(ops.cast(variable, stats_dtype), param_shape)

        gamma = per_feature(self.gamma) if self.scale else None
        beta = per_feature(self.beta) if self.center else None

        if not use_batch_statistics:
            outputs = _math.normalize(
                x,
                per_feature(self.moving_mean),
                per_feature(self.moving_variance),
                gamma,
                beta,
                self.epsilon,
            )
        elif self.virtual_batch_size is not None:
            outputs = self._ghost_batch_call(x, weights, gamma, beta)
        else:
            synced = (
                _sync.synchronized_moments(
                    x, self._reduction_axes, weights, self.replica_group_size
                )
                if self.synchronized
                else None
            )
            if synced is None:
                count, shift, residual, m2 = _math.shifted_moments(
                    x, self._reduction_axes, weights
                )
                moving = None
            else:
                count, shift, residual, m2, moving = synced
            mean = shift + residual
            # The residual is the part of the mean a float32 shift cannot
            # hold; subtracting the two in turn keeps it (see _math).
            centred, offset = x - shift, residual
            var = _math.variance(count, m2)
            # With replica groups the moving statistics pool the groups'.
            moving = moving or (count, mean, var)
            if self.renorm:
                gamma, beta = self._renorm_transform(
                    mean, var, gamma, beta, param_shape
                )
                self._update_renorm_statistics(*moving)
            else:
                self._update_moving_statistics(*moving)
            outputs = _math.normalize(
                centred, offset, var, gamma, beta, self.epsilon
            )
        return ops.cast(outputs, self.compute_dtype)

    def _fast_path(self, inputs, mask):
        """The fast path's implementation for this call (see `_fused`), or None."""
        if self.fused is False:
            return None
        from bnlayers import _fused

        implementation = _fused.implementation()
        reason = _fused.ineligibility(
            self, inputs, mask, self._feature_axes, implementation
        )
        if reason is None:
            return implementation
        if self.fused:
            raise ValueError(
                f"`fused=True` but the fused fast path cannot be taken here: {reason}. "
                "Pass fused=None to fall back to the reference path automatically."
            )
        return None

    def _fast_call(self, inputs, use_batch_statistics, implementation):
        from bnlayers import _fused

        args = dict(
            x=inputs,
            gamma=self.gamma if self.scale else None,
            beta=self.beta if self.center else None,
            moving_mean=self.moving_mean,
            moving_variance=self.moving_variance,
            axis=self._feature_axes[0],
            epsilon=self.epsilon,
            out_dtype=self.compute_dtype,
            implementation=implementation,
        )
        if not use_batch_statistics:
            return _fused.inference(**args)
        outputs, new_mean, new_var = _fused.training(
            momentum=self.momentum, **args
        )
        for variable, value in (
            (self.moving_mean, new_mean),
            (self.moving_variance, new_var),
        ):
            # (A cast of the same dtype still costs a Keras op per call.)
            if backend.standardize_dtype(value.dtype) != variable.dtype:
                value = ops.cast(value, variable.dtype)
            variable.assign(value)
        return outputs

    def _ghost_batch_call(self, x, weights, gamma, beta):
        """Training step with the batch split into ghost batches.

        The batch axis is padded up to a multiple of `virtual_batch_size`
        and the padding masked out, so a batch that is not a multiple ends
        with one smaller ghost batch and the same code serves both cases.
        """
        size = self.virtual_batch_size
        shape = ops.shape(x)
        batch = shape[0]
        pad = (-batch) % size
        keep = ops.reshape(
            ops.ones(shape[:1], dtype="bool"), [-1] + [1] * (len(x.shape) - 1)
        )
        if weights is not None:
            keep = ops.logical_and(keep, ops.cast(weights, "bool"))
        keep = ops.broadcast_to(keep, shape)
        padding = [(0, pad)] + [(0, 0)] * (len(x.shape) - 1)
        x_padded = ops.pad(x, padding)
        keep_padded = ops.pad(keep, padding, constant_values=False)

        groups = (batch + pad) // size
        grouped_shape = [groups, size] + list(shape[1:])
        xg = ops.reshape(x_padded, grouped_shape)
        kg = ops.reshape(keep_padded, grouped_shape)
        # Axis 0 of the inputs became axes 0 (groups) and 1 (within a group).
        group_axes = [1] + [a + 1 for a in self._reduction_axes if a != 0]
        count, shift, residual, m2 = _math.shifted_moments(xg, group_axes, kg)
        mean = shift + residual

        def expand(t):
            return None if t is None else ops.expand_dims(t, 0)

        var = _math.variance(count, m2)
        yg = _math.normalize(
            xg - shift, residual, var, expand(gamma), expand(beta), self.epsilon
        )
        outputs = ops.reshape(yg, [groups * size] + list(shape[1:]))[:batch]

        total, merged_mean, _ = _math.merge_moments(count, mean, m2, axis=0)
        pooled_var = ops.sum(m2, axis=0, keepdims=True) / ops.maximum(
            total, 1.0
        )
        self._update_moving_statistics(total, merged_mean, pooled_var)
        return outputs

    def _assign_counted(self, variable, value, counted):
        """Assign `value` to `variable`, except for features where nothing counted.

        A fully masked batch has no statistics; the moving averages keep
        what they had rather than decay towards zero.
        """
        value = ops.reshape(value, variable.shape)
        current = ops.cast(variable, value.dtype)
        variable.assign(
            ops.cast(ops.where(counted, value, current), variable.dtype)
        )

    def _counted(self, count, like):
        """Per-feature boolean, True where at least one element counted."""
        counted = ops.broadcast_to(
            ops.cast(count, like.dtype) > 0, ops.shape(like)
        )
        return ops.reshape(counted, self.moving_mean.shape)

    def _update_moving_statistics(self, count, mean, var):
        counted = self._counted(count, mean)
        for variable, value in (
            (self.moving_mean, mean),
            (self.moving_variance, var),
        ):
            current = ops.reshape(
                ops.cast(variable, value.dtype), ops.shape(value)
            )
            self._assign_counted(
                variable,
                _math.moving_average(current, value, self.momentum),
                counted,
            )

    # ----------------------------------------------------------------- renorm

    def _renorm_transform(self, mean, var, gamma, beta, param_shape):
        """Fold the renorm correction (r, d) into gamma and beta.

        With x_hat the batch-normalized input, renorm outputs
        `(x_hat * r + d) * gamma + beta`, i.e. a scale of `r * gamma` and an
        offset of `d * gamma + beta`; r and d carry no gradient.
        """
        dtype = mean.dtype
        stddev = ops.sqrt(var + self.epsilon)
        renorm_mean = ops.reshape(
            ops.cast(self.renorm_mean, dtype), param_shape
        )
        renorm_stddev = ops.reshape(
            ops.cast(self.renorm_stddev, dtype), param_shape
        )
        # Keep the divisor away from zero early in training.
        renorm_stddev = ops.maximum(
            renorm_stddev, ops.sqrt(ops.cast(self.epsilon, dtype))
        )
        r = stddev / renorm_stddev
        d = (mean - renorm_mean) / renorm_stddev
        clipping = self.renorm_clipping or {}
        if clipping.get("rmin") is not None:
            r = ops.maximum(r, clipping["rmin"])
        if clipping.get("rmax") is not None:
            r = ops.minimum(r, clipping["rmax"])
        if clipping.get("dmax") is not None:
            d = ops.clip(d, -clipping["dmax"], clipping["dmax"])
        r = ops.stop_gradient(r)
        d = ops.stop_gradient(d)
        if gamma is None:
            scale, offset = r, d
        else:
            scale, offset = r * gamma, d * gamma
        if beta is not None:
            offset = offset + beta
        return scale, offset

    def _update_renorm_statistics(self, count, mean, var):
        counted = self._counted(count, mean)
        shape = self.moving_mean.shape
        mean = ops.reshape(mean, shape)
        stddev = ops.reshape(ops.sqrt(var + self.epsilon), shape)

        def ema(variable, value, momentum):
            current = ops.cast(variable, value.dtype)
            return _math.moving_average(current, value, momentum)

        self._assign_counted(
            self.renorm_mean,
            ema(self.renorm_mean, mean, self.renorm_momentum),
            counted,
        )
        self._assign_counted(
            self.renorm_stddev,
            ema(self.renorm_stddev, stddev, self.renorm_momentum),
            counted,
        )
        self._assign_counted(
            self.moving_mean,
            ema(self.moving_mean, mean, self.momentum),
            counted,
        )
        new_stddev = ema(self.moving_stddev, stddev, self.momentum)
        self._assign_counted(self.moving_stddev, new_stddev, counted)
        # The inference variance follows the moving stddev; the ReLU guards
        # against rounding taking it below zero.
        self._assign_counted(
            self.moving_variance,
            ops.relu(new_stddev * new_stddev - self.epsilon),
            counted,
        )

    # ----------------------------------------------------------------- config

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "axis": self.axis,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "center": self.center,
                "scale": self.scale,
                "beta_initializer": initializers.serialize(
                    self.beta_initializer
                ),
                "gamma_initializer": initializers.serialize(
                    self.gamma_initializer
                ),
                "moving_mean_initializer": initializers.serialize(
                    self.moving_mean_initializer
                ),
                "moving_variance_initializer": initializers.serialize(
                    self.moving_variance_initializer
                ),
                "beta_regularizer": regularizers.serialize(
                    self.beta_regularizer
                ),
                "gamma_regularizer": regularizers.serialize(
                    self.gamma_regularizer
                ),
                "beta_constraint": constraints.serialize(self.beta_constraint),
                "gamma_constraint": constraints.serialize(
                    self.gamma_constraint
                ),
                "synchronized": self.synchronized,
                "renorm": self.renorm,
                "renorm_clipping": self.renorm_clipping,
                "renorm_momentum": self.renorm_momentum,
                "virtual_batch_size": self.virtual_batch_size,
                "fused": self.fused,
                "replica_group_size": self.replica_group_size,
            }
        )
        return config
