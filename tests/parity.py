"""The parity harness: one bnlayers layer against the float64 reference and the built-in.

Shared by the parity grid (test_parity.py) and the fast-path tests
(test_fused.py). A `Case` names a layer configuration, an input shape, a
dtype policy and how the step runs ("eager"; "function", `tf.function`
without XLA, TensorFlow's alone; "jit", `tf.function(jit_compile=True)` on
TensorFlow and `jax.jit` on JAX). `check(case, layer)` builds the same
weights and `STEPS` batches (seeded by the case name) for `layer`, the
float64 reference (`bn_reference.step`) and, where it takes the case, the
built-in `keras.layers.BatchNormalization`, runs a training step on each,
and after each step compares:

- the training output (batch statistics) and its gradients with respect to
  the inputs, gamma and beta, for a random upstream gradient;
- all the non-trainable weights (moving statistics, renorm statistics);
- the inference output on a held-out batch (moving statistics, as they are
  after the step) and its gradients.

The built-in layer is also checked against the reference, which checks the
reference itself. Gradients come from `backend_ops.value_and_grads`.
Errors are `bn_reference.rel_err`; the tolerances are in `TOLERANCES`, and
the largest error seen per (compared against, policy, quantity) is printed
at the end of the run (conftest.py).
"""

import dataclasses
import zlib

import keras
import numpy as np
import pytest
from keras import ops

import bn_reference as ref
from backend_ops import BACKEND
from backend_ops import has_x64
from backend_ops import to_numpy
from backend_ops import value_and_grads

STEPS = 3

# bn_reference.rel_err allowed, by policy and by quantity: about ten times the
# largest error measured over the parity grid and the fast-path grid on CPU
# under TensorFlow, JAX and PyTorch (in the comments; the summary at the end
# of a run prints them), except where rounding to a low-precision dtype sets
# a bound, which is used instead:
#
# mixed_float16 / mixed_bfloat16: statistics are computed in float32 from
# the same low-precision inputs in every implementation, so the moving
# statistics and the gamma/beta gradients carry float32 noise. The output
# and the input gradient are rounded to float16 (10-bit mantissa) or
# bfloat16 (7-bit mantissa): against float64 that is half a unit in the last
# place, and against the built-in one float32 difference can flip a
# rounding, a whole unit: 2**-10 ~ 9.8e-4 and 2**-7 ~ 7.8e-3 of the value,
# plus half.
#
# float16 / bfloat16 layers (dtype="float16"): as above, and the weights
# themselves are stored in float16/bfloat16, so every quantity carries that
# rounding.
#
# The input gradient is measured against the size of the terms it is the
# difference of (see bn_reference.step).
TOLERANCES = {  # bnlayers against the float64 reference
    "float32": {
        "output": 4e-6,  # measured 3.9e-7
        "stats": 7e-6,  # 7.2e-7
        "grad_x": 5e-6,  # 5.0e-7
        "grad_param": 2e-5,  # 2.6e-6
    },
    "mixed_float16": {
        "output": 1.5e-3,  # bound; measured 4.1e-4
        "stats": 2e-6,  # 1.9e-7
        "grad_x": 1.5e-3,  # bound; 4.2e-4
        "grad_param": 5e-6,  # 4.6e-7
    },
    "mixed_bfloat16": {
        "output": 1.2e-2,  # bound; measured 3.5e-3
        "stats": 2e-6,  # 1.5e-7
        "grad_x": 1.2e-2,  # bound; 3.3e-3
        "grad_param": 8e-6,  # 8.1e-7
    },
    # Bounds; measured 4.5e-4 and 3.7e-3 at most.
    "float16": dict.fromkeys(
        ("output", "stats", "grad_x", "grad_param"), 1.5e-3
    ),
    "bfloat16": dict.fromkeys(
        ("output", "stats", "grad_x", "grad_param"), 1.2e-2
    ),
    "float64": {
        "output": 5e-15,  # measured 4.4e-16
        "stats": 2e-15,  # 2.0e-16
        "grad_x": 6e-15,  # 5.6e-16
        "grad_param": 1.3e-14,  # 1.3e-15
    },
}

# Any comparison with the built-in layer (bnlayers against it, and it against
# the float64 reference): its own errors are larger in float32, up to 9e-6
# for the output of a batch of one under XLA (TensorFlow) and 5e-6 for a
# batch of two (PyTorch), where the normalized values are rounding noise
# amplified by 1 / sqrt(epsilon).
BUILTIN_TOLERANCES = {
    "float32": {
        "output": 9e-5,  # measured 9.0e-6
        "stats": 5e-6,  # 4.6e-7
        "grad_x": 3e-5,  # 3.1e-6
        "grad_param": 5e-5,  # 5.4e-6
    },
    "mixed_float16": {
        "output": 1.5e-3,  # bound; measured 4.1e-4
        "stats": 3e-6,  # 2.9e-7
        "grad_x": 1.5e-3,  # bound; 4.2e-4
        "grad_param": 7e-6,  # 6.4e-7
    },
    "mixed_bfloat16": {
        "output": 1.2e-2,  # bound; measured 3.5e-3
        "stats": 3e-6,  # 2.3e-7
        "grad_x": 1.2e-2,  # bound; 3.1e-3
        "grad_param": 3e-6,  # 3.0e-7
    },
    "float16": TOLERANCES["float16"],
    "bfloat16": TOLERANCES["bfloat16"],
    # TensorFlow's built-in computes float64 in float64; off TensorFlow it
    # takes float64 statistics in float32 (Keras' type promotion,
    # `result_type(dtype, "float32")`, maps float64 to float32 there), and
    # the float32 row applies (see `_builtin_tolerances`).
    "float64": {
        "output": 5e-15,  # measured 4.4e-16
        "stats": 2e-15,  # 2.0e-16
        "grad_x": 6e-15,  # 5.6e-16
        "grad_param": 2e-14,  # 2.0e-15
    },
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
        axes = (
            self.axis if isinstance(self.axis, (list, tuple)) else [self.axis]
        )
        return sorted(a % self.ndim for a in axes)

    @property
    def mask_shape(self):
        """Keras' masks drop the last axis; with several feature axes, the
        other accepted form drops those."""
        if len(self.feature_axes) == 1:
            return self.shape[:-1]
        return tuple(
            s for i, s in enumerate(self.shape) if i not in self.feature_axes
        )

    @property
    def clipping(self):
        return dict(self.renorm_clipping) or None

    @property
    def builtin_comparable(self):
        """The built-in takes one int axis only."""
        return not isinstance(self.axis, (list, tuple))


def case_data(case):
    """Initial weights and STEPS batches, seeded by the case name."""
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    features = case.feature_axes
    fshape = tuple(case.shape[a] for a in features)
    pshape = [case.shape[i] if i in features else 1 for i in range(case.ndim)]
    mask_shape = case.mask_shape

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


def make_layer(cls, case, **extra):
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


def run_keras(layer, case, weights, steps):
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
        y, grads = value_and_grads(
            train, [x], w, params, [layer], args=[mask], jit=jax_jit
        )
        # Runs after the training call, so it sees the updated statistics.
        y_inf, grads_inf = value_and_grads(
            infer, [x_inf], w_inf, params, [layer], jit=jax_jit
        )
        return y, grads, y_inf, grads_inf

    if BACKEND == "tensorflow" and case.execution != "eager":
        import tensorflow as tf

        step = tf.function(step, jit_compile=case.execution == "jit")

    dtype = "float64" if case.policy == "float64" else "float32"
    results = []
    for x, mask, w, x_inf, w_inf in steps:
        args = [
            ops.convert_to_tensor(x, dtype),
            None if mask is None else ops.convert_to_tensor(mask),
        ]
        args += [ops.convert_to_tensor(a, dtype) for a in (w, x_inf, w_inf)]
        y, grads, y_inf, grads_inf = step(*args)
        assert keras.backend.standardize_dtype(y.dtype) == layer.compute_dtype
        assert (
            keras.backend.standardize_dtype(y_inf.dtype) == layer.compute_dtype
        )
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


def rounded(a, policy):
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


def run_reference(case, names, weights, steps):
    # A float16/bfloat16 layer stores its weights in that dtype: round the
    # state whenever the layer would.
    stored = case.policy in ("float16", "bfloat16")

    def store(state):
        return {
            k: rounded(v, case.policy) if stored else v
            for k, v in state.items()
        }

    state = store(
        dict(
            zip(
                names,
                (np.asarray(w, np.float64) for w in weights),
                strict=False,
            )
        )
    )
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
            rounded(x, case.policy),
            state,
            training=True,
            mask=mask,
            upstream=rounded(w, case.policy),
            **options,
        )
        state = store(state)
        y_inf, g_inf, _ = ref.step(
            rounded(x_inf, case.policy),
            state,
            training=False,
            upstream=rounded(w_inf, case.policy),
            **options,
        )
        results.append(
            {
                "y": y,
                "grads": [g["x"]] + [g[n] for n in param_names],
                "weights": [state[n] for n in names],
                "y_inf": y_inf,
                "grads_inf": [g_inf["x"]] + [g_inf[n] for n in param_names],
                "x_scale": {
                    "grads": g["x_scale"],
                    "grads_inf": g_inf["x_scale"],
                },
            }
        )
    return results


def compare(
    case, against, actual, expected, names, reference, tol=None, where=""
):
    """Compare per-step results; `reference` (float64) supplies the error scales."""
    tol = tol or TOLERANCES[case.policy]
    label = f"{case.name} ({where})" if where else case.name

    def measure(quantity, kind, a, e, floor=1e-3):
        err = ref.rel_err(a, e, floor)
        ref.record(against, case.policy, quantity, err, label)
        assert err <= tol[kind], (
            f"{label}: {quantity} differs from {against}: relative error "
            f"{err:.2e} > {tol[kind]:.0e}"
        )

    assert len(actual) == len(expected)
    for i, (a, e, r) in enumerate(
        zip(actual, expected, reference, strict=False)
    ):
        at = f" (step {i + 1})"
        measure("output/train", "output", a["y"], e["y"])
        measure("output/infer", "output", a["y_inf"], e["y_inf"])
        for mode in ("grads", "grads_inf"):
            suffix = "train" if mode == "grads" else "infer"
            # Measured against the size of the terms it is the difference of
            # (see bn_reference.step).
            measure(
                f"grad x/{suffix}",
                "grad_x",
                a[mode][0],
                e[mode][0],
                r["x_scale"][mode],
            )
            for ga, ge in zip(a[mode][1:], e[mode][1:], strict=False):
                measure(f"grad gamma,beta/{suffix}", "grad_param", ga, ge)
            assert len(a[mode]) == len(e[mode]), case.name + at
        assert len(a["weights"]) == len(e["weights"]) == len(names)
        for name, wa, we in zip(
            names, a["weights"], e["weights"], strict=False
        ):
            if name in ("gamma", "beta"):
                np.testing.assert_array_equal(
                    wa, we, err_msg=f"{case.name}: {name} changed{at}"
                )
            else:
                measure("moving stats", "stats", wa, we)


def _assert_not_vacuous(case, names, weights, steps, reference):
    """A mask or a clipping that changed nothing would test nothing."""
    if not case.trainable:
        return
    if case.mask:
        unmasked = [(x, None, w, xi, wi) for x, _, w, xi, wi in steps]
        y = run_reference(case, names, weights, unmasked)[0]["y"]
        assert ref.rel_err(y, reference[0]["y"]) > 1e-2, (
            f"{case.name}: the mask changes nothing"
        )
    if case.clipping:
        unclipped = dataclasses.replace(case, renorm_clipping=())
        y = run_reference(unclipped, names, weights, steps)[0]["y"]
        assert ref.rel_err(y, reference[0]["y"]) > 1e-2, (
            f"{case.name}: clipping changes nothing"
        )


def set_policy(policy):
    """Make `policy` the global dtype policy, or float32 where the case gives the
    layer its dtype (restore it with conftest's `float32_policy_after`)."""
    keras.config.set_dtype_policy(
        "float32" if policy in _LAYER_DTYPES else policy
    )


def _builtin_tolerances(case):
    """The tolerances of a comparison with the built-in layer (see above)."""
    if case.policy == "float64" and BACKEND != "tensorflow":
        return BUILTIN_TOLERANCES["float32"]
    if case.policy == "float64" and case.mask:
        # With a mask the built-in divides by count + 1e-7 (backend.epsilon()),
        # a bias of 1e-7 / count: up to 1.1e-8 measured (the gamma gradient
        # on float64-rank5-axis1-mask).
        return dict.fromkeys(BUILTIN_TOLERANCES["float64"], 1e-7)
    return BUILTIN_TOLERANCES[case.policy]


def param(case, *values, id=None):
    """`case` (and any further parameters) as a pytest.param with the marks its
    execution and policy need."""
    marks = {
        "function": [pytest.mark.backends("tensorflow", reason="tf.function")],
        "jit": [
            pytest.mark.backends(
                "tensorflow", "jax", reason="XLA: tf.function or jax.jit"
            )
        ],
    }.get(case.execution, [])
    if case.policy == "float64":
        marks = marks + [pytest.mark.needs_x64]
    return pytest.param(case, *values, id=id or case.name, marks=marks)


# The built-in's and the reference's results depend on the case only, not on
# the bnlayers layer under test (its code path): computed once per case.
_EXPECTED = {}


def check(case, layer, where=""):
    """Run `layer` (a bnlayers layer made by `make_layer` for `case`) and compare
    it with the float64 reference and, where comparable, the built-in.

    `where` (the code path, say) is added to the case name in the summary.
    """
    names, weights, steps = case_data(case)
    assert [w.path.split("/")[-1] for w in layer.weights] == names
    ours = run_keras(layer, case, weights, steps)
    if case not in _EXPECTED:
        reference = run_reference(case, names, weights, steps)
        _assert_not_vacuous(case, names, weights, steps, reference)
        builtin = None
        if case.builtin_comparable:
            builtin_layer = make_layer(keras.layers.BatchNormalization, case)
            assert [
                w.path.split("/")[-1] for w in builtin_layer.weights
            ] == names
            builtin = run_keras(builtin_layer, case, weights, steps)
            # The yardstick checked against the built-in too.
            compare(
                case,
                "float64 (built-in)",
                builtin,
                reference,
                names,
                reference,
                _builtin_tolerances(case),
            )
        _EXPECTED[case] = reference, builtin
    reference, builtin = _EXPECTED[case]
    compare(case, "float64", ours, reference, names, reference, where=where)
    if builtin is not None:
        compare(
            case,
            "built-in",
            ours,
            builtin,
            names,
            reference,
            _builtin_tolerances(case),
            where=where,
        )
    ref.CASES_RUN.add((case.name, where))


def fast_path_reason(case):
    """Why a bnlayers layer with `fused=None` does not take the fast path on
    `case` here (`bnlayers.fused_eligibility`), or None when it does."""
    import bnlayers

    dtype = case.policy if case.policy in _LAYER_DTYPES else "float32"
    layer = make_layer(bnlayers.BatchNormalization, case, fused=None)
    mask = None
    if case.mask:
        mask = np.ones(case.mask_shape, bool)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return bnlayers.fused_eligibility(
            layer, tf.TensorSpec(case.shape, dtype), mask=mask
        )
    return bnlayers.fused_eligibility(layer, case.shape, mask=mask)
