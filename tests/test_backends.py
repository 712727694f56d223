"""What differs by Keras backend, checked under the backend the suite runs on.

The comparison tests (test_parity, test_math, test_validation,
test_serialization, test_ghost, test_axis_list) run unchanged under each
backend; here are the backend-specific promises: `synchronized=True` on one
replica is `synchronized=False`; where bnlayers has no fused fast path (a Keras backend
other than the three, simulated here) the automatic choice is the
reference path and `fused=True` is refused.
"""

import json

import numpy as np
import pytest

import bnlayers
from backend_ops import BACKEND
from backend_ops import to_numpy
from backend_ops import value_and_grads
from example_scripts import example_module
from example_scripts import forms_model_quick_run


@pytest.fixture
def no_fast_path(monkeypatch):
    """As on a Keras backend bnlayers has no fast path for (NumPy, OpenVINO)."""
    from bnlayers import _fused

    monkeypatch.setattr(_fused, "fast_backend", lambda: None)


def _data(shape=(8, 5, 3), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(2.0, 3.0, shape).astype("float32"), rng.standard_normal(
        shape
    ).astype("float32")


def test_synchronized_outside_replicas_is_exactly_unsynchronized():
    """No strategy, no process group, no distribution: one replica, so the
    same numbers as synchronized=False (on every backend)."""
    x, dy = _data()
    results = []
    for synchronized in (True, False):
        layer = bnlayers.BatchNormalization(synchronized=synchronized)
        y = layer(x, training=True)
        results.append(
            [to_numpy(y)] + [np.asarray(w) for w in layer.get_weights()]
        )
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.usefixtures("no_fast_path")
def test_fused_true_is_refused_with_the_reason():
    x, _ = _data()
    layer = bnlayers.BatchNormalization(fused=True)
    with pytest.raises(
        ValueError, match=rf"`fused=True`.*the Keras backend is '{BACKEND}'"
    ):
        layer(x, training=True)


@pytest.mark.usefixtures("no_fast_path")
@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
def test_automatic_choice_is_the_reference_path(renorm):
    """fused=None and fused=False: the same outputs, gradients and moving
    statistics bit for bit."""
    x, dy = _data()
    results = []
    for fused in (None, False):
        layer = bnlayers.BatchNormalization(
            momentum=0.5, renorm=renorm, fused=fused
        )
        layer.build(x.shape)
        steps = []
        for _ in range(2):
            y, grads = value_and_grads(
                lambda t, layer=layer: layer(t, training=True),
                [x],
                dy,
                [layer.gamma, layer.beta],
                [layer],
            )
            steps += [to_numpy(y)] + [to_numpy(g) for g in grads]
        steps += layer.get_weights() + [to_numpy(layer(x, training=False))]
        results.append(steps)
    for a, b in zip(*results, strict=False):
        np.testing.assert_array_equal(a, b)


def test_benchmark_runs_on_this_backend():
    """examples/benchmark_backends.py, one round on tiny shapes: every row
    timed for both layers (the figures themselves are the benchmark's)."""
    benchmark = example_module("benchmark_backends")
    report = benchmark.run(rounds=1, quick=True)
    assert report["backend"] == BACKEND
    assert [row["what"] for row in report["rows"]] == [
        "tiny: training step",
        "tiny: inference step",
        "article model: train_on_batch",
        "article model: predict_on_batch",
    ]
    for row in report["rows"]:
        assert (
            row["bnlayers_ms"] > 0
            and row["builtin_ms"] > 0
            and row["ratio"] > 0
        )
    for row in report["rows"][:2]:
        assert set(row["passes"]) == {"bnlayers", "built-in"}
        assert all(p > 0 for p in row["passes"].values())
    assert [row["floor_passes"] for row in report["rows"][:2]] == [2.5, 1.0]
    assert f"**{BACKEND}**" in benchmark.markdown([report])


@pytest.mark.backends(
    "torch",
    reason="the script is the same Keras code on every backend; PyTorch runs "
    "its model steps eagerly, in seconds where TensorFlow traces for a minute",
)
def test_model_benchmark_quick_run(tmp_path):
    """examples/benchmark_models.py --quick runs and reports both steps of
    its model and an epoch of fit, with fused activations and the floor
    without BN (the figures themselves are the benchmark's); the floor's
    model holds no BN layer."""
    import math

    import keras

    out = tmp_path / "models"
    module = example_module("benchmark_models")
    report = module.main(
        ["--quick", "--fuse-activations", "--floor", "--fit", "--out", str(out)]
    )
    assert [(r["model"], r["step"]) for r in report["rows"]] == [
        ("MobileNetV3Small", "train_on_batch"),
        ("MobileNetV3Small", "predict_on_batch"),
        ("MobileNetV3Small", "fit (epoch)"),
    ]
    for row in report["rows"]:
        assert row["input"] == [2, 32, 32, 3]
        assert row["bnlayers_ms"] > 0 and row["builtin_ms"] > 0
        assert math.isfinite(row["ratio"]) and math.isfinite(row["ratio_cpu"])
        assert math.isfinite(row["ratio_fused"]) and row["floor_ms"] > 0
    pair = module.model_pair("MobileNetV3Small", 32, fuse=True, floor=True)
    kinds = {
        name: sum(
            isinstance(layer, keras.layers.BatchNormalization)
            or type(layer).__name__ == "BatchNormalization"
            for layer in model._flatten_layers()
        )
        for name, model in pair.items()
    }
    assert kinds == {"built-in": 34, "bnlayers": 34, "fused": 34, "floor": 0}
    text = out.with_suffix(".md").read_text()
    assert "| MobileNetV3Small | train_on_batch | 2x32x32x3 |" in text
    # The JSON names its backend, which docs/figures/plot.py charts by.
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["backend"] == BACKEND
    assert "benchmark_models.py --quick" in text


@pytest.mark.backends(
    "torch", reason="`--model` on PyTorch: one form, the fast path"
)
def test_forms_benchmark_model_quick_run(tmp_path):
    """examples/benchmark_forms.py --model on PyTorch: the BN layers of a real
    model (activations merged), bnlayers' step against the built-in layer
    and activation, net of the step itself, weighted by the layer count."""
    saved = forms_model_quick_run(tmp_path)
    assert (saved["forms"], saved["onednn"]) == ([], None)
    assert saved["command"].startswith(
        "KERAS_BACKEND=torch python examples/benchmark_forms.py --model"
    )
    net = saved["rows"][0]["net_ms"]
    assert set(net) == {"built-in", "default", "best"}
    assert net["best"] == net["default"]
    assert "oneDNN" not in saved["markdown"]


@pytest.mark.backends("jax", reason="what the forms benchmark refuses on JAX")
def test_forms_benchmark_refuses_jax():
    forms = example_module("benchmark_forms")
    with pytest.raises(SystemExit, match="KERAS_BACKEND='jax'"):
        forms.main(["--model", "MobileNetV3Small", "--quick"])
    with pytest.raises(SystemExit, match="The forms are TensorFlow's"):
        forms.main(["--quick"])
