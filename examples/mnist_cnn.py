"""The article's MNIST model trained with bnlayers' and Keras' BatchNormalization, side by side.

The model is the article's, verbatim but for the BatchNormalization line:

    Conv2D(32, 3x3, relu) -> BatchNormalization -> MaxPooling2D(2x2) -> Flatten -> Dense(10)

compiled with adam and sparse categorical cross-entropy and fit for 10
epochs with batch size 64. With `--bn both` (the default) it is trained
twice, once with each layer, from the same initial weights and on the same
batches in the same order, then compared in a table: test accuracy, test
loss, seconds per epoch and the largest gap between the two learning curves.

    python examples/mnist_cnn.py                      # bundled data, offline, 10 epochs per layer
    python examples/mnist_cnn.py --epochs 1 --fold --recalibrate
    python examples/mnist_cnn.py --dataset fashion_mnist \
        --data-dir /usr/share/datasets/fashion-mnist
    python examples/mnist_cnn.py --replicas 2         # MirroredStrategy over 2 logical CPUs

Everything it writes goes to `--out` (default runs/mnist_cnn): history.json,
learning_curves.png and one .keras file per trained model, which is reloaded
and checked to predict the same before the script reports success.

Exit status: 0 on success, 2 for a bad argument or data file, 1 when the
data cannot be downloaded or a check fails, 130 when interrupted (Ctrl-C).
"""

import argparse
import functools
import importlib.util
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The shared module beside this file, also when this file is loaded by path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import _mnist  # noqa: E402
from _common import DataUnavailable  # noqa: E402
from _common import UsageError  # noqa: E402

LAYER_NAMES = {
    "bnlayers": "bnlayers.BatchNormalization",
    "keras": "keras.layers.BatchNormalization",
}
# NumPy's seeds, which keras.utils.set_random_seed sets too.
MAX_SEED = 2**32 - 1


# ------------------------------------------------------------------ arguments


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line instead of argparse's usage block.
        raise UsageError(f"{message} (see --help)")


def _integer(low, high, text):
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        wanted = (
            "a positive integer"
            if high is None
            else f"an integer from {low} to {high}"
        )
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
    return value


def parse_args(argv=None):
    positive = functools.partial(_integer, 1, None)
    p = _Parser(
        prog="mnist_cnn.py",
        description="Train the article's MNIST model with bnlayers' and/or Keras' "
        "BatchNormalization from the same initial weights on the same batches, and compare them.",
        epilog="Data sources: --dataset bundled reads examples/data/mnist_10k.npz (real MNIST, "
        "8,000 train / 2,000 test, shipped here: no download). mnist and fashion_mnist download "
        "the full sets through Keras once (into ~/.keras/datasets), unless --data-dir or --data "
        "points at a local copy. Outputs: history.json, learning_curves.png and "
        "model_<bn>.keras in --out.",
    )
    add = p.add_argument
    add(
        "--bn",
        choices=("bnlayers", "keras", "both"),
        default="both",
        help="which BatchNormalization to train: bnlayers.BatchNormalization, "
        "keras.layers.BatchNormalization, or both side by side (default: both)",
    )
    add(
        "--dataset",
        choices=("bundled", "mnist", "fashion_mnist"),
        default=None,
        help="bundled: the 10,000-digit MNIST subset in examples/data (offline); mnist: full "
        "MNIST via keras.datasets (downloads once); fashion_mnist: full Fashion-MNIST via "
        "keras.datasets, or from --data-dir (default: bundled)",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--data-dir",
        type=pathlib.Path,
        metavar="DIR",
        help="read --dataset mnist or fashion_mnist from the four IDX files in DIR "
        "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte; gzipped or not), e.g. Debian's dataset-fashion-mnist in "
        f"{_common.DEBIAN_FASHION_DIR} (default: none, download through Keras)",
    )
    source.add_argument(
        "--data",
        type=pathlib.Path,
        metavar="PATH",
        help="read the data from a .npz with Keras' keys x_train, y_train, x_test, y_test "
        "(28x28 images, labels 0-9), e.g. a local copy of Keras' mnist.npz (default: none)",
    )
    add(
        "--epochs",
        type=positive,
        default=10,
        metavar="N",
        help="training epochs (default: 10)",
    )
    add(
        "--batch-size",
        type=positive,
        default=64,
        metavar="N",
        help="batch size (default: 64)",
    )
    add(
        "--limit",
        type=positive,
        default=None,
        metavar="N",
        help="train on the first N training examples only, to try things quickly "
        "(default: all of them)",
    )
    add(
        "--seed",
        type=functools.partial(_integer, 0, MAX_SEED),
        default=0,
        help="seed of the initial weights and of the order of the batches in each epoch, "
        f"0 to {MAX_SEED} (default: 0)",
    )
    add(
        "--replicas",
        type=positive,
        default=1,
        metavar="N",
        help="train under tf.distribute.MirroredStrategy over N logical CPU devices, each "
        "taking 1/N of every batch, with BatchNormalization(synchronized=True) so that the "
        "statistics are those of the whole batch; 1 trains on one device without a strategy "
        "(default: 1)",
    )
    add(
        "--fold",
        action="store_true",
        help="after training, fold BN away with bnlayers.fold_batchnorm and report how closely "
        "the folded model agrees with the trained one and how much faster it predicts "
        "(default: off)",
    )
    add(
        "--recalibrate",
        action="store_true",
        help="after training (and after saving the models), set the BN moving statistics to "
        "the exact statistics of the training set with bnlayers.recalibrate and report the "
        "test loss and accuracy before and after (default: off)",
    )
    add(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("runs/mnist_cnn"),
        metavar="DIR",
        help="where to write history.json, learning_curves.png and the .keras models "
        "(default: runs/mnist_cnn)",
    )
    add(
        "--checkpoint-dir",
        type=pathlib.Path,
        default=None,
        metavar="DIR",
        help="back up the training state in DIR after every epoch "
        "(keras.callbacks.BackupAndRestore); started again with the same arguments, a killed "
        "run resumes from its last finished epoch and ends as an uninterrupted run would. The "
        "backups are deleted when the run completes (default: no backups)",
    )
    add(
        "--quiet",
        action="store_true",
        help="print no progress, only the summary table and errors (default: off)",
    )
    args = p.parse_args(argv)

    if args.batch_size < args.replicas:
        raise UsageError(
            f"argument --batch-size: {args.batch_size} is smaller than --replicas "
            f"{args.replicas}; each replica needs at least one example of every batch"
        )
    if args.data is not None and args.dataset == "bundled":
        raise UsageError(
            "--data replaces the bundled file; give --data alone, or with --dataset mnist "
            "or fashion_mnist to name what it holds"
        )
    if args.data_dir is not None and args.dataset in (None, "bundled"):
        raise UsageError(
            "--data-dir reads MNIST or Fashion-MNIST IDX files; say which with "
            "--dataset mnist or --dataset fashion_mnist"
        )
    if args.data is None and args.dataset is None:
        args.dataset = "bundled"
    return args


# ----------------------------------------------------------------------- data


def load_arrays_before_tensorflow(args):
    """All that can be read and checked before TensorFlow loads; None when Keras must download."""
    if args.data is not None:
        return _common.read_npz(args.data, f"--data {args.data}")
    if args.data_dir is not None:
        return _common.read_idx_dir(args.data_dir)
    if args.dataset == "bundled":
        return _common.read_npz(
            _common.BUNDLED, f"bundled data {_common.BUNDLED}"
        )
    _common.check_download(args.dataset)
    return None


# ------------------------------------------------------------------- training


def train(args, data, say):
    import tensorflow as tf

    if args.replicas > 1:  # before TensorFlow initializes its devices
        cpu = tf.config.list_physical_devices("CPU")[0]
        one = tf.config.LogicalDeviceConfiguration()
        tf.config.set_logical_device_configuration(cpu, [one] * args.replicas)
    # Same inputs, same result: a resumed run ends as an uninterrupted one.
    tf.config.experimental.enable_op_determinism()
    # predict() on several models in a row warns about retracing.
    tf.get_logger().setLevel("ERROR")
    import keras

    import bnlayers

    x_train, y_train, x_test, y_test = data
    EpochBatches, EpochLog = _mnist.make_training_parts(keras)
    names = list(_mnist.RUNS) if args.bn == "both" else [args.bn]
    keras.utils.set_random_seed(args.seed)  # the initial weights
    models = _mnist.build_models(keras, bnlayers, names, args.replicas)

    results = {}
    for name, model in models.items():
        batches = EpochBatches(x_train, y_train, args.batch_size, args.seed)
        keep = args.checkpoint_dir
        log = EpochLog(
            name,
            batches,
            args.epochs,
            keep and keep / f"{name}-history.json",
            say,
        )
        callbacks = [log]
        if keep is not None:
            backup = keras.callbacks.BackupAndRestore(
                str(keep / name),
                double_checkpoint=True,
                delete_checkpoint=False,
            )
            callbacks.append(backup)
        s = "s" if args.epochs > 1 else ""
        say(
            f"\nTraining the article's model with {LAYER_NAMES[name]} ({args.epochs} epoch{s})"
        )
        model.fit(
            batches,
            epochs=args.epochs,
            shuffle=False,  # the batches are in EpochBatches' order
            validation_data=(x_test, y_test),
            validation_batch_size=_mnist.EVAL_BATCH_SIZE,
            callbacks=callbacks,
            verbose=0 if args.quiet else (1 if sys.stdout.isatty() else 2),
        )
        loss, accuracy = model.evaluate(
            x_test, y_test, batch_size=_mnist.EVAL_BATCH_SIZE, verbose=0
        )
        results[name] = {
            "layer": LAYER_NAMES[name],
            "synchronized": args.replicas > 1,
        }
        results[name] |= {"history": log.entries, "test_loss": float(loss)}
        results[name]["test_accuracy"] = float(accuracy)
    return keras, bnlayers, models, results


# ----------------------------------------------------------------------- main


def run(args, say):
    """The whole run once the arguments are parsed; raises what main() reports."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(
            "the figure needs matplotlib: pip install -e '.[examples]' (or pip install matplotlib)"
        )
    data = load_arrays_before_tensorflow(args)
    _common.writable(args.out, "--out")
    resuming = (
        args.checkpoint_dir is not None and _mnist.prepare_checkpoint_dir(args)
    )
    x_train, y_train, x_test, y_test = data or _common.load_keras_dataset(
        args.dataset
    )
    x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    label, source = _mnist.describe_data(args)
    say(
        f"Data: {label} from {source}: {len(x_train)} training and {len(x_test)} test images"
    )
    if resuming:
        say(f"Resuming from the backups in {args.checkpoint_dir}")

    keras, bnlayers, models, results = train(
        args, (x_train, y_train, x_test, y_test), say
    )
    say("")
    _mnist.save_and_check(keras, models, results, args.out, x_test, say)
    if args.fold:
        _mnist.fold_report(bnlayers, models, results, x_test, say)
    if args.recalibrate:
        _mnist.recalibrate_report(
            bnlayers, models, results, args, x_train, x_test, y_test, say
        )
    gaps = _mnist.curve_gaps(results) if len(results) == 2 else None
    sizes = (len(x_train), len(x_test))
    _mnist.write_history(
        results, gaps, args, label, source, sizes, args.out / "history.json"
    )
    _mnist.plot(results, args, label, args.out / "learning_curves.png")

    if args.checkpoint_dir is not None:
        _mnist.remove_backups(args.checkpoint_dir, results)
    say("")
    print(_mnist.table(results, gaps))
    files = ", ".join(str(args.out / results[n]["model_file"]) for n in results)
    say(
        f"\nWrote {args.out / 'history.json'}, {args.out / 'learning_curves.png'} and {files}"
    )


def main(argv=None):
    args = None
    try:
        args = parse_args(argv)
        say = (
            (lambda *_, **__: None)
            if args.quiet
            else functools.partial(print, flush=True)
        )
        run(args, say)
        return 0
    except UsageError as error:
        print(f"mnist_cnn.py: error: {error}", file=sys.stderr)
        return 2
    except (DataUnavailable, _mnist.CheckFailed) as error:
        print(f"mnist_cnn.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # 128 + SIGINT, as shells report a command that Ctrl-C stopped.
        resume = args is not None and args.checkpoint_dir is not None
        again = " (run the same command again to resume)" if resume else ""
        print(f"\nmnist_cnn.py: interrupted{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
