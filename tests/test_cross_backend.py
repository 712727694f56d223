"""bnlayers on every Keras backend, each in its own process.

A Keras process runs one backend, chosen by KERAS_BACKEND before keras is
imported, so each check starts `tests/_backend_worker.py` under the backends
it needs and asserts on what the worker reports:

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

import pytest

WORKER = pathlib.Path(__file__).with_name("_backend_worker.py")
TIMEOUT = 300

pytestmark = [
    pytest.mark.slow,
    pytest.mark.backends("tensorflow", reason="starts its own process per backend: runs once, in the full suite"),
]


def _installed(backend):
    return importlib.util.find_spec(backend) is not None


def _needs(*backends):
    missing = [b for b in backends if not _installed(b)]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")


def _work(backend, *args, **env):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", **env)
    proc = subprocess.run(
        [sys.executable, str(WORKER), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"{backend} worker {args[0]} failed:\n{proc.stderr[-4000:]}"


@pytest.mark.parametrize("backend", [pytest.param(b, marks=_needs(b)) for b in ("jax", "torch")])
def test_article_model_trains_as_with_the_builtin(backend, tmp_path):
    """One epoch of the article's model on 2,048 bundled images, batch 64, both
    layers from the same initial weights on the same batches.

    The two layers compute the same function, so the runs differ by float32
    rounding only: measured, the losses agree to 1e-6 and the test
    accuracies exactly, on both backends (and they equal TensorFlow's run).
    """
    out = tmp_path / "article.json"
    _work(backend, "article", out, 2048)
    result = json.loads(out.read_text())
    assert result["backend"] == backend
    assert not result["tensorflow_imported"], "bnlayers imported TensorFlow"
    ours, builtin = result["bnlayers"], result["builtin"]
    # It learned: a first epoch starts from log(10) = 2.3.
    assert ours["train_loss"] < 1.2 and ours["test_accuracy"] > 0.5
    assert abs(ours["train_loss"] - builtin["train_loss"]) <= 1e-4 * builtin["train_loss"]
    assert abs(ours["test_loss"] - builtin["test_loss"]) <= 1e-4 * builtin["test_loss"]
    # Within one test image in 2,000 (a float32 difference may tip one).
    assert abs(ours["test_accuracy"] - builtin["test_accuracy"]) <= 0.0005 + 1e-9


@_needs("jax", "torch")
def test_keras_file_moves_between_backends(tmp_path):
    """Saved with renorm, ghost batches and an axis list under one backend,
    loaded under another: identical weights, outputs within float32 rounding
    (the backends' convolutions sum in different orders; measured <= 2.5e-6)."""
    # Each worker loads what the earlier ones saved, then saves its own:
    # TensorFlow -> PyTorch, TensorFlow -> JAX, PyTorch -> JAX, and the last
    # run, PyTorch and JAX -> TensorFlow.
    reports = []
    for i, backend in enumerate(("tensorflow", "torch", "jax", "tensorflow")):
        out = tmp_path / f"report{i}.json"
        _work(backend, "exchange", tmp_path, out)
        reports += [(source, backend, r) for source, r in json.loads(out.read_text()).items()]
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
        assert r["layers"][1] == r["layers"][3] == "bnlayers.batch_normalization.BatchNormalization", where
        assert r["weights_equal"], where
        assert r["infer_rel_err"] <= 1e-5, where
        assert r["train_rel_err"] <= 1e-5, where


@_needs("jax")
def test_jax_data_parallel_statistics_are_global(tmp_path):
    """keras.distribution.DataParallel over 2 CPU devices: each device holds
    half of every batch (the halves' means are 0 and 10), yet the moving
    statistics and the outputs are those of the whole batch: on JAX the
    mean over a sharded batch axis is a global mean by construction, so
    there is nothing to synchronize (and `synchronized=True` is refused)."""
    import numpy as np

    out = tmp_path / "data_parallel.json"
    _work("jax", "data_parallel", out, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = json.loads(out.read_text())
    assert result["devices"] == 2
    assert result["sharded_call"]["input_shards"] == [[8, 6, 3], [8, 6, 3]]
    expected = result["expected"]
    # The two devices' own means are far apart: per-device statistics would show.
    apart = np.abs(np.subtract(*expected["per_device_means"]))
    assert np.all(apart > 5.0)
    for run in ("bnlayers", "sharded_call", "builtin"):
        for quantity in ("moving_mean", "moving_variance", "outputs"):
            actual, want = np.array(result[run][quantity]), np.array(expected[quantity])
            err = np.max(np.abs(actual - want)) / np.max(np.abs(want))
            assert err <= 1e-5, (run, quantity, err)
