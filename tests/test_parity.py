"""Parity of bnlayers.BatchNormalization with the built-in layer and with float64.

Every case builds `bnlayers.BatchNormalization` and
`keras.layers.BatchNormalization` with the same arguments and the same
(random) weights, runs `STEPS` training steps on the same batches, and after
each step compares, against the built-in and against the float64 NumPy
reference in `bn_reference.py`:

- the training output (batch statistics) and its gradients with respect to
  the inputs, gamma and beta, for a random upstream gradient;
- all the non-trainable weights (moving statistics, renorm statistics);
- the inference output on a held-out batch (moving statistics, as they are
  after the step) and its gradients.

The built-in layer is also checked against the reference, which checks the
reference itself. Each case runs through both bnlayers code paths
(`fused_mode`: the reference keras.ops path and the automatic choice).

The grid runs under every Keras backend, against that backend's built-in
layer; gradients come from `backend_ops.value_and_grads`. Execution "jit"
is `tf.function(jit_compile=True)` on TensorFlow and `jax.jit` on JAX;
"function" (`tf.function` without XLA) is TensorFlow's alone.

Errors are relative to the largest magnitude of the expected tensor
(`bn_reference.rel_err`); the tolerances are in `TOLERANCES`.
"""

import dataclasses
import zlib

import keras
import numpy as np
import pytest
from keras import ops

import bn_reference as ref
import bnlayers
from backend_ops import BACKEND
from backend_ops import has_x64
from backend_ops import to_numpy
from backend_ops import value_and_grads

STEPS = 3

# Relative error allowed, by policy and by quantity.
#
# float32: everything is computed in float32, so the errors are rounding
# noise (about 1e-7 per operation); the gradient with respect to the inputs
# subtracts two sums of the size of the upstream gradient, so it is allowed
# ten times more.
#
# mixed_float16 / mixed_bfloat16: statistics are computed in float32 from
# the same low-precision inputs in every implementation, so the moving
# statistics and the gamma/beta gradients keep float32 tolerances. The
# output and the input gradient are rounded to float16 (10-bit mantissa)
# or bfloat16 (7-bit mantissa): against float64 that is half a unit in the
# last place, and against the built-in one float32 difference can flip a
# rounding, a whole unit: 2**-10 ~ 9.8e-4 and 2**-7 ~ 7.8e-3 of the value.
#
# float16 / bfloat16 layers (dtype="float16"): as above, and the weights
# themselves are stored in float16/bfloat16, so every quantity carries that
# rounding.
#
# float64: both layers then compute in float64; only rounding in float64 is
# left.
TOLERANCES = {
    "float32": {"output": 1e-5, "stats": 1e-5, "grad_x": 1e-4, "grad_param": 1e-5},
    "mixed_float16": {"output": 1.5e-3, "stats": 1e-5, "grad_x": 1.5e-3, "grad_param": 1e-5},
    "mixed_bfloat16": {"output": 1.2e-2, "stats": 1e-5, "grad_x": 1.2e-2, "grad_param": 1e-5},
    "float16": {"output": 1.5e-3, "stats": 1.5e-3, "grad_x": 1.5e-3, "grad_param": 1.5e-3},
    "bfloat16": {"output": 1.2e-2, "stats": 1.2e-2, "grad_x": 1.2e-2, "grad_param": 1.2e-2},
    "float64": {"output": 1e-12, "stats": 1e-12, "grad_x": 1e-11, "grad_param": 1e-12},
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    shape: tuple = (4, 3, 4, 3)
    axis: object = -1
    center: bool = True
    scale: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-3
    mask: bool = False
    renorm: bool = False
    renorm_clipping: tuple = ()  # items of the dict, to keep the case hashable
    renorm_momentum: float = 0.8
    policy: str = "float32"
    execution: str = "eager"
    trainable: bool = True

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def feature_axes(self):
        axes = self.axis if isinstance(self.axis, (list, tuple)) else [self.axis]
        return sorted(a % self.ndim for a in axes)

    @property
    def clipping(self):
        return dict(self.renorm_clipping) or None

    @property
    def builtin_comparable(self):
        """The built-in takes one int axis only."""
        return not isinstance(self.axis, (list, tuple))


def _cases():
    cases = []
    # Ranks 2 to 5, positive and negative axes, channels_first (axis=1).
    axes_by_rank = {
        (6, 5): [-1, 1],
        (4, 3, 5): [-1, 1, -2],
        (4, 3, 4, 3): [-1, 1, 2, -3],
        (3, 2, 3, 2, 3): [-1, 1, 3, -4],
    }
    for shape, axes in axes_by_rank.items():
        for axis in axes:
            cases.append(Case(f"rank{len(shape)}-axis{axis}", shape=shape, axis=axis))
    # Several feature axes at once (a bnlayers extension: reference only).
    cases.append(Case("rank4-axis[1,3]", axis=(1, 3)))
    cases.append(Case("rank3-axis[-1,-2]", shape=(4, 3, 5), axis=(-1, -2)))
    # center / scale.
    for center, scale in ((True, False), (False, True), (False, False)):
        cases.append(Case(f"center{center}-scale{scale}", center=center, scale=scale))
        cases.append(
            Case(f"rank3-axis1-center{center}-scale{scale}", shape=(4, 3, 5), axis=1,
                 center=center, scale=scale)
        )
    # Momenta (0 keeps the last batch, 1 never moves) and epsilons.
    for momentum in (0.0, 0.5, 0.99, 1.0):
        cases.append(Case(f"momentum{momentum}", momentum=momentum))
    for epsilon in (1e-5, 0.1, 1.0):
        cases.append(Case(f"epsilon{epsilon}", epsilon=epsilon))
    # Batch sizes 1 and 2.
    for batch in (1, 2):
        cases.append(Case(f"batch{batch}-rank2", shape=(batch, 5)))
        cases.append(Case(f"batch{batch}-rank4", shape=(batch, 3, 4, 3)))
        cases.append(Case(f"batch{batch}-rank4-axis1", shape=(batch, 3, 4, 3), axis=1))
    # Masks (the built-in supports them at axis=-1 only).
    cases += [
        Case("mask-rank2", shape=(6, 5), mask=True),
        Case("mask-rank3", shape=(4, 6, 3), mask=True),
        Case("mask-rank4", mask=True),
        Case("mask-batch2-rank3", shape=(2, 5, 3), mask=True),
        Case("mask-rank3-axis1", shape=(4, 3, 5), axis=1, mask=True),
        Case("mask-rank4-axis1", axis=1, mask=True),
        Case("mask-rank4-axis[1,2]", axis=(1, 2), mask=True),
    ]
    # Batch renormalization, with and without clipping (clipping that bites:
    # the data's spread is far from the initial renorm_stddev).
    clip = (("rmax", 1.5), ("rmin", 0.8), ("dmax", 0.5))
    cases += [
        Case("renorm", renorm=True),
        Case("renorm-clip", renorm=True, renorm_clipping=clip),
        Case("renorm-clip-rmax", renorm=True, renorm_clipping=(("rmax", 1.2),)),
        Case("renorm-clip-rank3-axis1", shape=(4, 3, 5), axis=1, renorm=True, renorm_clipping=clip),
        Case("renorm-clip-nocenter", renorm=True, renorm_clipping=clip, center=False),
        Case("renorm-clip-noscale", renorm=True, renorm_clipping=clip, scale=False),
        Case("renorm-clip-mask", shape=(4, 6, 3), renorm=True, renorm_clipping=clip, mask=True),
        Case("renorm-batch1", shape=(1, 3, 4, 3), renorm=True, renorm_clipping=clip),
    ]
    # trainable=False: inference mode even with training=True, no updates.
    cases += [
        Case("frozen", trainable=False),
        Case("frozen-renorm-mask", shape=(4, 6, 3), trainable=False, renorm=True, mask=True),
    ]
    # Mixed precision and float64.
    for policy in ("mixed_float16", "mixed_bfloat16"):
        cases += [
            Case(f"{policy}", policy=policy),
            Case(f"{policy}-rank3-axis1-mask", shape=(4, 3, 5), axis=1, mask=True, policy=policy),
            Case(f"{policy}-rank2-mask", shape=(6, 5), mask=True, policy=policy),
            Case(f"{policy}-renorm-clip", renorm=True, renorm_clipping=clip, policy=policy),
        ]
    for policy in ("float16", "bfloat16"):
        cases += [
            Case(f"{policy}-layer", policy=policy),
            Case(f"{policy}-layer-rank3-axis1-mask", shape=(4, 3, 5), axis=1, mask=True,
                 policy=policy),
        ]
    cases.append(Case("float64", policy="float64"))
    cases.append(Case("float64-rank5-axis1-mask", shape=(3, 2, 3, 2, 3), axis=1, mask=True,
                      policy="float64"))
    # Inside tf.function, and compiled with XLA, on a representative subset.
    for execution in ("function", "jit"):
        cases += [
            Case(f"{execution}", execution=execution),
            Case(f"{execution}-rank3-axis1", shape=(4, 3, 5), axis=1, execution=execution),
            Case(f"{execution}-rank5-axis-4-noscale", shape=(3, 2, 3, 2, 3), axis=-4,
                 scale=False, execution=execution),
            Case(f"{execution}-mask-rank3", shape=(4, 6, 3), mask=True, execution=execution),
            Case(f"{execution}-batch1-rank2", shape=(1, 5), execution=execution),
            Case(f"{execution}-renorm-clip", renorm=True, renorm_clipping=clip,
                 execution=execution),
            Case(f"{execution}-mixed_float16", policy="mixed_float16", execution=execution),
            Case(f"{execution}-frozen", trainable=False, execution=execution),
        ]
    cases.append(Case("jit-mixed_bfloat16-mask-axis1", shape=(4, 3, 5), axis=1, mask=True,
                      policy="mixed_bfloat16", execution="jit"))
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


CASES = _cases()


# ---------------------------------------------------------------- data


def _data(case):
    """Initial weights and STEPS batches, seeded by the case name."""
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    features = case.feature_axes
    fshape = tuple(case.shape[a] for a in features)
    pshape = [case.shape[i] if i in features else 1 for i in range(case.ndim)]
    # Keras' masks drop the last axis; with several feature axes, the
    # other accepted form drops those.
    if len(features) == 1:
        mask_shape = case.shape[:-1]
    else:
        mask_shape = tuple(s for i, s in enumerate(case.shape) if i not in features)

    # Each feature gets its own mean and spread, so a mix-up of axes shows.
    loc = rng.uniform(-2.0, 2.0, fshape).reshape(pshape)
    spread = rng.uniform(0.5, 3.0, fshape).reshape(pshape)

    def batch():
        x = loc + spread * rng.standard_normal(case.shape)
        mask = None
        if case.mask:
            mask = rng.random(mask_shape) > 0.35
            # Every feature keeps a counted position: on a fully masked
            # feature the built-in decays the moving statistics towards 0,
            # bnlayers keeps them (test_fully_masked_batch).
            mask[0] = True
            # Shift the masked positions so that statistics that counted
            # them would be visibly off.
            x = x + 4.0 * ~ref._keep(x, mask, features)
        w = rng.standard_normal(case.shape)
        return x.astype("float32"), mask, w.astype("float32")

    steps = []
    for _ in range(STEPS):
        x, mask, w = batch()
        x_inf, _, w_inf = batch()
        steps.append((x, mask, w, x_inf, w_inf))

    values = {
        "gamma": rng.uniform(0.5, 1.5, fshape),
        "beta": rng.normal(0.0, 0.5, fshape),
        "moving_mean": rng.normal(0.0, 0.5, fshape),
        "moving_variance": rng.uniform(0.5, 2.0, fshape),
        "renorm_mean": rng.normal(0.0, 0.5, fshape),
        "renorm_stddev": rng.uniform(0.5, 1.0, fshape),
    }
    values["moving_stddev"] = np.sqrt(values["moving_variance"])
    names = ref.weight_names(case.center, case.scale, case.renorm)
    weights = [values[n].astype("float32") for n in names]
    return names, weights, steps


# ------------------------------------------------------------- running


def _make_layer(cls, case, **extra):
    kwargs = dict(
        axis=list(case.axis) if isinstance(case.axis, tuple) else case.axis,
        momentum=case.momentum,
        epsilon=case.epsilon,
        center=case.center,
        scale=case.scale,
        renorm=case.renorm,
        renorm_clipping=case.clipping,
        renorm_momentum=case.renorm_momentum,
    )
    if case.policy in _LAYER_DTYPES:
        kwargs["dtype"] = case.policy
    layer = cls(**kwargs, **extra)
    layer.build(case.shape)
    return layer


def _run_keras(layer, case, weights, steps):
    """Per step: training output and gradients, weights, inference output and gradients."""
    layer.set_weights(weights)
    layer.trainable = case.trainable
    params = [v for v in (layer.gamma, layer.beta) if v is not None]
    jax_jit = BACKEND == "jax" and case.execution == "jit"

    def train(t, mask):
        return layer(t, training=True, mask=mask)

    def infer(t):
        return layer(t, training=False)

    def step(x, mask, w, x_inf, w_inf):
        y, grads = value_and_grads(train, [x], w, params, [layer], args=[mask], jit=jax_jit)
        # Runs after the training call, so it sees the updated statistics.
        y_inf, grads_inf = value_and_grads(infer, [x_inf], w_inf, params, [layer], jit=jax_jit)
        return y, grads, y_inf, grads_inf

    if BACKEND == "tensorflow" and case.execution != "eager":
        import tensorflow as tf

        step = tf.function(step, jit_compile=case.execution == "jit")

    dtype = "float64" if case.policy == "float64" else "float32"
    results = []
    for x, mask, w, x_inf, w_inf in steps:
        args = [ops.convert_to_tensor(x, dtype), None if mask is None else ops.convert_to_tensor(mask)]
        args += [ops.convert_to_tensor(a, dtype) for a in (w, x_inf, w_inf)]
        y, grads, y_inf, grads_inf = step(*args)
        assert keras.backend.standardize_dtype(y.dtype) == layer.compute_dtype
        assert keras.backend.standardize_dtype(y_inf.dtype) == layer.compute_dtype
        results.append(
            {
                "y": to_numpy(y),
                "grads": [to_numpy(g) for g in grads],
                "weights": layer.get_weights(),
                "y_inf": to_numpy(y_inf),
                "grads_inf": [to_numpy(g) for g in grads_inf],
            }
        )
    return results


# Policies given to the layer as its `dtype` (the others are set globally).
_LAYER_DTYPES = ("float16", "bfloat16", "float64")


def _rounded(a, policy):
    """`a` as the layer sees it under `policy`, in float64."""
    compute = {
        "mixed_float16": "float16",
        "mixed_bfloat16": "bfloat16",
        "float16": "float16",
        "bfloat16": "bfloat16",
    }.get(policy)
    if compute is None:
        return np.asarray(a, np.float64)
    # JAX without x64 has no float64: go through float32 there, which holds
    # every float16/bfloat16 value exactly.
    wide = "float64" if has_x64() else "float32"
    rounded = ops.cast(ops.cast(ops.convert_to_tensor(a, wide), compute), wide)
    return to_numpy(rounded).astype(np.float64)


def _run_reference(case, names, weights, steps):
    # A float16/bfloat16 layer stores its weights in that dtype: round the
    # state whenever the layer would.
    stored = case.policy in ("float16", "bfloat16")

    def store(state):
        return {k: _rounded(v, case.policy) if stored else v for k, v in state.items()}

    state = store(dict(zip(names, (np.asarray(w, np.float64) for w in weights))))
    options = dict(
        feature_axes=case.feature_axes,
        epsilon=case.epsilon,
        momentum=case.momentum,
        center=case.center,
        scale=case.scale,
        trainable=case.trainable,
        renorm=case.renorm,
        renorm_clipping=case.clipping,
        renorm_momentum=case.renorm_momentum,
    )
    param_names = [n for n in ("gamma", "beta") if n in names]
    results = []
    for x, mask, w, x_inf, w_inf in steps:
        # The gradient of the output's cast hands the layer the upstream
        # gradient in the compute dtype.
        y, g, state = ref.step(
            _rounded(x, case.policy), state, training=True, mask=mask,
            upstream=_rounded(w, case.policy), **options
        )
        state = store(state)
        y_inf, g_inf, _ = ref.step(
            _rounded(x_inf, case.policy), state, training=False,
            upstream=_rounded(w_inf, case.policy), **options
        )
        results.append(
            {
                "y": y,
                "grads": [g["x"]] + [g[n] for n in param_names],
                "weights": [state[n] for n in names],
                "y_inf": y_inf,
                "grads_inf": [g_inf["x"]] + [g_inf[n] for n in param_names],
                "x_scale": {"grads": g["x_scale"], "grads_inf": g_inf["x_scale"]},
            }
        )
    return results


def _compare(case, against, actual, expected, names, reference, tol=None):
    """Compare per-step results; `reference` (float64) supplies the error scales."""
    tol = tol or TOLERANCES[case.policy]

    def check(quantity, kind, a, e, floor=1e-3):
        err = ref.rel_err(a, e, floor)
        ref.record(against, case.policy, quantity, err, case.name)
        assert err <= tol[kind], (
            f"{case.name}: {quantity} differs from {against}: relative error "
            f"{err:.2e} > {tol[kind]:.0e}"
        )

    assert len(actual) == len(expected)
    for i, (a, e, r) in enumerate(zip(actual, expected, reference)):
        at = f" (step {i + 1})"
        check("output/train", "output", a["y"], e["y"])
        check("output/infer", "output", a["y_inf"], e["y_inf"])
        for mode in ("grads", "grads_inf"):
            suffix = "train" if mode == "grads" else "infer"
            # Measured against the size of the terms it is the difference of
            # (see bn_reference.step).
            check(f"grad x/{suffix}", "grad_x", a[mode][0], e[mode][0], r["x_scale"][mode])
            for p, (ga, ge) in enumerate(zip(a[mode][1:], e[mode][1:])):
                check(f"grad gamma,beta/{suffix}", "grad_param", ga, ge)
            assert len(a[mode]) == len(e[mode]), case.name + at
        assert len(a["weights"]) == len(e["weights"]) == len(names)
        for name, wa, we in zip(names, a["weights"], e["weights"]):
            if name in ("gamma", "beta"):
                np.testing.assert_array_equal(wa, we, err_msg=f"{case.name}: {name} changed{at}")
            else:
                check("moving stats", "stats", wa, we)


def _assert_not_vacuous(case, names, weights, steps, reference):
    """A mask or a clipping that changed nothing would test nothing."""
    if not case.trainable:
        return
    if case.mask:
        unmasked = [(x, None, w, xi, wi) for x, _, w, xi, wi in steps]
        y = _run_reference(case, names, weights, unmasked)[0]["y"]
        assert ref.rel_err(y, reference[0]["y"]) > 1e-2, f"{case.name}: the mask changes nothing"
    if case.clipping:
        unclipped = dataclasses.replace(case, renorm_clipping=())
        y = _run_reference(unclipped, names, weights, steps)[0]["y"]
        assert ref.rel_err(y, reference[0]["y"]) > 1e-2, f"{case.name}: clipping changes nothing"


# The built-in and the reference do not depend on `fused_mode`: compute once.
_BUILTIN = {}
_REFERENCE = {}


@pytest.fixture
def policy_scope(request, float32_policy_after):
    def enter(policy):
        keras.config.set_dtype_policy("float32" if policy in _LAYER_DTYPES else policy)

    return enter


def _builtin_tolerances(case):
    """Off TensorFlow the built-in layer takes float64 statistics in float32
    (Keras' type promotion, `result_type(dtype, "float32")`, maps float64 to
    float32 there), so against it float64 keeps float32 tolerances."""
    if case.policy == "float64" and BACKEND != "tensorflow":
        return TOLERANCES["float32"]
    if case.policy == "float64" and case.mask:
        # With a mask the built-in divides by count + 1e-7 (backend.epsilon()),
        # a bias of 1e-7 / count: up to 1.1e-8 measured (the gamma gradient
        # on float64-rank5-axis1-mask).
        return dict.fromkeys(TOLERANCES["float64"], 1e-7)
    return None


def _param(case):
    marks = {
        "function": [pytest.mark.backends("tensorflow", reason="tf.function")],
        "jit": [pytest.mark.backends("tensorflow", "jax", reason="XLA: tf.function or jax.jit")],
    }.get(case.execution, [])
    if case.policy == "float64":
        marks = marks + [pytest.mark.needs_x64]
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_parity(case, fused_mode, policy_scope):
    policy_scope(case.policy)
    names, weights, steps = _data(case)

    ours = _make_layer(bnlayers.BatchNormalization, case, fused=fused_mode)
    assert [w.path.split("/")[-1] for w in ours.weights] == names
    ours_results = _run_keras(ours, case, weights, steps)

    if case.name not in _REFERENCE:
        _REFERENCE[case.name] = _run_reference(case, names, weights, steps)
        _assert_not_vacuous(case, names, weights, steps, _REFERENCE[case.name])
    reference = _REFERENCE[case.name]
    _compare(case, "float64", ours_results, reference, names, reference)

    if case.builtin_comparable:
        if case.name not in _BUILTIN:
            builtin = _make_layer(keras.layers.BatchNormalization, case)
            assert [w.path.split("/")[-1] for w in builtin.weights] == names
            _BUILTIN[case.name] = _run_keras(builtin, case, weights, steps)
            # The yardstick checked against the built-in too.
            _compare(case, "float64 (built-in)", _BUILTIN[case.name], reference, names, reference,
                     _builtin_tolerances(case))
        _compare(case, "built-in", ours_results, _BUILTIN[case.name], names, reference,
                 _builtin_tolerances(case))
    ref.CASES_RUN.add((case.name, fused_mode))


# ------------------------------------------------------- special inputs


def _layer_pair(fused_mode, **kwargs):
    ours = bnlayers.BatchNormalization(fused=fused_mode, **kwargs)
    builtin = keras.layers.BatchNormalization(**kwargs)
    return ours, builtin


@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
def test_fully_masked_batch(fused_mode, renorm):
    """No statistics at all: finite outputs and gradients, moving statistics kept."""
    shape = (4, 6, 3)
    rng = np.random.default_rng(7)
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    w = rng.standard_normal(shape).astype("float32")
    mask = np.zeros(shape[:-1], dtype="bool")
    layer = bnlayers.BatchNormalization(momentum=0.5, renorm=renorm, fused=fused_mode)
    layer.build(shape)
    before = [v.copy() for v in layer.get_weights()]
    y, grads = value_and_grads(
        lambda t: layer(t, training=True, mask=mask), [x], w, layer.trainable_weights, [layer]
    )
    y = to_numpy(y)
    assert np.all(np.isfinite(y))
    for g in grads:
        assert np.all(np.isfinite(to_numpy(g)))
    for name, b, a in zip(ref.weight_names(renorm=renorm), before, layer.get_weights()):
        np.testing.assert_array_equal(a, b, err_msg=f"{name} moved on a fully masked batch")
    state = dict(zip(ref.weight_names(renorm=renorm), before))
    y_ref, g_ref, _ = ref.step(
        x, state, feature_axes=[-1], training=True, epsilon=1e-3, momentum=0.5,
        renorm=renorm, mask=mask, upstream=w,
    )
    assert ref.rel_err(y, y_ref) <= 1e-5
    assert ref.rel_err(grads[0], g_ref["x"], g_ref["x_scale"]) <= 1e-4


def test_masked_positions_may_hold_nan_and_inf(fused_mode):
    """Masked-out padding is selected away, never multiplied by zero."""
    shape = (4, 6, 3)
    rng = np.random.default_rng(8)
    x = rng.normal(1.0, 2.0, shape)
    mask = rng.random(shape[:-1]) > 0.4
    mask[0, 0] = True
    x[~mask] = np.nan
    x[~mask & (rng.random(shape[:-1]) > 0.5)] = np.inf
    layer = bnlayers.BatchNormalization(momentum=0.5, fused=fused_mode)
    layer.build(shape)
    state = dict(zip(ref.weight_names(), layer.get_weights()))
    y = to_numpy(layer(x.astype("float32"), training=True, mask=mask))
    y_ref, _, new_state = ref.step(
        x.astype("float32"), state, feature_axes=[-1], training=True, epsilon=1e-3,
        momentum=0.5, mask=mask,
    )
    assert ref.rel_err(y[mask], y_ref[mask]) <= 1e-5
    for name, value in zip(ref.weight_names(), layer.get_weights()):
        assert ref.rel_err(value, new_state[name]) <= 1e-5, name


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_large_values_under_mixed_precision(fused_mode, policy, policy_scope):
    """Sums and squares of float16-sized values overflow float16 (max 65504):
    statistics must be taken in float32."""
    policy_scope(policy)
    shape = (8, 4, 4, 2)
    rng = np.random.default_rng(9)
    x = rng.normal(2e4, 1e3, shape).astype("float32")
    ours, builtin = _layer_pair(fused_mode, momentum=0.0)
    y = ours(x, training=True)
    y_builtin = builtin(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == policy.split("_")[1]
    assert np.all(np.isfinite(to_numpy(y).astype("float32")))
    x_seen = _rounded(x, policy)
    state = dict(zip(ref.weight_names(), [np.ones(2), np.zeros(2), np.zeros(2), np.ones(2)]))
    y_ref, _, new_state = ref.step(
        x_seen, state, feature_axes=[-1], training=True, epsilon=1e-3, momentum=0.0
    )
    tol = TOLERANCES[policy]
    assert ref.rel_err(y, y_ref) <= tol["output"]
    assert ref.rel_err(y, y_builtin) <= tol["output"]
    for name, value in zip(ref.weight_names(), ours.get_weights()):
        assert ref.rel_err(value, new_state[name]) <= tol["stats"], name


@pytest.mark.parametrize(
    "execution",
    ["eager", pytest.param("function", marks=pytest.mark.backends("tensorflow", reason="tf.function"))],
)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_variance_of_large_mean_data(fused_mode, execution, masked):
    """Mean 1e4, standard deviation 1: the one-pass E[x^2] - E[x]^2 would
    cancel to nothing in float32; the variance must come out right."""
    shape = (16, 8, 3)
    rng = np.random.default_rng(10)
    x = rng.normal(1e4, 1.0, shape).astype("float32")
    mask = rng.random(shape[:-1]) > 0.3 if masked else None
    layer = bnlayers.BatchNormalization(momentum=0.0, fused=fused_mode)
    layer.build(shape)

    def call(x, mask):
        return layer(x, training=True, mask=mask)

    if execution == "function":
        import tensorflow as tf

        call = tf.function(call)
    y = to_numpy(call(ops.convert_to_tensor(x), None if mask is None else ops.convert_to_tensor(mask)))
    _, mean, var = ref.batch_moments(x, [-1], mask)
    moving_mean, moving_variance = layer.get_weights()[2:]
    assert ref.rel_err(moving_variance, var.ravel(), floor=0.0) <= 1e-4
    assert ref.rel_err(moving_mean, mean.ravel(), floor=0.0) <= 1e-6
    # The output inherits the error of the float32 mean itself: a sum of
    # values near 1e4 is a few units of 2**-10 ~ 1e-3 off (the built-in's
    # mean is off by the same), i.e. ~1e-3 of outputs of size ~3.
    y_ref = (x - mean) / np.sqrt(var + 1e-3)
    assert ref.rel_err(y, y_ref) <= 3e-3


def test_training_none_means_inference(fused_mode):
    """`training=None` (a plain call) uses the moving statistics, as the built-in does."""
    shape = (4, 5, 3)
    rng = np.random.default_rng(11)
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    ours, builtin = _layer_pair(fused_mode)
    for layer in (ours, builtin):
        layer.build(shape)
        layer.set_weights([rng.uniform(0.5, 1.5, 3).astype("float32") for _ in range(4)])
    builtin.set_weights(ours.get_weights())
    before = ours.get_weights()
    y = ours(x)
    np.testing.assert_array_equal(to_numpy(y), to_numpy(ours(x, training=False)))
    for a, b in zip(before, ours.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert ref.rel_err(y, builtin(x)) <= TOLERANCES["float32"]["output"]
