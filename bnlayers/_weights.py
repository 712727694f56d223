"""The weights of `BatchNormalization`, created in the built-in's order.

`gamma`, `beta`, `moving_mean`, `moving_variance` (names, shapes and order
of Keras' layer, which `get_weights` and `.weights.h5` files follow), then
renorm's `moving_stddev`, `renorm_mean`, `renorm_stddev`, and last the
step counter `moving_count` where an option averages by step.
"""

from bnlayers import _moving
from bnlayers import _renorm


def create(layer, shape):
    """Add `layer`'s weights of per-feature `shape` and set its attributes."""

    def weight(name, initializer, trainable=False, **kwargs):
        return layer.add_weight(
            shape=shape,
            name=name,
            initializer=initializer,
            trainable=trainable,
            autocast=False,
            **kwargs,
        )

    def trained(name):
        # gamma and beta: learned, with their own regularizer and constraint.
        return weight(
            name,
            getattr(layer, f"{name}_initializer"),
            trainable=True,
            regularizer=getattr(layer, f"{name}_regularizer"),
            constraint=getattr(layer, f"{name}_constraint"),
        )

    if layer.scale:
        layer.gamma = trained("gamma")
    if layer.center:
        layer.beta = trained("beta")
    layer.moving_mean = weight("moving_mean", layer.moving_mean_initializer)
    layer.moving_variance = weight(
        "moving_variance", layer.moving_variance_initializer
    )
    if layer.renorm:
        stddev_initializer = _renorm.stddev_initializer(
            layer.moving_variance_initializer
        )
        layer.moving_stddev = weight("moving_stddev", stddev_initializer)
        layer.renorm_mean = weight(
            "renorm_mean",
            _renorm.clone_initializer(layer.moving_mean_initializer),
        )
        layer.renorm_stddev = weight("renorm_stddev", stddev_initializer)
    if _moving.counts_steps(layer.momentum, layer.debias_moving_statistics):
        # Last, so that the weights before it are the built-in's list.
        layer.moving_count = weight("moving_count", "zeros")
