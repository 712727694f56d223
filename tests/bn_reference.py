"""A float64 NumPy reference of batch normalization, the yardstick of the tests.

Written from the formulas (Ioffe & Szegedy, 2015; Ioffe, 2017 for renorm),
independently of both bnlayers and Keras, so that a mistake the two layers
happen to share still shows up. Forward pass, moving-average updates and the
analytic backward pass (gradients with respect to the inputs, gamma and beta
for a given upstream gradient) are all computed in float64.

Conventions (those of the Keras layer): `feature_axes` are the axes that
keep separate statistics; the variance is the biased one; a mask has the
input's shape without the last axis (Keras' rule; with several feature
axes, also the input's shape without those) and excludes positions from the
statistics only (every position is still normalized); a feature with no
unmasked position keeps its moving statistics.
"""

import numpy as np

STATE_NAMES = (
    "gamma",
    "beta",
    "moving_mean",
    "moving_variance",
    "moving_stddev",
    "renorm_mean",
    "renorm_stddev",
)


def weight_names(center=True, scale=True, renorm=False):
    """Names of the layer's weights, in `get_weights()` order."""
    names = []
    if scale:
        names.append("gamma")
    if center:
        names.append("beta")
    names += ["moving_mean", "moving_variance"]
    if renorm:
        names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    return names


def _axes(ndim, feature_axes):
    features = sorted(a % ndim for a in feature_axes)
    reduction = tuple(i for i in range(ndim) if i not in features)
    return features, reduction


def _param_shape(x, features):
    return [x.shape[i] if i in features else 1 for i in range(x.ndim)]


def _keep(x, mask, features):
    if mask is None:
        return np.ones(x.shape, dtype=bool)
    keep = np.asarray(mask, dtype=bool)
    if keep.ndim == x.ndim - 1:
        # Keras' rule: the mask covers every axis but the last, whatever the features.
        return np.broadcast_to(keep[..., None], x.shape)
    for a in features:  # ascending, so each insertion lands where it belongs
        keep = np.expand_dims(keep, a)
    return np.broadcast_to(keep, x.shape)


def batch_moments(x, feature_axes, mask=None):
    """`(count, mean, variance)` per feature, dims kept, in float64."""
    x = np.asarray(x, dtype=np.float64)
    features, reduction = _axes(x.ndim, feature_axes)
    keep = _keep(x, mask, features)
    count = keep.sum(axis=reduction, keepdims=True).astype(np.float64)
    safe = np.maximum(count, 1.0)
    mean = np.where(keep, x, 0.0).sum(axis=reduction, keepdims=True) / safe
    var = np.where(keep, (x - mean) ** 2, 0.0).sum(axis=reduction, keepdims=True) / safe
    return count, mean, var


def step(
    x,
    state,
    *,
    feature_axes,
    training,
    epsilon,
    momentum,
    center=True,
    scale=True,
    trainable=True,
    renorm=False,
    renorm_clipping=None,
    renorm_momentum=0.99,
    mask=None,
    upstream=None,
):
    """One call of the layer, in float64.

    Args:
        x: inputs (any float dtype; used as float64).
        state: dict from weight name to its per-feature value.
        upstream: optional gradient of the loss with respect to the output.

    Returns:
        `(y, grads, new_state)`: the output; a dict with the gradients
        "x", "gamma", "beta" (those that exist) when `upstream` is given,
        else None; the weights after the call.
    """
    x = np.asarray(x, dtype=np.float64)
    features, reduction = _axes(x.ndim, feature_axes)
    pshape = _param_shape(x, features)

    def per_feature(name):
        return np.asarray(state[name], dtype=np.float64).reshape(pshape)

    g = per_feature("gamma") if scale else 1.0
    b = per_feature("beta") if center else 0.0
    new_state = {k: np.asarray(v, dtype=np.float64).copy() for k, v in state.items()}
    keep = _keep(x, mask, features)

    if not (training and trainable):
        mean, var = per_feature("moving_mean"), per_feature("moving_variance")
        count = None
    else:
        count, mean, var = batch_moments(x, feature_axes, mask)
    sigma = np.sqrt(var + epsilon)
    xhat = (x - mean) / sigma

    r, d = 1.0, 0.0
    if count is not None and renorm:
        renorm_stddev = np.maximum(per_feature("renorm_stddev"), np.sqrt(epsilon))
        r = sigma / renorm_stddev
        d = (mean - per_feature("renorm_mean")) / renorm_stddev
        clipping = renorm_clipping or {}
        if clipping.get("rmin") is not None:
            r = np.maximum(r, clipping["rmin"])
        if clipping.get("rmax") is not None:
            r = np.minimum(r, clipping["rmax"])
        if clipping.get("dmax") is not None:
            d = np.clip(d, -clipping["dmax"], clipping["dmax"])
    y = g * (r * xhat + d) + b

    grads = None
    if upstream is not None:
        dy = np.asarray(upstream, dtype=np.float64)
        dxhat = dy * g * r  # r and d are constants for the gradient (renorm paper)
        if count is None:
            dx = dxhat / sigma
        else:
            # xhat_i = (x_i - mean) / sigma for every position i, while mean
            # and sigma depend on the unmasked positions only:
            # dx_j = dxhat_j / sigma
            #        - [j unmasked] / (n sigma) * (sum dxhat + xhat_j sum dxhat xhat)
            s1 = dxhat.sum(axis=reduction, keepdims=True)
            s2 = (dxhat * xhat).sum(axis=reduction, keepdims=True)
            n = np.maximum(count, 1.0)
            dx = dxhat / sigma - keep * (s1 + xhat * s2) / (n * sigma)
        # dx is a difference of terms of size |dxhat / sigma|; when they
        # nearly cancel (a batch of 2, whose normalized values hardly
        # depend on the inputs) dx is tiny next to them, and rounding in
        # any implementation is of their size, not of dx's.
        grads = {"x": dx, "x_scale": float(np.max(np.abs(dxhat / sigma), initial=0.0))}
        shape = [x.shape[a] for a in features]
        if scale:
            grads["gamma"] = (dy * (r * xhat + d)).sum(axis=reduction).reshape(shape)
        if center:
            grads["beta"] = dy.sum(axis=reduction).reshape(shape)

    if count is not None:
        shape = new_state["moving_mean"].shape
        counted = count.reshape(shape) > 0
        mean_f = mean.reshape(shape)
        var_f = var.reshape(shape)

        def update(name, value, m):
            old = new_state[name]
            new_state[name] = np.where(counted, old * m + value * (1.0 - m), old)

        if renorm:
            stddev = np.sqrt(var_f + epsilon)
            update("renorm_mean", mean_f, renorm_momentum)
            update("renorm_stddev", stddev, renorm_momentum)
            update("moving_mean", mean_f, momentum)
            update("moving_stddev", stddev, momentum)
            new_state["moving_variance"] = np.where(
                counted,
                np.maximum(new_state["moving_stddev"] ** 2 - epsilon, 0.0),
                new_state["moving_variance"],
            )
        else:
            update("moving_mean", mean_f, momentum)
            update("moving_variance", var_f, momentum)
    return y, grads, new_state


def as_float64(x):
    """A float64 NumPy array from NumPy values or a tensor of any Keras backend
    (NumPy cannot read a PyTorch tensor that requires grad on its own)."""
    if not isinstance(x, (np.ndarray, np.generic, int, float, list, tuple)):
        from keras import ops

        x = ops.convert_to_numpy(x)
    return np.asarray(x, dtype=np.float64)


def rel_err(actual, expected, floor=1e-3):
    """Largest absolute difference, relative to the largest expected magnitude.

    The denominator is `max(max|expected|, floor)`, so one
    number describes a whole tensor; this is the error measure the tests
    state their tolerances in.
    """
    actual = as_float64(actual)
    expected = as_float64(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(expected))), floor)
    return float(np.max(np.abs(actual - expected))) / scale


# Largest error seen per (compared against, policy, quantity), filled by the
# parity tests and printed at the end of the run (see conftest.py).
MAX_ERRORS = {}
CASES_RUN = set()


def record(against, policy, quantity, err, case=""):
    key = (against, policy, quantity)
    if key not in MAX_ERRORS or err > MAX_ERRORS[key][0]:
        MAX_ERRORS[key] = (err, case)
