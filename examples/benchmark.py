"""Speed of bnlayers.BatchNormalization against keras.layers.BatchNormalization.

Everything runs in one process, both implementations side by side, in
interleaved rounds (each round times every contender once, in a rotating
order); the figures are medians over the rounds, and each ratio is the
median of the per-round ratios, so a load change on a shared machine hits
both sides of a ratio alike.

1. The layer alone, for a few input shapes:
   - training step: forward pass with batch statistics, backward pass (the
     gradients with respect to the inputs, gamma and beta for a given
     upstream gradient) and the moving-average update, in one tf.function;
   - inference step: forward pass with the moving statistics, in a
     tf.function.
   Each time is also given in *elementwise passes*: the time divided by
   that of a tf.function computing `x * 2` on the same tensor (one read and
   one write of it), so the distance to the memory-traffic limit shows.
   The `bnlayers` column is the automatic choice (`fused=None`); the
   reference keras.ops path (`fused=False`) is timed too.
2. The article's model (Conv2D 32 -> BatchNormalization -> MaxPooling ->
   Flatten -> Dense 10, adam, batch 64) on the bundled MNIST subset:
   seconds per epoch of `fit` with each layer, after a warm-up epoch,
   epochs interleaved.

Run from the repository root:

    python examples/benchmark.py --out bench           # everything, about 3 minutes on 2 cores
    python examples/benchmark.py --only layer --rounds 31
    python examples/benchmark.py --quick --out /tmp/bench   # seconds; a smoke test

It prints a table and, with `--out PREFIX`, writes PREFIX.md and
PREFIX.json. Timings measure the machine as it is: on a shared machine
compare ratios, not absolute times.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import dataclasses
import platform
import statistics
import sys

import numpy as np

# The shared module beside this file, also when this file is loaded by path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import article_model  # noqa: E402
from _common import cpu_name  # noqa: E402
from _common import interleaved  # noqa: E402
from _common import load_average  # noqa: E402
from _common import load_bundled  # noqa: E402
from _common import median_ratio  # noqa: E402
from _common import publish  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    shape: tuple
    axis: int
    what: str


CASES = (
    Case("article", (64, 26, 26, 32), -1, "the article's model's BN input"),
    Case("resnet", (32, 56, 56, 64), -1, "a ResNet stage"),
    Case("dense", (256, 128), -1, "after a Dense layer"),
    Case(
        "channels_first", (32, 64, 28, 28), 1, "after a channels_first Conv2D"
    ),
    Case("conv3d", (8, 16, 16, 16, 32), -1, "after a Conv3D (rank 5)"),
)
QUICK_CASES = (Case("tiny", (8, 6, 6, 4), -1, "smoke test"),)

# Goals of the fast path, checked against the figures.
GOALS = (
    (
        "training step <= 0.45x the built-in at the article's shape",
        "article",
        "train",
        0.45,
    ),
    (
        "training step <= 0.45x the built-in at the ResNet-stage shape",
        "resnet",
        "train",
        0.45,
    ),
    (
        "inference step <= 0.45x the built-in at the article's shape",
        "article",
        "infer",
        0.45,
    ),
    (
        "inference step <= 0.45x the built-in at the ResNet-stage shape",
        "resnet",
        "infer",
        0.45,
    ),
)
MAX_PASSES_ARTICLE = 5.0
MODEL_GOAL = 0.85


def machine():
    import keras
    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# ------------------------------------------------------------------ layer


def layer_steps(layer, shape, seed):
    """(train, infer) callables for `layer` on fixed random data."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(0.5, 2.0, shape).astype("float32"))
    dy = tf.constant(rng.normal(size=shape).astype("float32"))
    layer.build(shape)
    params = [v.value for v in layer.trainable_weights]

    @tf.function
    def train(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, [x] + params, output_gradients=dy)

    @tf.function
    def infer(x):
        return layer(x, training=False)

    return (lambda: train(x, dy)), (lambda: infer(x)), x


def bench_layer(case, rounds):
    import keras
    import tensorflow as tf

    import bnlayers
    from bnlayers import _fused

    layers = {
        "keras": keras.layers.BatchNormalization(axis=case.axis),
        "bnlayers": bnlayers.BatchNormalization(axis=case.axis),
        "bnlayers_reference": bnlayers.BatchNormalization(
            axis=case.axis, fused=False
        ),
    }
    contenders = {}
    x = None
    for name, layer in layers.items():
        train, infer, x = layer_steps(layer, case.shape, seed=0)
        contenders[f"{name}/train"] = train
        contenders[f"{name}/infer"] = infer
    double = tf.function(lambda t: t * 2.0)
    contenders["pass"] = lambda: double(x)
    reason = bnlayers.fused_eligibility(layers["bnlayers"], x)

    def path(step):
        # In a tf.function: plain ops, the kernel or compiled calls.
        return _fused.describe(layers["bnlayers"], x, inference=step == "infer")

    times, cpu = interleaved(contenders, rounds)
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for step in ("train", "infer"):
        rows.append(
            {
                "case": case.name,
                "what": case.what,
                "shape": list(case.shape),
                "axis": case.axis,
                "step": step,
                "bnlayers_path": path(step),
                "bnlayers_path_reason": reason,
                "ms": {
                    "keras": median[f"keras/{step}"] * 1e3,
                    "bnlayers": median[f"bnlayers/{step}"] * 1e3,
                    "bnlayers_reference": median[f"bnlayers_reference/{step}"]
                    * 1e3,
                    "pass": median["pass"] * 1e3,
                },
                "ratio": median_ratio(
                    times[f"bnlayers/{step}"], times[f"keras/{step}"]
                ),
                # This process's CPU time hardly depends on what else runs
                # on the machine: a check on the wall-time ratio.
                "ratio_cpu": median_ratio(
                    cpu[f"bnlayers/{step}"], cpu[f"keras/{step}"]
                ),
                "ratio_reference": median_ratio(
                    times[f"bnlayers_reference/{step}"], times[f"keras/{step}"]
                ),
                "passes": {
                    name: median_ratio(times[f"{name}/{step}"], times["pass"])
                    for name in ("keras", "bnlayers", "bnlayers_reference")
                },
                "rounds": rounds,
            }
        )
    return rows


# ------------------------------------------------------------------ model


def bench_model(epochs, train_size):
    """Seconds per epoch of fit, each layer, epochs interleaved after a warm-up."""
    import keras
    import tensorflow as tf

    import bnlayers
    from bnlayers import _fused

    x, y, _, _ = load_bundled()
    x, y = x[:train_size], y[:train_size]
    keras.utils.set_random_seed(0)
    models = {"keras": article_model(keras.layers.BatchNormalization())}
    models["bnlayers"] = article_model(bnlayers.BatchNormalization())
    models["bnlayers"].set_weights(models["keras"].get_weights())
    for model in models.values():
        model.compile(
            optimizer="adam",
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    # One epoch of fit per call, so no blocks of calls; one warm-up epoch
    # (tracing, first calls).
    epoch = {
        name: (lambda m=model: m.fit(x, y, epochs=1, batch_size=64, verbose=0))
        for name, model in models.items()
    }
    seconds, cpu = interleaved(epoch, epochs, min_block=0, warmup=1)
    bn = models["bnlayers"].layers[1]
    spec = tf.TensorSpec((64, 26, 26, 32))
    return {
        "train_images": int(len(x)),
        "batch_size": 64,
        "steps_per_epoch": int(-(-len(x) // 64)),
        "epochs_timed": epochs,
        "bnlayers_path": _fused.describe(bn, spec, inference=False),
        "seconds_per_epoch": {
            name: statistics.median(t) for name, t in seconds.items()
        },
        "ratio": median_ratio(seconds["bnlayers"], seconds["keras"]),
        "ratio_cpu": median_ratio(cpu["bnlayers"], cpu["keras"]),
    }


# ---------------------------------------------------------------- report


def goals(layer_rows, model):
    by = {(r["case"], r["step"]): r for r in layer_rows}
    results = []
    for text, case, step, limit in GOALS:
        row = by.get((case, step))
        if row is not None:
            results.append(
                {
                    "goal": text,
                    "figure": f"{row['ratio']:.2f}x",
                    "met": row["ratio"] <= limit,
                }
            )
    if layer_rows:
        worst = max(layer_rows, key=lambda r: r["ratio"])
        results.append(
            {
                "goal": "no shape slower than the built-in (training and inference)",
                "figure": f"slowest {worst['ratio']:.2f}x ({worst['case']}, {worst['step']})",
                "met": worst["ratio"] <= 1.0,
            }
        )
    row = by.get(("article", "train"))
    if row is not None:
        passes = row["passes"]["bnlayers"]
        results.append(
            {
                "goal": f"training step within {MAX_PASSES_ARTICLE:g} elementwise "
                "passes at the article's shape",
                "figure": f"{passes:.1f} passes",
                "met": passes <= MAX_PASSES_ARTICLE,
            }
        )
    if model is not None and model.get("train_images", 0) >= 8000:
        results.append(
            {
                "goal": f"article model seconds per epoch <= {MODEL_GOAL}x the built-in's",
                "figure": f"{model['ratio']:.2f}x",
                "met": model["ratio"] <= MODEL_GOAL,
            }
        )
    return results


def markdown(report):
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cpu_count']} CPU cores"
        + (f", GPUs {', '.join(m['gpus'])}" if m["gpus"] else ", no GPU")
        + f"; TensorFlow {m['tensorflow']}, Keras {m['keras']}, Python {m['python']}.",
        f"Load average before / after: {report['load_before']} / {report['load_after']}.",
        "",
    ]
    if report["layer"]:
        rounds = report["layer"][0]["rounds"]
        lines += [
            f"The layer alone (float32, {rounds} interleaved rounds, medians; "
            "passes = time / time of `x * 2` on the same tensor):",
            "",
            "| shape | axis | step | built-in ms | bnlayers ms | ratio | ratio (CPU time) "
            "| built-in passes | bnlayers passes | bnlayers path | reference path ms (ratio) |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        for r in report["layer"]:
            shape = "(" + ", ".join(map(str, r["shape"])) + ")"
            lines.append(
                f"| {shape} {r['case']} | {r['axis']} | {r['step']} | {r['ms']['keras']:.2f} "
                f"| {r['ms']['bnlayers']:.2f} | **{r['ratio']:.2f}x** | {r['ratio_cpu']:.2f}x "
                f"| {r['passes']['keras']:.1f} | {r['passes']['bnlayers']:.1f} "
                f"| {r['bnlayers_path']} | {r['ms']['bnlayers_reference']:.2f} "
                f"({r['ratio_reference']:.2f}x) |"
            )
        lines.append("")
    model = report["model"]
    if model is not None:
        s = model["seconds_per_epoch"]
        lines += [
            f"The article's model, `fit` on {model['train_images']} images "
            f"({model['steps_per_epoch']} steps of {model['batch_size']}), "
            f"{model['epochs_timed']} interleaved epochs after a warm-up epoch, medians:",
            "",
            "| layer | seconds / epoch | ratio | ratio (CPU time) |",
            "|---|---:|---:|---:|",
            f"| keras.layers.BatchNormalization | {s['keras']:.2f} | 1.00x | 1.00x |",
            f"| bnlayers.BatchNormalization ({model['bnlayers_path']}) | {s['bnlayers']:.2f} "
            f"| **{model['ratio']:.2f}x** | {model['ratio_cpu']:.2f}x |",
            "",
        ]
    if report["goals"]:
        lines += ["| goal | figure | met |", "|---|---|---|"]
        for g in report["goals"]:
            lines.append(
                f"| {g['goal']} | {g['figure']} | {'yes' if g['met'] else 'no'} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", choices=["layer", "model"], help="run one part only"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny shape and a small model run: checks that the script works, in seconds",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="interleaved rounds per shape (default 21; --quick 3)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        help="timed epochs per model (default 5; --quick 1)",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        metavar="NAME",
        help=f"layer cases to run, among {[c.name for c in CASES + QUICK_CASES]}",
    )
    parser.add_argument("--out", help="write PREFIX.md and PREFIX.json")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 21)
    epochs = args.epochs or (1 if args.quick else 5)
    if rounds < 1 or epochs < 1:
        parser.error(
            f"--rounds and --epochs must be >= 1. Received: rounds={rounds}, epochs={epochs}"
        )
    cases = QUICK_CASES if args.quick else CASES
    if args.cases:
        known = {c.name: c for c in CASES + QUICK_CASES}
        unknown = [n for n in args.cases if n not in known]
        if unknown:
            parser.error(
                f"unknown case(s) {unknown}; the cases are {list(known)}"
            )
        cases = tuple(known[n] for n in args.cases)

    report = {
        "machine": machine(),
        "load_before": load_average(),
        "layer": [],
        "model": None,
    }
    if args.only in (None, "layer"):
        for case in cases:
            rows = bench_layer(case, rounds)
            report["layer"] += rows
            for r in rows:
                print(
                    f"{r['case']:>14} {str(tuple(r['shape'])):>20} axis {r['axis']:>2} "
                    f"{r['step']:>5}: "
                    f"keras {r['ms']['keras']:8.2f} ms ({r['passes']['keras']:4.1f} passes)  "
                    f"bnlayers {r['ms']['bnlayers']:8.2f} ms "
                    f"({r['passes']['bnlayers']:4.1f} passes)  "
                    f"ratio {r['ratio']:.2f}  [reference path {r['ratio_reference']:.2f}]",
                    flush=True,
                )
    if args.only in (None, "model"):
        report["model"] = bench_model(
            epochs, train_size=256 if args.quick else 8000
        )
        s = report["model"]["seconds_per_epoch"]
        print(
            f"article model: keras {s['keras']:.2f} s/epoch, "
            f"bnlayers {s['bnlayers']:.2f} s/epoch, "
            f"ratio {report['model']['ratio']:.2f}",
            flush=True,
        )
    report["load_after"] = load_average()
    # The goals are about the full-size cases; a quick run checks the script only.
    report["goals"] = (
        [] if args.quick else goals(report["layer"], report["model"])
    )
    report["command"] = " ".join(
        ["python", "examples/benchmark.py"]
        + list(sys.argv[1:] if argv is None else argv)
    )
    print()
    publish(markdown(report), report, args.out)
    return report


if __name__ == "__main__":
    main()
