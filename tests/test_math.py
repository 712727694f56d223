"""The pure functions of `bnlayers._math` and `bnlayers._renorm` against float64 NumPy."""

import numpy as np
import pytest
from keras import ops

import bn_reference as ref
from bnlayers import _math
from bnlayers import _renorm


def _np(t):
    return np.asarray(ops.convert_to_numpy(t), dtype=np.float64)


def _triple(x, axes, keep=None):
    """float64 (count, mean, m2) over `axes`, dims kept."""
    x = np.asarray(x, np.float64)
    keep = (
        np.ones(x.shape, bool)
        if keep is None
        else np.broadcast_to(keep, x.shape)
    )
    count = keep.sum(axis=axes, keepdims=True).astype(np.float64)
    mean = np.where(keep, x, 0).sum(axis=axes, keepdims=True) / np.maximum(
        count, 1
    )
    m2 = np.where(keep, (x - mean) ** 2, 0).sum(axis=axes, keepdims=True)
    return count, mean, m2


@pytest.mark.parametrize(
    "dtype, expected",
    [
        ("float16", "float32"),
        ("bfloat16", "float32"),
        ("float32", "float32"),
        ("float64", "float64"),
    ],
)
def test_statistics_dtype(dtype, expected):
    assert _math.statistics_dtype(dtype) == expected


# bn_reference.rel_err allowed, about ten times the largest measured on
# TensorFlow, JAX and PyTorch: float32 results are rounding noise away from
# float64 (sums of a few hundred terms; measured 1.4e-7), float64 inputs
# agree to float64 rounding (measured 5.8e-16).
TOL = {"float32": 1e-6, "float64": 6e-15}
FLOAT64 = pytest.param("float64", marks=pytest.mark.needs_x64)


@pytest.mark.parametrize("dtype", ["float32", FLOAT64])
@pytest.mark.parametrize("axes", [(0,), (0, 1), (0, 2), (1, 2, 3)], ids=str)
def test_moments_unmasked(dtype, axes):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (6, 5, 4, 3)).astype(dtype)
    count, mean, m2 = _math.moments(ops.convert_to_tensor(x), axes)
    c, m, s = _triple(x, axes)
    np.testing.assert_array_equal(_np(count) * np.ones_like(c), c)
    ref.assert_close(_np(mean), m, TOL[dtype], f"mean ({dtype})")
    ref.assert_close(_np(m2), s, TOL[dtype], f"m2 ({dtype})")
    ref.assert_close(
        _np(_math.variance(count, m2)), s / c, TOL[dtype], f"variance ({dtype})"
    )


@pytest.mark.parametrize("dtype", ["float32", FLOAT64])
@pytest.mark.parametrize("axes", [(0, 1), (0, 1, 2)], ids=str)
def test_moments_masked(dtype, axes):
    rng = np.random.default_rng(1)
    x = rng.normal(-1.0, 3.0, (6, 5, 4)).astype(dtype)
    keep = rng.random((6, 5, 1)) > 0.4
    # Masked entries hold garbage that must not leak into any sum.
    x = np.where(keep, x, np.array(np.nan, dtype))
    count, mean, m2 = _math.moments(
        ops.convert_to_tensor(x), axes, ops.convert_to_tensor(keep)
    )
    c, m, s = _triple(x, axes, keep)
    np.testing.assert_array_equal(_np(count), c)
    ref.assert_close(_np(mean), m, TOL[dtype], f"mean ({dtype})")
    ref.assert_close(_np(m2), s, TOL[dtype], f"m2 ({dtype})")


def test_moments_with_nothing_counted_are_zero():
    x = ops.convert_to_tensor(np.full((4, 3), np.inf, "float32"))
    count, mean, m2 = _math.moments(x, (0,), ops.zeros((4, 1), "bool"))
    for t in (count, mean, m2, _math.variance(count, m2)):
        np.testing.assert_array_equal(_np(t), np.zeros((1, 3)))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_moments_of_large_mean_data(masked):
    """Mean 1e4, standard deviation 1, float32: variance to 1e-4 (one-pass
    E[x^2] - E[x]^2 would lose every digit: x^2 ~ 1e8 has a float32 spacing of 8)."""
    rng = np.random.default_rng(2)
    x = rng.normal(1e4, 1.0, (256, 4)).astype("float32")
    keep = rng.random((256, 1)) > 0.3 if masked else None
    count, mean, m2 = _math.moments(
        ops.convert_to_tensor(x),
        (0,),
        None if keep is None else ops.convert_to_tensor(keep),
    )
    c, m, s = _triple(x, (0,), keep)
    # Measured 1.4e-5 and 4.1e-7.
    ref.assert_close(
        _np(_math.variance(count, m2)), s / c, 1e-4, "variance", floor=0.0
    )
    ref.assert_close(_np(mean), m, 4e-6, "mean", floor=0.0)


@pytest.mark.parametrize("dtype", ["float32", FLOAT64])
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["mean0", "mean1e4"])
def test_merge_moments_equals_moments_of_the_union(dtype, offset):
    """Groups of different sizes, one of them empty, merge to the whole's triple."""
    rng = np.random.default_rng(3)
    sizes = [5, 1, 0, 9, 3]
    x = rng.normal(offset, 1.0, (sum(sizes), 3)).astype(dtype)
    # Each group's spread differs, and so does its mean, so both terms of the
    # merge matter.
    bounds = np.cumsum([0] + sizes)
    for i in range(len(sizes)):
        x[bounds[i] : bounds[i + 1]] += np.array(i * 0.5, dtype)
    triples = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=False):
        group = np.zeros((max(hi - lo, 1), 3), dtype)
        keep = np.zeros((max(hi - lo, 1), 1), bool)
        group[: hi - lo] = x[lo:hi]
        keep[: hi - lo] = True
        triples.append(
            _math.moments(
                ops.convert_to_tensor(group), (0,), ops.convert_to_tensor(keep)
            )
        )
    stacked = [
        ops.concatenate([t[k] for t in triples], axis=0) for k in range(3)
    ]
    count, mean, m2 = _math.merge_moments(*stacked, axis=0)
    c, m, s = _triple(x, (0,))
    np.testing.assert_array_equal(_np(count), c)
    ref.assert_close(
        _np(mean), m, TOL[dtype], f"mean ({dtype}, mean {offset:g})", floor=0.0
    )
    # A merge through sums of squares would be off by ~n * offset**2 * 2**-24
    # ~ 100 here (m2 ~ 35). The exact merge is limited by the group means
    # themselves: in float32 a mean near 1e4 is only known to ~2**-11 * 1e4
    # ~ 5e-4, which enters m2 at first order through n_i (mean_i - mean).
    # Measured 2.8e-4 (float32) and 2.9e-13 (float64) at mean 1e4.
    tol = {"float32": 3e-3, "float64": 3e-12}[dtype] if offset else TOL[dtype]
    ref.assert_close(
        _np(m2), s, tol, f"m2 ({dtype}, mean {offset:g})", floor=0.0
    )


@pytest.mark.needs_x64
def test_merge_moments_of_float64_is_exact_to_rounding():
    rng = np.random.default_rng(4)
    x = rng.normal(0.0, 1.0, (40, 2))
    groups = np.split(x, 4)
    triples = []
    for g in groups:
        count, mean, m2 = _math.moments(ops.convert_to_tensor(g), (0,))
        # Unmasked, the count comes back as a scalar; stacking needs its shape.
        triples.append((ops.broadcast_to(count, ops.shape(mean)), mean, m2))
    count, mean, m2 = _math.merge_moments(
        *[ops.stack([t[k] for t in triples], axis=0) for k in range(3)], axis=0
    )
    c, m, s = _triple(x, (0,))
    # Measured 1.8e-16 and 0.
    ref.assert_close(_np(mean)[0], m, 2e-15, "mean")
    ref.assert_close(_np(m2)[0], s, 1e-15, "m2")
    np.testing.assert_array_equal(_np(count)[0] * np.ones_like(c), c)


@pytest.mark.parametrize(
    "affine", [(True, True), (True, False), (False, True), (False, False)]
)
def test_normalize(affine):
    rng = np.random.default_rng(5)
    x = rng.normal(2.0, 3.0, (8, 4))
    mean, var = x.mean(0, keepdims=True), x.var(0, keepdims=True)
    gamma = rng.uniform(0.5, 1.5, (1, 4)) if affine[0] else None
    beta = rng.normal(0.0, 1.0, (1, 4)) if affine[1] else None
    expected = (x - mean) / np.sqrt(var + 1e-3)
    if gamma is not None:
        expected = expected * gamma
    if beta is not None:
        expected = expected + beta

    def t(a):
        return None if a is None else ops.convert_to_tensor(a.astype("float32"))

    y = _math.normalize(t(x), t(mean), t(var), t(gamma), t(beta), 1e-3)
    ref.assert_close(_np(y), expected, 1e-6, "output")  # measured 9.7e-8


def test_normalize_keeps_accuracy_for_large_means():
    """Subtracting before scaling: (x - mean) is exact when both are near 1e4."""
    x = np.float32(1e4) + np.arange(-4, 4, dtype="float32") / 8
    mean = np.float32(1e4)
    y = _math.normalize(
        ops.convert_to_tensor(x), mean, np.float32(1.0), None, None, 1e-3
    )
    expected = (x.astype(np.float64) - 1e4) / np.sqrt(1.001)
    ref.assert_close(_np(y), expected, 5e-7, "output")  # measured 4.4e-8


def test_moving_average():
    moving = np.array([1.0, -2.0, 5.0], "float32")
    value = np.array([3.0, 4.0, -1.0], "float32")
    for momentum in (0.0, 0.25, 0.99, 1.0):
        out = _math.moving_average(
            ops.convert_to_tensor(moving),
            ops.convert_to_tensor(value),
            momentum,
        )
        expected = moving.astype(np.float64) * momentum + value * (1 - momentum)
        ref.assert_close(
            _np(out), expected, 1e-6, "moving average"
        )  # measured 8.5e-8


@pytest.mark.parametrize(
    "clipping",
    [{}, {"rmin": 0.8, "rmax": 1.25, "dmax": 0.1}, {"rmax": 1.1}],
    ids=["none", "all", "rmax"],
)
def test_renorm_correction_and_fold(clipping):
    """`_renorm`: r, d clipped as asked, folded into gamma and beta."""
    rng = np.random.default_rng(6)
    mean = rng.normal(0.0, 1.0, (1, 5))
    var = rng.uniform(0.2, 3.0, (1, 5))
    renorm_mean = rng.normal(0.0, 1.0, (1, 5))
    renorm_stddev = np.array([[1.0, 0.5, 2.0, 1e-4, 1.5]])
    gamma = rng.uniform(0.5, 1.5, (1, 5))
    beta = rng.normal(0.0, 1.0, (1, 5))
    eps = 1e-3
    divisor = np.maximum(renorm_stddev, np.sqrt(eps))
    r = np.sqrt(var + eps) / divisor
    d = (mean - renorm_mean) / divisor
    r = np.clip(r, clipping.get("rmin", -np.inf), clipping.get("rmax", np.inf))
    d = np.clip(d, -clipping.get("dmax", np.inf), clipping.get("dmax", np.inf))

    def t(a):
        return ops.convert_to_tensor(a.astype("float32"))

    r_out, d_out = _renorm.correction(
        t(mean), t(var), t(renorm_mean), t(renorm_stddev), eps, clipping
    )
    # Measured up to 4.9e-8 (r), 1.5e-8 (d), 8.1e-8 (scale), 5.5e-8 (offset).
    ref.assert_close(_np(r_out), r, 1e-6, "r")
    ref.assert_close(_np(d_out), d, 1e-6, "d")
    scale, offset = _renorm.fold(r_out, d_out, t(gamma), t(beta))
    ref.assert_close(_np(scale), r * gamma, 1e-6, "scale")
    ref.assert_close(_np(offset), d * gamma + beta, 1e-6, "offset")
    scale, offset = _renorm.fold(r_out, d_out, None, None)
    np.testing.assert_array_equal(_np(scale), _np(r_out))
    np.testing.assert_array_equal(_np(offset), _np(d_out))


def test_renorm_stddev_and_variance_round_trip():
    var = np.array([0.0, 1e-4, 1.0, 9.0], "float32")
    stddev = _renorm.stddev(ops.convert_to_tensor(var), 1e-3)
    back = _np(_renorm.variance(stddev, 1e-3))
    # Never below zero, however the square root rounded.
    assert np.all(back >= 0.0)
    ref.assert_close(back, var, 1e-7, "variance")  # measured 6.6e-9
