"""The article's MNIST model trained with bnlayers' and Keras' BatchNormalization, side by side.

The model is the article's, verbatim but for the BatchNormalization line:

    Conv2D(32, 3x3, relu) -> BatchNormalization -> MaxPooling2D(2x2) -> Flatten -> Dense(10, softmax)

compiled with adam and sparse categorical cross-entropy and fit for 10
epochs with batch size 64. With `--bn both` (the default) it is trained
twice, once with `bnlayers.BatchNormalization` and once with
`keras.layers.BatchNormalization`, from the same initial weights and on the
same batches in the same order, then compared in a table: test accuracy,
test loss, seconds per epoch and the largest gap between the two learning
curves.

    python examples/mnist_cnn.py                      # bundled data, offline, 10 epochs per layer
    python examples/mnist_cnn.py --epochs 1 --fold --recalibrate
    python examples/mnist_cnn.py --dataset fashion_mnist --data-dir /usr/share/datasets/fashion-mnist
    python examples/mnist_cnn.py --replicas 2         # MirroredStrategy over 2 logical CPUs, synchronized BN

Everything it writes goes to `--out` (default runs/mnist_cnn): history.json,
learning_curves.png and one .keras file per trained model, which is reloaded
and checked to predict the same before the script reports success.

Exit status: 0 on success, 2 for a bad argument or data file, 1 when the
data cannot be downloaded, a check fails or the run is interrupted.
"""

import argparse
import functools
import gzip
import importlib.util
import json
import os
import pathlib
import shutil
import statistics
import struct
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
BUNDLED = HERE / "data" / "mnist_10k.npz"
KERAS_KEYS = ("x_train", "y_train", "x_test", "y_test")
KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
# What keras.datasets.*.load_data() fetches, relative to Keras' cache directory.
KERAS_FILES = {
    "mnist": ["datasets/mnist.npz"],
    "fashion_mnist": [
        f"datasets/fashion-mnist/{name}"
        for name in (
            "train-labels-idx1-ubyte.gz",
            "train-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
        )
    ],
}
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
RUNS = ("bnlayers", "keras")
EVAL_BATCH_SIZE = 256
FOLD_TIMING_ROUNDS = 5
# A reloaded .keras model runs the same kernels on the same inputs, so its
# predictions should be equal; this leaves room only for float32 rounding.
RELOAD_ATOL = 1e-6


class UsageError(Exception):
    """A bad argument or data file: reported in one line, exit status 2."""


class DataUnavailable(Exception):
    """The data could not be fetched: reported in one line, exit status 1."""


class CheckFailed(Exception):
    """A check of the results failed: reported in one line, exit status 1."""


# ------------------------------------------------------------------ arguments


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line instead of argparse's usage block.
        raise UsageError(f"{message} (see --help)")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def parse_args(argv=None):
    parser = _Parser(
        prog="mnist_cnn.py",
        description=(
            "Train the article's MNIST model with bnlayers' and/or Keras' BatchNormalization "
            "from the same initial weights on the same batches, and compare them."
        ),
        epilog=(
            "Data sources: --dataset bundled reads examples/data/mnist_10k.npz (real MNIST, "
            "8,000 train / 2,000 test, shipped here: no download). mnist and fashion_mnist "
            "download the full sets through Keras once (into ~/.keras/datasets), unless "
            "--data-dir or --data points at a local copy. Outputs: history.json, "
            "learning_curves.png and model_<bn>.keras in --out."
        ),
    )
    parser.add_argument(
        "--bn",
        choices=("bnlayers", "keras", "both"),
        default="both",
        help="which BatchNormalization to train: bnlayers.BatchNormalization, "
        "keras.layers.BatchNormalization, or both side by side (default: both)",
    )
    parser.add_argument(
        "--dataset",
        choices=("bundled", "mnist", "fashion_mnist"),
        default=None,
        help="bundled: the 10,000-digit MNIST subset in examples/data (offline); mnist: full "
        "MNIST via keras.datasets (downloads once); fashion_mnist: full Fashion-MNIST via "
        "keras.datasets, or from --data-dir (default: bundled)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--data-dir",
        type=pathlib.Path,
        metavar="DIR",
        help="read --dataset mnist or fashion_mnist from the four IDX files in DIR "
        "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte; gzipped or not), e.g. Debian's dataset-fashion-mnist in "
        f"{DEBIAN_FASHION_DIR} (default: none, download through Keras)",
    )
    source.add_argument(
        "--data",
        type=pathlib.Path,
        metavar="PATH",
        help="read the data from a .npz with Keras' keys x_train, y_train, x_test, y_test "
        "(28x28 images, labels 0-9), e.g. a local copy of Keras' mnist.npz (default: none)",
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        default=10,
        metavar="N",
        help="training epochs (default: 10)",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=64, metavar="N", help="batch size (default: 64)"
    )
    parser.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        metavar="N",
        help="train on the first N training examples only, to try things quickly "
        "(default: all of them)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initial weights and of the order of the batches in each epoch "
        "(default: 0)",
    )
    parser.add_argument(
        "--replicas",
        type=_positive_int,
        default=1,
        metavar="N",
        help="train under tf.distribute.MirroredStrategy over N logical CPU devices, each "
        "taking 1/N of every batch, with BatchNormalization(synchronized=True) so that the "
        "statistics are those of the whole batch; 1 trains on one device without a "
        "strategy (default: 1)",
    )
    parser.add_argument(
        "--fold",
        action="store_true",
        help="after training, fold BN away with bnlayers.fold_batchnorm and report how "
        "closely the folded model agrees with the trained one and how much faster it "
        "predicts (default: off)",
    )
    parser.add_argument(
        "--recalibrate",
        action="store_true",
        help="after training (and after saving the models), set the BN moving statistics "
        "to the exact statistics of the training set with bnlayers.recalibrate and report "
        "the test loss and accuracy before and after (default: off)",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("runs/mnist_cnn"),
        metavar="DIR",
        help="where to write history.json, learning_curves.png and the .keras models "
        "(default: runs/mnist_cnn)",
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=pathlib.Path,
        default=None,
        metavar="DIR",
        help="back up the training state in DIR after every epoch "
        "(keras.callbacks.BackupAndRestore); started again with the same arguments, a "
        "killed run resumes from its last finished epoch and ends as an uninterrupted run "
        "would. The backups are deleted when the run completes (default: no backups)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="print no progress, only the summary table and errors (default: off)",
    )
    args = parser.parse_args(argv)

    if args.data is not None:
        if args.dataset == "bundled":
            raise UsageError(
                "--data replaces the bundled file; give --data alone, or with --dataset mnist "
                "or fashion_mnist to name what it holds"
            )
    elif args.data_dir is not None:
        if args.dataset in (None, "bundled"):
            raise UsageError(
                "--data-dir reads MNIST or Fashion-MNIST IDX files; say which with "
                "--dataset mnist or --dataset fashion_mnist"
            )
    elif args.dataset is None:
        args.dataset = "bundled"
    return args


# ----------------------------------------------------------------------- data


def _images(source, name, x):
    """Checks one image array and returns it as float32 (N, 28, 28, 1) in [0, 1]."""
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE or x.shape[0] == 0:
        raise UsageError(
            f"{source}: {name} has shape {x.shape}; expected (N, 28, 28) or (N, 28, 28, 1) "
            "with N > 0"
        )
    if x.dtype.kind in "ui":
        scale = 255.0
        low, high = int(x.min()), int(x.max())
        if low < 0 or high > 255:
            raise UsageError(f"{source}: {name} holds values {low}..{high}; expected 0..255")
    elif x.dtype.kind == "f":
        if not np.isfinite(x).all():
            raise UsageError(f"{source}: {name} holds NaN or infinite values")
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 255.0:
            raise UsageError(
                f"{source}: {name} holds values {low:g}..{high:g}; expected 0..255 or 0..1"
            )
        # Floats are taken as grey levels 0..255 unless they already lie in [0, 1].
        scale = 255.0 if high > 1.0 else 1.0
    else:
        raise UsageError(f"{source}: {name} has dtype {x.dtype}; expected integer or float pixels")
    return (x.astype("float32") / np.float32(scale))[..., None]


def _labels(source, name, y, count):
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.shape[0] != count:
        raise UsageError(
            f"{source}: {name} has shape {y.shape}; expected ({count},), one label per image"
        )
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
        y = y.astype("int64")
    if y.dtype.kind not in "ui":
        raise UsageError(f"{source}: {name} has dtype {y.dtype}; expected integer class labels")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= NUM_CLASSES:
        raise UsageError(f"{source}: {name} holds labels {low}..{high}; expected 0..9")
    return y.astype("int64")


def check_arrays(source, arrays):
    """Validates Keras-style arrays; returns (x_train, y_train, x_test, y_test) ready to train."""
    missing = [key for key in KERAS_KEYS if key not in arrays]
    if missing:
        raise UsageError(
            f"{source} lacks {', '.join(missing)}; expected the keys of Keras' mnist.npz: "
            f"{', '.join(KERAS_KEYS)}"
        )
    x_train = _images(source, "x_train", np.asarray(arrays["x_train"]))
    y_train = _labels(source, "y_train", np.asarray(arrays["y_train"]), len(x_train))
    x_test = _images(source, "x_test", np.asarray(arrays["x_test"]))
    y_test = _labels(source, "y_test", np.asarray(arrays["y_test"]), len(x_test))
    return x_train, y_train, x_test, y_test


def read_npz(path, option):
    source = f"{option} {path}"
    if not path.is_file():
        raise UsageError(f"{source}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not hasattr(npz, "files"):
                raise UsageError(f"{source} holds a single array, not a .npz with Keras' keys")
            arrays = {key: npz[key] for key in KERAS_KEYS if key in npz.files}
    except UsageError:
        raise
    except Exception as error:  # zip, pickle and format errors all mean "not an .npz"
        raise UsageError(f"{source} is not a readable .npz file ({error})") from None
    return check_arrays(source, arrays)


def _idx_file(directory, stem):
    # MNIST's own distribution spells the names with a dot before "idx".
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        path = directory / name
        if path.is_file():
            return path
    raise UsageError(f"--data-dir {directory}: no {stem} or {stem}.gz in it")


def read_idx(path, magic, dims):
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            raw = file.read()
    except (OSError, EOFError) as error:
        raise UsageError(f"{path}: cannot read it ({error})") from None
    header = 4 + 4 * dims
    if len(raw) < header or struct.unpack(">i", raw[:4])[0] != magic:
        raise UsageError(f"{path}: not an IDX file of {dims}-dimensional unsigned bytes")
    shape = struct.unpack(f">{dims}i", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise UsageError(
            f"{path}: holds {len(raw) - header} bytes of data, its header says {shape}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def read_idx_dir(directory):
    if not directory.is_dir():
        raise UsageError(f"--data-dir {directory}: no such directory")
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        arrays[f"x_{split}"] = read_idx(
            _idx_file(directory, f"{prefix}-images-idx3-ubyte"), IDX_IMAGES_MAGIC, 3
        )
        arrays[f"y_{split}"] = read_idx(
            _idx_file(directory, f"{prefix}-labels-idx1-ubyte"), IDX_LABELS_MAGIC, 1
        )
    return check_arrays(f"--data-dir {directory}", arrays)


def _keras_cache_dirs():
    # Where keras.utils.get_file keeps downloads: $KERAS_HOME or ~/.keras,
    # or /tmp/.keras when that is not writable.
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return [pathlib.Path(home), pathlib.Path("/tmp/.keras")]


def check_download(dataset):
    """Fails fast, before TensorFlow loads, when Keras would have to download but cannot."""
    import urllib.error
    import urllib.request

    cached = lambda relative: any((home / relative).is_file() for home in _keras_cache_dirs())
    missing = [relative for relative in KERAS_FILES[dataset] if not cached(relative)]
    if not missing:
        return
    url = KERAS_ORIGIN + pathlib.PurePosixPath(missing[0]).name
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=20).close()
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise DataUnavailable(download_advice(dataset, getattr(error, "reason", error))) from None


def download_advice(dataset, reason):
    local = (
        f"--data-dir {DEBIAN_FASHION_DIR} (Debian: apt-get install dataset-fashion-mnist)"
        if dataset == "fashion_mnist"
        else "--data PATH with a local copy of mnist.npz"
    )
    return (
        f"cannot download {dataset} through Keras ({reason}), this machine seems to be offline: "
        f"use --dataset bundled (10,000 real MNIST digits shipped with bnlayers) or {local}"
    )


def load_keras_dataset(dataset):
    import keras

    loader = {"mnist": keras.datasets.mnist, "fashion_mnist": keras.datasets.fashion_mnist}[dataset]
    try:
        (x_train, y_train), (x_test, y_test) = loader.load_data()
    except Exception as error:  # get_file wraps every network failure in a bare Exception
        raise DataUnavailable(download_advice(dataset, error)) from None
    arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return check_arrays(f"keras.datasets.{dataset}", arrays)


def describe_source(args):
    if args.data is not None:
        return str(args.data)
    if args.data_dir is not None:
        return f"IDX files in {args.data_dir}"
    if args.dataset == "bundled":
        return str(BUNDLED.relative_to(HERE.parent))
    return f"keras.datasets.{args.dataset}"


def load_arrays_before_tensorflow(args):
    """Everything that can be read and checked without TensorFlow; None when Keras must download."""
    if args.data is not None:
        return read_npz(args.data, "--data")
    if args.data_dir is not None:
        return read_idx_dir(args.data_dir)
    if args.dataset == "bundled":
        return read_npz(BUNDLED, "bundled data")
    check_download(args.dataset)
    return None


def dataset_label(args):
    if args.dataset is not None:
        return {
            "bundled": "MNIST (bundled subset)",
            "mnist": "MNIST",
            "fashion_mnist": "Fashion-MNIST",
        }[args.dataset]
    return args.data.name


# ---------------------------------------------------------- checkpoint folder

# The arguments that decide what a run computes: a backup is resumed only
# under the same ones.
RESUME_KEYS = (
    "bn",
    "dataset",
    "data",
    "data_dir",
    "epochs",
    "batch_size",
    "limit",
    "seed",
    "replicas",
)


def prepare_checkpoint_dir(args):
    directory = args.checkpoint_dir
    wanted = {
        key: (str(value) if isinstance(value, pathlib.Path) else value)
        for key, value in vars(args).items()
        if key in RESUME_KEYS
    }
    marker = directory / "arguments.json"
    if marker.is_file():
        try:
            stored = json.loads(marker.read_text())
        except (OSError, ValueError) as error:
            raise UsageError(
                f"--checkpoint-dir {directory}: unreadable {marker.name} ({error})"
            ) from None
        differing = [key for key in RESUME_KEYS if stored.get(key) != wanted[key]]
        if differing:
            there = ", ".join(
                f"{key} {stored.get(key)!r} there, {wanted[key]!r} here" for key in differing
            )
            raise UsageError(
                f"--checkpoint-dir {directory} holds the backup of a run with other arguments "
                f"({there}); start it again with those, or use another directory"
            )
        return True
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UsageError(
            f"--checkpoint-dir {directory} exists and is not a backup of this script; "
            "give an empty or new directory"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(wanted, indent=1))
    except OSError as error:
        raise UsageError(
            f"--checkpoint-dir {directory}: cannot write there ({error.strerror})"
        ) from None
    return False


def prepare_out_dir(directory):
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"--out {directory}: cannot write there ({error.strerror})") from None


# ------------------------------------------------------------------- training


def article_model(keras, batch_normalization):
    # The article's model, verbatim but for the BatchNormalization line.
    model = keras.Sequential(
        [
            keras.layers.InputLayer(shape=(28, 28, 1)),
            keras.layers.Conv2D(32, (3, 3), activation="relu"),
            batch_normalization,
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def make_training_parts(keras):
    """The Keras classes this script needs, defined once Keras is imported."""

    class EpochBatches(keras.utils.PyDataset):
        """The training set in batches, reshuffled each epoch in an order fixed by (seed, epoch).

        The order depends on the epoch number alone, not on how many epochs
        this process has run, so a run resumed at epoch k sees the batches an
        uninterrupted run sees at epoch k. `epoch` is set by `EpochLog`.
        """

        def __init__(self, x, y, batch_size, seed):
            super().__init__()
            self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
            self.epoch = 0
            self._order_epoch, self._order = None, None

        def __len__(self):
            return -(-len(self.x) // self.batch_size)

        def __getitem__(self, index):
            if self._order_epoch != self.epoch:
                rng = np.random.default_rng([self.seed, self.epoch])
                self._order_epoch, self._order = self.epoch, rng.permutation(len(self.x))
            rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
            return self.x[rows], self.y[rows]

    class EpochLog(keras.callbacks.Callback):
        """Keeps per-epoch metrics and training seconds; with a backup folder, keeps them there too.

        Listed before BackupAndRestore, so an epoch's entry is on disk before
        its backup: after a kill, entries past the restored epoch are dropped.
        """

        def __init__(self, name, dataset, epochs, path=None, say=print):
            super().__init__()
            self.name = name
            self.dataset = dataset
            self.epochs = epochs
            self.path = path
            self.say = say
            self.entries = []
            if path is not None and path.is_file():
                self.entries = json.loads(path.read_text())
            self.first_epoch = None

        def _keep_first(self, count):
            self.entries = [entry for entry in self.entries if entry["epoch"] <= count]

        def on_epoch_begin(self, epoch, logs=None):
            if self.first_epoch is None:
                self.first_epoch = epoch
                self._keep_first(epoch)
                if epoch > 0:
                    self.say(f"{self.name}: resumed from the backup after epoch {epoch}")
            elif self.path is not None:
                # BackupAndRestore saved at the end of the last epoch, after the progress line.
                self.say(f"{self.name}: backed up after epoch {epoch}")
            self.dataset.epoch = epoch
            self.started = time.perf_counter()
            self.trained = None

        def on_test_begin(self, logs=None):
            # Validation runs inside the epoch; the epoch's time is training only.
            if self.trained is None:
                self.trained = time.perf_counter() - self.started

        def on_epoch_end(self, epoch, logs=None):
            seconds = (
                self.trained if self.trained is not None else time.perf_counter() - self.started
            )
            entry = {"epoch": epoch + 1, "seconds": seconds}
            entry.update({key: float(value) for key, value in (logs or {}).items()})
            self.entries.append(entry)
            if self.path is not None:
                temporary = self.path.with_suffix(".tmp")
                temporary.write_text(json.dumps(self.entries))
                os.replace(temporary, self.path)

        def on_train_end(self, logs=None):
            if self.first_epoch is None:
                self._keep_first(self.epochs)
                self.say(f"{self.name}: all {self.epochs} epochs restored from the backup")
            elif self.path is not None:
                self.say(f"{self.name}: backed up after epoch {self.epochs}")

    return EpochBatches, EpochLog


def start_tensorflow(replicas):
    """Imports TensorFlow, with `replicas` logical CPU devices when more than one."""
    import tensorflow as tf

    if replicas > 1:
        # Must happen before TensorFlow initializes its devices.
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
        )
    # Same inputs, same result: a resumed run ends as an uninterrupted one.
    tf.config.experimental.enable_op_determinism()
    # predict() on several models in a row makes tf.function warn about retracing.
    tf.get_logger().setLevel("ERROR")
    return tf


def train(args, data, say):
    tf = start_tensorflow(args.replicas)
    import keras

    import bnlayers

    x_train, y_train, x_test, y_test = data
    EpochBatches, EpochLog = make_training_parts(keras)
    names = list(RUNS) if args.bn == "both" else [args.bn]
    synchronized = args.replicas > 1
    layers = {
        "bnlayers": lambda: bnlayers.BatchNormalization(synchronized=synchronized),
        "keras": lambda: keras.layers.BatchNormalization(synchronized=synchronized),
    }
    if synchronized:
        strategy = tf.distribute.MirroredStrategy(
            [f"/cpu:{index}" for index in range(args.replicas)],
            cross_device_ops=tf.distribute.ReductionToOneDevice(),
        )
    else:
        strategy = tf.distribute.get_strategy()

    keras.utils.set_random_seed(args.seed)
    with strategy.scope():
        models = {name: article_model(keras, layers[name]()) for name in names}
    initial = models[names[0]].get_weights()
    for model in models.values():
        model.set_weights(initial)

    verbose = 0 if args.quiet else (1 if sys.stdout.isatty() else 2)
    results = {}
    for name, model in models.items():
        batches = EpochBatches(x_train, y_train, args.batch_size, args.seed)
        backup = None if args.checkpoint_dir is None else args.checkpoint_dir / name
        log = EpochLog(
            name,
            batches,
            args.epochs,
            None if backup is None else args.checkpoint_dir / f"{name}-history.json",
            say,
        )
        callbacks = [log]
        if backup is not None:
            callbacks.append(
                keras.callbacks.BackupAndRestore(
                    str(backup), double_checkpoint=True, delete_checkpoint=False
                )
            )
        epochs = f"{args.epochs} epoch" + ("s" if args.epochs > 1 else "")
        say(f"\nTraining the article's model with {describe_layer(name)} ({epochs})")
        model.fit(
            batches,
            epochs=args.epochs,
            # The batches are in EpochBatches' order; fit would shuffle them again.
            shuffle=False,
            validation_data=(x_test, y_test),
            validation_batch_size=EVAL_BATCH_SIZE,
            callbacks=callbacks,
            verbose=verbose,
        )
        test_loss, test_accuracy = model.evaluate(
            x_test, y_test, batch_size=EVAL_BATCH_SIZE, verbose=0
        )
        results[name] = {
            "layer": describe_layer(name),
            "synchronized": synchronized,
            "history": log.entries,
            "test_loss": float(test_loss),
            "test_accuracy": float(test_accuracy),
        }
    return keras, bnlayers, models, results


def describe_layer(name):
    return (
        "bnlayers.BatchNormalization" if name == "bnlayers" else "keras.layers.BatchNormalization"
    )


# -------------------------------------------------------------- after training


def save_and_check(keras, models, results, args, x_test, say):
    """Saves each model as .keras, reloads it and checks it predicts the same."""
    for name, model in models.items():
        path = args.out / f"model_{name}.keras"
        model.save(path)
        reloaded = keras.models.load_model(path)
        before = model.predict(x_test, batch_size=EVAL_BATCH_SIZE, verbose=0)
        after = reloaded.predict(x_test, batch_size=EVAL_BATCH_SIZE, verbose=0)
        difference = float(np.max(np.abs(before - after)))
        if not difference <= RELOAD_ATOL:
            raise CheckFailed(
                f"{path} reloaded predicts differently from the trained model "
                f"(max abs difference {difference:.3g} > {RELOAD_ATOL:g})"
            )
        results[name]["model_file"] = path.name
        results[name]["reload_max_abs_difference"] = difference
        say(
            f"{name}: saved {path}, reloaded it: same predictions (max abs difference {difference:.1e})"
        )


def _timed_predict(model, x):
    started = time.perf_counter()
    model.predict(x, batch_size=EVAL_BATCH_SIZE, verbose=0)
    return time.perf_counter() - started


def fold_report(bnlayers, models, results, x_test, say):
    for name, model in models.items():
        folded = bnlayers.fold_batchnorm(model)
        original = model.predict(x_test, batch_size=EVAL_BATCH_SIZE, verbose=0)
        fast = folded.predict(x_test, batch_size=EVAL_BATCH_SIZE, verbose=0)
        # Interleaved rounds and medians, so that load on the machine hits both alike.
        times = {"original": [], "folded": []}
        for _ in range(FOLD_TIMING_ROUNDS):
            times["original"].append(_timed_predict(model, x_test))
            times["folded"].append(_timed_predict(folded, x_test))
        original_s = statistics.median(times["original"])
        folded_s = statistics.median(times["folded"])
        results[name]["fold"] = {
            "max_abs_difference": float(np.max(np.abs(original - fast))),
            "same_class_fraction": float(np.mean(original.argmax(-1) == fast.argmax(-1))),
            "predict_seconds_original": original_s,
            "predict_seconds_folded": folded_s,
            "speedup": original_s / folded_s,
        }
        fold = results[name]["fold"]
        say(
            f"{name}: folded model agrees within {fold['max_abs_difference']:.1e} (max abs), "
            f"predicts {fold['speedup']:.2f}x as fast ({folded_s * 1e3:.0f} vs {original_s * 1e3:.0f} ms "
            f"for {len(x_test)} images)"
        )


def recalibrate_report(bnlayers, models, results, args, x_train, x_test, y_test, say):
    for name, model in models.items():
        bnlayers.recalibrate(model, x_train, batch_size=args.batch_size)
        loss, accuracy = model.evaluate(x_test, y_test, batch_size=EVAL_BATCH_SIZE, verbose=0)
        results[name]["recalibrated"] = {"test_loss": float(loss), "test_accuracy": float(accuracy)}
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
        best = None
        for curve, key in (("train", kind), ("test", f"val_{kind}")):
            for a, b in zip(first, second):
                gap = abs(a[key] - b[key])
                if best is None or gap > best["gap"]:
                    best = {"gap": gap, "curve": curve, "epoch": a["epoch"]}
        gaps[kind] = best
    return gaps


def plot(results, args, label, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Where the runs agree their curves coincide: bnlayers is drawn wide and
    # pale, the built-in thin on top of it, so that both stay visible.
    styles = {
        "bnlayers": dict(color="tab:blue", linewidth=5, alpha=0.4),
        "keras": dict(color="tab:orange", linewidth=1.5, marker="o", markersize=3),
    }
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for axis, kind in zip(axes, ("loss", "accuracy")):
        for name, result in results.items():
            epochs = [entry["epoch"] for entry in result["history"]]
            for curve, key, linestyle in (("train", kind, "--"), ("test", f"val_{kind}", "-")):
                axis.plot(
                    epochs,
                    [entry[key] for entry in result["history"]],
                    linestyle=linestyle,
                    label=f"{name}, {curve}",
                    **styles[name],
                )
        axis.set_title(kind)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
    axes[1].legend(loc="lower right")
    replicas = f", {args.replicas} replicas" if args.replicas > 1 else ""
    figure.suptitle(f"The article's model on {label}, batch size {args.batch_size}{replicas}")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def table(results, gaps):
    """The side-by-side summary: one column per run, and their difference when there are two."""
    names = list(results)
    pair = len(names) == 2
    speed = {n: statistics.median(e["seconds"] for e in results[n]["history"]) for n in names}
    rows = [
        ["test accuracy", *(f"{results[n]['test_accuracy']:.4f}" for n in names)],
        ["test loss", *(f"{results[n]['test_loss']:.4f}" for n in names)],
        ["train seconds per epoch", *(f"{speed[n]:.2f}" for n in names)],
    ]
    if pair:
        a, b = (results[n] for n in names)
        rows[0].append(f"{100 * (a['test_accuracy'] - b['test_accuracy']):+.2f} points")
        rows[1].append(f"{a['test_loss'] - b['test_loss']:+.1e}")
        # One run after the other: their times compare only on an idle machine,
        # so no ratio here (benchmarks interleave their rounds instead).
        rows[2].append("")
    if all("fold" in results[n] for n in names):
        rows.append(
            [
                "folded: max abs difference",
                *(f"{results[n]['fold']['max_abs_difference']:.1e}" for n in names),
            ]
        )
        rows.append(
            ["folded: predict speedup", *(f"{results[n]['fold']['speedup']:.2f}x" for n in names)]
        )
    if all("recalibrated" in results[n] for n in names):
        rows.append(
            [
                "recalibrated: test accuracy",
                *(f"{results[n]['recalibrated']['test_accuracy']:.4f}" for n in names),
            ]
        )
        rows.append(
            [
                "recalibrated: test loss",
                *(f"{results[n]['recalibrated']['test_loss']:.4f}" for n in names),
            ]
        )
    if pair:
        for row in rows[3:]:
            row.append("")
        for kind in ("accuracy", "loss"):
            gap = gaps[kind]
            value = f"{100 * gap['gap']:.2f} points" if kind == "accuracy" else f"{gap['gap']:.1e}"
            rows.append(
                [
                    f"largest curve gap, {kind}",
                    "",
                    "",
                    f"{value} ({gap['curve']}, epoch {gap['epoch']})",
                ]
            )
    header = ["", *names] + (["difference"] if pair else [])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row):
        cells = [
            cell.ljust(widths[i]) if i in (0, 3) else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), "  ".join("-" * width for width in widths), *map(line, rows)])


def write_history(results, gaps, args, label, source, sizes, path):
    arguments = {
        key: (str(value) if isinstance(value, pathlib.Path) else value)
        for key, value in vars(args).items()
    }
    document = {
        "model": "the article's: Conv2D(32, 3x3, relu), BatchNormalization, MaxPooling2D, Flatten, Dense(10, softmax); adam",
        "arguments": arguments,
        "data": {
            "name": label,
            "source": source,
            "train_examples": sizes[0],
            "test_examples": sizes[1],
        },
        "runs": results,
        "largest_curve_gap": gaps,
    }
    path.write_text(json.dumps(document, indent=1) + "\n")


# ----------------------------------------------------------------------- main


def main(argv=None):
    say = functools.partial(print, flush=True)
    try:
        args = parse_args(argv)
        if args.quiet:
            say = lambda *_, **__: None
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError(
                "the figure needs matplotlib: pip install -e '.[examples]' (or pip install matplotlib)"
            )
        data = load_arrays_before_tensorflow(args)
        prepare_out_dir(args.out)
        resuming = args.checkpoint_dir is not None and prepare_checkpoint_dir(args)
        if data is None:
            data = load_keras_dataset(args.dataset)
    except UsageError as error:
        print(f"mnist_cnn.py: error: {error}", file=sys.stderr)
        return 2
    except DataUnavailable as error:
        print(f"mnist_cnn.py: error: {error}", file=sys.stderr)
        return 1

    x_train, y_train, x_test, y_test = data
    if args.limit is not None:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    label = dataset_label(args)
    source = describe_source(args)
    say(f"Data: {label} from {source}: {len(x_train)} training and {len(x_test)} test images")
    if resuming:
        say(f"Resuming from the backups in {args.checkpoint_dir}")

    try:
        keras, bnlayers, models, results = train(args, (x_train, y_train, x_test, y_test), say)
        say("")
        save_and_check(keras, models, results, args, x_test, say)
        if args.fold:
            fold_report(bnlayers, models, results, x_test, say)
        if args.recalibrate:
            recalibrate_report(bnlayers, models, results, args, x_train, x_test, y_test, say)
        gaps = curve_gaps(results) if len(results) == 2 else None
        write_history(
            results,
            gaps,
            args,
            label,
            source,
            (len(x_train), len(x_test)),
            args.out / "history.json",
        )
        plot(results, args, label, args.out / "learning_curves.png")
    except CheckFailed as error:
        print(f"mnist_cnn.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resume = (
            " (run the same command again to resume)" if args.checkpoint_dir is not None else ""
        )
        print(f"\nmnist_cnn.py: interrupted{resume}", file=sys.stderr)
        return 1

    if args.checkpoint_dir is not None:
        # The run is complete: its backups would only make the next run skip training.
        for name in results:
            shutil.rmtree(args.checkpoint_dir / name, ignore_errors=True)
            (args.checkpoint_dir / f"{name}-history.json").unlink(missing_ok=True)
        (args.checkpoint_dir / "arguments.json").unlink(missing_ok=True)
        try:
            args.checkpoint_dir.rmdir()
        except OSError:
            pass

    say("")
    print(table(results, gaps))
    say(
        f"\nWrote {args.out / 'history.json'}, {args.out / 'learning_curves.png'} and "
        f"{', '.join(str(args.out / results[n]['model_file']) for n in results)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
