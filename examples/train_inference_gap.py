"""The train-inference gap of batch normalization, and what each remedy does about it.

The article's model (Conv2D, BatchNormalization, pooling, Dense; Adam 1e-3,
sparse categorical crossentropy) is trained for a few steps under several
regimes (few steps, batch sizes 2 to 128, batches of two classes each) and
then evaluated on the test set in inference mode, against the same weights
with the exact population statistics of the training set (`recalibrate`).
The difference is the gap. Each remedy is a row of `REMEDIES`: a layer
factory and the callbacks given to `fit`; a new layer option is one more
row, e.g.

    "debiased": Remedy(lambda: bnlayers.BatchNormalization(debias_moving_statistics=True)),

`diagnose` is run on every model trained without a remedy (on 1,000
training images), and its verdict shown.

    python examples/train_inference_gap.py                    # bundled MNIST
    python examples/train_inference_gap.py --quick            # three regimes
    python examples/train_inference_gap.py --data-dir DIR     # e.g. Fashion-MNIST's IDX files
    python examples/train_inference_gap.py --plot gap.png --out results/gap

Without `--data-dir`, Debian's Fashion-MNIST (package dataset-fashion-mnist)
is used where installed with `--fashion`; otherwise the bundled MNIST subset.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

import _common  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Regime:
    """How the model is trained: steps, batch size, and whether batches are i.i.d."""

    name: str
    steps: int
    batch_size: int
    classes_per_batch: int | None = None  # None: random batches


@dataclasses.dataclass(frozen=True)
class Remedy:
    """A layer factory, and the callbacks for `fit` as a function of (training data, regime)."""

    layer: Callable
    callbacks: Callable = lambda x, regime: []


def _remedies():
    import keras

    import bnlayers

    return {
        "built-in": Remedy(keras.layers.BatchNormalization),
        "bnlayers": Remedy(bnlayers.BatchNormalization),
        "PreciseBN callback": Remedy(
            bnlayers.BatchNormalization,
            lambda x, regime: [
                bnlayers.PreciseBN(
                    x,
                    steps=200,
                    batch_size=max(regime.batch_size, 64),
                    verbose=0,
                )
            ],
        ),
        "renorm": Remedy(lambda: bnlayers.BatchNormalization(renorm=True)),
        # Recalibrated when freezing starts: frozen moving averages would
        # keep whatever lag they have then.
        "frozen, last 10 %": Remedy(
            bnlayers.BatchNormalization,
            lambda x, regime: [
                bnlayers.FreezeBNStatistics(
                    last_epochs=1, data=x, steps=200, batch_size=64, verbose=0
                )
            ],
        ),
    }


REGIMES = [
    Regime("10 steps, batch 64", 10, 64),
    Regime("30 steps, batch 64", 30, 64),
    Regime("100 steps, batch 64", 100, 64),
    Regime("500 steps, batch 64", 500, 64),
    Regime("500 steps, batch 2", 500, 2),
    Regime("300 steps, batch 32, two classes per batch", 300, 32, 2),
    Regime("200 steps, batch 8", 200, 8),
    Regime("200 steps, batch 128", 200, 128),
]
QUICK = [REGIMES[0], REGIMES[3], REGIMES[-1]]
EPOCHS = (
    10  # each training is split in 10 epochs, so "last epoch" is its last 10 %
)


def _order(y, regime, rng):
    """Indices of the training samples in the order training sees them."""
    n = regime.steps * regime.batch_size
    if regime.classes_per_batch is None:
        reps = n // len(y) + 1
        return np.concatenate([rng.permutation(len(y)) for _ in range(reps)])[
            :n
        ]
    by_class = [np.flatnonzero(y == c) for c in range(_common.NUM_CLASSES)]
    batches = []
    for _ in range(regime.steps):
        classes = rng.choice(
            _common.NUM_CLASSES, regime.classes_per_batch, replace=False
        )
        pool = np.concatenate([by_class[c] for c in classes])
        batches.append(rng.choice(pool, regime.batch_size, replace=False))
    return np.concatenate(batches)


def _batches(x, y, order, batch_size):
    while True:  # fit draws exactly steps_per_epoch * epochs of them
        for start in range(0, len(order), batch_size):
            part = order[start : start + batch_size]
            yield x[part], y[part]


def run(regime, name, remedy, data, seed):
    import keras

    import bnlayers

    x_train, y_train, x_test, y_test = data
    keras.utils.set_random_seed(seed)
    model = _common.article_model(remedy.layer())
    model.compile(
        keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy"
    )
    order = _order(y_train, regime, np.random.default_rng(seed))
    epochs = min(EPOCHS, regime.steps)
    model.fit(
        _batches(x_train, y_train, order, regime.batch_size),
        steps_per_epoch=regime.steps // epochs,
        epochs=epochs,
        verbose=0,
        callbacks=remedy.callbacks(x_train, regime),
    )
    inference = _accuracy(model, x_test, y_test)
    verdict = None
    if name in ("built-in", "bnlayers"):
        report = bnlayers.diagnose(
            model,
            x_train[:2000],
            y_train[:2000],
            batch_size=max(regime.batch_size, 32),
        )
        verdict = report.healthy
    bnlayers.recalibrate(model, x_train, batch_size=500, verbose=0)
    population = _accuracy(model, x_test, y_test)
    return {
        "regime": regime.name,
        "remedy": name,
        "inference": inference,
        "population": population,
        "gap": population - inference,
        "diagnose_healthy": verdict,
    }


def _accuracy(model, x, y):
    predicted = np.argmax(model.predict(x, batch_size=500, verbose=0), -1)
    return float(100 * np.mean(predicted == y))


def table(results, regimes, names):
    lines = [
        "| training | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    cells = {(r["regime"], r["remedy"]): r for r in results}
    for regime in regimes:
        row = []
        for name in names:
            r = cells[(regime.name, name)]
            text = f"{r['inference']:.1f} % ({r['gap']:+.1f})"
            if r["diagnose_healthy"] is not None:
                text += " ok" if r["diagnose_healthy"] else " **unhealthy**"
            row.append(text)
        lines.append(f"| {regime.name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results, regimes, names, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {(r["regime"], r["remedy"]): r for r in results}
    figure, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        ax.bar(
            np.arange(len(regimes)) + (k - len(names) / 2 + 0.5) * width,
            [cells[(regime.name, name)]["gap"] for regime in regimes],
            width,
            label=name,
        )
    ax.set_xticks(np.arange(len(regimes)))
    ax.set_xticklabels(
        [regime.name for regime in regimes], rotation=20, ha="right"
    )
    ax.set_ylabel("gap (points)")
    ax.set_title("test accuracy: population statistics minus inference mode")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="three regimes only"
    )
    parser.add_argument(
        "--regimes", help="comma-separated indices into REGIMES (default: all)"
    )
    parser.add_argument(
        "--data-dir", help="a directory of MNIST-format IDX files"
    )
    parser.add_argument(
        "--fashion",
        action="store_true",
        help=f"Fashion-MNIST from {_common.DEBIAN_FASHION_DIR} (Debian's dataset-fashion-mnist)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--plot", help="save the plot of the gaps here (needs matplotlib)"
    )
    parser.add_argument(
        "--out", help="also write the table to OUT.md and OUT.json"
    )
    args = parser.parse_args(argv)
    try:
        if args.data_dir or args.fashion:
            data = _common.read_idx_dir(
                args.data_dir or _common.DEBIAN_FASHION_DIR
            )
            source = args.data_dir or _common.DEBIAN_FASHION_DIR
        else:
            data = _common.load_bundled()
            source = (
                "the bundled MNIST subset (8,000 training, 2,000 test images)"
            )
    except _common.UsageError as error:
        print(f"train_inference_gap.py: error: {error}", file=sys.stderr)
        return 2
    import keras  # after the arguments are checked: loading a backend is slow

    remedies = _remedies()
    regimes = QUICK if args.quick else REGIMES
    if args.regimes:
        regimes = [REGIMES[int(i)] for i in args.regimes.split(",")]
    names = list(remedies)
    started = time.time()
    results = []
    for regime in regimes:
        for name in names:
            results.append(run(regime, name, remedies[name], data, args.seed))
            r = results[-1]
            print(
                f"{regime.name:45s} {name:20s} inference {r['inference']:5.1f} %  "
                f"population {r['population']:5.1f} %  gap {r['gap']:+5.1f}"
                + {
                    None: "",
                    True: "  diagnose: healthy",
                    False: "  diagnose: unhealthy",
                }[r["diagnose_healthy"]],
                flush=True,
            )
    text = "\n".join(
        [
            f"Test accuracy in inference mode (gap to the population statistics in "
            f"points; 'ok' / 'unhealthy': diagnose's verdict) on {source}; "
            f"seed {args.seed}, {keras.backend.backend()}, "
            f"{datetime.date.today().isoformat()}, {time.time() - started:.0f} s.",
            f"Machine: {_common.machine_line()}.",
            "",
            table(results, regimes, names),
        ]
    )
    _common.publish(text, results, args.out)
    if args.plot:
        plot(results, regimes, names, pathlib.Path(args.plot))
        print(f"plot saved to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
