"""Every stop is bounded: SIGTERM or SIGINT ends a run within the stop deadline, whatever it is blocked on.

Each test waits until the run is really blocked (the kernel says a thread waits to open a FIFO, or
the S3 proxy holds one of its requests), sends the signal, and checks: the run exits 1 within
``STOP_DEADLINE_SECONDS`` plus a margin for this loaded machine, with one ``Error:`` line; no
process it started is left; no ``_SUCCESS`` and no temporary file; and a retry commits exactly.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.job.stopping import STOP_DEADLINE_SECONDS
from batchscore.sample import churn_table
from helpers import assert_exact, read_manifest, read_output
from s3proxy import S3Proxy

#: What this 2-core machine, shared with other test runs, may add to the deadline.
MARGIN = 8.0


def _tasks_wchan(pid: int) -> list[str]:
    found = []
    for path in glob.glob(f"/proc/{pid}/task/*/wchan"):
        try:
            found.append(Path(path).read_text().strip())
        except OSError:
            pass
    return found


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            kids |= {int(c) for c in Path(path).read_text().split()}
        except OSError:
            pass
    return kids


def _gone(pid: int, within: float = 5.0) -> bool:
    """The process no longer exists (or is a zombie waiting for init to reap it)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


class Running:
    """A ``batchscore`` command in its own process, with its stderr in a file to watch."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = Path(f"/tmp/batchscore-stop-{uuid.uuid4().hex}.log")
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "batchscore", *args],
                stdout=subprocess.DEVNULL,
                stderr=err,
                text=True,
                env={**os.environ, **(env or {})},
            )
        self.started = time.monotonic()

    def wait_until(self, condition: Callable[[], bool], what: str, limit: float = 120) -> None:
        while not condition():
            assert self.proc.poll() is None, f"the run ended before {what}: {self.stderr()}"
            assert time.monotonic() - self.started < limit, f"never {what}: {self.stderr()}"
            time.sleep(0.1)

    def stop(self, signum: int) -> tuple[int, float, set[int]]:
        """Send ``signum``; (exit code, seconds to exit, the children it had when signalled)."""
        children = _children(self.proc.pid)
        sent = time.monotonic()
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=STOP_DEADLINE_SECONDS + 60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return code, time.monotonic() - sent, children

    def stderr(self) -> str:
        return self.log.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.unlink(missing_ok=True)


@pytest.fixture
def running() -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Running:
        started.append(Running(*map(str, args), env=env))
        return started[-1]

    yield start
    for run in started:
        run.close()


def assert_stopped(run: Running, signum: int) -> float:
    code, seconds, children = run.stop(signum)
    stderr = run.stderr()
    print(
        f"{signal.Signals(signum).name}: exit {code} {seconds:.1f} s after the signal, {len(children)} child(ren); "
        f"{stderr.strip().splitlines()[-1] if stderr.strip() else ''}"
    )
    assert code == 1, stderr
    assert seconds < STOP_DEADLINE_SECONDS + MARGIN, f"took {seconds:.1f} s to stop"
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "nothing was committed" in errors[0], stderr
    assert "Traceback" not in stderr, stderr
    for child in children:
        assert _gone(child), f"worker {child} outlived the stopped run"
    return seconds


def _local_input(folder: Path, rows: tuple[int, ...] = (20_016, 12_000)) -> pa.Table:
    folder.mkdir(parents=True, exist_ok=True)
    tables = []
    for i, n in enumerate(rows):
        table = churn_table(n, seed=60 + i, first_id=1 + i * 100_000)
        pq.write_table(table, folder / f"day-{i}.parquet", row_group_size=4_000)
        tables.append(table)
    return pa.concat_tables(tables)


def _no_leftovers(output: Path) -> None:
    names = sorted(os.listdir(output)) if output.exists() else []
    assert "_SUCCESS" not in names and not [n for n in names if ".tmp-" in n], names


@pytest.mark.fault
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_while_the_parent_is_blocked_opening_a_fifo_model(
    tmp_path: Path, binary_model_paths: dict[str, Path], running: Callable[..., Running], signum: int
) -> None:
    source = _local_input(tmp_path / "in")
    fifo = tmp_path / "model.joblib"
    os.mkfifo(fifo)  # a model path that never returns data: the parent blocks in open()
    output = tmp_path / "out"
    job = ["--input", tmp_path / "in", "--output", output, "--scaler", binary_model_paths["scaler"], "--workers", "2"]
    run = running("run", *job, "--model", fifo)
    run.wait_until(lambda: "wait_for_partner" in _tasks_wchan(run.proc.pid), "blocked opening the FIFO")
    assert_stopped(run, signum)
    _no_leftovers(output)
    retry = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchscore",
            "run",
            *map(str, job),
            "--model",
            binary_model_paths["model"],
            "--overwrite",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert retry.returncode == 0, retry.stderr
    assert_exact(read_output(output), source, binary_model_paths)


@pytest.mark.fault
def test_stop_while_footer_threads_are_blocked_on_a_fifo_input(
    tmp_path: Path, binary_model_paths: dict[str, Path], running: Callable[..., Running]
) -> None:
    source = _local_input(tmp_path / "in")
    os.mkfifo(tmp_path / "in" / "x.parquet")  # an input entry that never returns data
    output = tmp_path / "out"
    job = [
        "--input",
        tmp_path / "in",
        "--output",
        output,
        "--model",
        binary_model_paths["model"],
        "--scaler",
        binary_model_paths["scaler"],
        "--workers",
        "2",
    ]
    run = running("run", *job)
    deadline = time.monotonic() + 120
    while "wait_for_partner" not in _tasks_wchan(run.proc.pid) and run.proc.poll() is None:
        assert time.monotonic() < deadline, f"neither blocked nor ended: {run.stderr()}"
        time.sleep(0.1)
    if run.proc.poll() is not None:  # a listing that refuses what is not a regular file never blocks
        assert run.proc.returncode in (1, 3) and "x.parquet" in run.stderr(), run.stderr()
    else:
        assert_stopped(run, signal.SIGTERM)
    _no_leftovers(output)
    (tmp_path / "in" / "x.parquet").unlink()
    retry = subprocess.run(
        [sys.executable, "-m", "batchscore", "run", *map(str, job), "--overwrite"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert retry.returncode == 0, retry.stderr
    assert_exact(read_output(output), source, binary_model_paths)


@pytest.fixture
def proxied(s3: tuple[Any, str, dict[str, str]], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Input files in a fresh bucket, and a proxy in front of the S3 server that can stall requests."""
    fs, bucket, options = s3
    tables = []
    for i, rows in enumerate((40_016, 24_000)):
        table = churn_table(rows, seed=70 + i, first_id=1 + i * 100_000)
        with fs.open(f"{bucket}/in/day-{i}.parquet", "wb") as fh:
            pq.write_table(table, fh, row_group_size=4_000)
        tables.append(table)
    proxy = S3Proxy(options["endpoint_url"])
    try:
        yield {
            "fs": fs,
            "bucket": bucket,
            "proxy": proxy,
            "input": pa.concat_tables(tables),
            "storage": ["--storage-option", f"endpoint_url={proxy.endpoint}"],
        }
    finally:
        proxy.close()


@pytest.mark.fault
def test_stop_while_a_worker_is_blocked_reading_from_a_stalled_store(
    proxied: dict[str, Any], tmp_path: Path, binary_model_paths: dict[str, Path], running: Callable[..., Running]
) -> None:
    bucket, proxy = proxied["bucket"], proxied["proxy"]
    output = tmp_path / "out"
    job = [
        "--input",
        f"s3://{bucket}/in/",
        "--output",
        output,
        "--model",
        binary_model_paths["model"],
        "--scaler",
        binary_model_paths["scaler"],
        *proxied["storage"],
        "--storage-option",
        "default_block_size=131072",
        "--batch-size",
        "1000",
        "--workers",
        "2",
        "--log-format",
        "json",
    ]
    run = running("run", *job)
    run.wait_until(lambda: '"shard_start"' in run.stderr(), "scoring started")
    proxy.stall(rf"^(GET|HEAD) /{bucket}/in/")  # the workers' next reads of the input never return
    run.wait_until(lambda: proxy.stalled > 0, "a worker's read was held")
    assert _children(run.proc.pid), "the workers are running"
    code, seconds, children = run.stop(signal.SIGTERM)
    print(f"worker stalled on S3: exit {code} {seconds:.1f} s after SIGTERM, {len(children)} worker(s)")
    assert code == 1 and seconds < STOP_DEADLINE_SECONDS + MARGIN, (code, seconds, run.stderr())
    assert [line for line in run.stderr().splitlines() if '"level": "error"' in line], run.stderr()
    for child in children:
        assert _gone(child), f"worker {child} outlived the stopped run"
    _no_leftovers(output)
    proxy.release()
    retry = subprocess.run(
        [sys.executable, "-m", "batchscore", "run", *map(str, job), "--overwrite"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert retry.returncode == 0, retry.stderr
    assert_exact(read_output(output), proxied["input"], binary_model_paths)


@pytest.mark.fault
def test_stop_while_commit_is_blocked_on_a_stalled_store(
    proxied: dict[str, Any], binary_model_paths: dict[str, Path], running: Callable[..., Running]
) -> None:
    fs, bucket, proxy = proxied["fs"], proxied["bucket"], proxied["proxy"]
    job = [
        "--input",
        f"s3://{bucket}/in/",
        "--output",
        f"s3://{bucket}/out",
        "--model",
        binary_model_paths["model"],
        "--scaler",
        binary_model_paths["scaler"],
        *proxied["storage"],
        "--workers",
        "2",
    ]
    proxy.stall(rf"^PUT /{bucket}/_batchscore/out/(report|manifest)\.json")  # commit's first write never returns
    run = running("run", *job)
    run.wait_until(lambda: proxy.stalled > 0, "commit was blocked", limit=180)
    proxy.stall(".")  # and every later call, its clean-up included, stalls too
    assert_stopped(run, signal.SIGTERM)
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/out/_SUCCESS")
    proxy.release()  # held requests are dropped, never forwarded: nothing lands late
    retry = subprocess.run(
        [sys.executable, "-m", "batchscore", "run", *job, "--overwrite"], capture_output=True, text=True, timeout=180
    )
    assert retry.returncode == 0, retry.stderr
    fs.invalidate_cache()
    assert read_manifest(f"{bucket}/out", fs)["rows"]["out"] == 64_016
    assert_exact(read_output(f"{bucket}/out", fs), proxied["input"], binary_model_paths)
