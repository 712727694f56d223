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
