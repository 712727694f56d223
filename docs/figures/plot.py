"""Draws the charts of the Performance and Accuracy pages from the
benchmarks' own output (the JSON their `--out PREFIX` writes).

    python docs/figures/plot.py          # from the committed docs/figures/*.json

After a new run, pass its files instead (each option takes one or more):

    python examples/benchmark_backends.py --all --rounds 11 --out /tmp/backends
    KERAS_BACKEND=jax python examples/benchmark_models.py --rounds 5 --out /tmp/models-jax
    KERAS_BACKEND=torch python examples/accuracy.py --out /tmp/accuracy-torch
    python docs/figures/plot.py --backends /tmp/backends.json \\
        --models /tmp/models-*.json --accuracy /tmp/accuracy-*.json

and copy them over docs/figures/backends.json, models.json, accuracy.json
(as `{"reports": [...]}`) so that the pages' tables and charts stay one run.
Writes docs/figures/{backends,models,accuracy}.svg, or into `--out DIR`
(tall and narrow, so that they stay legible on a phone's width; the same
data gives the same files). tests/test_docs_figures.py checks that the
committed data is what the pages' tables print.
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE  # where the charts go
BACKENDS = ("tensorflow", "jax", "torch")
LABEL = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}
# Inches: narrow enough that a phone shows the chart at about three
# quarters of its size, with the fonts still legible.
WIDTH = 5.0
COLOR = {"tensorflow": "#e37400", "jax": "#1a73e8", "torch": "#c5221f"}

plt.rcParams.update(
    {
        "font.size": 12,
        "svg.fonttype": "none",  # text stays text: the browser's font, searchable
        "svg.hashsalt": "bnlayers",  # the same input gives the same file
        "axes.spines.top": False,
        "axes.spines.right": False,
    }
)


def reports(paths):
    """The per-backend reports in `paths`: files holding one report (as
    benchmark_models.py and accuracy.py write), a list of them (as
    benchmark_backends.py writes) or `{"reports": [...]}` (the committed
    files), by backend."""
    found = {}
    for path in paths:
        data = json.loads(pathlib.Path(path).read_text())
        if isinstance(data, dict):
            data = data.get("reports", [data])
        for report in data:
            found[report["backend"]] = report
    return [found[b] for b in BACKENDS if b in found]


def _save(fig, name):
    path = OUT / f"{name}.svg"
    fig.savefig(
        path, format="svg", bbox_inches="tight", metadata={"Date": None}
    )
    plt.close(fig)
    print(f"wrote {path}")


def _ratio_axis(ax, title):
    ax.axvline(1.0, color="#444", linewidth=1, linestyle=":")
    ax.set_title(title, loc="left", fontsize=13, fontweight="bold")
    ax.set_xlabel("time, bnlayers / built-in\n(below 1: bnlayers is faster)")
    ax.grid(axis="x", color="#ddd")
    ax.set_axisbelow(True)


def backends_chart(found):
    """One panel per backend: the ratio of each step (bars)."""
    fig, axes = plt.subplots(
        len(found), 1, figsize=(WIDTH, 5.6 * len(found)), squeeze=False
    )
    top = max(row["ratio"] for r in found for row in r["rows"])
    for ax, report in zip(axes[:, 0], found, strict=True):
        rows = report["rows"][::-1]
        labels = [
            f"{row['what']}\n{'x'.join(map(str, row['shape']))}" for row in rows
        ]
        ratios = [row["ratio"] for row in rows]
        ax.barh(labels, ratios, color=COLOR[report["backend"]])
        ax.tick_params(axis="y", labelsize=10)
        for y, ratio in enumerate(ratios):
            ax.text(ratio + 0.01, y, f"{ratio:.2f}", va="center", fontsize=11)
        ax.set_xlim(0, max(1.2, top + 0.15))
        _ratio_axis(
            ax, f"{LABEL[report['backend']]} ({report['rounds']} rounds)"
        )
    fig.tight_layout()
    _save(fig, "backends")


def models_chart(found):
    """One group per model and step, one bar per backend."""
    keys = [(row["model"], row["step"]) for row in found[0]["rows"]]
    fig, ax = plt.subplots(figsize=(WIDTH, 1.0 + 1.0 * len(keys)))
    height = 0.8 / len(found)
    top = 0.0
    for k, report in enumerate(found):
        by_key = {
            (row["model"], row["step"]): row["ratio"] for row in report["rows"]
        }
        ys = [
            len(keys) - 1 - i + (len(found) / 2 - k - 0.5) * height
            for i in range(len(keys))
        ]
        ratios = [by_key.get(key, float("nan")) for key in keys]
        top = max(top, *ratios)
        ax.barh(
            ys,
            ratios,
            height=height,
            color=COLOR[report["backend"]],
            label=LABEL[report["backend"]],
        )
        for y, ratio in zip(ys, ratios, strict=True):
            ax.text(ratio + 0.01, y, f"{ratio:.2f}", va="center", fontsize=10)
    ax.set_yticks(
        range(len(keys)), [f"{m}\n{s}" for m, s in keys][::-1], fontsize=11
    )
    ax.set_xlim(0, max(1.3, top + 0.15))
    _ratio_axis(ax, "keras.applications models, 64x64, batch 16")
    ax.legend(
        loc="lower center",
        bbox_to_anchor=(0.45, 1.04),
        ncol=len(found),
        fontsize=10,
        frameon=False,
    )
    ax.set_title(
        ax.get_title(), loc="left", pad=34, fontsize=14, fontweight="bold"
    )
    fig.tight_layout()
    _save(fig, "models")


def accuracy_chart(found):
    """Error against the mean offset, one panel per quantity and shape:
    the built-in (dashed) and bnlayers (solid) on each backend."""
    quantities = (
        ("output", "output error (absolute)"),
        ("variance", "moving variance (relative)"),
        ("gradients", "gradients (relative)"),
    )
    shapes = sorted(
        {tuple(row["shape"]) for row in found[0]["rows"]}, key=len, reverse=True
    )
    fig, axes = plt.subplots(
        len(quantities) * len(shapes),
        1,
        figsize=(WIDTH, 3.2 * len(quantities) * len(shapes)),
        squeeze=False,
    )
    panels = [(q, s) for s in shapes for q in quantities]
    for ax, ((quantity, title), shape) in zip(axes[:, 0], panels, strict=True):
        for report in found:
            rows = [
                row
                for row in report["rows"]
                if tuple(row["shape"]) == shape and row["policy"] == "float32"
            ]
            offsets = [max(row["offset"], 1.0) for row in rows]
            for layer, style in (("built-in", "--"), ("bnlayers", "-")):
                values = [row[layer][quantity] for row in rows]
                ax.plot(
                    offsets,
                    [float("nan") if v is None else v for v in values],
                    style,
                    marker="o",
                    color=COLOR[report["backend"]],
                    label=f"{layer}, {LABEL[report['backend']]}",
                )
                # A NaN is no point on the chart: say so at the top edge.
                for offset, value in zip(offsets, values, strict=True):
                    if value is None:
                        ax.annotate(
                            "NaN",
                            xy=(offset, 0.97),
                            xycoords=("data", "axes fraction"),
                            color=COLOR[report["backend"]],
                            ha="right" if offset > 1e5 else "center",
                            va="top",
                            fontsize=10,
                        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([1, 1e2, 1e4, 1e6], ["0", "1e2", "1e4", "1e6"])
        ax.set_xlabel("mean of the data (offset)")
        ax.set_title(
            f"{title}\nshape {'x'.join(map(str, shape))}",
            loc="left",
            fontsize=12,
            fontweight="bold",
        )
        ax.grid(color="#ddd")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=2,
        fontsize=10,
        frameon=False,
        bbox_to_anchor=(0.5, 1.0),
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.9 / fig.get_figheight()))
    _save(fig, "accuracy")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backends", nargs="+", default=[HERE / "backends.json"]
    )
    parser.add_argument("--models", nargs="+", default=[HERE / "models.json"])
    parser.add_argument(
        "--accuracy", nargs="+", default=[HERE / "accuracy.json"]
    )
    parser.add_argument("--out", type=pathlib.Path, default=HERE)
    args = parser.parse_args(argv)
    global OUT
    OUT = args.out
    backends_chart(reports(args.backends))
    models_chart(reports(args.models))
    accuracy_chart(reports(args.accuracy))


if __name__ == "__main__":
    main()
