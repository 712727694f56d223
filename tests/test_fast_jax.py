"""The JAX fast path (`bnlayers/_fast_jax.py`): when it is taken, and that it
computes what the reference path and a float64 reference compute.

Each check runs a training step (outputs, gradients by `jax.value_and_grad`
with respect to the inputs, gamma and beta, moving statistics) and an
inference call, under `jax.jit` and op by op, with `fused=None` (the fast
path, checked to be taken) and `fused=False` (the reference path), at an
offset of 1e4 where a plain float32 mean would be off by about 1e-3.
"""

import keras
import numpy as np
import pytest

import bn_reference as ref
import bnlayers
from backend_ops import to_numpy
from backend_ops import value_and_grads

pytestmark = pytest.mark.backends("jax", reason="the JAX fast path")

# Largest error against float64 measured over the grid below (rel_err, the
# whole tensor's largest difference over its largest value), and the
# tolerance, about ten times that:
# - float32 and float64 (inputs rounded to the layer's dtype, statistics in
#   float32 or float64): measured 3.8e-7 (float32); 2.7e-12 (float64, the
#   reference's own rounding: it takes a plain mean, and an ulp of the
#   offset 1e4 is 1.8e-12);
# - float16 and bfloat16 (mixed policies: outputs and the input gradient
#   rounded to the compute dtype): measured 5.5e-4 and 4.6e-3.
TOLERANCE = {
    "float32": 4e-6,
    "float64": 3e-11,
    "mixed_float16": 5e-3,
    "mixed_bfloat16": 4e-2,
}
OFFSET = 1e4


class _Spy:
    """Counts the calls of the fast path's two entry points."""

    def __init__(self, monkeypatch):
        from bnlayers import _fast_jax

        self.calls = {"training": 0, "inference": 0}
        for name in self.calls:
            original = getattr(_fast_jax, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(_fast_jax, name, counted)


def _data(shape, axis, dtype, seed=0):
    x, dy = ref.offset_data(shape, [axis % len(shape)], OFFSET, seed)
    # The reference takes the inputs as the layer sees them, rounded.
    import jax.numpy as jnp

    return x.astype(jnp.dtype(dtype)).astype("float64"), dy


def _layer(shape, axis, fused, dtype, **kwargs):
    layer = bnlayers.BatchNormalization(
        axis=axis, momentum=0.5, fused=fused, dtype=dtype, **kwargs
    )
    layer.build(shape)
    rng = np.random.default_rng(3)
    sizes = layer.moving_mean.shape
    weights = [
        rng.uniform(0.5, 1.5, sizes),
        rng.uniform(-0.5, 0.5, sizes),
        rng.uniform(-1, 1, sizes),
        rng.uniform(0.5, 2, sizes),
    ]
    layer.set_weights([w.astype(layer.variable_dtype) for w in weights])
    return layer


def _step(layer, x, dy, jit):
    """A training step and an inference call: every result as float64."""
    compute = layer.compute_dtype
    y, (dx, dgamma, dbeta) = value_and_grads(
        lambda t: layer(t, training=True),
        [keras.ops.cast(x, compute)],
        keras.ops.cast(dy, compute),
        [layer.gamma, layer.beta],
        [layer],
        jit=jit,
    )
    y_inf = layer(keras.ops.cast(x, compute), training=False)
    assert keras.backend.standardize_dtype(y.dtype) == compute
    assert keras.backend.standardize_dtype(y_inf.dtype) == compute
    results = [y, dx, dgamma, dbeta, layer.moving_mean, layer.moving_variance]
    return [ref.as_float64(to_numpy(r)) for r in results + [y_inf]]


def _expected(layer, x, dy, axis):
    state = dict(zip(ref.weight_names(), layer.get_weights(), strict=True))
    y, grads, new_state = ref.step(
        x,
        state,
        feature_axes=[axis],
        training=True,
        epsilon=layer.epsilon,
        momentum=layer.momentum,
        upstream=dy,
    )
    y_inf, _, _ = ref.step(
        x,
        new_state,
        feature_axes=[axis],
        training=False,
        epsilon=layer.epsilon,
        momentum=layer.momentum,
    )
    return [
        y,
        grads["x"],
        grads["gamma"],
        grads["beta"],
        new_state["moving_mean"],
        new_state["moving_variance"],
        y_inf,
    ], grads["x_scale"]


NAMES = (
    "outputs",
    "input gradient",
    "gamma gradient",
    "beta gradient",
    "moving mean",
    "moving variance",
    "inference outputs",
)


def _compare(dtype, shape, axis, jit, monkeypatch):
    x, dy = _data(shape, axis, dtype.replace("mixed_", ""))
    results = {}
    for fused in (None, False):
        spy = _Spy(monkeypatch)
        layer = _layer(shape, axis, fused, dtype)
        assert bnlayers.fused_eligibility(layer, shape) is None
        expected, x_scale = _expected(layer, x, dy, axis)
        results[fused] = _step(layer, x, dy, jit)
        taken = fused is None
        assert spy.calls == {"training": int(taken), "inference": int(taken)}
        tol = TOLERANCE[dtype]
        for name, got, want in zip(
            NAMES, results[fused], expected, strict=True
        ):
            floor = x_scale if name == "input gradient" else 1e-3
            ref.assert_close(got, want, tol, f"fused={fused}: {name}", floor)
    # The two paths round alike; their difference is within the same bound.
    for name, fast, reference in zip(
        NAMES, results[None], results[False], strict=True
    ):
        ref.assert_close(fast, reference, TOLERANCE[dtype], f"paths: {name}")


CONV_LAST = ((8, 5, 3, 4), -1)
CONV_FIRST = ((8, 4, 5, 3), 1)
DENSE = ((64, 6), -1)
# float32 everywhere; the other dtypes on a few combinations, for time
# (each check compiles both paths anew).
GRID = [
    ("float32", *geometry, jit)
    for geometry in (CONV_LAST, CONV_FIRST, DENSE)
    for jit in (True, False)
] + [
    ("mixed_float16", *CONV_LAST, True),
    ("mixed_float16", *CONV_FIRST, False),
    ("mixed_bfloat16", *CONV_FIRST, True),
    ("mixed_bfloat16", *DENSE, False),
    ("float64", *CONV_LAST, True),
    ("float64", *CONV_FIRST, False),
]


@pytest.mark.parametrize(
    "dtype, shape, axis, jit",
    GRID,
    ids=[
        f"{d}-{len(s)}d-axis{a}-{'jit' if j else 'eager'}"
        for d, s, a, j in GRID
    ],
)
def test_fast_path_matches_float64_and_the_reference_path(
    dtype, shape, axis, jit, monkeypatch
):
    if dtype != "float64":
        _compare(dtype, shape, axis, jit, monkeypatch)
        return
    import jax

    # float64 exists in JAX only with x64 enabled (here, for this test only).
    with jax.enable_x64(True):
        _compare(dtype, shape, axis, jit, monkeypatch)


@pytest.mark.parametrize("copies", [True, False], ids=["copies", "shared"])
@pytest.mark.parametrize(
    "geometry", [CONV_LAST, CONV_FIRST], ids=["last", "first"]
)
def test_with_and_without_the_broadcast_copies(copies, geometry, monkeypatch):
    """Both sides of the size above which each loop broadcasts its own copy
    of a per-feature vector (`_fast_jax._own_copy`): the same results."""
    from bnlayers import _fast_jax

    monkeypatch.setattr(
        _fast_jax, "_COPIES_MIN_SIZE", 0 if copies else np.iinfo("int64").max
    )
    # With an activation the loops take no copies at any size.
    assert _fast_jax._copies(np.zeros(geometry[0]), None) is copies
    assert _fast_jax._copies(np.zeros(geometry[0]), "relu") is False
    # The jitted function keeps its traces per shape: trace it anew here,
    # and leave no trace of this setting to the tests after.
    _fast_jax._training.clear_cache()
    try:
        _compare("float32", *geometry, True, monkeypatch)
    finally:
        _fast_jax._training.clear_cache()


def test_without_gamma_and_beta_and_with_an_empty_batch(monkeypatch):
    spy = _Spy(monkeypatch)
    shape = (6, 5, 3)
    x, dy = _data(shape, 1, "float32")
    layer = _layer(shape, 1, None, "float32")
    plain = bnlayers.BatchNormalization(
        axis=1, momentum=0.5, center=False, scale=False
    )
    plain.build(shape)
    plain.set_weights(layer.get_weights()[2:])
    y = to_numpy(plain(x, training=True))
    expected = (
        to_numpy(layer(x, training=True)) - layer.get_weights()[1][:, None]
    ) / layer.get_weights()[0][:, None]
    np.testing.assert_allclose(y, expected, atol=2e-5)
    np.testing.assert_allclose(
        plain.get_weights(), layer.get_weights()[2:], rtol=1e-6
    )
    # An empty batch: empty outputs, the moving statistics unchanged.
    before = layer.get_weights()
    y = layer(np.zeros((0, 5, 3), "float32"), training=True)
    assert tuple(y.shape) == (0, 5, 3)
    for a, b in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert spy.calls["training"] == 3


def test_fused_true_works_and_the_common_rules_hold():
    layer = bnlayers.BatchNormalization(fused=True)
    x = np.random.default_rng(0).normal(size=(4, 3, 2)).astype("float32")
    layer(x, training=True)
    masked = bnlayers.BatchNormalization(fused=True)
    with pytest.raises(ValueError, match="`fused=True`.*a mask is given"):
        masked(x, training=True, mask=np.ones((4, 3), bool))
    for kwargs, reason in (
        ({"renorm": True}, "renorm=True"),
        ({"virtual_batch_size": 2}, "virtual_batch_size=2"),
        ({"axis": [1, 2]}, "names several feature axes"),
    ):
        other = bnlayers.BatchNormalization(**kwargs)
        assert reason in bnlayers.fused_eligibility(other, (4, 3, 2))
