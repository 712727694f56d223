"""Lint the GitHub Actions workflow and keep it in step with `.ci/run`.

The workflow is validated against the GitHub workflow JSON schema that
`check-jsonschema` (in the dev extra) ships, and audited by `zizmor` (also
in the dev extra) with `--offline`, so neither check needs the network.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest
from ruamel.yaml import YAML  # a dependency of check-jsonschema

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
CI_RUN = REPO / ".ci" / "run"


def _lint(path):
    # A proxy that refuses every connection proves the check is offline.
    env = dict(
        os.environ,
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.github-workflows",
            str(path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _audit(path):
    """zizmor's security audit of a workflow file, offline."""
    env = dict(
        os.environ,
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
    )
    return subprocess.run(
        ["zizmor", "--offline", "--no-progress", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _load(text):
    return YAML(typ="safe").load(text)


@pytest.fixture(scope="module")
def workflow():
    return _load(WORKFLOW.read_text())


def test_workflow_passes_the_schema_offline():
    proc = _lint(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "breakage",
    [
        ("    runs-on: ubuntu-latest\n", ""),  # a job needs somewhere to run
        ("    steps:\n", "    step:\n"),  # unknown key
        (
            "    timeout-minutes: 60\n",
            "    timeout-minutes: [60]\n",
        ),  # wrong type
    ],
    ids=["no-runs-on", "unknown-key", "wrong-type"],
)
def test_the_lint_rejects_a_broken_workflow(tmp_path, breakage):
    """The schema check is not a formality: each of these breakages fails it."""
    old, new = breakage
    text = WORKFLOW.read_text()
    assert old in text
    broken = tmp_path / "ci.yml"
    broken.write_text(text.replace(old, new, 1))
    assert _lint(broken).returncode != 0


def test_workflow_passes_the_security_audit_offline():
    proc = _audit(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# A commit SHA and the release it is, as the workflow writes them.
PINNED = re.compile(
    r"uses: ([\w.-]+/[\w.-]+)@([0-9a-f]{40})  # (v\d+\.\d+\.\d+)$", re.M
)


def test_every_action_is_pinned_to_a_commit_with_its_release_named(workflow):
    uses = [
        s["uses"]
        for job in workflow["jobs"].values()
        for s in job["steps"]
        if "uses" in s
    ]
    pinned = PINNED.findall(WORKFLOW.read_text())
    assert uses and [f"{name}@{sha}" for name, sha, _ in pinned] == uses
    checkout = [
        s
        for s in workflow["jobs"]["test"]["steps"]
        if "checkout" in s.get("uses", "")
    ]
    assert checkout[0]["with"]["persist-credentials"] is False


@pytest.mark.parametrize("breakage", ["tag", "credentials"])
def test_the_audit_rejects_an_unsafe_workflow(tmp_path, breakage):
    """The audit is not a formality: a tag instead of a commit, or a checkout
    that keeps its token, fails it."""
    text = WORKFLOW.read_text()
    if breakage == "tag":
        name, sha, release = PINNED.findall(text)[0]
        broken = text.replace(
            f"{name}@{sha}", f"{name}@{release.split('.')[0]}", 1
        )
    else:
        broken = text.replace(
            "        with:\n          persist-credentials: false\n", "", 1
        )
    assert broken != text
    path = tmp_path / "ci.yml"
    path.write_text(broken)
    proc = _audit(path)
    assert proc.returncode != 0
    assert (
        "unpinned-uses" if breakage == "tag" else "artipacked"
    ) in proc.stdout + proc.stderr


def test_ci_script_runs_the_tooling():
    """Lint, format, types, the audit and the strict docs build, each failing CI,
    in the block that CI_PARTS=lint selects."""
    text = CI_RUN.read_text()
    block = re.search(r"^if wants lint; then\n(.*?)^fi\n", text, re.S | re.M)
    assert block, "no `if wants lint` block in .ci/run"
    # Each command on a line of its own (a trailing comment aside).
    script = [
        line.split("  #")[0].strip() for line in block.group(1).splitlines()
    ]
    for command in (
        'python3 -m pip install -q -e ".[docs]"',
        "ruff check .",
        "ruff format --check .",
        "mypy bnlayers",
        "zizmor --offline .github/workflows/ci.yml",
        "NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet",
    ):
        assert command in script, command
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    names = {
        key: {re.split(r"[<>=\[ ]", req)[0] for req in reqs}
        for key, reqs in extras.items()
    }
    assert {"ruff", "mypy", "zizmor", "check-jsonschema", "pytest"} <= names[
        "dev"
    ]
    assert {"mkdocs-material", "mkdocstrings-python"} <= names["docs"]


def test_every_job_runs_the_local_ci_script(workflow):
    for name, job in workflow["jobs"].items():
        runs = [step["run"].strip() for step in job["steps"] if "run" in step]
        assert "bash .ci/run" in runs, f"job {name} does not run .ci/run"


def test_lint_and_docs_run_once_and_nightly_keras_only_reports(workflow):
    """One job lints and builds the docs; the matrix jobs only test; the
    keras-nightly job tests and cannot fail the workflow."""
    jobs = workflow["jobs"]
    parts = {
        name: job.get("env", {}).get("CI_PARTS") for name, job in jobs.items()
    }
    assert parts == {"lint": "lint", "test": "tests", "keras-nightly": "tests"}
    assert "strategy" not in jobs["lint"]
    nightly = jobs["keras-nightly"]
    assert nightly["continue-on-error"] is True
    assert nightly["env"]["CI_KERAS"] == "nightly"
    assert all(
        job.get("continue-on-error") is not True
        for name, job in jobs.items()
        if name != "keras-nightly"
    )
    script = CI_RUN.read_text()
    # Without CI_PARTS, .ci/run does both (the local run).
    assert 'parts="${CI_PARTS:-lint tests}"' in script
    assert "wants tests || exit 0" in script
    assert "pip install -q keras-nightly" in script


def test_one_supported_keras_range_for_the_package_and_the_tools():
    """pyproject.toml's keras requirement is the range the tools accept."""
    from bnlayers.tools import _keras_internals

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())[
        "project"
    ]["dependencies"]
    (keras_req,) = [d for d in dependencies if re.match(r"keras\b", d)]
    bounds = dict(
        (op, tuple(int(n) for n in version.split(".")))
        for op, version in re.findall(r"(>=|<)\s*(\d+\.\d+)", keras_req)
    )
    assert (bounds[">="], bounds["<"]) == _keras_internals.CHECKED, keras_req
    # The tools accept the Keras that keras-nightly installed when the range
    # was last checked, and refuse the first release outside it.
    low, high = _keras_internals.CHECKED
    assert low <= _keras_internals._release("3.16.0.dev2026102704") < high
    assert not low <= _keras_internals._release("3.17.0") < high


def _pytest_args(command):
    """Arguments after `-m pytest` in a shell command line."""
    for part in re.split(r"&&|;|\n", command):
        words = shlex.split(part, comments=True)
        for i in range(len(words) - 1):
            if words[i] == "-m" and words[i + 1] == "pytest":
                return words[i + 2 :]
    return None


def test_ci_script_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    match = re.search(r"Run the tests.*?```bash\n(.*?)```", readme, re.S)
    assert match, "README has no test command block"
    readme_args = _pytest_args(match.group(1))
    assert readme_args is not None, match.group(1)
    script = CI_RUN.read_text()
    assert _pytest_args(script) == readme_args
    assert 'install -q -e ".[dev]"' in script or 'install -e ".[dev]"' in script
    assert "set -euo pipefail" in script  # any failing step fails CI


def _slug(heading):
    """The anchor GitHub and MkDocs give a heading (for the headings used here)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return re.sub(r" ", "-", text)


def test_readme_is_short_and_its_links_resolve():
    """The README points into docs/; every relative link and anchor it uses exists."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    relative = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert any(link.startswith("docs/") for link in relative)
    for link in relative:
        path, _, anchor = link.partition("#")
        target = REPO / path
        assert target.is_file(), link
        if anchor:
            headings = re.findall(r"^#+ (.*)$", target.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, link


def test_matrix_covers_the_supported_pythons_with_a_pip_cache(workflow):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    lowest = re.fullmatch(
        r">=\s*3\.(\d+)", pyproject["project"]["requires-python"]
    )
    assert lowest, pyproject["project"]["requires-python"]
    job = workflow["jobs"]["test"]
    versions = job["strategy"]["matrix"]["python-version"]
    assert len(versions) >= 3
    minors = sorted(int(str(v).split(".")[1]) for v in versions)
    # The lowest Python the package claims is the lowest one CI tests.
    assert minors[0] == int(lowest.group(1))
    # ... and every tested Python can install the runtime dependencies.
    for dist in ("keras", "tensorflow"):
        needs = metadata.metadata(dist)["Requires-Python"]
        low = re.search(r">=\s*3\.(\d+)", needs or "")
        if low:
            assert minors[0] >= int(low.group(1)), (
                f"{dist} needs Python {needs}"
            )
    setup = [
        s
        for s in job["steps"]
        if str(s.get("uses", "")).startswith("actions/setup-python")
    ]
    assert setup and setup[0]["with"]["cache"] == "pip"
    assert setup[0]["with"]["python-version"] == "${{ matrix.python-version }}"


def test_pytest_summary_is_the_last_thing_printed(tmp_path):
    """The largest-errors table goes to a file named in one line (not to the
    terminal), and pytest's pass/fail line stays last."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), env.get("PYTHONPATH")])
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-o",
            f"cache_dir={tmp_path / 'cache'}",
            "tests/test_math.py",
            "-k",
            "normalize",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"=+ \d+ passed.* in [\d.]+s.* =+", last), last
    named = re.findall(
        r"^Largest relative errors .* figures in (.+)$", run.stdout, re.M
    )
    backend = env.get("KERAS_BACKEND", "tensorflow")
    path = (
        tmp_path / "cache" / "d" / "bnlayers" / f"largest-errors-{backend}.txt"
    )
    assert named == [str(path)], run.stdout
    table = path.read_text().splitlines()
    assert table[0].startswith("largest relative errors")
    # The measured errors of float32 normalization (about 1e-7 here).
    errors = [
        float(re.search(r" (\d\.\d\de[-+]\d\d)\b", line).group(1))
        for line in table[1:]
        if "test_normalize" in line
    ]
    assert errors and max(errors) < 1e-5, table
    assert not any(line in run.stdout for line in table[1:])
