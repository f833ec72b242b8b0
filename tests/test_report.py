"""Feedback while scoring: a bar in a terminal, periodic plain or JSON lines elsewhere."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pytest

from batchscore import report
from batchscore.report import Reporter
from helpers import REPO, cli


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_in_a_terminal_shows_rate_and_eta() -> None:
    stream = Terminal()
    with Reporter("text", stream).progress(1_000) as progress:
        for _ in range(10):
            progress.advance(100)
    text = stream.getvalue()
    assert "scoring" in text and "rows/s" in text and "100%" in text


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_periodic_lines_when_not_a_terminal(monkeypatch, fmt: str) -> None:
    monkeypatch.setattr(report, "LOG_INTERVAL_SECONDS", 0.0)
    stream = io.StringIO()
    with Reporter(fmt, stream).progress(300) as progress:
        for _ in range(3):
            progress.advance(100)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    if fmt == "json":
        record = json.loads(lines[-1])
        assert record["event"] == "progress" and record["rows_done"] == 300 and record["rows_total"] == 300
    else:
        assert lines[-1].startswith("batchscore: scored 300/300 rows (100%)")


def test_sample_model_loads_without_version_warnings(tmp_path: Path) -> None:
    import shutil

    shutil.copy(REPO / "sample_data" / "churn.parquet", tmp_path / "churn.parquet")
    assert cli("sample", "--out-dir", tmp_path, "--model-only").exit_code == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = cli("inspect", tmp_path / "model" / "model.joblib", "--scaler", tmp_path / "model" / "scaler.joblib")
    assert result.exit_code == 0, result.stderr
