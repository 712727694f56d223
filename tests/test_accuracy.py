"""Exactness at any offset: bnlayers against float64, with data far from zero.

The batch statistics are taken on values shifted by a sample near the mean
(`_math.shifted_moments`), so a large mean costs no accuracy. Each test runs
one training step at offsets 0, 1e2, 1e4 and 1e6 (float32 inputs, spread
0.5 to 2 per feature, unit-scale outputs) and compares with the float64
reference of `bn_reference` computed on the same float32 inputs: the
outputs, the moving statistics (momentum 0, so they are the batch ones) and
the gradients. On TensorFlow every path runs (`fused=None` and `fused=False`;
eager, `tf.function`, `jit_compile=True`); on JAX both paths, eager and
jitted; on PyTorch both paths, eagerly. A plain float32 mean of values near
1e6 is off by about 0.06: the outputs would be off by that much
(`examples/accuracy.py` prints the built-in layer's figures beside these).
"""

import keras
import numpy as np
import pytest

import bn_reference as ref
import bnlayers
from backend_ops import BACKEND
from backend_ops import to_numpy
from backend_ops import value_and_grads

OFFSETS = (0.0, 1e2, 1e4, 1e6)

# Tolerances, about ten times the largest error measured over every path
# and backend (float32; the goal of the exactness work is 1e-5 for outputs
# and variance, 1e-4 for gradients):
# - outputs, absolute: measured <= 2.4e-6 (examples/accuracy.py, all backends);
OUTPUT_ATOL = 1e-5
# - moving variance, relative: measured <= 6.2e-7;
VARIANCE_RTOL = 1e-5
# - moving mean, relative to max(|mean|, 1): measured <= 6e-8 (half an ulp
#   of the offset);
MEAN_RTOL = 1e-6
# - gradients, relative to the largest term (bn_reference.rel_err): measured
#   <= 1.4e-6.
GRAD_RTOL = 1e-4

# Under the mixed policies at offset 1e3 the inputs are rounded to float16
# (an ulp of 0.5 there) or bfloat16 (an ulp of 4) before the layer sees them;
# the reference takes the same rounded inputs. Statistics stay float32, so
# what is left is the rounding of the outputs and of the input gradient to
# the compute dtype: measured 1.9e-3 (float16) and 1.6e-2 (bfloat16) absolute
# on outputs up to about 4 (about 5e-4 and 4e-3 relative), 4.5e-4 and 3.7e-3
# on the gradients, as for the built-in layer; statistics within 4e-6.
MIXED_TOL = {"mixed_float16": 2e-3, "mixed_bfloat16": 1.6e-2}

if BACKEND == "tensorflow":
    # (fused, execution)
    PATHS = [
        (fused, execution)
        for fused in (None, False)
        for execution in ("eager", "function", "jit")
    ]
elif BACKEND == "jax":
    PATHS = [
        (fused, execution)
        for fused in (None, False)
        for execution in ("eager", "jit")
    ]
else:
    PATHS = [(None, "eager"), (False, "eager")]
PATH_IDS = [f"fused={f}-{e}" for f, e in PATHS]


def _data(shape, feature_axes, offset, seed):
    """float32 inputs and upstream gradient (`bn_reference.offset_data`)."""
    x, dy = ref.offset_data(shape, feature_axes, offset, seed)
    return x.astype("float32"), dy.astype("float32")


def _step_function(layer, execution, masked):
    """One training step `(x, dy, mask) -> (y, dx, dgamma, dbeta)` on the given path."""
    variables = [layer.gamma, layer.beta]

    def call(t, m=None):
        return layer(t, training=True, mask=m)

    if BACKEND == "tensorflow" and execution != "eager":
        import tensorflow as tf

        @tf.function(jit_compile=execution == "jit")
        def step(x, dy, mask):
            args = (mask,) if masked else ()
            return value_and_grads(call, [x], dy, variables, [layer], args=args)

        return step

    def step(x, dy, mask):
        args = (mask,) if masked else ()
        return value_and_grads(
            call, [x], dy, variables, [layer], args=args, jit=execution == "jit"
        )

    return step


def _check(layer, step, x, dy, mask, expected, offset):
    """Run `step` on fresh moving statistics and compare with `expected`."""
    y_ref, grads_ref, state_ref = expected
    sizes = layer.moving_mean.shape
    layer.set_weights(
        [
            to_numpy(layer.gamma),
            to_numpy(layer.beta),
            np.zeros(sizes, "float32"),
            np.ones(sizes, "float32"),
        ]
    )
    y, (dx, dgamma, dbeta) = step(x, dy, mask)
    where = f"offset {offset:g}"
    err = float(np.max(np.abs(to_numpy(y).astype(np.float64) - y_ref)))
    assert err <= OUTPUT_ATOL, f"{where}: outputs {err:.2e} from float64"
    mean = state_ref["moving_mean"]
    err = float(
        np.max(
            np.abs(to_numpy(layer.moving_mean) - mean)
            / np.maximum(np.abs(mean), 1.0)
        )
    )
    assert err <= MEAN_RTOL, f"{where}: moving mean {err:.2e} from float64"
    err = float(
        np.max(
            np.abs(
                to_numpy(layer.moving_variance) / state_ref["moving_variance"]
                - 1
            )
        )
    )
    assert err <= VARIANCE_RTOL, (
        f"{where}: moving variance {err:.2e} relative from float64"
    )
    err = (
        float(np.max(np.abs(to_numpy(dx) - grads_ref["x"])))
        / grads_ref["x_scale"]
    )
    assert err <= GRAD_RTOL, f"{where}: input gradient {err:.2e} from float64"
    for name, got in (("gamma", dgamma), ("beta", dbeta)):
        err = ref.rel_err(to_numpy(got), grads_ref[name])
        assert err <= GRAD_RTOL, (
            f"{where}: {name} gradient {err:.2e} from float64"
        )


def _layer(shape, fused, **kwargs):
    layer = bnlayers.BatchNormalization(momentum=0.0, fused=fused, **kwargs)
    layer.build(shape)
    rng = np.random.default_rng(7)
    sizes = layer.moving_mean.shape
    layer.set_weights(
        [
            rng.uniform(0.5, 1.5, sizes).astype("float32"),
            rng.uniform(-0.5, 0.5, sizes).astype("float32"),
            np.zeros(sizes, "float32"),
            np.ones(sizes, "float32"),
        ]
    )
    return layer


def _state(layer):
    sizes = layer.moving_mean.shape
    return {
        "gamma": to_numpy(layer.gamma),
        "beta": to_numpy(layer.beta),
        "moving_mean": np.zeros(sizes),
        "moving_variance": np.ones(sizes),
    }


def _run_offsets(
    layer, shape, feature_axes, fused, execution, mask=None, reference=None
):
    step = _step_function(layer, execution, mask is not None)
    for i, offset in enumerate(OFFSETS):
        x, dy = _data(shape, feature_axes, offset, seed=i)
        if reference is None:
            expected = ref.step(
                x,
                _state(layer),
                feature_axes=feature_axes,
                training=True,
                epsilon=layer.epsilon,
                momentum=0.0,
                mask=mask,
                upstream=dy,
            )
        else:
            expected = reference(x, dy, _state(layer))
        _check(layer, step, x, dy, mask, expected, offset)


@pytest.mark.parametrize("fused, execution", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize(
    "shape", [(16, 5, 5, 4), (64, 8)], ids=["conv", "dense"]
)
def test_single_axis(shape, fused, execution):
    layer = _layer(shape, fused)
    _run_offsets(layer, shape, [len(shape) - 1], fused, execution)


# Masks, ghost batches and axis lists take the reference path whatever
# `fused` says, so one value of it is enough.
REFERENCE_PATHS = [p for p in PATHS if p[0] is None]
REFERENCE_IDS = [e for _, e in REFERENCE_PATHS]


@pytest.mark.parametrize("execution", REFERENCE_IDS)
def test_mask(execution):
    shape = (16, 5, 5, 4)
    mask = np.random.default_rng(11).uniform(size=shape[:-1]) < 0.7
    mask[0, 0, 0] = False  # the first element, a shift candidate, is masked out
    layer = _layer(shape, None)
    _run_offsets(
        layer,
        shape,
        [3],
        None,
        execution,
        mask=keras.ops.convert_to_tensor(mask),
    )


@pytest.mark.parametrize("execution", REFERENCE_IDS)
def test_axis_list(execution):
    shape = (16, 5, 5, 4)
    layer = _layer(shape, None, axis=[1, 3])
    _run_offsets(layer, shape, [1, 3], None, execution)


def _ghost_reference(size, epsilon):
    """Each ghost batch normalized on its own; moving statistics over all of them."""

    def reference(x, dy, state):
        ys, dxs, m2, total = [], [], 0.0, 0
        grads = {"gamma": 0.0, "beta": 0.0, "x_scale": 0.0}
        for start in range(0, x.shape[0], size):
            part = slice(start, start + size)
            y, g, _ = ref.step(
                x[part],
                state,
                feature_axes=[3],
                training=True,
                epsilon=epsilon,
                momentum=0.0,
                upstream=dy[part],
            )
            ys.append(y)
            dxs.append(g["x"])
            for k in ("gamma", "beta"):
                grads[k] = grads[k] + g[k]
            grads["x_scale"] = max(grads["x_scale"], g["x_scale"])
            _, _, var = ref.batch_moments(x[part], [3])
            m2 = m2 + var.ravel() * x[part].size / x.shape[-1]
            total += x[part].size // x.shape[-1]
        grads["x"] = np.concatenate(dxs)
        _, mean, _ = ref.batch_moments(x, [3])
        return (
            np.concatenate(ys),
            grads,
            {"moving_mean": mean.ravel(), "moving_variance": m2 / total},
        )

    return reference


@pytest.mark.parametrize("execution", REFERENCE_IDS)
def test_ghost_batches(execution):
    shape = (16, 5, 5, 4)
    layer = _layer(
        shape, None, virtual_batch_size=6
    )  # ghost batches of 6, 6 and 4
    _run_offsets(
        layer,
        shape,
        [3],
        None,
        execution,
        reference=_ghost_reference(6, layer.epsilon),
    )


@pytest.mark.parametrize("policy", sorted(MIXED_TOL))
@pytest.mark.parametrize("fused", sorted({f for f, _ in PATHS}, key=str))
def test_mixed_precision_at_offset_1e3(policy, fused, float32_policy_after):
    keras.config.set_dtype_policy(policy)
    shape = (16, 5, 5, 4)
    layer = _layer(shape, fused)
    x, dy = _data(shape, [3], 1e3, seed=5)
    x_low = to_numpy(
        keras.ops.cast(keras.ops.cast(x, layer.compute_dtype), "float32")
    )
    y_ref, grads_ref, state_ref = ref.step(
        x_low,
        _state(layer),
        feature_axes=[3],
        training=True,
        epsilon=layer.epsilon,
        momentum=0.0,
        upstream=dy,
    )
    y, (dx, dgamma, dbeta) = _step_function(layer, "eager", False)(x, dy, None)
    tol = MIXED_TOL[policy]
    assert ref.rel_err(to_numpy(keras.ops.cast(y, "float32")), y_ref) <= tol
    dx = to_numpy(keras.ops.cast(dx, "float32"))
    assert (
        float(np.max(np.abs(dx - grads_ref["x"]))) / grads_ref["x_scale"] <= tol
    )
    for got, name in ((dgamma, "gamma"), (dbeta, "beta")):
        assert ref.rel_err(to_numpy(got), grads_ref[name]) <= tol
    assert (
        ref.rel_err(to_numpy(layer.moving_mean), state_ref["moving_mean"])
        <= 1e-6
    )
    err = np.abs(
        to_numpy(layer.moving_variance) / state_ref["moving_variance"] - 1
    )
    assert float(np.max(err)) <= 1e-5


def test_the_examples_reference_agrees_with_the_tests():
    """examples/accuracy.py measures against its own float64 step and its
    own gradient step (examples import nothing from tests/): both agree with
    the tests' reference (`bn_reference.step`, `value_and_grads`)."""
    from example_scripts import example_module

    example = example_module("_reference")
    rng = np.random.default_rng(3)
    x = (1e3 + rng.standard_normal((8, 3, 5))).astype("float32")
    dy = rng.standard_normal(x.shape).astype("float32")
    gamma, beta = rng.uniform(0.5, 1.5, 5), rng.uniform(-0.5, 0.5, 5)
    state = {
        "gamma": gamma,
        "beta": beta,
        "moving_mean": np.zeros(5),
        "moving_variance": np.ones(5),
    }
    y, grads, new_state = ref.step(
        x,
        state,
        feature_axes=[2],
        training=True,
        epsilon=1e-3,
        momentum=0.0,
        upstream=dy,
    )
    y_ex, grads_ex, var_ex = example.batch_norm_step(x, gamma, beta, 1e-3, dy)
    # Two float64 computations of the same formulas: measured 0 apart for the
    # output, variance, gamma and beta gradients, 1.7e-16 for the input one.
    assert ref.rel_err(y_ex, y, floor=0) < 1e-13
    assert ref.rel_err(var_ex, new_state["moving_variance"], floor=0) < 1e-13
    for name in ("x", "gamma", "beta"):
        assert ref.rel_err(grads_ex[name], grads[name], floor=0) < 1e-12, name
    assert grads_ex["x_scale"] == pytest.approx(grads["x_scale"], rel=1e-12)

    # The example's gradient step is the tests' one, on this backend.
    layers = [bnlayers.BatchNormalization(momentum=0.0) for _ in range(2)]
    for layer in layers:
        layer.build(x.shape)
        layer.set_weights(
            [
                gamma.astype("float32"),
                beta.astype("float32"),
                *layer.get_weights()[2:],
            ]
        )
    ours = example.training_step(layers[0])(x, dy)
    y_t, grads_t = value_and_grads(
        lambda t: layers[1](t, training=True),
        [x],
        dy,
        [layers[1].gamma, layers[1].beta],
        [layers[1]],
    )
    for a, b in zip(ours, [y_t, *grads_t], strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    np.testing.assert_array_equal(
        to_numpy(layers[0].moving_variance), to_numpy(layers[1].moving_variance)
    )
