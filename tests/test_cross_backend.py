"""bnlayers on every Keras backend, each in its own process.

A Keras process runs one backend, chosen by KERAS_BACKEND before keras is
imported, so the module starts `tests/_backend_worker.py` once per backend
(TensorFlow twice), each doing every task that backend has, and each test
asserts on what the workers report:

- the article's model trains with bnlayers as with the built-in layer on
  JAX and PyTorch, without bnlayers importing TensorFlow;
- a `.keras` file saved under one backend loads under another with the same
  weights and the same outputs;
- under `keras.distribution.DataParallel` on JAX (two CPU devices), batch
  statistics are those of the global batch.

The module starts its own processes whatever backend the suite runs under,
so it runs once, in the full suite (TensorFlow).
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import bn_reference as ref

WORKER = pathlib.Path(__file__).with_name("_backend_worker.py")
TIMEOUT = 900
# bn_reference.rel_err allowed, about ten times the largest measured.
# bnlayers' and the built-in's losses after one epoch (measured: equal on
# PyTorch, 7.6e-8 on JAX).
LOSS_RTOL = 1e-6
# A model's outputs saved under one backend and loaded under another
# (measured 1.0e-6).
EXCHANGE_RTOL = 1e-5
# Statistics and outputs under DataParallel against float64 (measured 2.5e-7).
DATA_PARALLEL_RTOL = 3e-6

pytestmark = [
    pytest.mark.slow,
    pytest.mark.backends(
        "tensorflow",
        reason="starts its own process per backend: runs once, in the full suite",
    ),
]


def _installed(backend):
    return importlib.util.find_spec(backend) is not None


def _needs(*backends):
    missing = [b for b in backends if not _installed(b)]
    return pytest.mark.skipif(
        bool(missing), reason=f"not installed: {', '.join(missing)}"
    )


# One process per backend start-up, in this order (each `exchange` loads the
# files the earlier ones saved, then saves its own: TensorFlow -> PyTorch,
# TensorFlow -> JAX, PyTorch -> JAX, and the last run, PyTorch and JAX ->
# TensorFlow). `article` comes first in its process: it checks that
# bnlayers does not import TensorFlow, which Keras' saving would. JAX gets
# two CPU devices, which only `data_parallel` uses (it sets a distribution,
# so it comes last).
_RUNS = [
    ("tensorflow", ["exchange"]),
    ("torch", ["article", "exchange"]),
    ("jax", ["article", "exchange", "data_parallel"]),
    ("tensorflow", ["exchange"]),
]


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    """{(run index, backend, task): what the worker wrote}, for the installed backends."""
    directory = tmp_path_factory.mktemp("backends")
    results = {}
    for i, (backend, tasks) in enumerate(_RUNS):
        if not _installed(backend):
            continue
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        if backend == "jax":
            env["XLA_FLAGS"] = (
                env.get("XLA_FLAGS", "")
                + " --xla_force_host_platform_device_count=2"
            ).strip()
        proc = subprocess.run(
            [sys.executable, str(WORKER), str(directory), str(i), *tasks],
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert proc.returncode == 0, (
            f"{backend} worker {tasks} failed:\n{proc.stderr[-4000:]}"
        )
        for task in tasks:
            results[i, backend, task] = json.loads(
                (directory / f"{i}-{task}.json").read_text()
            )
    return results


def _result(worker_results, backend, task):
    (result,) = [
        r
        for (_, b, t), r in worker_results.items()
        if (b, t) == (backend, task)
    ]
    assert "error" not in result, f"{backend} {task}:\n{result['error']}"
    return result


@pytest.mark.parametrize(
    "backend", [pytest.param(b, marks=_needs(b)) for b in ("jax", "torch")]
)
def test_article_model_trains_as_with_the_builtin(worker_results, backend):
    """One epoch of the article's model on 2,048 bundled images, batch 64, both
    layers from the same initial weights on the same batches.

    The two layers compute the same function, so the runs differ by float32
    rounding only (see LOSS_RTOL).
    """
    result = _result(worker_results, backend, "article")
    assert result["backend"] == backend
    assert not result["tensorflow_imported"], "bnlayers imported TensorFlow"
    ours, builtin = result["bnlayers"], result["builtin"]
    # It learned: a first epoch starts from log(10) = 2.3.
    assert ours["train_loss"] < 1.2 and ours["test_accuracy"] > 0.5
    for key in ("train_loss", "test_loss"):
        ref.assert_close(ours[key], builtin[key], LOSS_RTOL, key, floor=0.0)
    # Within one test image in 2,000 (a float32 difference may tip one).
    assert (
        abs(ours["test_accuracy"] - builtin["test_accuracy"]) <= 0.0005 + 1e-9
    )


@_needs("jax", "torch")
def test_keras_file_moves_between_backends(worker_results):
    """Saved with renorm, ghost batches and an axis list under one backend,
    loaded under another: identical weights, outputs within float32 rounding
    (the backends' convolutions sum in different orders; see EXCHANGE_RTOL)."""
    reports = []
    for (_, backend, task), result in worker_results.items():
        if task == "exchange":
            assert "error" not in result, (
                f"{backend} exchange:\n{result['error']}"
            )
            reports += [(source, backend, r) for source, r in result.items()]
    directions = {(source, target) for source, target, _ in reports}
    assert directions == {
        ("tensorflow", "torch"),
        ("tensorflow", "jax"),
        ("torch", "jax"),
        ("torch", "tensorflow"),
        ("jax", "tensorflow"),
    }
    for source, target, r in reports:
        where = f"saved under {source}, loaded under {target}"
        assert (
            r["layers"][1]
            == r["layers"][3]
            == "bnlayers.batch_normalization.BatchNormalization"
        ), where
        assert r["weights_equal"], where
        ref.check_error(r["infer_rel_err"], EXCHANGE_RTOL, "inference outputs")
        ref.check_error(r["train_rel_err"], EXCHANGE_RTOL, "training outputs")


@_needs("jax")
def test_jax_data_parallel_statistics_are_global(worker_results):
    """keras.distribution.DataParallel over 2 CPU devices: each device holds
    half of every batch (the halves' means are 0 and 10), yet the moving
    statistics and the outputs are those of the whole batch: on JAX the
    mean over a sharded batch axis is a global mean by construction, so
    there is nothing to synchronize (`synchronized=True` changes nothing)."""
    result = _result(worker_results, "jax", "data_parallel")
    assert result["devices"] == 2
    assert result["sharded_call"]["input_shards"] == [[8, 6, 3], [8, 6, 3]]
    expected = result["expected"]
    # The two devices' own means are far apart: per-device statistics would show.
    apart = np.abs(np.subtract(*expected["per_device_means"]))
    assert np.all(apart > 5.0)
    for run in ("bnlayers", "sharded_call", "builtin"):
        for quantity in ("moving_mean", "moving_variance", "outputs"):
            ref.assert_close(
                result[run][quantity],
                expected[quantity],
                DATA_PARALLEL_RTOL,
                f"{quantity} ({run})",
                floor=0.0,
            )
