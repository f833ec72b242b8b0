"""Feedback while scoring: a bar in a terminal, periodic plain or JSON lines elsewhere."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import batchscore
from batchscore import logs
from batchscore.config import JobConfig
from helpers import REPO, cli, write_inputs

log = logging.getLogger("batchscore.job.shard")


@pytest.fixture(autouse=True)
def _logs_set_up_again() -> Iterator[None]:
    yield
    logs.reset()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_in_a_terminal_shows_rate_and_eta() -> None:
    stream = Terminal()
    logs.configure("text", stream)
    with logs.progress(log, 1_000) as progress:
        for _ in range(10):
            progress.advance(100)
    text = stream.getvalue()
    assert "scoring" in text and "rows/s" in text and "100%" in text


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_periodic_lines_when_not_a_terminal(fmt: str) -> None:
    stream = io.StringIO()
    logs.configure(fmt, stream, progress_interval=0.0)
    with logs.progress(log, 300) as progress:
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


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_moves_with_every_batch_not_every_part(tmp_path: Path, binary_model_paths, workers: int) -> None:
    """Each part here is a whole file of 8 batches: progress must hear of each batch as it is
    scored, from every worker (counted, not timed)."""
    inputs = write_inputs(tmp_path / "in", files=2, rows=4_816, row_group_size=1_204)
    config = JobConfig(
        input=tuple(str(p) for p in inputs),
        output=str(tmp_path / "out"),
        model=str(binary_model_paths["model"]),
        scaler=str(binary_model_paths["scaler"]),
        batch_size=602,
        workers=workers,
        log_format="json",
    )
    stream = io.StringIO()
    logs.configure("json", stream, progress_interval=0.0)
    result = batchscore.run(config)
    assert len(result.parts) == 2
    done = [json.loads(line)["rows_done"] for line in stream.getvalue().splitlines() if '"progress"' in line]
    assert len(done) == 16  # 2 files x 4 row groups x 2 batches
    assert [b - a for a, b in zip([0] + done, done)] == [602] * 16
    assert done[-1] == 9_632


def test_other_libraries_speak_through_the_handler_only_from_warning_up() -> None:
    """A library that sets its own logger to INFO (py4j under Spark) is not printed as batchscore's
    progress; its warnings still are, in the chosen format."""
    stream = io.StringIO()
    logs.configure("text", stream)
    chatty = logging.getLogger("py4j.clientserver")
    chatty.setLevel(logging.INFO)
    try:
        chatty.info("Closing down clientserver connection")
        chatty.warning("the gateway is slow")
        logging.getLogger("batchscore.job.shard").info("shard 0 done")
        logging.getLogger("batchscorex").info("a name that only starts like ours")
    finally:
        chatty.setLevel(logging.NOTSET)
        logs.reset()
    assert stream.getvalue().splitlines() == ["batchscore: the gateway is slow", "batchscore: shard 0 done"]
