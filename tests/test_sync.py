"""Synchronized statistics (`synchronized=True`): exact, and equivalent to one device.

The distributed checks need logical CPU devices, which TensorFlow only lets
a process set up before it initializes its devices, so they run in fresh
processes (`tests/_mirrored_checks.py`, one per device count, both started
at once) that print their measurements; the assertions and tolerances are
here. Without a strategy the checks run in this process.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import _mirrored_checks as checks
import bn_reference as ref
import bnlayers

HERE = pathlib.Path(__file__).resolve().parent
DEVICE_COUNTS = (2, 4)
SUBPROCESS_TIMEOUT_S = 600

# bn_reference.rel_err, measured in the worker processes, allowed about ten
# times the largest measured (2 and 4 CPU replicas, TensorFlow 2.21).
# The synchronized variance against the float64 truth, at means 0 to 1e6:
# float32 rounding of the sums (measured 3.4e-7).
VARIANCE_RTOL = 4e-6
# Normalized outputs against the float64 truth (measured 2.2e-7).
OUTPUT_RTOL = 3e-6
# Replicas sum in another order than one device: a few float32 ulps of the
# largest value (measured 1.4e-6, the outputs of a short last batch).
EQUIVALENCE_TOL = 1.5e-5


@pytest.fixture(scope="module")
def measured():
    """{device count: the JSON printed by _mirrored_checks.py}."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    procs = {
        r: subprocess.Popen(
            [sys.executable, str(HERE / "_mirrored_checks.py"), str(r)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in DEVICE_COUNTS
    }
    results = {}
    try:
        for r, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                pytest.fail(
                    f"_mirrored_checks.py {r} timed out; stderr:\n{err[-3000:]}"
                )
            if proc.returncode != 0:
                pytest.fail(
                    f"_mirrored_checks.py {r} failed ({proc.returncode}):\n{err[-3000:]}"
                )
            results[r] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


# ------------------------------------------------- under MirroredStrategy


@pytest.mark.slow
@pytest.mark.parametrize("replicas", DEVICE_COUNTS)
def test_strategy_has_the_requested_replicas(measured, replicas):
    assert measured[replicas]["num_replicas_in_sync"] == replicas


@pytest.mark.slow
@pytest.mark.parametrize("replicas", DEVICE_COUNTS)
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("offset", checks.OFFSETS)
def test_synchronized_variance_is_exact_at_any_mean(
    measured, replicas, masked, offset
):
    (row,) = [
        r for r in measured[replicas]["exactness"] if r["offset"] == offset
    ]
    key = "bnlayers" + ("_masked" if masked else "")
    ref.check_error(
        row[key + "_var_rel_err"],
        VARIANCE_RTOL,
        f"{key} variance, mean {offset:g}",
    )
    ref.check_error(
        row[key + "_out_rel_err"],
        OUTPUT_RTOL,
        f"{key} outputs, mean {offset:g}",
    )


@pytest.mark.slow
@pytest.mark.parametrize("replicas", DEVICE_COUNTS)
def test_synchronized_variance_agrees_with_builtin_on_ordinary_data(
    measured, replicas
):
    """At mean 0 the built-in's E[x^2] - E[x]^2 is fine, and the two agree."""
    (row,) = [r for r in measured[replicas]["exactness"] if r["offset"] == 0.0]
    ref.assert_close(
        row["bnlayers_var"],
        row["builtin_var"],
        2 * VARIANCE_RTOL,
        "vs built-in",
    )
    ref.assert_close(
        row["bnlayers_var"],
        row["truth_var"],
        VARIANCE_RTOL,
        "vs float64",
        floor=0.0,
    )


@pytest.mark.slow
@pytest.mark.parametrize("replicas", DEVICE_COUNTS)
def test_synchronized_statistics_in_mixed_precision(measured, replicas):
    """float16 inputs at mean 100: statistics in float32, outputs in float16."""
    result = measured[replicas]["mixed_precision"]
    assert result["bnlayers_dtype"] == "float16"
    ref.check_error(
        result["bnlayers_var_rel_err"], VARIANCE_RTOL, "variance, mixed_float16"
    )
    # A float16 output rounds by up to half a unit in its last place, 2**-11
    # of its magnitude, so by up to 2**-11 of the largest output: a bound
    # (measured 3.2e-4), with 5% for the float32 error beneath it.
    ref.check_error(
        result["bnlayers_out_rel_err"], 2**-11 * 1.05, "outputs, mixed_float16"
    )


def _equivalence_ids():
    ids = []
    for replicas in DEVICE_COUNTS:
        for kind in ("even", "uneven"):
            ids += [
                (replicas, f"{case}_{kind}")
                for case in checks.PLAN[replicas][kind]
            ]
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("replicas,case", _equivalence_ids())
def test_replicas_equal_one_device_with_the_global_batch(
    measured, replicas, case
):
    """Outputs, gradients (inputs, gamma, beta) and moving statistics."""
    diffs = measured[replicas]["equivalence"][case]
    for key, value in diffs.items():
        if key.endswith("_replicas_identical"):
            assert value is True, (key, diffs)
        else:
            ref.check_error(
                value, EQUIVALENCE_TOL, f"{key} ({case.split('_')[-1]} batches)"
            )


@pytest.mark.slow
@pytest.mark.parametrize("replicas", DEVICE_COUNTS)
def test_distributed_dataset_with_a_short_last_batch(measured, replicas):
    result = measured[replicas]["dataset_remainder"]
    sizes = result["per_replica_sizes"]
    # The pipeline really did split the last batch unevenly.
    assert sizes[0] == [2] * replicas
    assert sum(sizes[-1]) == 2 and min(sizes[-1]) < max(sizes[0])
    if replicas == 4:
        assert 0 in sizes[-1]
    for key in ("outputs", "moving_mean", "moving_variance"):
        ref.check_error(result[key], EQUIVALENCE_TOL, key)


# ----------------------------------------------------- without a strategy


def _train(layer, batches, masks):
    outputs, grads = [], []
    for x, m in zip(batches, masks, strict=False):
        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=m)
            # Weights that differ per element, so the input gradient is not 0.
            loss = tf.reduce_sum(
                y * tf.math.sin(tf.cumsum(tf.ones_like(y), axis=0))
            )
        grads.append(
            [
                g.numpy()
                for g in tape.gradient(loss, [x, layer.gamma, layer.beta])
            ]
        )
        outputs.append(y.numpy())
    return outputs, grads, [w.numpy() for w in layer.weights]


@pytest.mark.parametrize(
    "one_replica_strategy", [False, True], ids=["no_strategy", "one_replica"]
)
def test_synchronized_without_replicas_is_exactly_unsynchronized(
    one_replica_strategy,
):
    rng = np.random.default_rng(0)
    batches = [
        (1e4 + rng.standard_normal((8, 3, 4))).astype("float32")
        for _ in range(3)
    ]
    masks = [None, rng.random((8, 3)) > 0.3, None]
    results = []
    for synchronized in (False, True):
        if one_replica_strategy:
            strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
            with strategy.scope():
                layer = bnlayers.BatchNormalization(
                    synchronized=synchronized, momentum=0.5
                )
                layer.build((None, 3, 4))

            def step(layer=layer, strategy=strategy):
                return strategy.run(lambda: _train(layer, batches, masks))

            results.append(step())
        else:
            layer = bnlayers.BatchNormalization(
                synchronized=synchronized, momentum=0.5
            )
            results.append(_train(layer, batches, masks))
    unsynced, synced = results
    for a, b in zip(
        [*unsynced[0], *sum(unsynced[1], []), *unsynced[2]],
        [*synced[0], *sum(synced[1], []), *synced[2]],
        strict=False,
    ):
        np.testing.assert_array_equal(a, b)


# The shared cases against their float64 reference (bn_reference.rel_err;
# 4 CPU replicas, TensorFlow 2.21): outputs and moving statistics measured
# 2.0e-7 (moving variance relative per feature), input, gamma and beta
# gradients 3.9e-7.
REFERENCE_RTOL = 2e-6
GRADIENT_RTOL = 4e-6


@pytest.mark.slow
@pytest.mark.parametrize("case", checks.REFERENCE_CASES)
def test_reference_cases_with_four_replicas(measured, case):
    """Cases the PyTorch and JAX processes run (test_sync_processes.py),
    here under MirroredStrategy: gradients at a mean of 1e6, and
    `replica_group_size=2` (each group its own global batch's statistics)
    with a mask and with uneven and empty shares; every replica's moving
    statistics the same."""
    result = dict(measured[4]["reference_cases"][case])
    assert result.pop("copies_equal")
    for quantity, err in result.items():
        tol = GRADIENT_RTOL if quantity.startswith("d") else REFERENCE_RTOL
        ref.check_error(err, tol, f"{quantity} ({case})")


def test_synchronized_cannot_combine_with_ghost_batches():
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bnlayers.BatchNormalization(synchronized=True, virtual_batch_size=4)


def test_synchronized_config_round_trip():
    layer = bnlayers.BatchNormalization(synchronized=True)
    clone = bnlayers.BatchNormalization.from_config(layer.get_config())
    assert clone.synchronized is True
    assert (
        keras.layers.deserialize(keras.layers.serialize(layer)).synchronized
        is True
    )


def test_replica_group_size_config_and_checks(tmp_path):
    layer = bnlayers.BatchNormalization(synchronized=True, replica_group_size=2)
    clone = bnlayers.BatchNormalization.from_config(layer.get_config())
    assert clone.replica_group_size == 2
    model = keras.Sequential([keras.Input((3,)), layer])
    model.save(tmp_path / "m.keras")
    reloaded = keras.models.load_model(tmp_path / "m.keras")
    assert reloaded.layers[0].replica_group_size == 2
    assert reloaded.layers[0].synchronized is True
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=rf"replica_group_size={bad!r}"):
            bnlayers.BatchNormalization(
                synchronized=True, replica_group_size=bad
            )
    with pytest.raises(ValueError, match="needs `synchronized=True`"):
        bnlayers.BatchNormalization(replica_group_size=2)
    from bnlayers import _sync

    # At call, against the number of replicas found.
    with pytest.raises(
        ValueError, match=r"divide the number of replicas \(4\)"
    ):
        _sync._check_groups(4, 3)
    assert _sync._check_groups(4, 2) == 2


@pytest.mark.slow
@pytest.mark.parametrize("replicas", DEVICE_COUNTS)
@pytest.mark.parametrize("option", ["debiased", "cumulative"])
def test_moving_statistics_averaged_by_step_over_replicas(
    measured, replicas, option
):
    """`debias_moving_statistics` and `momentum=None`: the global batch's
    statistics, averaged by step, on every replica (uneven shares, one
    empty with 4 replicas: a replica's empty share is still a step)."""
    result = measured[replicas]["step_averages"][option]
    assert result["counts"] == [[3.0] * 3] * replicas
    # Measured 5e-8 (3 steps, float32 sums over replicas).
    ref.check_error(result["mean_rel_err"], VARIANCE_RTOL, f"{option} mean")
    ref.check_error(result["var_rel_err"], VARIANCE_RTOL, f"{option} variance")
