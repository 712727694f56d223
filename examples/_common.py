"""What the examples share: the article's model, the data readers and the timing harness.

Nothing here imports Keras or a backend at import time, so a script can check
its arguments and read its data before TensorFlow (or JAX, or PyTorch) loads.
The scripts beside this file import it as `_common`, and so do the tests
(through tests/example_scripts.py): one module under one name.
"""

import gzip
import json
import os
import pathlib
import platform
import statistics
import struct
import time
import zipfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
BUNDLED = HERE / "data" / "mnist_10k.npz"
KERAS_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
# What keras.datasets.*.load_data() fetches, relative to Keras' cache directory.
KERAS_FILES = {
    "mnist": ["datasets/mnist.npz"],
    "fashion_mnist": [
        f"datasets/fashion-mnist/{split}-{kind}-idx{dims}-ubyte.gz"
        for split in ("train", "t10k")
        for kind, dims in (("labels", 1), ("images", 3))
    ],
}
IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned bytes, 3 or 1 dimensions


class UsageError(Exception):
    """A bad argument or data file: the scripts report it in one line, exit status 2."""


class DataUnavailable(Exception):
    """The data could not be fetched: the scripts report it in one line, exit status 1."""


# ---------------------------------------------------------------- the model


def article_model(bn, filters=32):
    """The article's model, verbatim but for the BatchNormalization line
    (`bn`, a layer instance), uncompiled. `filters` shrinks the Conv2D where
    only the shape of the model matters, not its accuracy."""
    import keras

    return keras.Sequential(
        [
            keras.layers.InputLayer(shape=(28, 28, 1)),
            keras.layers.Conv2D(filters, (3, 3), activation="relu"),
            bn,
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def randomize_batchnorm(model, seed):
    """BN statistics and affine weights far from their initial values."""
    import keras

    import bnlayers

    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(
            layer,
            (keras.layers.BatchNormalization, bnlayers.BatchNormalization),
        ):
            n = layer.moving_mean.shape
            layer.set_weights(
                [
                    rng.normal(1.0, 0.3, n).astype("float32"),
                    rng.normal(0.0, 0.5, n).astype("float32"),
                    rng.normal(0.0, 0.5, n).astype("float32"),
                    rng.uniform(0.3, 3.0, n).astype("float32"),
                ]
            )


def free_ports(n):
    """`n` distinct free TCP ports on 127.0.0.1."""
    import socket

    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_processes(commands, env, timeout):
    """Run `commands` side by side and wait for all of them, at most `timeout` s.

    All are killed as soon as one fails (the others would otherwise wait on
    a collective until the deadline) or when the time is up. Returns each
    process's return code (negative where it was killed) and its (stdout,
    stderr), in order.
    """
    import subprocess

    procs = [
        subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for command in commands
    ]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        outputs = [p.communicate() for p in procs]
    return [p.returncode for p in procs], outputs


# ----------------------------------------------------------------- the data


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
        low, high = int(x.min()), int(x.max())
        if low < 0 or high > 255:
            raise UsageError(
                f"{source}: {name} holds values {low}..{high}; expected 0..255"
            )
        scale = 255.0
    elif x.dtype.kind == "f":
        if not np.isfinite(x).all():
            raise UsageError(f"{source}: {name} holds NaN or infinite values")
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 255.0:
            raise UsageError(
                f"{source}: {name} holds values {low:g}..{high:g}; expected 0..255 or 0..1"
            )
        # Floats are grey levels 0..255 unless they already lie in [0, 1].
        scale = 255.0 if high > 1.0 else 1.0
    else:
        raise UsageError(
            f"{source}: {name} has dtype {x.dtype}; expected integer or float pixels"
        )
    return (x.astype("float32") / np.float32(scale))[..., None]


def _labels(source, name, y, count):
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.shape[0] != count:
        raise UsageError(
            f"{source}: {name} has shape {y.shape}; expected ({count},), one label per image"
        )
    if (
        y.dtype.kind == "f"
        and np.isfinite(y).all()
        and (y == np.round(y)).all()
    ):
        y = y.astype("int64")
    if y.dtype.kind not in "ui":
        raise UsageError(
            f"{source}: {name} has dtype {y.dtype}; expected integer class labels"
        )
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= NUM_CLASSES:
        raise UsageError(
            f"{source}: {name} holds labels {low}..{high}; expected 0..9"
        )
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
    y_train = _labels(
        source, "y_train", np.asarray(arrays["y_train"]), len(x_train)
    )
    x_test = _images(source, "x_test", np.asarray(arrays["x_test"]))
    y_test = _labels(
        source, "y_test", np.asarray(arrays["y_test"]), len(x_test)
    )
    return x_train, y_train, x_test, y_test


def read_npz(path, source=None):
    """The four arrays of an .npz with Keras' keys, checked; `source` names it in errors."""
    path = pathlib.Path(path)
    source = source or str(path)
    if not path.is_file():
        raise UsageError(f"{source}: no such file")
    # An .npz is a zip archive; anything else would reach NumPy's other
    # readers (.npy, pickles), whose errors talk about something else.
    if not zipfile.is_zipfile(path):
        raise UsageError(
            f"{source} is not an .npz archive (a zip of arrays, as numpy.savez writes); "
            "expected one with the keys x_train, y_train, x_test, y_test"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in KERAS_KEYS if key in npz.files}
    except (
        Exception
    ) as error:  # a damaged archive or member, or an object array
        raise UsageError(
            f"{source} is not a readable .npz archive ({error})"
        ) from None
    return check_arrays(source, arrays)


def load_bundled():
    """The bundled 10,000-digit MNIST subset: (x_train, y_train, x_test, y_test), checked."""
    return read_npz(BUNDLED, "bundled data")


def _idx_file(directory, stem):
    # MNIST's own distribution spells the names with a dot before "idx".
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise UsageError(f"--data-dir {directory}: no {stem} or {stem}.gz in it")


def read_idx(path, dims):
    """One IDX file of unsigned bytes with `dims` dimensions (gzipped or not)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            raw = file.read()
    except (OSError, EOFError) as error:
        raise UsageError(f"{path}: cannot read it ({error})") from None
    header = 4 + 4 * dims
    if len(raw) < header or struct.unpack(">i", raw[:4])[0] != IDX_MAGIC[dims]:
        raise UsageError(
            f"{path}: not an IDX file of {dims}-dimensional unsigned bytes"
        )
    shape = struct.unpack(f">{dims}i", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise UsageError(
            f"{path}: holds {len(raw) - header} bytes of data, its header says {shape}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def read_idx_dir(directory):
    """MNIST or Fashion-MNIST from the four IDX files of its distribution in `directory`."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise UsageError(f"--data-dir {directory}: no such directory")
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        arrays[f"x_{split}"] = read_idx(
            _idx_file(directory, f"{prefix}-images-idx3-ubyte"), 3
        )
        arrays[f"y_{split}"] = read_idx(
            _idx_file(directory, f"{prefix}-labels-idx1-ubyte"), 1
        )
    return check_arrays(f"--data-dir {directory}", arrays)


def writable(directory, option):
    """Creates `directory` if needed and checks it takes files; `option` names it in errors."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ".write-test").write_text("")
        (directory / ".write-test").unlink()
    except OSError as error:
        raise UsageError(
            f"{option} {directory}: cannot write there ({error.strerror})"
        ) from None


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


def check_download(dataset):
    """Fails fast, before a backend loads, when Keras would have to download but cannot."""
    import urllib.error
    import urllib.request

    # Where keras.utils.get_file keeps downloads: $KERAS_HOME or ~/.keras,
    # or /tmp/.keras when that is not writable.
    home = os.environ.get("KERAS_HOME") or os.path.join(
        os.path.expanduser("~"), ".keras"
    )
    homes = [pathlib.Path(home), pathlib.Path("/tmp/.keras")]
    missing = [
        f
        for f in KERAS_FILES[dataset]
        if not any((h / f).is_file() for h in homes)
    ]
    if not missing:
        return
    url = KERAS_ORIGIN + pathlib.PurePosixPath(missing[0]).name
    try:
        urllib.request.urlopen(
            urllib.request.Request(url, method="HEAD"), timeout=20
        ).close()
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise DataUnavailable(
            download_advice(dataset, getattr(error, "reason", error))
        ) from None


def load_keras_dataset(dataset):
    """Full MNIST or Fashion-MNIST through keras.datasets (downloads once), checked."""
    import keras

    loader = {
        "mnist": keras.datasets.mnist,
        "fashion_mnist": keras.datasets.fashion_mnist,
    }[dataset]
    try:
        (x_train, y_train), (x_test, y_test) = loader.load_data()
    except (
        Exception
    ) as error:  # get_file wraps every network failure in a bare Exception
        raise DataUnavailable(download_advice(dataset, error)) from None
    arrays = dict(
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test
    )
    return check_arrays(f"keras.datasets.{dataset}", arrays)


# ------------------------------------------------------------------- timing

# Each timed block repeats a call until it lasts this long, so that timer
# resolution and per-call jitter stay small next to it.
MIN_BLOCK_SECONDS = 0.05


def interleaved(contenders, rounds, min_block=MIN_BLOCK_SECONDS, warmup=2):
    """Per-call seconds of each contender in each round, as (wall, cpu) dicts of lists.

    `contenders` maps a name to a no-argument callable that runs one call to
    completion. Each is called `warmup` times (tracing, compiling, first-call
    costs), then given a block of calls lasting at least `min_block` (one
    call when `min_block` is 0, for calls that are long already); every
    round times one block of each, starting with a different contender each
    round, so that a load change on a shared machine hits all of them alike.
    CPU time is this process's: it hardly depends on what else runs on the
    machine, a check on the wall-time figures.
    """
    if rounds < 1:
        raise ValueError(
            f"`rounds` must be at least 1. Received: rounds={rounds}"
        )
    repeats = {}
    for name, fn in contenders.items():
        for _ in range(warmup):
            fn()
        n = 1
        while min_block > 0:
            start = time.perf_counter()
            for _ in range(n):
                fn()
            if time.perf_counter() - start >= min_block or n >= 1 << 16:
                break
            n *= 2
        repeats[name] = n
    names = list(contenders)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn, n = contenders[name], repeats[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                fn()
            wall[name].append((time.perf_counter() - start) / n)
            cpu[name].append((time.process_time() - start_cpu) / n)
    return wall, cpu


def median_ratio(numerator, denominator):
    """The median of the per-round ratios: what a ratio of interleaved timings means."""
    return statistics.median(
        a / b for a, b in zip(numerator, denominator, strict=True)
    )


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every OS
        return None


def accelerator(backend):
    """The GPU the Keras backend computes on, or "no GPU"."""
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return details.get("device_name", gpus[0].name)
    elif backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform == "gpu":
            return device.device_kind
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    return "no GPU"


def versions():
    """Keras' and its backend's versions: {"keras": "3.15.1", "tensorflow": "2.21.0"}."""
    import importlib

    import keras

    backend = keras.backend.backend()
    return {
        "keras": keras.__version__,
        backend: importlib.import_module(backend).__version__,
    }


def machine_line():
    """One line for a figure's caption: CPU, cores, accelerator, backend and versions."""
    import keras

    backend = keras.backend.backend()
    soft = ", ".join(f"{k} {v}" for k, v in versions().items())
    return f"{os.cpu_count()} CPU cores, {cpu_name()}, {accelerator(backend)}; {soft}"


def publish(text, data, prefix=None):
    """Print `text`; with a `prefix`, also write it to PREFIX.md and `data` as JSON to
    PREFIX.json."""
    print(text)
    if prefix is None:
        return
    prefix = pathlib.Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(f"{prefix}.md").write_text(text)
    pathlib.Path(f"{prefix}.json").write_text(json.dumps(data, indent=1) + "\n")
