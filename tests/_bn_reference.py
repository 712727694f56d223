"""Float64 NumPy reference of batch normalization, for the ghost-batch and axis-list tests.

Written from the formula, independently of bnlayers and of Keras, so that a
bug shared by both would still show. Gradients are the closed form for the
loss ``sum(dy * y)``.
"""

import numpy as np

# The moments (and which positions count) are the parity tests' reference.
from bn_reference import _keep
from bn_reference import batch_moments


def _param(values, feature_axes, ndim):
    """A per-feature array (features in increasing axis order) shaped to broadcast."""
    values = np.asarray(values, "float64")
    return np.expand_dims(values, [i for i in range(ndim) if i not in feature_axes])


def batch_norm(x, feature_axes, gamma, beta, epsilon, mask=None, dy=None):
    """Training-mode batch normalization of `x` with its own statistics.

    Args:
        x: inputs (any float dtype; computed in float64).
        feature_axes: sorted non-negative feature axes.
        gamma, beta: per-feature arrays of the feature axes' shape.
        mask: optional boolean array, the shape of `x` without the feature
            axes; False leaves a position out of the statistics.
        dy: optional upstream gradient, the shape of `x`.

    Returns:
        dict with `y`, `count`, `mean`, `var` (per feature) and, with `dy`,
        `dx`, `dgamma`, `dbeta`.
    """
    x = np.asarray(x, "float64")
    ndim = x.ndim
    axes = tuple(i for i in range(ndim) if i not in feature_axes)
    keep = _keep(x, mask, feature_axes)
    count, mean, var = batch_moments(x, feature_axes, mask)
    n = np.maximum(count, 1)
    centred = x - mean
    inv = 1.0 / np.sqrt(var + epsilon)
    g = _param(gamma, feature_axes, ndim)
    y = g * centred * inv + _param(beta, feature_axes, ndim)
    squeeze = lambda t: np.squeeze(t, axis=axes)
    out = {"y": y, "count": squeeze(count), "mean": squeeze(mean), "var": squeeze(var)}
    if dy is not None:
        dy = np.asarray(dy, "float64")
        # Every position (masked or not) subtracts the mean and divides by
        # the deviation; only kept positions move them.
        sum_dy = dy.sum(axis=axes, keepdims=True)
        sum_dy_c = (dy * centred).sum(axis=axes, keepdims=True)
        through_stats = -g * inv * sum_dy / n - g * inv**3 * centred * sum_dy_c / n
        out["dx"] = g * inv * dy + np.where(keep, through_stats, 0.0)
        out["dgamma"] = squeeze((dy * centred * inv).sum(axis=axes, keepdims=True))
        out["dbeta"] = squeeze(sum_dy)
    return out


def ghost_batch_norm(x, virtual_batch_size, feature_axes, gamma, beta, epsilon, mask=None, dy=None):
    """Each run of `virtual_batch_size` examples normalized on its own.

    The last group is smaller when the batch is not a multiple. Returns the
    same keys as `batch_norm`, with `mean` the count-weighted mean of the
    group means and `var` the pooled within-group variance (what the moving
    statistics are updated with).
    """
    groups = []
    for start in range(0, len(x), virtual_batch_size):
        part = slice(start, start + virtual_batch_size)
        groups.append(
            batch_norm(
                x[part],
                feature_axes,
                gamma,
                beta,
                epsilon,
                None if mask is None else mask[part],
                None if dy is None else dy[part],
            )
        )
    count = sum(g["count"] for g in groups)
    n = np.maximum(count, 1)
    out = {
        "y": np.concatenate([g["y"] for g in groups]),
        "count": count,
        "mean": sum(g["count"] * g["mean"] for g in groups) / n,
        "var": sum(g["count"] * g["var"] for g in groups) / n,
    }
    if dy is not None:
        out["dx"] = np.concatenate([g["dx"] for g in groups])
        out["dgamma"] = sum(g["dgamma"] for g in groups)
        out["dbeta"] = sum(g["dbeta"] for g in groups)
    return out


def moving_update(moving, value, momentum):
    return moving * momentum + value * (1.0 - momentum)


def assert_close(actual, expected, rtol, what=""):
    """max |actual - expected| <= rtol * max |expected| (scale-relative)."""
    # NumPy cannot read every backend's tensors (PyTorch's that require grad).
    from bn_reference import as_float64

    actual = as_float64(actual)
    expected = as_float64(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-12)
    err = float(np.max(np.abs(actual - expected), initial=0.0)) / scale
    assert err <= rtol, f"{what}: scaled error {err:.3g} > {rtol:g}"
