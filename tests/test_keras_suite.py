"""Keras' own tests of its BatchNormalization layer, run against bnlayers' layer.

The test file ships inside the installed `keras` package. At test time it
is read from there, `layers.BatchNormalization` is replaced by
`bnlayers.BatchNormalization` (a text substitution; nothing of Keras' test
code is kept in this repository), and the result is run by pytest in a
subprocess under the current Keras backend, with this checkout's bnlayers
first on the path.
"""

import os
import pathlib
import re
import subprocess
import sys
from xml.etree import ElementTree

import keras
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
KERAS_TEST = "src/layers/normalization/batch_normalization_test.py"
# Keras 3.15.1 has 33 tests in that file; fewer would mean some were
# skipped or not collected, and would pass silently.
MIN_TESTS = 33
_CLASS = re.compile(r"\blayers\.BatchNormalization\b")


def _substituted_suite():
    path = pathlib.Path(keras.__file__).parent / KERAS_TEST
    if not path.is_file():
        pytest.skip(
            f"the installed Keras {keras.__version__} ships no test files "
            f"(no {KERAS_TEST}; keras-nightly wheels leave them out)"
        )
    source = path.read_text()
    suite, count = _CLASS.subn("bnlayers.BatchNormalization", source)
    assert count >= 10, (
        f"only {count} uses of layers.BatchNormalization in Keras' {KERAS_TEST}"
    )
    return "import bnlayers\n" + suite


def test_keras_batch_normalization_suite_passes(tmp_path):
    (tmp_path / "test_keras_bn.py").write_text(_substituted_suite())
    # Keras' marker, declared so that pytest does not warn; its own conftest
    # (which skips what a backend cannot train) is not used: every backend
    # tested here can train.
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n    requires_trainable_backend\n"
    )
    env = dict(os.environ)
    env["KERAS_BACKEND"] = keras.backend.backend()
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), env.get("PYTHONPATH")])
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    report = tmp_path / "report.xml"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rfEs",
            "--tb=short",
            "--disable-warnings",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            "test_keras_bn.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    output = (run.stdout + run.stderr)[-20000:]
    assert report.exists(), (
        f"pytest wrote no report (exit {run.returncode}):\n{output}"
    )
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    collected, failed, errors, skipped = (
        int(suite.get(key))
        for key in ("tests", "failures", "errors", "skipped")
    )
    passed = collected - failed - errors - skipped
    print(
        f"Keras' BatchNormalization tests on {env['KERAS_BACKEND']}: "
        f"{passed} passed of {collected}"
    )
    assert (failed, errors) == (0, 0), (
        f"{failed} failed, {errors} errors:\n{output}"
    )
    assert passed == collected, f"{skipped} skipped:\n{output}"
    assert collected >= MIN_TESTS, (
        f"only {collected} tests collected:\n{output}"
    )
    assert run.returncode == 0, output
