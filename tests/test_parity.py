"""Parity of bnlayers.BatchNormalization with the built-in layer and with float64.

Every case of the grid below goes through the parity harness (`parity.py`):
the same weights and batches for bnlayers, the built-in layer and the
float64 reference, training outputs, gradients, moving statistics and
inference outputs compared after each step. Each case runs through both
bnlayers code paths (`fused_mode`: the reference keras.ops path and the
automatic choice).

The grid runs under every Keras backend, against that backend's built-in
layer. Execution "jit" is `tf.function(jit_compile=True)` on TensorFlow and
`jax.jit` on JAX; "function" (`tf.function` without XLA) is TensorFlow's
alone.
"""

import keras
import numpy as np
import pytest
from keras import ops

import bn_reference as ref
import bnlayers
import parity
from backend_ops import HAS_FAST_PATH
from backend_ops import to_numpy
from backend_ops import value_and_grads
from parity import BUILTIN_TOLERANCES
from parity import TOLERANCES
from parity import Case


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
            cases.append(
                Case(f"rank{len(shape)}-axis{axis}", shape=shape, axis=axis)
            )
    # Several feature axes at once (a bnlayers extension: reference only).
    cases.append(Case("rank4-axis[1,3]", axis=(1, 3)))
    cases.append(Case("rank3-axis[-1,-2]", shape=(4, 3, 5), axis=(-1, -2)))
    # center / scale.
    for center, scale in ((True, False), (False, True), (False, False)):
        cases.append(
            Case(f"center{center}-scale{scale}", center=center, scale=scale)
        )
        cases.append(
            Case(
                f"rank3-axis1-center{center}-scale{scale}",
                shape=(4, 3, 5),
                axis=1,
                center=center,
                scale=scale,
            )
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
        cases.append(
            Case(f"batch{batch}-rank4-axis1", shape=(batch, 3, 4, 3), axis=1)
        )
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
        Case(
            "renorm-clip-rank3-axis1",
            shape=(4, 3, 5),
            axis=1,
            renorm=True,
            renorm_clipping=clip,
        ),
        Case(
            "renorm-clip-nocenter",
            renorm=True,
            renorm_clipping=clip,
            center=False,
        ),
        Case(
            "renorm-clip-noscale",
            renorm=True,
            renorm_clipping=clip,
            scale=False,
        ),
        Case(
            "renorm-clip-mask",
            shape=(4, 6, 3),
            renorm=True,
            renorm_clipping=clip,
            mask=True,
        ),
        Case(
            "renorm-batch1",
            shape=(1, 3, 4, 3),
            renorm=True,
            renorm_clipping=clip,
        ),
    ]
    # trainable=False: inference mode even with training=True, no updates.
    cases += [
        Case("frozen", trainable=False),
        Case(
            "frozen-renorm-mask",
            shape=(4, 6, 3),
            trainable=False,
            renorm=True,
            mask=True,
        ),
    ]
    # Mixed precision and float64.
    for policy in ("mixed_float16", "mixed_bfloat16"):
        cases += [
            Case(f"{policy}", policy=policy),
            Case(
                f"{policy}-rank3-axis1-mask",
                shape=(4, 3, 5),
                axis=1,
                mask=True,
                policy=policy,
            ),
            Case(
                f"{policy}-rank2-mask", shape=(6, 5), mask=True, policy=policy
            ),
            Case(
                f"{policy}-renorm-clip",
                renorm=True,
                renorm_clipping=clip,
                policy=policy,
            ),
        ]
    for policy in ("float16", "bfloat16"):
        cases += [
            Case(f"{policy}-layer", policy=policy),
            Case(
                f"{policy}-layer-rank3-axis1-mask",
                shape=(4, 3, 5),
                axis=1,
                mask=True,
                policy=policy,
            ),
        ]
    cases.append(Case("float64", policy="float64"))
    cases.append(
        Case(
            "float64-rank5-axis1-mask",
            shape=(3, 2, 3, 2, 3),
            axis=1,
            mask=True,
            policy="float64",
        )
    )
    # Inside tf.function, and compiled with XLA, on a representative subset.
    for execution in ("function", "jit"):
        cases += [
            Case(f"{execution}", execution=execution),
            Case(
                f"{execution}-rank3-axis1",
                shape=(4, 3, 5),
                axis=1,
                execution=execution,
            ),
            Case(
                f"{execution}-rank5-axis-4-noscale",
                shape=(3, 2, 3, 2, 3),
                axis=-4,
                scale=False,
                execution=execution,
            ),
            Case(
                f"{execution}-mask-rank3",
                shape=(4, 6, 3),
                mask=True,
                execution=execution,
            ),
            Case(
                f"{execution}-batch1-rank2", shape=(1, 5), execution=execution
            ),
            Case(
                f"{execution}-renorm-clip",
                renorm=True,
                renorm_clipping=clip,
                execution=execution,
            ),
            Case(
                f"{execution}-mixed_float16",
                policy="mixed_float16",
                execution=execution,
            ),
            Case(f"{execution}-frozen", trainable=False, execution=execution),
        ]
    cases.append(
        Case(
            "jit-mixed_bfloat16-mask-axis1",
            shape=(4, 3, 5),
            axis=1,
            mask=True,
            policy="mixed_bfloat16",
            execution="jit",
        )
    )
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


CASES = _cases()


def _grid():
    """Every case through the reference path (`fused=False`) and the automatic
    choice (`fused=None`), where the two differ.

    On a backend with no fast path the automatic choice alone runs
    (tests/test_backends.py checks it is the reference path there, bit for
    bit). Where there is one, a case the fast path does not take would run
    the `fused=False` computation twice; test_fused.py (TensorFlow),
    test_fast_jax.py and test_fast_torch.py check that the automatic choice
    takes the fast path in exactly the eligible cases.
    """
    modes = (
        [(False, "reference"), (None, "auto")]
        if HAS_FAST_PATH
        else [(None, "auto")]
    )
    grid = []
    for case in CASES:
        for fused, name in modes:
            if (
                fused is None
                and len(modes) > 1
                and parity.fast_path_reason(case) is not None
            ):
                continue
            grid.append(parity.param(case, fused, id=f"{name}-{case.name}"))
    return grid


@pytest.mark.parametrize("case, fused", _grid())
def test_parity(case, fused, float32_policy_after):
    parity.set_policy(case.policy)
    layer = parity.make_layer(bnlayers.BatchNormalization, case, fused=fused)
    parity.check(case, layer, where=f"fused={fused}")


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
    layer = bnlayers.BatchNormalization(
        momentum=0.5, renorm=renorm, fused=fused_mode
    )
    layer.build(shape)
    before = [v.copy() for v in layer.get_weights()]
    y, grads = value_and_grads(
        lambda t: layer(t, training=True, mask=mask),
        [x],
        w,
        layer.trainable_weights,
        [layer],
    )
    y = to_numpy(y)
    assert np.all(np.isfinite(y))
    for g in grads:
        assert np.all(np.isfinite(to_numpy(g)))
    for name, b, a in zip(
        ref.weight_names(renorm=renorm),
        before,
        layer.get_weights(),
        strict=False,
    ):
        np.testing.assert_array_equal(
            a, b, err_msg=f"{name} moved on a fully masked batch"
        )
    state = dict(zip(ref.weight_names(renorm=renorm), before, strict=False))
    y_ref, g_ref, _ = ref.step(
        x,
        state,
        feature_axes=[-1],
        training=True,
        epsilon=1e-3,
        momentum=0.5,
        renorm=renorm,
        mask=mask,
        upstream=w,
    )
    # Measured 8.1e-8 and 6.6e-8.
    ref.assert_close(y, y_ref, 1e-6, "output")
    ref.assert_close(
        grads[0], g_ref["x"], 1e-6, "grad x", floor=g_ref["x_scale"]
    )


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
    state = dict(zip(ref.weight_names(), layer.get_weights(), strict=False))
    y = to_numpy(layer(x.astype("float32"), training=True, mask=mask))
    y_ref, _, new_state = ref.step(
        x.astype("float32"),
        state,
        feature_axes=[-1],
        training=True,
        epsilon=1e-3,
        momentum=0.5,
        mask=mask,
    )
    # Measured 1.3e-7 and 7.2e-8.
    ref.assert_close(y[mask], y_ref[mask], 2e-6, "output")
    for name, value in zip(
        ref.weight_names(), layer.get_weights(), strict=False
    ):
        ref.assert_close(value, new_state[name], 1e-6, name)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_large_values_under_mixed_precision(
    fused_mode, policy, float32_policy_after
):
    """Sums and squares of float16-sized values overflow float16 (max 65504):
    statistics must be taken in float32."""
    parity.set_policy(policy)
    shape = (8, 4, 4, 2)
    rng = np.random.default_rng(9)
    x = rng.normal(2e4, 1e3, shape).astype("float32")
    ours, builtin = _layer_pair(fused_mode, momentum=0.0)
    y = ours(x, training=True)
    y_builtin = builtin(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == policy.split("_")[1]
    assert np.all(np.isfinite(to_numpy(y).astype("float32")))
    x_seen = parity.rounded(x, policy)
    state = dict(
        zip(
            ref.weight_names(),
            [np.ones(2), np.zeros(2), np.zeros(2), np.ones(2)],
            strict=False,
        )
    )
    y_ref, _, new_state = ref.step(
        x_seen,
        state,
        feature_axes=[-1],
        training=True,
        epsilon=1e-3,
        momentum=0.0,
    )
    tol = TOLERANCES[policy]
    ref.assert_close(y, y_ref, tol["output"], f"output ({policy})")
    ref.assert_close(
        y,
        y_builtin,
        BUILTIN_TOLERANCES[policy]["output"],
        f"output vs built-in ({policy})",
    )
    # Statistics of values near 2e4, in float32 (measured 1.9e-6).
    for name, value in zip(
        ref.weight_names(), ours.get_weights(), strict=False
    ):
        ref.assert_close(value, new_state[name], 2e-5, f"{name} ({policy})")


@pytest.mark.parametrize(
    "execution",
    [
        "eager",
        pytest.param(
            "function",
            marks=pytest.mark.backends("tensorflow", reason="tf.function"),
        ),
    ],
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
    y = to_numpy(
        call(
            ops.convert_to_tensor(x),
            None if mask is None else ops.convert_to_tensor(mask),
        )
    )
    _, mean, var = ref.batch_moments(x, [-1], mask)
    moving_mean, moving_variance = layer.get_weights()[2:]
    # Measured 1.3e-5 and 3.7e-7.
    ref.assert_close(
        moving_variance, var.ravel(), 1.5e-4, "moving_variance", floor=0.0
    )
    ref.assert_close(moving_mean, mean.ravel(), 4e-6, "moving_mean", floor=0.0)
    # The output inherits the error of the float32 mean itself: a sum of
    # values near 1e4 is a few units of 2**-10 ~ 1e-3 off (the built-in's
    # mean is off by the same), i.e. ~1e-3 of outputs of size ~3 (measured
    # 6e-4 at most).
    y_ref = (x - mean) / np.sqrt(var + 1e-3)
    ref.assert_close(y, y_ref, 3e-3, "output")


def test_training_none_means_inference(fused_mode):
    """`training=None` (a plain call) uses the moving statistics, as the built-in does."""
    shape = (4, 5, 3)
    rng = np.random.default_rng(11)
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    ours, builtin = _layer_pair(fused_mode)
    for layer in (ours, builtin):
        layer.build(shape)
        layer.set_weights(
            [rng.uniform(0.5, 1.5, 3).astype("float32") for _ in range(4)]
        )
    builtin.set_weights(ours.get_weights())
    before = ours.get_weights()
    y = ours(x)
    np.testing.assert_array_equal(
        to_numpy(y), to_numpy(ours(x, training=False))
    )
    for a, b in zip(before, ours.get_weights(), strict=False):
        np.testing.assert_array_equal(a, b)
    ref.assert_close(
        y,
        builtin(x),
        BUILTIN_TOLERANCES["float32"]["output"],
        "output vs built-in",
    )
