"""The skip guard (tests/skip_guard.py), tried on small suites run by a real pytest in a subprocess:
in CI a test that did not run fails the run unless its reason is allow-listed; outside CI it does not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CONFTEST = """
import skip_guard

def pytest_configure(config):
    skip_guard.register(config)
"""

ALLOWLIST = """# The demo's tool is missing on purpose: acceptable for this test of the guard.
demo tool (is|was) absent
"""

SUITE = """
import pytest

@pytest.fixture
def tool():
    pytest.skip("the fixture's service is absent")

def test_runs():
    pass

def test_allowed():
    pytest.skip("demo tool is absent")

def test_unlisted():
    pytest.skip("no compiler here")

@pytest.mark.skipif(True, reason="not on this platform")
def test_marked():
    pass

def test_in_fixture(tool):
    pass

@pytest.mark.xfail(reason="known to be broken")
def test_xfailed():
    assert False

@pytest.mark.xfail(reason="thought broken")
def test_xpassed():
    pass
"""


def _suite(root: Path, files: dict[str, str], allowlist: str = ALLOWLIST) -> Path:
    (root / "tests").mkdir(parents=True)
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "tests" / "conftest.py").write_text(CONFTEST)
    (root / "tests" / "skip-allowlist.txt").write_text(allowlist)
    for name, text in files.items():
        (root / "tests" / name).write_text(text)
    return root


def _pytest(root: Path, ci: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_in_ci_only_allowlisted_skips_pass(tmp_path: Path) -> None:
    root = _suite(tmp_path, {"test_allowed.py": SUITE.split("def test_unlisted")[0]})
    done = _pytest(root, "true")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed, 1 skipped" in done.stdout and "NOT RUN" not in done.stdout
    assert "skip allow-list tests/skip-allowlist.txt: 1 entries (CI is set" in done.stdout
    assert "allowed: demo tool (is|was) absent" in done.stdout


def test_in_ci_every_unlisted_way_of_not_running_fails_the_run_by_name(tmp_path: Path) -> None:
    module_skip = "import pytest\npytest.importorskip('no_such_module_for_the_guard')\n\ndef test_never():\n    pass\n"
    root = _suite(tmp_path, {"test_demo.py": SUITE, "test_module.py": module_skip})
    done = _pytest(root, "true")
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
    not_run = sorted(line for line in done.stdout.splitlines() if line.startswith("NOT RUN "))
    assert not_run == sorted(
        [
            "NOT RUN tests/test_demo.py::test_unlisted: no compiler here",
            "NOT RUN tests/test_demo.py::test_marked: not on this platform",
            "NOT RUN tests/test_demo.py::test_in_fixture: the fixture's service is absent",
            "NOT RUN tests/test_demo.py::test_xfailed: xfailed: known to be broken",
            "NOT RUN tests/test_demo.py::test_xpassed: xpassed: thought broken",
            "NOT RUN tests/test_module.py: could not import 'no_such_module_for_the_guard': "
            "No module named 'no_such_module_for_the_guard'",
        ]
    ), done.stdout
    assert "test_allowed" not in "\n".join(not_run)


def test_outside_ci_skips_are_only_reported(tmp_path: Path) -> None:
    root = _suite(tmp_path, {"test_demo.py": SUITE})
    for ci in (None, "", "0", "false"):
        done = _pytest(root, ci)
        assert done.returncode == 0, (ci, done.stdout + done.stderr)
        assert "NOT RUN" not in done.stdout and "CI unset: skips are only reported" in done.stdout


def test_a_failure_stays_a_failure_and_a_bad_entry_is_a_usage_error(tmp_path: Path) -> None:
    failing = "import pytest\n\ndef test_fails():\n    assert False\n\ndef test_skips():\n    pytest.skip('nope')\n"
    root = _suite(tmp_path / "a", {"test_fails.py": failing})
    done = _pytest(root, "true")
    assert (
        done.returncode == pytest.ExitCode.TESTS_FAILED
        and "NOT RUN tests/test_fails.py::test_skips: nope" in done.stdout
    )
    root = _suite(tmp_path / "b", {"test_ok.py": "def test_ok():\n    pass\n"}, allowlist="# why\nunclosed (group\n")
    done = _pytest(root, "true")
    assert (
        done.returncode == pytest.ExitCode.USAGE_ERROR
        and "skip-allowlist.txt:2: not a regular expression" in done.stderr
    )
