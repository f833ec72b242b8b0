"""The reader/writer threads: order kept, errors surface where the caller can see them."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchscore.errors import EXIT_INPUT
from batchscore.job.pipeline import BackgroundWriter, prefetch
from helpers import cli, write_inputs, writing_a_part


def test_prefetch_keeps_order_and_bounds_read_ahead() -> None:
    produced = []

    def items():
        for i in range(20):
            produced.append(i)
            yield i

    seen = []
    for item in prefetch(items(), depth=2):
        time.sleep(0.005)
        assert len(produced) - len(seen) <= 4  # queue depth + one in hand each side
        seen.append(item)
    assert seen == list(range(20))


def test_prefetch_reraises_producer_errors_and_stops_on_early_exit() -> None:
    def failing():
        yield 1
        raise ValueError("bad row group")

    with pytest.raises(ValueError, match="bad row group"):
        list(prefetch(failing()))
    closed = threading.Event()

    def endless():
        try:
            while True:
                yield 0
        finally:
            closed.set()

    for _ in prefetch(endless()):
        break
    assert closed.wait(2), "the producer must stop when the consumer leaves"


def test_background_writer_writes_all_in_order_and_reports_failures() -> None:
    written = []
    with BackgroundWriter(written.append) as writer:
        for i in range(50):
            writer.write(i)
    assert written == list(range(50))

    def explode(item):
        raise OSError("disk full")

    writer = BackgroundWriter(explode)
    with pytest.raises(OSError, match="disk full"):
        for i in range(10):
            writer.write(i)
            time.sleep(0.01)
        writer.close()


def test_corrupt_row_group_mid_file_leaves_no_part(tmp_path: Path, binary_model_paths) -> None:
    """A failure after some batches were written: the part is discarded, nothing is committed."""
    path = write_inputs(tmp_path / "in", files=1, rows=4_000, row_group_size=1_000)[0]
    meta = pq.read_metadata(path)
    column = meta.row_group(2).column(1)  # 'age' in the third row group
    data = bytearray(path.read_bytes())
    start = column.data_page_offset
    data[start : start + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    result = cli(
        "run",
        "--input",
        path,
        "--output",
        out,
        "--model",
        binary_model_paths["model"],
        "--scaler",
        binary_model_paths["scaler"],
        "--batch-size",
        "500",
    )
    assert result.exit_code == EXIT_INPUT, result.stderr
    assert str(path) in result.stderr
    assert not (out / "_SUCCESS").exists()
    assert [name for name in os.listdir(out) if "part-" in name] == []


def test_sigterm_mid_run_discards_unfinished_parts(tmp_path: Path, binary_model_paths) -> None:
    """Schedulers stop tasks with SIGTERM: exit 1, nothing committed, no partial or temporary part."""
    import signal
    import subprocess
    import sys

    inputs = write_inputs(tmp_path / "in", files=1, rows=200_000, row_group_size=50_000)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchscore",
            "run",
            "--input",
            str(inputs[0]),
            "--output",
            str(out),
            "--model",
            str(binary_model_paths["model"]),
            "--scaler",
            str(binary_model_paths["scaler"]),
            "--batch-size",
            "64",
            "--workers",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not writing_a_part(out):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert "interrupted; nothing was committed" in stderr
    assert not (out / "_SUCCESS").exists()
    assert [n for n in os.listdir(out) if "part-" in n] == []
