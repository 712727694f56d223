"""`ChannelAffine`: the fixed multiply-add that a BN layer is at inference."""

import numbers
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from bnlayers import _geometry
from bnlayers import _math


# The registered name, "bnlayers>ChannelAffine", is what saved files refer
# to: it must not change, wherever the class lives.
@keras.saving.register_keras_serializable(package="bnlayers")
class ChannelAffine(keras.layers.Layer):
    """A fixed per-feature multiply-add: `outputs = inputs * scale + offset`.

    What a BatchNormalization layer computes at inference, with its four
    per-feature vectors reduced to two. `fold_batchnorm` puts one in place
    of a `bnlayers.BatchNormalization` over several axes that it cannot
    merge into a linear layer; every other BN layer it cannot merge becomes
    a frozen `keras.layers.BatchNormalization`, which loads without
    bnlayers. Models that earlier versions folded hold one in place of
    each such layer, and still load. It has
    no statistics and no training behaviour: it computes the same thing in
    training and inference, and its two weights are not trainable.

    Args:
        axis: Integer or list of integers, the feature axes (as the BN
            layer's `axis`). `scale` and `offset` have the shape of those
            axes.
        **kwargs: Base layer keyword arguments (e.g. `name`, `dtype`).

    Inputs in float16 or bfloat16 are computed in float32 and cast back, as
    the BN layers do.
    """

    def __init__(self, axis: int | Sequence[int] = -1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(axis, (list, tuple)):
            axis = [int(a) for a in axis]
        elif isinstance(axis, numbers.Integral) and not isinstance(axis, bool):
            axis = int(axis)
        else:
            raise TypeError(
                f"`axis` must be an int or a list of ints. Received: axis={axis!r}"
            )
        self.axis = axis
        self.supports_masking = True
        self._feature_axes: list[int] = []  # set by build

    def build(self, input_shape):
        ndim = len(input_shape)
        self._feature_axes = _geometry.feature_axes(
            self.axis, ndim, input_shape
        )
        shape = tuple(input_shape[a] for a in self._feature_axes)
        # Created in this order, which saved files rely on.
        self.scale, self.offset = (
            self.add_weight(
                shape=shape,
                name=name,
                initializer=initializer,
                trainable=False,
                autocast=False,
            )
            for name, initializer in (("scale", "ones"), ("offset", "zeros"))
        )

    def call(self, inputs):
        ndim = len(inputs.shape)
        param_shape = _geometry.param_shape(
            self._feature_axes, ndim, self.scale.shape
        )
        dtype = _math.statistics_dtype(inputs.dtype)
        x = ops.cast(inputs, dtype)
        scale = ops.reshape(ops.cast(self.scale, dtype), param_shape)
        offset = ops.reshape(ops.cast(self.offset, dtype), param_shape)
        return ops.cast(x * scale + offset, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"axis": self.axis})
        return config
