"""Batch renormalization (Ioffe, 2017): pure functions over `keras.ops`.

In training the batch-normalized values ``x_hat`` are corrected to
``x_hat * r + d``, with ``r = stddev / renorm_stddev`` and ``d = (mean -
renorm_mean) / renorm_stddev`` taken from moving statistics, clipped, and
carrying no gradient. The layer tracks standard deviations rather than
variances for renorm; the inference variance follows the moving stddev.
The initializers of those weights are here too.
"""

from keras import initializers
from keras import ops


def correction(mean, var, renorm_mean, renorm_stddev, epsilon, clipping):
    """`(r, d)`, clipped to `clipping` (keys among "rmin", "rmax", "dmax").

    All tensors broadcast against each other and share a dtype; a missing
    key means no clipping on that side. Neither carries a gradient.
    """
    # Keep the divisor away from zero early in training.
    renorm_stddev = ops.maximum(
        renorm_stddev, ops.sqrt(ops.cast(epsilon, mean.dtype))
    )
    r = stddev(var, epsilon) / renorm_stddev
    d = (mean - renorm_mean) / renorm_stddev
    if clipping.get("rmin") is not None:
        r = ops.maximum(r, clipping["rmin"])
    if clipping.get("rmax") is not None:
        r = ops.minimum(r, clipping["rmax"])
    if clipping.get("dmax") is not None:
        d = ops.clip(d, -clipping["dmax"], clipping["dmax"])
    return ops.stop_gradient(r), ops.stop_gradient(d)


def fold(r, d, gamma, beta):
    """The scale ``r * gamma`` and offset ``d * gamma + beta`` of renorm's output.

    Renorm outputs ``(x_hat * r + d) * gamma + beta``.

    `gamma` and `beta` may be None (no scale, no offset).
    """
    if gamma is None:
        scale, offset = r, d
    else:
        scale, offset = r * gamma, d * gamma
    if beta is not None:
        offset = offset + beta
    return scale, offset


def stddev(var, epsilon):
    """The standard deviation renorm tracks for a variance: ``sqrt(var + epsilon)``."""
    return ops.sqrt(var + epsilon)


def variance(stddev, epsilon):
    """The variance that follows a moving stddev, ``max(stddev**2 - epsilon, 0)``.

    The ReLU guards against rounding taking it below zero.
    """
    return ops.relu(stddev * stddev - epsilon)


def clone_initializer(initializer):
    """A fresh copy, so a seeded initializer used twice draws the same values."""
    if isinstance(initializer, initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer


def stddev_initializer(variance_initializer):
    """Renorm's standard deviations start at the square root of the variance's start, as Keras'."""

    def initializer(shape, dtype=None):
        variance = clone_initializer(variance_initializer)
        return ops.sqrt(variance(shape, dtype=dtype))

    return initializer
