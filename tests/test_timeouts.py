"""Every test has a time limit (pyproject.toml): a hang is reported by the test's name and the run
goes on, also when the test hangs waiting on the worker pool's forks or on a child process; a hang
the alarm cannot interrupt is ended by the last resort, which prints the stack of the hung test.

The hanging suites run in a real pytest subprocess with the project's own settings (only the limits
shortened), so the settings themselves are what is tried."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SLOW_TIMEOUT

REPO = Path(__file__).resolve().parents[1]

HANGING = """
import os, subprocess, time
import pytest
from batchscore.job.pool import WorkerPool


def test_sleeps_forever():
    time.sleep(3600)


def _never_answers(item):
    time.sleep(3600)


def test_waits_on_workers_forever():
    with WorkerPool(2, lambda: None, _never_answers) as pool:
        list(pool.map_unordered([1, 2], [0, 1]))


def test_waits_on_a_child_forever():
    subprocess.run(["sleep", "3600"], check=True)


@pytest.mark.timeout(30)
def test_slow_but_marked():
    time.sleep(3)


def test_runs_after_them_and_nothing_is_left():
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as fh:
        assert fh.read().split() == []
"""

UNINTERRUPTIBLE = """
import signal, time


def test_alarm_blocked_forever():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # as if stuck where no signal is seen
    time.sleep(3600)


def test_never_reached():
    pass
"""


def _pytest(folder: Path, *options: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "CI")}
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(REPO / "pyproject.toml"),
            "--rootdir",
            str(folder),
            "-p",
            "no:cacheprovider",
            "-v",
            *options,
            str(folder),
        ],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    return done, time.monotonic() - started


def test_a_hang_fails_by_name_and_the_run_goes_on(tmp_path: Path) -> None:
    (tmp_path / "test_hanging.py").write_text(HANGING)
    done, seconds = _pytest(tmp_path, "-o", "timeout=2")
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    for name in ("test_sleeps_forever", "test_waits_on_workers_forever", "test_waits_on_a_child_forever"):
        assert f"FAILED test_hanging.py::{name} - Failed: Timeout" in out, out
    assert "test_hanging.py::test_slow_but_marked PASSED" in out, out
    assert "test_hanging.py::test_runs_after_them_and_nothing_is_left PASSED" in out, out
    assert "3 failed, 2 passed" in out, out
    assert seconds < 120, f"three 2 s hangs took {seconds:.0f} s to report"


@pytest.mark.fault
def test_slow_and_fault_tests_get_the_longer_limit(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("timeout").args == (SLOW_TIMEOUT,)


def test_a_hang_the_alarm_cannot_end_is_ended_with_its_stack(tmp_path: Path) -> None:
    (tmp_path / "test_stuck.py").write_text(UNINTERRUPTIBLE)
    done, seconds = _pytest(tmp_path, "-o", "timeout=2", "-o", "faulthandler_timeout=6")
    assert done.returncode != 0 and "test_never_reached" not in done.stdout, done.stdout
    assert (
        "Timeout (0:00:06)!" in done.stderr and 'test_stuck.py", line 7 in test_alarm_blocked_forever' in done.stderr
    ), done.stderr
    assert seconds < 120
