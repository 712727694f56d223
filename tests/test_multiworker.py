"""Synchronized BN under `MultiWorkerMirroredStrategy`: two worker processes on 127.0.0.1.

Each worker (`tests/_multiworker_worker.py`) trains the article's model (4
filters) for 5 Adam steps on its half of every global batch; the global
losses equal one process's, and both must end with identical moving
statistics (and weights), equal to one process training on the global
batches. The BN layer's inputs have a mean near 1e3 next to a spread
near 1, where E[x^2] - E[x]^2 in float32 keeps only a few bits. Loopback
only; the workers are killed on any failure or after `TIMEOUT_S`, which
frees their ports.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import _multiworker_worker as worker
import bn_reference as ref

HERE = pathlib.Path(__file__).resolve().parent
TIMEOUT_S = 600
# Two workers sum their halves in another order than one process sums the
# whole batch, and five Adam steps carry that on: a few float32 ulps
# (bn_reference.rel_err, measured 1.2e-5 on the weights, 1.3e-6 on the
# moving variance).
RTOL = 1e-4
# The global batch's loss at each of the 5 steps, relative (measured
# 8.1e-7).
LOSS_RTOL = 1e-5


def _free_ports(n):
    """Ports the OS says are free now on 127.0.0.1 (released just before use)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _run_workers():
    ports = _free_ports(2)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    env.pop("TF_CONFIG", None)
    # Only the worker's own TF_CONFIG and loopback: no proxy may catch 127.0.0.1.
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "_multiworker_worker.py"), str(i)]
            + [str(p) for p in ports],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    outputs = []
    try:
        for i, proc in enumerate(procs):
            try:
                out, err = proc.communicate(
                    timeout=max(1.0, deadline - time.monotonic())
                )
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {i} did not finish within {TIMEOUT_S} s")
            if proc.returncode != 0:
                pytest.fail(
                    f"worker {i} failed ({proc.returncode}):\n{err[-3000:]}"
                )
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    return outputs, ports


def _port_is_free(port):
    """No process listens on `port` any more.

    SO_REUSEADDR lets the bind through the TIME_WAIT that the workers'
    closed connections leave for a minute (ordinary TCP), but not past a
    socket still listening.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.slow
def test_two_workers_match_one_process_with_the_global_batch():
    results, ports = _run_workers()
    assert [r["num_replicas_in_sync"] for r in results] == [2, 2]
    first, second = results
    # The workers agree bit for bit: synchronized statistics are the same
    # numbers on every replica, so the moving averages never drift apart.
    for key in ("moving_mean", "moving_variance"):
        np.testing.assert_array_equal(first[key], second[key])
    for a, b in zip(first["weights"], second["weights"], strict=False):
        np.testing.assert_array_equal(a, b)

    single = worker.train(worker.build_model())
    assert first["losses"] == second["losses"]
    ref.assert_close(first["losses"], single["losses"], LOSS_RTOL, "losses")
    for key in ("moving_mean", "moving_variance"):
        ref.assert_close(first[key], single[key], RTOL, key)
    for a, b in zip(first["weights"], single["weights"], strict=False):
        ref.assert_close(a, b, RTOL, "weights")
    # The statistics did move away from where they started.
    start = worker.build_model().get_layer("bn")
    assert (
        np.min(np.abs(np.subtract(single["moving_mean"], start.moving_mean)))
        > 0.1
    )
    assert (
        np.min(
            np.abs(
                np.subtract(single["moving_variance"], start.moving_variance)
            )
        )
        > 0.01
    )

    for port in ports:
        assert _port_is_free(port), (
            f"port {port} still in use after the workers ended"
        )
