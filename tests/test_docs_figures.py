"""The docs' charts and their data: the JSON under docs/figures/ holds the
figures of the tables on the Performance and Accuracy pages, in the format
the scripts write with `--out`, and docs/figures/plot.py draws a chart from
each (from those files, or from a script's own output)."""

import importlib.util
import json
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FIGURES = REPO / "docs" / "figures"

pytest.importorskip("matplotlib")


def _plot():
    spec = importlib.util.spec_from_file_location(
        "docs_figures_plot", FIGURES / "plot.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(page, marker):
    """The cells of the first table after `marker` on a docs page."""
    text = (REPO / "docs" / page).read_text()
    lines = text[text.index(marker) :].splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _numbers(cell):
    return [float(n) for n in re.findall(r"\d+\.\d+(?:e[-+]\d+)?", cell)]


def _reports(name):
    return {
        r["backend"]: r
        for r in json.loads((FIGURES / name).read_text())["reports"]
    }


def test_layer_data_is_the_performance_page_tables():
    reports = _reports("backends.json")
    for backend, marker in (
        ("tensorflow", "**TensorFlow** (11 rounds"),
        ("jax", "**JAX** (11 rounds)"),
        ("torch", "**PyTorch** (11 rounds)"),
    ):
        table = _table_rows("performance.md", marker)
        rows = reports[backend]["rows"]
        assert [r["what"] for r in rows] == [cells[0] for cells in table]
        for row, cells in zip(rows, table, strict=True):
            assert _numbers(cells[2]) == [row["ratio"]], cells
            assert _numbers(cells[3]) == [row["ratio_cpu"]], cells


def test_model_data_is_the_performance_page_table():
    reports = _reports("models.json")
    table = _table_rows("performance.md", "| model | step | TensorFlow |")
    for k, backend in enumerate(("tensorflow", "jax", "torch")):
        rows = reports[backend]["rows"]
        assert len(rows) == len(table)
        for row, cells in zip(rows, table, strict=True):
            assert (row["model"], f"`{row['step']}`") == tuple(cells[:2])
            assert _numbers(cells[2 + k]) == [row["ratio"], row["ratio_cpu"]]


def test_accuracy_data_is_the_accuracy_page_table():
    reports = _reports("accuracy.json")
    table = _table_rows("accuracy.md", "| mean offset | shape |")
    for k, backend in enumerate(("tensorflow", "jax", "torch")):
        rows = reports[backend]["rows"]
        assert len(rows) == len(table)
        for row, cells in zip(rows, table, strict=True):
            for layer, cell in (
                ("built-in", cells[2 + 2 * k]),
                ("bnlayers", cells[3 + 2 * k]),
            ):
                published = [
                    None if v.strip() == "nan" else float(v)
                    for v in cell.split("/")
                ]
                figures = row[layer]
                assert published == [
                    figures["output"],
                    figures["variance"],
                    figures["gradients"],
                ], (backend, row["offset"], layer)


def test_plot_draws_each_chart_from_the_data(tmp_path):
    plot = _plot()
    plot.main(["--out", str(tmp_path)])
    backends = (tmp_path / "backends.svg").read_text()
    models = (tmp_path / "models.svg").read_text()
    accuracy = (tmp_path / "accuracy.svg").read_text()
    # Text stays text (svg.fonttype none): each bar's label is in the file.
    assert "resnet: training step" in backends and "0.42" in backends
    assert "DenseNet121" in models and "0.85" in models
    assert "shape 16x5x5x4" in accuracy and "NaN" in accuracy


def test_plot_reads_what_the_scripts_write(tmp_path):
    """One report (benchmark_models.py, accuracy.py) or a list of them
    (benchmark_backends.py), as `--out` writes them."""
    plot = _plot()
    models = _reports("models.json")
    single = tmp_path / "models-jax.json"
    single.write_text(json.dumps(models["jax"]))
    listed = tmp_path / "backends.json"
    listed.write_text(json.dumps(list(_reports("backends.json").values())[:2]))
    assert [r["backend"] for r in plot.reports([single])] == ["jax"]
    assert [r["backend"] for r in plot.reports([listed])] == [
        "tensorflow",
        "jax",
    ]
