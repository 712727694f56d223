"""Speed of real architectures with bnlayers against the built-in BatchNormalization.

The keras.applications models ResNet50, DenseNet121, MobileNetV3Small and
EfficientNetB0 (`weights=None`, 64x64 inputs, batch 16, 10 classes), built
once with the built-in layer and once swapped to bnlayers with
`bnlayers.swap_batchnorm`, same weights, both compiled with adam and sparse
categorical cross-entropy. For each: the *train step* (`train_on_batch`)
and the *predict step* (`predict_on_batch`), on the current Keras backend
(KERAS_BACKEND), as Keras runs them (compiled by default on TensorFlow and
JAX, eager on PyTorch).

Both models of a pair run in one process, in interleaved rounds (each round
times both, in alternating order, after a warm-up that traces and compiles);
a figure is the median over the rounds, and a ratio (bnlayers / built-in:
below 1 is faster) is the median of the per-round ratios, so a load change
on a shared machine hits both sides alike. The ratio of this process's CPU
time is given too, as a check on the wall-time ratio on a shared machine.

Run from the repository root:

    python examples/benchmark_models.py                      # four models, 15 rounds
    KERAS_BACKEND=jax python examples/benchmark_models.py --out /tmp/models-jax
    python examples/benchmark_models.py --quick              # a smoke test: seconds to a minute

`--out PREFIX` writes PREFIX.md and PREFIX.json. `--fit` adds an epoch
of `fit` on two and a half batches: as in most data sets the last batch is
smaller, and Keras then traces the training step for a batch size it
leaves unknown, which every step of every epoch runs. `--fuse-activations`
adds a third contender: the bnlayers model with each BN layer and the
activation layer after it merged into one layer
(`bnlayers.fuse_activations`), its ratio against the built-in in a column
of its own. `--floor` adds the model with its BN layers (and, with
`--fuse-activations`, the activations merged into them) replaced by
identities: the step a batch normalization that cost nothing would give,
the floor for any BN layer's ratio.
"""

import argparse
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The shared module beside this file, also when this file is loaded by path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from _common import interleaved  # noqa: E402
from _common import load_average  # noqa: E402
from _common import machine_line  # noqa: E402
from _common import median_ratio  # noqa: E402
from _common import publish  # noqa: E402

MODELS = ("ResNet50", "DenseNet121", "MobileNetV3Small", "EfficientNetB0")
QUICK = {"models": ("MobileNetV3Small",), "size": 32, "batch": 2, "rounds": 1}


def without_batchnorm(model):
    """`model` with every BN layer (a fused activation with it) replaced by
    an identity: what a step costs if BN cost nothing."""
    import keras

    import bnlayers

    class Skipped(keras.layers.Layer):
        """An identity that takes the call arguments a BN node was given."""

        def call(self, inputs, training=None, mask=None):
            return inputs

        def compute_output_shape(self, input_shape):
            return input_shape

    def clone(layer):
        if isinstance(
            layer,
            (keras.layers.BatchNormalization, bnlayers.BatchNormalization),
        ):
            return Skipped(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone)


def application(name, size):
    """The keras.applications model `name` at `size`x`size`, no weights
    loaded, 10 classes, as the benchmarks time it."""
    import keras

    return getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classes=10
    )


def model_pair(name, size, seed=0, fuse=False, floor=False):
    """{"bnlayers": model, "built-in": model}: the same weights, all compiled
    (and "fused": BN layers with their activations, where `fuse`; "floor":
    the bnlayers model, fused where `fuse`, without its BN layers, where
    `floor`)."""
    import keras

    import bnlayers

    keras.utils.set_random_seed(seed)
    builtin = application(name, size)
    pair = {
        "bnlayers": bnlayers.swap_batchnorm(builtin, to="bnlayers"),
        "built-in": builtin,
    }
    if fuse:
        pair["fused"] = bnlayers.fuse_activations(pair["bnlayers"])
    if floor:
        pair["floor"] = without_batchnorm(pair["fused" if fuse else "bnlayers"])
    for model in pair.values():
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return pair


def bench(
    name, size, batch, rounds, seed=0, fuse=False, floor=False, fit=False
):
    """Rows of figures for one architecture: its train step and its predict
    step (and, with `fit`, an epoch of `fit`)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 255.0, (batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, batch)
    pair = model_pair(name, size, seed, fuse, floor)
    steps = {
        "train_on_batch": {
            k: (lambda m=m: m.train_on_batch(x, y)) for k, m in pair.items()
        },
        "predict_on_batch": {
            k: (lambda m=m: m.predict_on_batch(x)) for k, m in pair.items()
        },
    }
    if fit:
        # Two and a half batches: the last one smaller, as in most data sets,
        # so that Keras traces the step for a batch size it leaves unknown
        # (the warm-up epochs trace and compile it).
        n = 2 * batch + max(batch // 2, 1)
        xs = rng.uniform(0.0, 255.0, (n, size, size, 3)).astype("float32")
        ys = rng.integers(0, 10, n)
        steps["fit (epoch)"] = {
            k: (
                lambda m=m: m.fit(
                    xs, ys, batch_size=batch, epochs=1, verbose=0, shuffle=False
                )
            )
            for k, m in pair.items()
        }
    rows = []
    for step, contenders in steps.items():
        wall, cpu = interleaved(contenders, rounds)
        fused = {}
        if fuse:
            fused = {
                "fused_ms": 1e3 * statistics.median(wall["fused"]),
                "ratio_fused": median_ratio(wall["fused"], wall["built-in"]),
                "ratio_fused_cpu": median_ratio(cpu["fused"], cpu["built-in"]),
            }
        if floor:
            fused |= {
                "floor_ms": 1e3 * statistics.median(wall["floor"]),
                "ratio_floor": median_ratio(wall["floor"], wall["built-in"]),
            }
        rows.append(
            fused
            | {
                "model": name,
                "step": step,
                "input": [batch, size, size, 3],
                "bnlayers_ms": 1e3 * statistics.median(wall["bnlayers"]),
                "builtin_ms": 1e3 * statistics.median(wall["built-in"]),
                "ratio": median_ratio(wall["bnlayers"], wall["built-in"]),
                "ratio_cpu": median_ratio(cpu["bnlayers"], cpu["built-in"]),
            }
        )
    return rows


def markdown(report):
    lines = [
        f"{report['machine']}; {report['rounds']} interleaved rounds, medians; "
        f"load average {report['load_before']} before, {report['load_after']} after.",
        f"Command: `{report['command']}`",
        "",
        "| model | step | input | built-in (ms) | bnlayers (ms) | ratio | ratio (CPU time) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    fused = any("ratio_fused" in r for r in report["rows"])
    if fused:
        lines[-2] += (
            " fused activations (ms) | ratio, fused | ratio, fused (CPU time) |"
        )
        lines[-1] += "---:|---:|---:|"
    floor = any("ratio_floor" in r for r in report["rows"])
    if floor:
        lines[-2] += " no BN (ms) | ratio, no BN |"
        lines[-1] += "---:|---:|"
    for r in report["rows"]:
        shape = "x".join(map(str, r["input"]))
        line = (
            f"| {r['model']} | {r['step']} | {shape} | {r['builtin_ms']:.1f} "
            f"| {r['bnlayers_ms']:.1f} | **{r['ratio']:.2f}** | {r['ratio_cpu']:.2f} |"
        )
        if fused:
            line += (
                f" {r['fused_ms']:.1f} | **{r['ratio_fused']:.2f}** "
                f"| {r['ratio_fused_cpu']:.2f} |"
            )
        if floor:
            line += f" {r['floor_ms']:.1f} | {r['ratio_floor']:.2f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        metavar="NAME",
        help=f"architectures to time (default: all of {', '.join(MODELS)})",
    )
    parser.add_argument(
        "--size", type=int, help="input height and width (default 64)"
    )
    parser.add_argument("--batch", type=int, help="batch size (default 16)")
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds (default 15)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="MobileNetV3Small at 32x32, batch 2, 1 round: checks that the script works",
    )
    parser.add_argument(
        "--fuse-activations",
        action="store_true",
        help="also time the bnlayers model with BN and activations merged "
        "(bnlayers.fuse_activations)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also time the model without its BN layers (with "
        "--fuse-activations: without BN and the activations merged into it), "
        "the floor a BN layer that cost nothing would reach",
    )
    parser.add_argument(
        "--fit",
        action="store_true",
        help="also time an epoch of fit on two and a half batches (the last "
        "one smaller, so that the step is traced for an unknown batch size)",
    )
    parser.add_argument(
        "--out", metavar="PREFIX", help="write PREFIX.md and PREFIX.json"
    )
    args = parser.parse_args(argv)
    defaults = (
        QUICK
        if args.quick
        else {"models": MODELS, "size": 64, "batch": 16, "rounds": 15}
    )
    models = args.models or defaults["models"]
    size, batch = args.size or defaults["size"], args.batch or defaults["batch"]
    rounds = args.rounds or defaults["rounds"]
    if size < 32 or batch < 1 or rounds < 1:
        parser.error(
            "--size must be >= 32, --batch and --rounds >= 1. "
            f"Received: size={size}, batch={batch}, rounds={rounds}"
        )

    command = [
        "python",
        "examples/benchmark_models.py",
        *(sys.argv[1:] if argv is None else argv),
    ]
    report = {"load_before": load_average(), "rounds": rounds, "rows": []}
    report["command"] = " ".join(command)
    for name in models:
        for row in bench(
            name,
            size,
            batch,
            rounds,
            fuse=args.fuse_activations,
            floor=args.floor,
            fit=args.fit,
        ):
            report["rows"].append(row)
            fused = (
                f"; fused activations {row['fused_ms']:8.1f} ms, ratio "
                f"{row['ratio_fused']:.2f} (CPU time {row['ratio_fused_cpu']:.2f})"
                if "ratio_fused" in row
                else ""
            )
            if "ratio_floor" in row:
                fused += f"; no BN {row['floor_ms']:8.1f} ms, ratio {row['ratio_floor']:.2f}"
            print(
                f"{name:>16} {row['step']:>16}: built-in {row['builtin_ms']:8.1f} ms, "
                f"bnlayers {row['bnlayers_ms']:8.1f} ms, ratio {row['ratio']:.2f} "
                f"(CPU time {row['ratio_cpu']:.2f}){fused}",
                flush=True,
            )
    import keras

    report["backend"] = keras.backend.backend()
    report["load_after"] = load_average()
    report["machine"] = machine_line()
    print()
    publish(markdown(report), report, args.out)
    return report


if __name__ == "__main__":
    main()
