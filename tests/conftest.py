"""Shared fixtures for the bnlayers test suite."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# On a GPU, float32 is not always computed in float32: matrix products and
# convolutions default to TensorFloat-32 (10 mantissa bits) on Ampere and
# later under JAX, TensorFlow and cuDNN in PyTorch, and XLA may drop a
# float32 -> float16 -> float32 round trip inside a fusion ("excess
# precision"), so a jitted layer under a mixed policy would see inputs that
# Keras' cast never rounded. The tests compare implementations to float32
# rounding, so they turn both off (set before JAX or TensorFlow start; the
# rest in `_full_float32_on_gpus`). On CPUs the suite passes either way.
# Seen on an H200 with JAX: TF32 put 5.7e-5 between models with identical
# weights, and excess precision 4.8e-4 into a mixed_float16 gamma gradient.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false"
).strip()
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import pathlib

import numpy as np
import pytest

from backend_ops import BACKEND
from backend_ops import HAS_FAST_PATH
from backend_ops import has_x64

REPO = pathlib.Path(__file__).resolve().parents[1]
MNIST_NPZ = REPO / "examples" / "data" / "mnist_10k.npz"

# The suite runs under whichever Keras backend KERAS_BACKEND names. A test
# (or a whole module, through `pytestmark`) that needs one backend says so:
#     @pytest.mark.backends("tensorflow", reason="tf.distribute")
# and is skipped, with that reason, under the others. One that needs float64
# or int64 tensors is marked `needs_x64`: JAX has them only with
# jax_enable_x64 (without, it makes them 32-bit without a word).

# Modules about what only TensorFlow has, skipped whole under other backends.
TENSORFLOW_ONLY_MODULES = {
    "test_fused.py": "the fused kernel is TensorFlow's FusedBatchNormV3",
    "test_sync.py": "synchronized statistics run on tf.distribute",
    "test_multiworker.py": "MultiWorkerMirroredStrategy",
    "test_article_model.py": "trains under TensorFlow's op determinism (test_cross_backend.py "
    "trains the article's model on every backend)",
    "test_example.py": "examples/mnist_cnn.py is written for TensorFlow "
    "(tf.distribute, op determinism)",
}


def _full_float32_on_gpus():
    """TensorFloat-32 off where the backend has a switch for it (see above)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)
    elif BACKEND == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def pytest_configure(config):
    _full_float32_on_gpus()
    config.addinivalue_line(
        "markers",
        "backends(*names, reason): runs only under these Keras backends; "
        "skipped with the reason under the others",
    )
    config.addinivalue_line(
        "markers",
        "needs_x64: uses float64 or int64 tensors (skipped on JAX without jax_enable_x64)",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (
            BACKEND != "tensorflow"
            and item.path.name in TENSORFLOW_ONLY_MODULES
        ):
            item.add_marker(
                pytest.mark.skip(
                    reason=f"needs the tensorflow backend, not {BACKEND}: "
                    + TENSORFLOW_ONLY_MODULES[item.path.name]
                )
            )
            continue
        if item.get_closest_marker("needs_x64") and not has_x64():
            item.add_marker(
                pytest.mark.skip(
                    reason="JAX has no float64/int64 without jax_enable_x64"
                )
            )
        for marker in item.iter_markers("backends"):
            if BACKEND not in marker.args:
                reason = marker.kwargs.get("reason", "")
                item.add_marker(
                    pytest.mark.skip(
                        reason=f"needs the {' or '.join(marker.args)} backend, "
                        f"not {BACKEND}: {reason}"
                    )
                )
                break


@pytest.fixture(scope="session")
def mnist_subset():
    """The bundled 10,000-digit MNIST subset as float32 images in [0, 1]."""
    with np.load(MNIST_NPZ) as data:
        x_train = data["x_train"].astype("float32")[..., None] / 255.0
        x_test = data["x_test"].astype("float32")[..., None] / 255.0
        return (
            x_train,
            data["y_train"].astype("int64"),
            x_test,
            data["y_test"].astype("int64"),
        )


# On a backend with no fast path the automatic choice is the reference
# path, so running both would only repeat every test
# (tests/test_backends.py checks that the two are identical there).
_FUSED_MODES = (
    ([False, None], ["reference", "auto"])
    if HAS_FAST_PATH
    else ([None], ["auto"])
)


@pytest.fixture(params=_FUSED_MODES[0], ids=_FUSED_MODES[1])
def fused_mode(request):
    """The `fused` argument for bnlayers layers: a test that takes it runs
    both the reference keras.ops path (False) and the automatic choice
    (None), which takes the fast path wherever it is eligible. (The parity
    grid chooses per case instead: see test_parity._grid.)"""
    return request.param


@pytest.fixture
def float32_policy_after():
    """Restores the global dtype policy to float32 after the test, whatever it set."""
    import keras

    yield
    keras.config.set_dtype_policy("float32")


def pytest_addoption(parser):
    parser.addoption(
        "--largest-errors",
        action="store_true",
        help="print the table of the largest relative errors measured "
        "(always written to a file; its path is printed in one line)",
    )


def _largest_errors_path(config):
    """Where the table goes: pytest's cache folder, or the system's
    temporary folder when the cache is switched off (-p no:cacheprovider);
    one file per backend, since .ci/run runs two backends at once."""
    import tempfile

    name = f"largest-errors-{BACKEND}.txt"
    if getattr(config, "cache", None) is not None:
        return config.cache.mkdir("bnlayers") / name
    return pathlib.Path(tempfile.gettempdir()) / f"bnlayers-{name}"


def pytest_terminal_summary(terminalreporter, config):
    """The largest error seen per quantity (`bn_reference.rel_err`), the
    measured figures the tolerances' comments quote: written to a file whose
    path is printed in one line (the table with --largest-errors), so that
    pytest's own summary stays the last thing a run prints."""
    import sys

    reference = sys.modules.get("bn_reference")
    if reference is None or not reference.MAX_ERRORS:
        return
    parity_cases = len(reference.CASES_RUN)
    lines = [
        f"{group:22s} {condition:36s} {quantity:34s} {err:.2e}  {case}"
        for (group, condition, quantity), (err, case) in sorted(
            reference.MAX_ERRORS.items()
        )
    ]
    title = f"largest relative errors ({parity_cases} parity cases run)"
    path = _largest_errors_path(config)
    path.write_text("\n".join([title, *lines]) + "\n")
    tr = terminalreporter
    if config.getoption("largest_errors"):
        tr.write_sep("-", title)
        for line in lines:
            tr.write_line(line)
    tr.write_line(
        f"{title[0].upper()}{title[1:]}: {len(lines)} figures in {path}"
    )
