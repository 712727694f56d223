"""Shared fixtures for the bnlayers test suite."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
MNIST_NPZ = REPO / "examples" / "data" / "mnist_10k.npz"


@pytest.fixture(scope="session")
def mnist_subset():
    """The bundled 10,000-digit MNIST subset as float32 images in [0, 1]."""
    with np.load(MNIST_NPZ) as data:
        x_train = data["x_train"].astype("float32")[..., None] / 255.0
        x_test = data["x_test"].astype("float32")[..., None] / 255.0
        return x_train, data["y_train"].astype("int64"), x_test, data["y_test"].astype("int64")


@pytest.fixture(params=[False, None], ids=["reference", "auto"])
def fused_mode(request):
    """The `fused` argument for bnlayers layers: every parity test runs both
    the reference keras.ops path (False) and the automatic choice (None),
    which takes the fused TensorFlow kernel wherever it is eligible."""
    return request.param


@pytest.fixture
def float32_policy_after():
    """Restores the global dtype policy to float32 after the test, whatever it set."""
    import keras

    yield
    keras.config.set_dtype_policy("float32")


def pytest_terminal_summary(terminalreporter):
    """Print the largest parity errors seen, when parity tests ran."""
    import sys

    reference = sys.modules.get("bn_reference")
    if reference is None or not reference.MAX_ERRORS:
        return
    tr = terminalreporter
    tr.write_sep("-", f"parity: {len(reference.CASES_RUN)} cases, largest relative errors")
    for (against, policy, quantity), (err, case) in sorted(reference.MAX_ERRORS.items()):
        tr.write_line(f"vs {against:18s} {policy:14s} {quantity:21s} {err:.2e}  {case}")
