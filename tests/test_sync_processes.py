"""`synchronized=True` across real processes on PyTorch and JAX, on 127.0.0.1.

One launch per backend (process start-up is most of the time), four
replicas: four PyTorch processes in a gloo process group, or two JAX
processes of two CPU devices each under `jax.distributed` and
`keras.distribution.DataParallel`. Each process runs every case of
`tests/_sync_process_checks.py` and prints its measured errors against the
float64 reference of the global batch (of each group's, with
`replica_group_size=2`); the assertions are here. TensorFlow's
counterparts are `test_sync.py` (MirroredStrategy) and
`test_multiworker.py`. All processes are killed as soon as one fails, and
after `TIMEOUT_S` in any case.
"""

import json
import os
import pathlib
import sys

import keras
import pytest

import _sync_process_checks as checks
import bn_reference as ref
from example_scripts import example_module

pytestmark = pytest.mark.backends(
    "torch",
    "jax",
    reason="TensorFlow's are test_sync.py and test_multiworker.py",
)

HERE = pathlib.Path(__file__).resolve().parent
BACKEND = keras.backend.backend()
TIMEOUT_S = 300
_common = example_module("_common")
free_ports, run_processes = _common.free_ports, _common.run_processes
# bn_reference.rel_err, the largest over processes and cases (PyTorch 2.13
# over 4 processes / JAX 0.10.2 over 2 x 2 devices, offsets 0 to 1e6):
# outputs 1.5e-7 / 1.8e-7, input gradients 1.4e-7 / 2.8e-7, gamma and beta
# gradients 3.2e-7 / 2.5e-7, moving mean 7.2e-8 / 1.4e-7, moving variance
# (relative per feature) 1.0e-7 / 1.4e-7.
STATISTICS_RTOL = 2e-6
GRADIENT_RTOL = 4e-6
# Training losses, relative: the processes sum in another order than one
# process (measured 2.4e-7 on PyTorch, 7.9e-8 on JAX).
TRAIN_RTOL = 1e-5


def _launch():
    """Start every process; the JSON each printed, in rank order."""
    if BACKEND == "torch":
        world = checks.REPLICAS
        extra = {}
    else:
        world = checks.REPLICAS // checks.DEVICES_PER_PROCESS
        extra = {
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={checks.DEVICES_PER_PROCESS}"
        }
    (port,) = free_ports(1)
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        **extra,
    )
    commands = [
        [sys.executable, str(HERE / "_sync_process_checks.py")]
        + [str(rank), str(world), str(port)]
        for rank in range(world)
    ]
    codes, outputs = run_processes(commands, env, TIMEOUT_S)
    for rank, (code, (_out, err)) in enumerate(
        zip(codes, outputs, strict=True)
    ):
        if code != 0:
            pytest.fail(
                f"{BACKEND} process {rank} failed ({code}), or another did "
                f"or {TIMEOUT_S} s passed:\n{err[-3000:]}"
            )
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


@pytest.fixture(scope="module")
def results():
    return _launch()


def test_statistics_and_gradients_equal_the_global_batch(results):
    """Every process, every case: outputs, gradients and moving statistics
    of its group's global batch (all replicas without groups), at means 0 to
    1e6, with masks, uneven and empty shares (PyTorch)."""
    expected_cases = [
        name
        for name, (_, sizes, _, _) in checks.CASES.items()
        if BACKEND == "torch" or sizes is None
    ]
    for measured in results:
        assert sorted(measured) == sorted(expected_cases + ["train"])
        for name in expected_cases:
            for quantity, err in measured[name].items():
                tol = (
                    GRADIENT_RTOL
                    if quantity.startswith("d")
                    else STATISTICS_RTOL
                )
                ref.check_error(err, tol, f"{quantity} ({name})")


def test_processes_train_as_one_with_the_global_batch(results):
    """The article's model: DistributedDataParallel (PyTorch) or DataParallel
    (JAX), each process its share of every global batch, against one process
    training on the global batches."""
    single = checks.single_process_training()
    for measured in results:
        train = measured["train"]
        for key in ("losses", "moving_mean", "moving_variance"):
            ref.assert_close(train[key], single[key], TRAIN_RTOL, key)
