"""The tests' float64 NumPy reference of batch normalization, and their one error measure.

Written from the formulas (Ioffe & Szegedy, 2015; Ioffe, 2017 for renorm),
independently of both bnlayers and Keras, so that a mistake the two layers
happen to share still shows up. Forward pass, moving-average updates and the
analytic backward pass (gradients with respect to the inputs, gamma and beta
for a given upstream gradient, i.e. of the loss `sum(upstream * y)`) are all
computed in float64: `step` is one call of the layer, `batch_norm` and
`ghost_batch_norm` are the training-mode normalization with the batch's
statistics (whole, or per virtual batch), both through `step`.

Conventions (those of the Keras layer): `feature_axes` are the axes that
keep separate statistics; the variance is the biased one; a mask has the
input's shape without the last axis (Keras' rule; with several feature
axes, also the input's shape without those) and excludes positions from the
statistics only (every position is still normalized); a feature with no
unmasked position keeps its moving statistics.

Every comparison in the tests is stated in one measure, `rel_err`: the
largest absolute difference over a tensor, divided by the largest magnitude
of the expected tensor (or by `floor`, if that is larger). `assert_close`
and `check_error` assert it against a tolerance and record the largest
value seen per quantity, which conftest.py prints at the end of a run: the
figures the tolerances' comments quote come from that summary.
"""

import os

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
    var = (
        np.where(keep, (x - mean) ** 2, 0.0).sum(axis=reduction, keepdims=True)
        / safe
    )
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
    new_state = {
        k: np.asarray(v, dtype=np.float64).copy() for k, v in state.items()
    }
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
        renorm_stddev = np.maximum(
            per_feature("renorm_stddev"), np.sqrt(epsilon)
        )
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
        dxhat = (
            dy * g * r
        )  # r and d are constants for the gradient (renorm paper)
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
        grads = {
            "x": dx,
            "x_scale": float(np.max(np.abs(dxhat / sigma), initial=0.0)),
        }
        shape = [x.shape[a] for a in features]
        if scale:
            grads["gamma"] = (
                (dy * (r * xhat + d)).sum(axis=reduction).reshape(shape)
            )
        if center:
            grads["beta"] = dy.sum(axis=reduction).reshape(shape)

    if count is not None:
        shape = new_state["moving_mean"].shape
        counted = count.reshape(shape) > 0
        mean_f = mean.reshape(shape)
        var_f = var.reshape(shape)

        def update(name, value, m):
            old = new_state[name]
            new_state[name] = np.where(
                counted, old * m + value * (1.0 - m), old
            )

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


def offset_data(shape, feature_axes, offset, seed=0):
    """float64 inputs ``offset + u + spread * N(0, 1)`` and an upstream gradient.

    Per feature, `u` is uniform in [-1, 1] and `spread` uniform in [0.5, 2]:
    data whose mean is `offset` and whose spread is of unit scale, the case
    where a plain float32 sum of the inputs loses the spread's digits.
    """
    rng = np.random.default_rng(seed)
    pshape = [shape[a] if a in feature_axes else 1 for a in range(len(shape))]
    spread = rng.uniform(0.5, 2.0, pshape)
    centre = offset + rng.uniform(-1.0, 1.0, pshape)
    x = centre + spread * rng.standard_normal(shape)
    return x, rng.standard_normal(shape)


def feature_axes_of(axis, ndim):
    """The layer's `axis` argument (an int or a list) as sorted non-negative axes."""
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return sorted(a % ndim for a in axes)


def batch_norm(x, feature_axes, gamma, beta, epsilon, mask=None, dy=None):
    """Training-mode batch normalization of `x` with its own statistics.

    Args:
        x: inputs (any float dtype; computed in float64).
        feature_axes: the feature axes (any order, negative allowed).
        gamma, beta: per-feature arrays of the feature axes' shape.
        mask: optional boolean array, the shape of `x` without the feature
            axes; False leaves a position out of the statistics.
        dy: optional upstream gradient, the shape of `x`.

    Returns:
        dict with `y`, `count`, `mean`, `var` (per feature, the feature
        axes' shape) and, with `dy`, `dx`, `dgamma`, `dbeta`.
    """
    x = np.asarray(x, np.float64)
    features, reduction = _axes(x.ndim, feature_axes)
    shape = [x.shape[a] for a in features]
    state = {
        "gamma": gamma,
        "beta": beta,
        "moving_mean": np.zeros(shape),
        "moving_variance": np.ones(shape),
    }
    y, grads, _ = step(
        x,
        state,
        feature_axes=features,
        training=True,
        epsilon=epsilon,
        momentum=0.0,
        mask=mask,
        upstream=dy,
    )
    count, mean, var = (
        np.reshape(t, shape) for t in batch_moments(x, features, mask)
    )
    out = {"y": y, "count": count, "mean": mean, "var": var}
    if grads is not None:
        out.update(dx=grads["x"], dgamma=grads["gamma"], dbeta=grads["beta"])
    return out


def ghost_batch_norm(
    x,
    virtual_batch_size,
    feature_axes,
    gamma,
    beta,
    epsilon,
    mask=None,
    dy=None,
):
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


def assert_training_step(layer, outputs, expected, moving, momentum, tol):
    """Check one training step of `layer` against the reference's `expected`.

    `outputs` is `(y, dx, dgamma, dbeta)` from the step, `expected` the dict
    of `batch_norm` or `ghost_batch_norm` for the same batch, and `moving`
    the `(moving_mean, moving_variance)` expected before the step. Asserts
    the outputs, the gradients and the layer's moving statistics (unchanged
    for features where nothing counted) and returns the moving statistics
    expected after the step.
    """
    y, dx, dgamma, dbeta = outputs
    assert_close(y, expected["y"], tol, "outputs")
    assert_close(dx, expected["dx"], tol, "gradient wrt inputs")
    assert_close(dgamma, expected["dgamma"], tol, "gradient wrt gamma")
    assert_close(dbeta, expected["dbeta"], tol, "gradient wrt beta")
    counted = expected["count"] > 0
    moving_mean, moving_var = (
        np.where(counted, moving_update(old, expected[key], momentum), old)
        for old, key in zip(moving, ("mean", "var"), strict=True)
    )
    assert_close(layer.moving_mean.numpy(), moving_mean, tol, "moving mean")
    assert_close(
        layer.moving_variance.numpy(), moving_var, tol, "moving variance"
    )
    return moving_mean, moving_var


def as_float64(x):
    """A float64 NumPy array from NumPy values or a tensor of any Keras backend
    (NumPy cannot read a PyTorch tensor that requires grad on its own)."""
    if not isinstance(x, (np.ndarray, np.generic, int, float, list, tuple)):
        from keras import ops

        x = ops.convert_to_numpy(x)
    return np.asarray(x, dtype=np.float64)


# ------------------------------------------------------------ the error measure


def rel_err(actual, expected, floor=1e-3):
    """max |actual - expected| / max(max |expected|, floor): the tests' one error measure.

    One number for a whole tensor, relative to its largest expected value:
    float rounding is relative to the magnitudes that enter a computation,
    and those are the tensor's largest, not each element (an output near
    zero is a difference of values of ordinary size, so an element-wise
    relative error would be unbounded there). `floor` keeps a tensor that
    is all but zero from turning rounding noise into a large ratio; pass
    the size of the terms a quantity is the difference of where that is
    known (the input gradient, see `step`), or 0 for none.
    """
    actual = as_float64(actual)
    expected = as_float64(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.size == 0:
        return 0.0
    diff = float(np.max(np.abs(actual - expected)))
    scale = max(float(np.max(np.abs(expected))), floor)
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


# Largest error seen per key, filled by `record` and printed at the end of
# the run (see conftest.py): the measured figures behind the tolerances.
MAX_ERRORS = {}
CASES_RUN = set()


def record(against, policy, quantity, err, case=""):
    """Keep `err` if it is the largest yet for (against, policy, quantity)."""
    key = (against, policy, quantity)
    if key not in MAX_ERRORS or err > MAX_ERRORS[key][0]:
        MAX_ERRORS[key] = (err, case)


def check_error(err, tol, what):
    """Record an error measured with `rel_err` (here or in a worker process)
    under the running test, and assert it is within `tol`."""
    # PYTEST_CURRENT_TEST is "tests/test_x.py::test_y[params] (call)".
    module, _, test = (
        os.environ.get("PYTEST_CURRENT_TEST", "")
        .rpartition(" ")[0]
        .partition("::")
    )
    record(
        module.rsplit("/", 1)[-1],
        test.split("[")[0],
        what,
        err,
        test.partition("[")[2][:-1],
    )
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def assert_close(actual, expected, tol, what, floor=1e-3):
    """`rel_err(actual, expected, floor) <= tol`, recorded (see `check_error`)."""
    check_error(rel_err(actual, expected, floor), tol, what)
