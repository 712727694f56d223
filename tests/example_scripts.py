"""The scripts under examples/, imported as modules the way they import
each other (from their own folder): `example_module("benchmark")`."""

import importlib
import pathlib
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def example_module(name):
    """examples/<name>.py, imported as a module."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def forms_model_quick_run(tmp_path):
    """`benchmark_forms.py --model MobileNetV3Small --quick --out ...` on this
    backend, with the checks that hold on every backend it runs on: the
    report written is the one returned; the census of the model (34 BN
    layers, 23 merged with their activation, what fuse_activations gives);
    one row, the model's smallest layer at 32x32, batch 2; totals that are
    the row times its count; the weighted row in the markdown. Returns the
    report as saved."""
    import json

    import pytest

    forms = example_module("benchmark_forms")
    out = tmp_path / "model"
    report = forms.main(
        ["--model", "MobileNetV3Small", "--quick", "--out", str(out)]
    )
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (saved["bn_layers"], saved["with_activation"]) == (34, 23)
    (row,) = saved["rows"]
    assert (row["shape"], row["activation"], row["count"]) == (
        [2, 1, 1, 96],
        None,
        3,
    )
    for name, total in saved["total_ms"].items():
        assert total == pytest.approx(3 * row["net_ms"][name], rel=1e-12)
        assert saved["total_ratio"][name] == pytest.approx(
            total / saved["total_ms"]["built-in"], rel=1e-12
        )
    saved["markdown"] = out.with_suffix(".md").read_text()
    assert "| 3 | all, weighted |" in saved["markdown"]
    return saved
