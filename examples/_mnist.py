"""The parts of examples/mnist_cnn.py that are not its command line or its training run.

The Keras pieces of the training loop (a dataset whose batch order depends on
the seed and the epoch only, and a callback that logs each epoch), the checks
and reports after training (reload, fold, recalibrate) and the outputs (the
summary table, the figure, history.json). Keras is passed in or imported
inside the functions, so importing this module loads no backend.
"""

import json
import os
import pathlib
import shutil
import statistics
import time

import numpy as np

import _common

RUNS = ("bnlayers", "keras")
# The arguments that decide what a run computes: a backup is resumed only under the same ones.
RESUME_KEYS = (
    "bn",
    "dataset",
    "data",
    "data_dir",
    "epochs",
    "batch_size",
    "limit",
    "seed",
)
RESUME_KEYS += ("replicas",)
EVAL_BATCH_SIZE = 256
FOLD_TIMING_ROUNDS = 5
# A reloaded .keras model runs the same kernels on the same inputs, so its
# predictions should be equal; this leaves room only for float32 rounding.
RELOAD_ATOL = 1e-6


class CheckFailed(Exception):
    """A check of the results failed: reported in one line, exit status 1."""


def make_training_parts(keras):
    """The Keras classes this script needs, defined once Keras is imported."""

    class EpochBatches(keras.utils.PyDataset):
        """The training set in batches, in an order fixed by (seed, epoch) alone, not by how
        many epochs this process has run: a run resumed at epoch k sees the batches an
        uninterrupted run sees at epoch k. `EpochLog` sets `epoch`."""

        def __init__(self, x, y, batch_size, seed):
            super().__init__()
            self.x, self.y, self.batch_size, self.seed, self.epoch = (
                x,
                y,
                batch_size,
                seed,
                0,
            )

        def __len__(self):
            return -(-len(self.x) // self.batch_size)

        def __getitem__(self, index):
            if getattr(self, "_order_epoch", None) != self.epoch:
                rng = np.random.default_rng([self.seed, self.epoch])
                self._order_epoch, self._order = (
                    self.epoch,
                    rng.permutation(len(self.x)),
                )
            rows = self._order[
                index * self.batch_size : (index + 1) * self.batch_size
            ]
            return self.x[rows], self.y[rows]

    class EpochLog(keras.callbacks.Callback):
        """Per-epoch metrics and training seconds, kept in `path` too when there are backups.
        Listed before BackupAndRestore, so an epoch's entry is on disk before its backup:
        after a kill, entries past the restored epoch are dropped."""

        def __init__(self, name, dataset, epochs, path, say):
            super().__init__()
            self.name, self.dataset, self.epochs, self.path, self.say = (
                name,
                dataset,
                epochs,
                path,
                say,
            )
            self.entries = (
                json.loads(path.read_text()) if path and path.is_file() else []
            )
            self.first_epoch = None

        def on_epoch_begin(self, epoch, logs=None):
            if self.first_epoch is None:
                self.first_epoch = epoch
                self.entries = [e for e in self.entries if e["epoch"] <= epoch]
                if epoch > 0:
                    self.say(
                        f"{self.name}: resumed from the backup after epoch {epoch}"
                    )
            elif (
                self.path is not None
            ):  # BackupAndRestore saved at the end of the last epoch
                self.say(f"{self.name}: backed up after epoch {epoch}")
            self.dataset.epoch = epoch
            self.started, self.trained = time.perf_counter(), None

        def on_test_begin(self, logs=None):
            if (
                self.trained is None
            ):  # validation runs inside the epoch; time training only
                self.trained = time.perf_counter() - self.started

        def on_epoch_end(self, epoch, logs=None):
            seconds = (
                self.trained
                if self.trained is not None
                else time.perf_counter() - self.started
            )
            entry = {"epoch": epoch + 1, "seconds": seconds}
            self.entries.append(
                entry | {k: float(v) for k, v in (logs or {}).items()}
            )
            if self.path is not None:
                self.path.with_suffix(".tmp").write_text(
                    json.dumps(self.entries)
                )
                os.replace(self.path.with_suffix(".tmp"), self.path)

        def on_train_end(self, logs=None):
            if self.first_epoch is None:
                self.entries = [
                    e for e in self.entries if e["epoch"] <= self.epochs
                ]
                self.say(
                    f"{self.name}: all {self.epochs} epochs restored from the backup"
                )
            elif self.path is not None:
                self.say(f"{self.name}: backed up after epoch {self.epochs}")

    return EpochBatches, EpochLog


# ------------------------------------------------------------------ models


def describe_data(args):
    """(label, source) of the data, for the output and history.json."""
    labels = {
        "bundled": "MNIST (bundled subset)",
        "mnist": "MNIST",
        "fashion_mnist": "Fashion-MNIST",
    }
    label = labels[args.dataset] if args.dataset is not None else args.data.name
    if args.data is not None:
        return label, str(args.data)
    if args.data_dir is not None:
        return label, f"IDX files in {args.data_dir}"
    if args.dataset == "bundled":
        return label, str(_common.BUNDLED.relative_to(_common.HERE.parent))
    return label, f"keras.datasets.{args.dataset}"


def build_models(keras, bnlayers, names, replicas):
    """The article's model compiled with each BN layer of `names`, same initial weights;
    synchronized over `replicas` logical CPUs under MirroredStrategy when more than one."""
    import tensorflow as tf

    synchronized = replicas > 1
    classes = {
        "bnlayers": bnlayers.BatchNormalization,
        "keras": keras.layers.BatchNormalization,
    }
    if synchronized:
        devices = [f"/cpu:{index}" for index in range(replicas)]
        reduce = tf.distribute.ReductionToOneDevice()
        strategy = tf.distribute.MirroredStrategy(
            devices, cross_device_ops=reduce
        )
    else:
        strategy = tf.distribute.get_strategy()
    models = {}
    with strategy.scope():
        for name in names:
            bn = classes[name](synchronized=synchronized)
            models[name] = _common.article_model(bn)
            models[name].compile(
                optimizer="adam",
                loss="sparse_categorical_crossentropy",
                metrics=["accuracy"],
            )
    for model in models.values():
        model.set_weights(models[names[0]].get_weights())
    return models


# ------------------------------------------------------------------ backups


def prepare_checkpoint_dir(args):
    """True when the directory holds the backup of a run with these arguments (resume it)."""
    directory, marker = (
        args.checkpoint_dir,
        args.checkpoint_dir / "arguments.json",
    )
    wanted = {
        k: str(v) if isinstance(v, pathlib.Path) else v
        for k, v in vars(args).items()
    }
    wanted = {key: wanted[key] for key in RESUME_KEYS}
    if marker.is_file():
        try:
            stored = json.loads(marker.read_text())
        except (OSError, ValueError) as error:
            raise _common.UsageError(
                f"--checkpoint-dir {directory}: unreadable {marker.name} ({error})"
            ) from None
        differing = [
            key for key in RESUME_KEYS if stored.get(key) != wanted[key]
        ]
        if differing:
            there = ", ".join(
                f"{k} {stored.get(k)!r} there, {wanted[k]!r} here"
                for k in differing
            )
            raise _common.UsageError(
                f"--checkpoint-dir {directory} holds the backup of a run with other arguments "
                f"({there}); start it again with those, or use another directory"
            )
        return True
    if directory.exists() and (
        not directory.is_dir() or any(directory.iterdir())
    ):
        raise _common.UsageError(
            f"--checkpoint-dir {directory} exists and is not a backup of this script; "
            "give an empty or new directory"
        )
    _common.writable(directory, "--checkpoint-dir")
    marker.write_text(json.dumps(wanted, indent=1))
    return False


def remove_backups(directory, names):
    """Deletes the backups of a completed run: they would only make the next run skip training."""
    for name in names:
        shutil.rmtree(directory / name, ignore_errors=True)
        (directory / f"{name}-history.json").unlink(missing_ok=True)
    (directory / "arguments.json").unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass  # something else is in it: leave it


# -------------------------------------------------------------- after training


def _predict(model, x):
    return model.predict(x, batch_size=EVAL_BATCH_SIZE, verbose=0)


def save_and_check(keras, models, results, out, x_test, say):
    """Saves each model as .keras, reloads it and checks it predicts the same."""
    for name, model in models.items():
        path = out / f"model_{name}.keras"
        model.save(path)
        difference = float(
            np.max(
                np.abs(
                    _predict(model, x_test)
                    - _predict(keras.models.load_model(path), x_test)
                )
            )
        )
        if not difference <= RELOAD_ATOL:
            raise CheckFailed(
                f"{path} reloaded predicts differently from the trained model "
                f"(max abs difference {difference:.3g} > {RELOAD_ATOL:g})"
            )
        results[name] |= {
            "model_file": path.name,
            "reload_max_abs_difference": difference,
        }
        say(
            f"{name}: saved {path}, reloaded it: same predictions (max abs difference "
            f"{difference:.1e})"
        )


def fold_report(bnlayers, models, results, x_test, say):
    for name, model in models.items():
        folded = bnlayers.fold_batchnorm(model)
        original, fast = _predict(model, x_test), _predict(folded, x_test)
        # Interleaved rounds and medians, so that load on the machine hits both alike.
        times = {"original": [], "folded": []}
        for _ in range(FOLD_TIMING_ROUNDS):
            for kind, timed in (("original", model), ("folded", folded)):
                started = time.perf_counter()
                _predict(timed, x_test)
                times[kind].append(time.perf_counter() - started)
        original_s, folded_s = (
            statistics.median(times[k]) for k in ("original", "folded")
        )
        fold = results[name]["fold"] = {
            "max_abs_difference": float(np.max(np.abs(original - fast))),
            "same_class_fraction": float(
                np.mean(original.argmax(-1) == fast.argmax(-1))
            ),
            "predict_seconds_original": original_s,
            "predict_seconds_folded": folded_s,
            "speedup": original_s / folded_s,
        }
        say(
            f"{name}: folded model agrees within {fold['max_abs_difference']:.1e} (max abs), "
            f"predicts {fold['speedup']:.2f}x as fast ({folded_s * 1e3:.0f} vs "
            f"{original_s * 1e3:.0f} ms for {len(x_test)} images)"
        )


def recalibrate_report(
    bnlayers, models, results, args, x_train, x_test, y_test, say
):
    for name, model in models.items():
        bnlayers.recalibrate(model, x_train, batch_size=args.batch_size)
        loss, accuracy = model.evaluate(
            x_test, y_test, batch_size=EVAL_BATCH_SIZE, verbose=0
        )
        results[name]["recalibrated"] = {
            "test_loss": float(loss),
            "test_accuracy": float(accuracy),
        }
        say(
            f"{name}: recalibrated on {len(x_train)} training images: test loss "
            f"{results[name]['test_loss']:.4f} -> {loss:.4f}, accuracy "
            f"{results[name]['test_accuracy']:.4f} -> {accuracy:.4f}"
        )


def curve_gaps(results):
    """The largest gap between the two runs' learning curves, for accuracy and for loss."""
    first, second = (results[name]["history"] for name in RUNS)
    gaps = {}
    for kind in ("accuracy", "loss"):
        candidates = [
            {"gap": abs(a[key] - b[key]), "curve": curve, "epoch": a["epoch"]}
            for curve, key in (("train", kind), ("test", f"val_{kind}"))
            for a, b in zip(first, second, strict=True)
        ]
        # max() keeps the first of equal gaps: the earliest epoch, train first.
        gaps[kind] = max(candidates, key=lambda c: c["gap"])
    return gaps


def plot(results, args, label, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Where the runs agree their curves coincide: bnlayers is drawn wide and
    # pale, the built-in thin on top of it, so that both stay visible.
    styles = {
        "bnlayers": dict(color="tab:blue", linewidth=5, alpha=0.4),
        "keras": dict(
            color="tab:orange", linewidth=1.5, marker="o", markersize=3
        ),
    }
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for axis, kind in zip(axes, ("loss", "accuracy"), strict=True):
        for name, result in results.items():
            epochs = [entry["epoch"] for entry in result["history"]]
            for curve, key, style in (
                ("train", kind, "--"),
                ("test", f"val_{kind}", "-"),
            ):
                values = [entry[key] for entry in result["history"]]
                axis.plot(
                    epochs,
                    values,
                    style,
                    label=f"{name}, {curve}",
                    **styles[name],
                )
        axis.set(title=kind, xlabel="epoch")
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
    axes[1].legend(loc="lower right")
    replicas = f", {args.replicas} replicas" if args.replicas > 1 else ""
    figure.suptitle(
        f"The article's model on {label}, batch size {args.batch_size}{replicas}"
    )
    figure.savefig(path, dpi=100)
    plt.close(figure)


def table(results, gaps):
    """The side-by-side summary: one column per run, and their difference when there are two."""
    names, pair = list(results), len(results) == 2
    runs = [results[n] for n in names]
    per_epoch = [
        statistics.median(e["seconds"] for e in run["history"]) for run in runs
    ]
    rows = [
        ["test accuracy", *(f"{run['test_accuracy']:.4f}" for run in runs)],
        ["test loss", *(f"{run['test_loss']:.4f}" for run in runs)],
        ["train seconds per epoch", *(f"{s:.2f}" for s in per_epoch)],
    ]
    if pair:
        a, b = runs
        rows[0].append(
            f"{100 * (a['test_accuracy'] - b['test_accuracy']):+.2f} points"
        )
        rows[1].append(f"{a['test_loss'] - b['test_loss']:+.1e}")
        # One run after the other: their times compare only on an idle machine,
        # so no ratio here (benchmarks interleave their rounds instead).
        rows[2].append("")
    extra = [
        ("fold", "folded: max abs difference", "max_abs_difference", "{:.1e}"),
        ("fold", "folded: predict speedup", "speedup", "{:.2f}x"),
        (
            "recalibrated",
            "recalibrated: test accuracy",
            "test_accuracy",
            "{:.4f}",
        ),
        ("recalibrated", "recalibrated: test loss", "test_loss", "{:.4f}"),
    ]
    for part, title, key, form in extra:
        if all(part in run for run in runs):
            rows.append(
                [title, *(form.format(run[part][key]) for run in runs)]
                + [""] * pair
            )
    for kind in ("accuracy", "loss") if pair else ():
        gap = gaps[kind]
        value = (
            f"{100 * gap['gap']:.2f} points"
            if kind == "accuracy"
            else f"{gap['gap']:.1e}"
        )
        where = f"{value} ({gap['curve']}, epoch {gap['epoch']})"
        rows.append([f"largest curve gap, {kind}", "", "", where])
    header = ["", *names] + (["difference"] if pair else [])
    widths = [
        max(len(row[i]) for row in [header, *rows]) for i in range(len(header))
    ]

    def line(row):
        cells = [
            c.ljust(widths[i]) if i in (0, 3) else c.rjust(widths[i])
            for i, c in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    return "\n".join(
        [
            line(header),
            "  ".join("-" * width for width in widths),
            *map(line, rows),
        ]
    )


def write_history(results, gaps, args, label, source, sizes, path):
    document = {
        "model": "the article's: Conv2D(32, 3x3, relu), BatchNormalization, MaxPooling2D, "
        "Flatten, Dense(10, softmax); adam",
        "arguments": {
            k: str(v) if isinstance(v, pathlib.Path) else v
            for k, v in vars(args).items()
        },
        "data": {"name": label, "source": source, "train_examples": sizes[0]}
        | {"test_examples": sizes[1]},
        "runs": results,
        "largest_curve_gap": gaps,
    }
    path.write_text(json.dumps(document, indent=1) + "\n")
