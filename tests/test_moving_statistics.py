"""Moving statistics averaged by step: `debias_moving_statistics=True` and `momentum=None`.

Every check compares the layer's moving statistics after a few training
steps with a float64 reference of the same average of the batch
statistics (`bn_reference.batch_moments`, `ghost_batch_norm`), on the
reference path and the fast path of the running backend. Synchronized
replicas are checked in tests/test_sync.py (their processes are there).
"""

import warnings

import keras
import numpy as np
import pytest

import bn_reference as ref
import bnlayers
from backend_ops import BACKEND
from backend_ops import HAS_FAST_PATH
from backend_ops import to_numpy

EPSILON = 1e-3
# bn_reference.rel_err of the moving statistics against float64, about ten
# times the largest measured on TensorFlow, JAX and PyTorch (float32
# rounding of the batch sums and of the per-step update: measured 4.6e-7,
# the variance after `fit` on PyTorch; 1.5e-7 over the 20 cumulative steps).
RTOL = 5e-6
# The goal for momentum=None: the float64 mean of the batch statistics
# within 1e-6 relative.
CUMULATIVE_GOAL = 1e-6


def _batches(shape, steps, seed=0, offset=3.0):
    """Batches whose statistics change from step to step, as in training."""
    rng = np.random.default_rng(seed)
    return [
        (
            offset
            + rng.uniform(-1, 1)
            + rng.uniform(0.5, 2.0) * rng.standard_normal(shape)
        ).astype("float32")
        for _ in range(steps)
    ]


def _weight(momentum, debias, t):
    """The float64 weight of the batch statistic at step `t` (an array)."""
    t = np.maximum(t, 1.0)
    if momentum is None:
        return 1.0 / t
    if debias:
        return (1.0 - momentum) / (1.0 - momentum**t)
    return np.full_like(t, 1.0 - momentum)


def _expected(
    batches,
    momentum,
    debias,
    feature_axes,
    masks=None,
    ghost=None,
    start=(0.0, 1.0),
):
    """float64 `(moving_mean, moving_variance, count)` after `batches`."""
    shape = [batches[0].shape[a] for a in feature_axes]
    mean_est = np.full(shape, start[0])
    var_est = np.full(shape, start[1])
    t = np.zeros(shape)
    for i, x in enumerate(batches):
        mask = None if masks is None else masks[i]
        if ghost is None:
            count, mean, var = (
                np.reshape(v, shape)
                for v in ref.batch_moments(x, feature_axes, mask)
            )
        else:
            gamma, beta = np.ones(shape), np.zeros(shape)
            stats = ref.ghost_batch_norm(
                x, ghost, feature_axes, gamma, beta, EPSILON, mask
            )
            count, mean, var = stats["count"], stats["mean"], stats["var"]
        counted = count > 0
        t = np.where(counted, t + 1.0, t)
        w = _weight(momentum, debias, t)
        mean_est = np.where(counted, mean_est + w * (mean - mean_est), mean_est)
        var_est = np.where(counted, var_est + w * (var - var_est), var_est)
    return mean_est, var_est, t


def _check(layer, expected, what, tol=RTOL):
    mean, var, t = expected
    np.testing.assert_array_equal(to_numpy(layer.moving_count), t)
    ref.check_error(
        ref.rel_err(to_numpy(layer.moving_mean), mean), tol, f"{what} mean"
    )
    ref.check_error(
        ref.rel_err(to_numpy(layer.moving_variance), var),
        tol,
        f"{what} variance",
    )


AVERAGES = [(0.9, True), (0.99, True), (None, False), (None, True)]
AVERAGE_IDS = [
    "debiased-0.9",
    "debiased-0.99",
    "cumulative",
    "cumulative+debias",
]


@pytest.mark.parametrize(("momentum", "debias"), AVERAGES, ids=AVERAGE_IDS)
@pytest.mark.parametrize("axis", [-1, 1])
def test_moving_statistics_equal_the_float64_average(
    momentum, debias, axis, fused_mode
):
    batches = _batches((6, 5, 3, 4), 8)
    layer = bnlayers.BatchNormalization(
        axis=axis,
        momentum=momentum,
        debias_moving_statistics=debias,
        epsilon=EPSILON,
        fused=fused_mode,
    )
    for x in batches:
        layer(x, training=True)
    features = ref.feature_axes_of(axis, 4)
    _check(layer, _expected(batches, momentum, debias, features), "eager")


def test_cumulative_average_meets_the_goal_over_many_steps(fused_mode):
    """momentum=None: the float64 mean of 20 batch statistics within 1e-6."""
    batches = _batches((16, 8), 20, seed=3)
    layer = bnlayers.BatchNormalization(momentum=None, fused=fused_mode)
    for x in batches:
        layer(x, training=True)
    _check(
        layer,
        _expected(batches, None, False, [1]),
        "cumulative",
        CUMULATIVE_GOAL,
    )


def test_the_first_step_replaces_the_initial_values(fused_mode):
    """w_1 = 1: after one batch the statistics are that batch's, whatever
    the initializers (and the outputs are those of the default layer)."""
    (x,) = _batches((8, 3), 1)
    layer = bnlayers.BatchNormalization(
        debias_moving_statistics=True,
        moving_mean_initializer="ones",
        moving_variance_initializer=keras.initializers.Constant(7.0),
        fused=fused_mode,
    )
    plain = bnlayers.BatchNormalization(fused=fused_mode)
    y = to_numpy(layer(x, training=True))
    np.testing.assert_array_equal(y, to_numpy(plain(x, training=True)))
    _, mean, var = ref.batch_moments(x, [1])
    ref.check_error(
        ref.rel_err(to_numpy(layer.moving_mean), mean.ravel()),
        RTOL,
        "first mean",
    )
    ref.check_error(
        ref.rel_err(to_numpy(layer.moving_variance), var.ravel()),
        RTOL,
        "first variance",
    )


@pytest.mark.skipif(not HAS_FAST_PATH, reason="no fast path on this backend")
@pytest.mark.parametrize(
    ("momentum", "debias"), AVERAGES[:3], ids=AVERAGE_IDS[:3]
)
def test_fast_path_and_reference_path_agree(momentum, debias):
    batches = _batches((8, 4, 6), 5, seed=1)
    layers = [
        bnlayers.BatchNormalization(
            momentum=momentum, debias_moving_statistics=debias, fused=fused
        )
        for fused in (False, True)
    ]
    for x in batches:
        for layer in layers:
            layer(x, training=True)
    reference, fast = ([to_numpy(w) for w in layer.weights] for layer in layers)
    for a, b in zip(reference, fast, strict=True):
        # Measured 1.2e-7: the two paths sum in another order.
        ref.check_error(ref.rel_err(b, a), RTOL, "fast against reference")


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "jit"])
def test_fit_averages_by_step(jit_compile):
    """In Keras' own training loop (traced, and compiled by XLA)."""
    if jit_compile and BACKEND == "torch":
        # Passes, but torch.compile takes 18 s here; Keras trains eagerly
        # on PyTorch unless asked.
        pytest.skip("jit_compile on PyTorch is torch.compile: too slow for CI")
    batches = _batches((8, 6), 4, seed=2)
    layer = bnlayers.BatchNormalization(debias_moving_statistics=True)
    model = keras.Sequential([keras.Input((6,)), layer])
    model.compile(loss="mse", optimizer="sgd", jit_compile=jit_compile)
    x = np.concatenate(batches)
    model.fit(x, np.zeros_like(x), batch_size=8, shuffle=False, verbose=0)
    _check(layer, _expected(batches, 0.99, True, [1]), "fit")


@pytest.mark.backends("tensorflow", reason="TensorFlow's three fast-path forms")
@pytest.mark.parametrize("form", ["plain", "kernel", "compiled"])
@pytest.mark.parametrize(
    ("momentum", "debias"), AVERAGES[:3:2], ids=AVERAGE_IDS[:3:2]
)
def test_every_tensorflow_form(form, momentum, debias):
    import tensorflow as tf

    batches = _batches((8, 3, 4), 4, seed=4)
    layer = bnlayers.BatchNormalization(
        momentum=momentum, debias_moving_statistics=debias, fused=True
    )
    layer.build((None, 3, 4))
    step = tf.function(
        lambda x: layer(x, training=True), jit_compile=form == "compiled"
    )
    previous = bnlayers.set_form_rule(
        bnlayers.FormRule.always("plain" if form == "compiled" else form)
    )
    try:
        for x in batches:
            step(x)
    finally:
        bnlayers.set_form_rule(previous)
    _check(layer, _expected(batches, momentum, debias, [2]), form)


@pytest.mark.parametrize(
    ("momentum", "debias"), AVERAGES[1:3], ids=AVERAGE_IDS[1:3]
)
def test_masked_positions_and_empty_batches_are_no_step(momentum, debias):
    """A feature a mask leaves out of a batch keeps its statistics and its
    count; a fully masked batch and an empty one change nothing."""
    rng = np.random.default_rng(5)
    # Features on axis 1 and a mask of the inputs without the last axis:
    # the mask decides per feature.
    batches = _batches((6, 4, 3), 5, seed=5)
    masks = [rng.uniform(size=(6, 4)) > 0.3 for _ in batches]
    masks[1][:, 2] = False  # feature 2 misses batch 1
    masks[3][:] = False  # nothing counts in batch 3
    layer = bnlayers.BatchNormalization(
        axis=1, momentum=momentum, debias_moving_statistics=debias
    )
    for x, mask in zip(batches, masks, strict=True):
        layer(x, training=True, mask=mask)
    expected = _expected(batches, momentum, debias, [1], masks)
    assert list(expected[2]) == [4, 4, 3, 4]
    _check(layer, expected, "masked")
    for fused in (False, None):
        layer.fused = fused
        before = [to_numpy(w) for w in layer.weights]
        layer(np.zeros((0, 4, 3), "float32"), training=True)
        for a, b in zip(before, layer.weights, strict=True):
            np.testing.assert_array_equal(to_numpy(b), a)


@pytest.mark.parametrize(
    ("momentum", "debias"), AVERAGES[1:3], ids=AVERAGE_IDS[1:3]
)
def test_ghost_batches(momentum, debias):
    batches = _batches((10, 3), 4, seed=6)
    layer = bnlayers.BatchNormalization(
        momentum=momentum, debias_moving_statistics=debias, virtual_batch_size=4
    )
    for x in batches:
        layer(x, training=True)
    expected = _expected(batches, momentum, debias, [1], ghost=4)
    _check(layer, expected, "ghost")


@pytest.mark.parametrize(
    ("momentum", "debias"),
    [(0.9, True), (None, False)],
    ids=["debiased", "cumulative"],
)
def test_renorm(momentum, debias):
    """The inference statistics follow the moving stddev, averaged by step;
    renorm's own averages are debiased with `debias_moving_statistics`."""
    batches = _batches((8, 3), 4, seed=7)
    layer = bnlayers.BatchNormalization(
        momentum=momentum,
        debias_moving_statistics=debias,
        renorm=True,
        renorm_momentum=0.8,
        epsilon=EPSILON,
    )
    for x in batches:
        layer(x, training=True)
    moments = [ref.batch_moments(x, [1]) for x in batches]
    stddevs = [np.sqrt(v.ravel() + EPSILON) for _, _, v in moments]
    means = [m.ravel() for _, m, _ in moments]

    def average(values, m, debiased):
        # moving_stddev and renorm_stddev start at sqrt(1), as Keras'.
        estimate = np.zeros(3) if values is means else np.ones(3)
        for t, v in enumerate(values, 1):
            estimate = estimate + _weight(m, debiased, np.float64(t)) * (
                v - estimate
            )
        return estimate

    stddev = average(stddevs, momentum, debias)
    expected = {
        "moving_mean": average(means, momentum, debias),
        "moving_stddev": stddev,
        "moving_variance": stddev**2 - EPSILON,
        "renorm_mean": average(means, 0.8, debias),
        "renorm_stddev": average(stddevs, 0.8, debias),
    }
    for name, value in expected.items():
        ref.check_error(
            ref.rel_err(to_numpy(getattr(layer, name)), value),
            RTOL,
            f"renorm {name}",
        )
    np.testing.assert_array_equal(to_numpy(layer.moving_count), [4, 4, 4])


def test_momentum_one_keeps_the_statistics_and_inference_changes_nothing():
    layer = bnlayers.BatchNormalization(
        momentum=1.0, debias_moving_statistics=True
    )
    (x,) = _batches((8, 3), 1)
    layer(x, training=False)
    assert to_numpy(layer.moving_count).tolist() == [0, 0, 0]
    layer(x, training=True)
    np.testing.assert_array_equal(to_numpy(layer.moving_mean), np.zeros(3))
    np.testing.assert_array_equal(to_numpy(layer.moving_variance), np.ones(3))


def test_weights_and_config():
    """The counter exists only where an option needs it, last; the options
    round-trip through the config."""
    for kwargs, extra in (
        ({}, []),
        ({"debias_moving_statistics": True}, ["moving_count"]),
        ({"momentum": None, "renorm": True}, ["moving_count"]),
    ):
        layer = bnlayers.BatchNormalization(**kwargs)
        layer.build((None, 3))
        builtin = keras.layers.BatchNormalization(
            **{k: v for k, v in kwargs.items() if k == "renorm"}
        )
        builtin.build((None, 3))
        names = [w.name for w in layer.weights]
        assert names == [w.name for w in builtin.weights] + extra
        config = layer.get_config()
        assert config["momentum"] == kwargs.get("momentum", 0.99)
        assert config["debias_moving_statistics"] == kwargs.get(
            "debias_moving_statistics", False
        )
        clone = bnlayers.BatchNormalization.from_config(config)
        assert clone.get_config() == config


@pytest.mark.parametrize(
    ("momentum", "debias"), AVERAGES[1:3], ids=AVERAGE_IDS[1:3]
)
def test_keras_file_keeps_the_counter(tmp_path, momentum, debias):
    batches = _batches((8, 3), 3, seed=8)
    layer = bnlayers.BatchNormalization(
        momentum=momentum, debias_moving_statistics=debias
    )
    model = keras.Sequential([keras.Input((3,)), layer])
    for x in batches[:2]:
        layer(x, training=True)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    restored = loaded.layers[0]
    assert restored.get_config() == layer.get_config()
    for a, b in zip(layer.weights, restored.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(b), to_numpy(a))
    # Training goes on from the saved step count: step 3 of the average.
    restored(batches[2], training=True)
    _check(restored, _expected(batches, momentum, debias, [1]), "reloaded")


@pytest.mark.parametrize(
    ("momentum", "debias"), AVERAGES[1:3], ids=AVERAGE_IDS[1:3]
)
def test_swap_to_keras_keeps_the_estimate_and_warns(momentum, debias):
    layer = bnlayers.BatchNormalization(
        momentum=momentum, debias_moving_statistics=debias
    )
    model = keras.Sequential([keras.Input((3,)), layer])
    for x in _batches((8, 3), 3, seed=9):
        layer(x, training=True)
    with pytest.warns(UserWarning, match="does not have") as caught:
        swapped = bnlayers.swap_batchnorm(model, to="keras")
    assert ("momentum=None" in str(caught[0].message)) == (momentum is None)
    builtin = swapped.layers[0]
    assert type(builtin) is keras.layers.BatchNormalization
    assert builtin.momentum == (0.99 if momentum is None else momentum)
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_array_equal(
            to_numpy(getattr(builtin, name)), to_numpy(getattr(layer, name))
        )
    (x,) = _batches((5, 3), 1, seed=10)
    np.testing.assert_allclose(
        to_numpy(swapped(x, training=False)),
        to_numpy(model(x, training=False)),
        rtol=0,
        atol=1e-5,  # float32 rounding of the two layers' arithmetic (5e-7)
    )
    # Back to bnlayers: no option set, so no warning and no counter.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = bnlayers.swap_batchnorm(swapped, to="bnlayers")
    assert not [w for w in caught if "swap_batchnorm" in str(w.message)]
    assert back.layers[0].moving_count is None


def test_fused_eligibility_is_unchanged_by_the_options():
    for kwargs in ({"debias_moving_statistics": True}, {"momentum": None}):
        layer = bnlayers.BatchNormalization(**kwargs)
        expected = bnlayers.fused_eligibility(
            bnlayers.BatchNormalization(), (8, 3)
        )
        assert bnlayers.fused_eligibility(layer, (8, 3)) == expected


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"Received: renorm_momentum=None"):
        bnlayers.BatchNormalization(renorm=True, renorm_momentum=None)
    with pytest.raises(
        TypeError, match=r"Received: debias_moving_statistics='yes'"
    ):
        bnlayers.BatchNormalization(debias_moving_statistics="yes")
    with pytest.raises(ValueError, match=r"Received: momentum=1.5"):
        bnlayers.BatchNormalization(momentum=1.5)
    layer = bnlayers.BatchNormalization()
    layer.build((None, 3))
    layer.momentum = None
    with pytest.raises(ValueError, match="without a step counter"):
        layer(np.ones((4, 3), "float32"), training=True)


@pytest.mark.parametrize(
    ("momentum", "debias"), AVERAGES[1:3], ids=AVERAGE_IDS[1:3]
)
def test_recalibrate_sets_the_statistics_and_keeps_the_count(momentum, debias):
    batches = _batches((8, 3), 2, seed=12)
    layer = bnlayers.BatchNormalization(
        momentum=momentum, debias_moving_statistics=debias
    )
    model = keras.Sequential([keras.Input((3,)), layer])
    for x in batches:
        layer(x, training=True)
    data = np.concatenate(_batches((8, 3), 3, seed=13))
    bnlayers.recalibrate(model, data, batch_size=8, verbose=0)
    _, mean, var = ref.batch_moments(data, [1])
    ref.check_error(
        ref.rel_err(to_numpy(layer.moving_mean), mean.ravel()),
        RTOL,
        "recalibrated mean",
    )
    ref.check_error(
        ref.rel_err(to_numpy(layer.moving_variance), var.ravel()),
        RTOL,
        "recalibrated variance",
    )
    np.testing.assert_array_equal(to_numpy(layer.moving_count), [2, 2, 2])


@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param("float64", marks=pytest.mark.needs_x64),
        "mixed_float16",
    ],
)
def test_other_dtypes(dtype, fused_mode):
    """The counter and the average in the variables' dtype (float64, or
    float32 under a mixed policy, of the inputs as the layer sees them)."""
    batches = _batches((8, 3), 4, seed=14)
    layer = bnlayers.BatchNormalization(
        momentum=0.9,
        debias_moving_statistics=True,
        dtype=dtype,
        fused=fused_mode,
    )
    for x in batches:
        layer(x, training=True)
    assert layer.moving_count.dtype == layer.variable_dtype
    seen = [x.astype(layer.compute_dtype) for x in batches]
    # float64: measured 2.8e-16; mixed_float16: float32 statistics
    # (measured 8e-8, within RTOL).
    tol = 5e-15 if dtype == "float64" else RTOL
    _check(layer, _expected(seen, 0.9, True, [1]), dtype, tol)
