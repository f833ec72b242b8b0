"""In CI, a test that did not run fails the run, unless its reason is on the reviewed allow-list.

A skip (a ``skip``/``skipif`` mark, ``pytest.skip`` in a test or fixture, a module skipped by
``importorskip`` or ``allow_module_level``), an xfail and an xpass each mean a test did not show
what it claims; on a developer's machine they are reported as usual, but with ``CI`` set (to
anything but ``0``/``false``) each one whose reason no entry of ``tests/skip-allowlist.txt``
matches is listed at the end and sets the exit status to "tests failed". The allow-list is
printed in the header of every run, and at its end in CI. ``conftest.py`` registers the hooks (``register``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

#: Where the allow-list lives, from the root directory of the run.
ALLOWLIST = Path("tests") / "skip-allowlist.txt"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def read_allowlist(path: Path) -> list[tuple[str, re.Pattern[str]]]:
    """Each line that is not blank or a ``#`` comment is a regular expression searched for in a
    skip's reason; its comment (the lines above it) says why that skip is acceptable."""
    if not path.exists():
        return []
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if text and not text.startswith("#"):
            try:
                entries.append((text, re.compile(text)))
            except re.error as exc:
                raise pytest.UsageError(f"{path}:{number}: not a regular expression: {text!r} ({exc})") from None
    return entries


def _reason(report: Any) -> str | None:
    """Why ``report`` did not run its test as a pass or a failure; None if it did."""
    if hasattr(report, "wasxfail"):
        kind = "xfailed" if report.skipped else "xpassed"
        return f"{kind}: {report.wasxfail}"
    if not report.skipped:
        return None
    longrepr = report.longrepr
    message = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return message.removeprefix("Skipped: ")


class SkipGuard:
    """The hooks, registered by ``register`` (see ``conftest.py``)."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.entries = read_allowlist(config.rootpath / ALLOWLIST)
        self.unlisted: list[tuple[str, str]] = []

    def pytest_report_header(self) -> list[str]:
        mode = (
            "CI is set: a test not run for an unlisted reason fails the run"
            if in_ci()
            else "CI unset: skips are only reported"
        )
        lines = [f"skip allow-list {ALLOWLIST}: {len(self.entries)} entries ({mode})"]
        return lines + [f"  allowed: {text}" for text, _ in self.entries]

    def _check(self, nodeid: str, report: Any) -> None:
        reason = _reason(report)
        if reason is not None and in_ci() and not any(p.search(reason) for _, p in self.entries):
            self.unlisted.append((nodeid, reason))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or report.skipped:  # a skip is reported once, by the phase that skipped
            self._check(report.nodeid, report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:  # a whole module (importorskip, allow_module_level)
            self._check(report.nodeid, report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.unlisted and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if in_ci():  # at the end too: the header is not shown with -q
            terminalreporter.section("skip allow-list", bold=True)
            for line in self.pytest_report_header():
                terminalreporter.line(line)
        if not self.unlisted:
            return
        terminalreporter.section("not run, and not on the skip allow-list: the run fails in CI", red=True, bold=True)
        for nodeid, reason in self.unlisted:
            terminalreporter.line(f"NOT RUN {nodeid}: {reason}", red=True)
        terminalreporter.line(f"Install what they need (.ci/run), or add a reviewed entry to {ALLOWLIST}.")


def register(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipGuard(config), "batchscore-skip-guard")
