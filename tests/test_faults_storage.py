"""Storage that fails: stalled, dead or missing S3, full, read-only or forbidden disks.

Each failure must end the run with exit 1 and one ``Error:`` line naming the path and the cause,
without a traceback, without ``_SUCCESS`` and within a bounded time; a stalled endpoint must
fail the job within two minutes with the default bounds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from batchscore.io.layout import rejected_path
from batchscore.sample import churn_table
from helpers import cli

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
MOTO_SERVER = Path(sys.executable).with_name("moto_server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """A moto S3 server in its own process, so a test can stop (SIGSTOP) or kill it; ``log`` gets
    its request log, one line per request ("PUT /bucket/key?partNumber=1&uploadId=... HTTP/1.1" 200)."""

    def __init__(self, log: Path) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(
                [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)], stdout=fh, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)

    def requests(self, method: str, path: str) -> list[str]:
        """The logged requests ``method`` to ``path`` (with any query string), without colour codes."""
        lines = re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_text()).splitlines()
        return [line for line in lines if f'"{method} {path}' in line]

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing", skip_instance_cache=True)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MotoServer]:
    srv = MotoServer(tmp_path / "moto_server.log")
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def s3_job(server: MotoServer, binary_model_paths: dict[str, Path]) -> dict[str, Any]:
    """Two input files in a fresh bucket on ``server``, and the flags of a job scoring them to S3."""
    fs = server.filesystem()
    bucket = f"bs-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    for i in range(2):
        with fs.open(f"{bucket}/in/day-{i}.parquet", "wb") as fh:
            pq.write_table(churn_table(48_016, seed=i, first_id=1 + i * 48_016), fh, row_group_size=4_016)
    args = [
        "--input",
        f"s3://{bucket}/in/",
        "--output",
        f"s3://{bucket}/out",
        "--model",
        binary_model_paths["model"],
        "--scaler",
        binary_model_paths["scaler"],
        "--storage-option",
        f"endpoint_url={server.endpoint}",
        "--batch-size",
        "1024",
        "--workers",
        "1",
    ]
    return {"fs": fs, "bucket": bucket, "args": [str(a) for a in args]}


def batchscore(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchscore", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **AWS_ENV},
    )


def assert_one_line_error(stderr: str, *needles: str) -> str:
    """The last line is the one ``Error:`` line, containing each needle; no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().splitlines()[-1] == errors[0]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def run_with_stall(
    s3_job: dict[str, Any], server: MotoServer, *extra: str, limit: float
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Start a run, stop the S3 server once scoring has begun, and time how long the run takes to fail."""
    log = Path(f"/tmp/batchscore-stall-{uuid.uuid4().hex}.log")
    cmd = [sys.executable, "-m", "batchscore", "run", *s3_job["args"], "--log-format", "json", *extra]
    started = time.monotonic()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **AWS_ENV})
    try:
        while '"shard_start"' not in log.read_text() and proc.poll() is None and time.monotonic() - started < 60:
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before the server could be stopped: {log.read_text()}"
        server.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        stdout, _ = proc.communicate(timeout=limit)
        elapsed = time.monotonic() - stopped
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout, log.read_text()), elapsed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        server.proc.send_signal(signal.SIGCONT)
        log.unlink()


def assert_failed_json(result: subprocess.CompletedProcess[str], *needles: str) -> dict[str, Any]:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = json.loads(result.stderr.strip().splitlines()[-1])
    assert last["level"] == "error" and last["event"] == "error" and last["exit_code"] == 1, last
    for needle in needles:
        assert needle in last["message"], last
    return last


@pytest.mark.fault
def test_stalled_endpoint_fails_within_the_configured_bound(s3_job: dict[str, Any], server: MotoServer) -> None:
    # 2 s per request, 1 retry: any call fails within 2 x 2 + 1 = 5 s.
    result, elapsed = run_with_stall(s3_job, server, "--storage-timeout", "2", "--storage-retries", "1", limit=60)
    assert_failed_json(result, "did not answer in time", f"s3://{s3_job['bucket']}/")
    assert elapsed < 30, f"a stalled endpoint took {elapsed:.1f} s to fail the run"
    assert not s3_job["fs"].exists(f"{s3_job['bucket']}/out/_SUCCESS")


@pytest.mark.fault
def test_stalled_endpoint_fails_the_job_within_two_minutes_by_default(
    s3_job: dict[str, Any], server: MotoServer
) -> None:
    result, elapsed = run_with_stall(s3_job, server, limit=150)
    error = assert_failed_json(result, "did not answer in time")
    print(f"stalled endpoint, default bounds: failed {elapsed:.1f} s after the server stopped: {error['message']}")
    assert elapsed < 120, f"a stalled endpoint took {elapsed:.1f} s to fail the run"


@pytest.mark.fault
def test_dead_endpoint_fails_fast_with_one_line(s3_job: dict[str, Any], server: MotoServer) -> None:
    server.close()  # connection refused from now on
    started = time.monotonic()
    result = batchscore("run", *s3_job["args"], timeout=60)
    assert time.monotonic() - started < 40
    assert result.returncode == 1, result.stderr
    assert_one_line_error(result.stderr, "cannot connect to storage", f"s3://{s3_job['bucket']}/in/")
    assert_failed_json(batchscore("validate", *s3_job["args"], "--log-format", "json", timeout=60), "cannot connect")


@pytest.mark.fault
def test_missing_bucket_output_is_one_line(s3_job: dict[str, Any]) -> None:
    args = list(s3_job["args"])
    args[args.index("--output") + 1] = "s3://no-such-bucket-here/out"
    for command in ("validate", "run"):
        result = batchscore(command, *args, timeout=60)
        assert result.returncode == 1, result.stderr
        assert_one_line_error(result.stderr, "s3://no-such-bucket-here/out", "bucket does not exist")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for the test (root only)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def local_job(tmp_path: Path, model: dict[str, Path], output: Path, rows: int = 4_816) -> list[str]:
    source = tmp_path / "in.parquet"
    if not source.exists():
        pq.write_table(churn_table(rows, seed=5), source, row_group_size=1_024)
    return [
        "--input",
        str(source),
        "--output",
        str(output),
        "--model",
        str(model["model"]),
        "--scaler",
        str(model["scaler"]),
        "--workers",
        "1",
    ]


@pytest.mark.fault
def test_read_only_output_fails_validate_and_run(
    tmp_path: Path, tmpfs: Path, binary_model_paths: dict[str, Path]
) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True, timeout=30)
    output = tmpfs / "scores"
    job = local_job(tmp_path, binary_model_paths, output)
    for command in ("validate", "run"):
        result = batchscore(command, *job, timeout=60)
        assert result.returncode == 1, result.stderr
        assert_one_line_error(result.stderr, str(output), "read-only file system")
    # the same with JSON logs: the error is a JSON line
    assert_failed_json(batchscore("run", *job, "--log-format", "json", timeout=60), "read-only file system")


@pytest.mark.fault
def test_full_disk_is_one_line_and_leaves_no_temporary_files(
    tmp_path: Path, tmpfs: Path, binary_model_paths: dict[str, Path]
) -> None:
    output = tmpfs / "scores"
    job = local_job(tmp_path, binary_model_paths, output, rows=96_016)  # ~2 MB of parts for 1 MiB of disk
    result = batchscore("run", *job, timeout=90)
    assert result.returncode == 1, result.stderr
    line = assert_one_line_error(result.stderr, "no space left on device", f"cannot write {output}/")
    assert ".tmp-" not in line, "the error names the part, not its temporary file"
    left = sorted(p.name for p in output.rglob("*")) if output.exists() else []
    assert "_SUCCESS" not in left and not [n for n in left if ".tmp-" in n], left


@pytest.mark.fault
def test_permission_denied_is_one_line(tmp_path: Path, binary_model_paths: dict[str, Path]) -> None:
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run without the power to override file permissions")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)
    os.chown(locked, 65534, 65534)  # someone else's folder: only they may write in it
    job = local_job(tmp_path, binary_model_paths, locked / "scores")
    drop = "-dac_override,-dac_read_search"
    for command in ("validate", "run"):
        result = subprocess.run(
            [
                setpriv,
                f"--inh-caps={drop}",
                f"--bounding-set={drop}",
                "--",
                sys.executable,
                "-m",
                "batchscore",
                command,
                *job,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, result.stderr
        assert_one_line_error(result.stderr, str(locked / "scores"), "permission denied")


def test_validate_probe_leaves_nothing_behind(tmp_path: Path, binary_model_paths: dict[str, Path]) -> None:
    fresh = tmp_path / "new" / "scores"
    result = cli("validate", *local_job(tmp_path, binary_model_paths, fresh))
    assert result.exit_code == 0, result.stderr
    assert not (tmp_path / "new").exists(), "the folders the probe created are removed again"
    existing = tmp_path / "existing"
    existing.mkdir()
    assert cli("validate", *local_job(tmp_path, binary_model_paths, existing)).exit_code == 0
    assert list(existing.iterdir()) == []


def _uploads(fs: Any, bucket: str) -> list[str]:
    return sorted(u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []))


@pytest.mark.fault
def test_incomplete_uploads_of_a_killed_attempt_are_aborted_and_only_under_the_output(s3_job: dict[str, Any]) -> None:
    fs, bucket = s3_job["fs"], s3_job["bucket"]
    leftovers = ["out/part-00000-00000.parquet", rejected_path("out", "part-00001-00000.parquet")]
    strangers = ["out2/part-00000-00000.parquet", "other/out/part-00000-00000.parquet"]
    for key in leftovers + strangers:
        fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    assert _uploads(fs, bucket) == sorted(leftovers + strangers)
    result = batchscore("run", *s3_job["args"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert _uploads(fs, bucket) == sorted(strangers)


@pytest.mark.fault
def test_a_failed_multipart_write_leaves_no_upload(server: MotoServer, binary_model_paths: dict[str, Path]) -> None:
    fs = server.filesystem()
    bucket = f"bs-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    table = churn_table(320_016, seed=9)
    charges = table.column("monthly_charges").to_numpy().copy()
    charges[-5] = np.nan  # the last batch fails after > 5 MiB of the part was uploaded
    table = table.set_column(table.schema.get_field_index("monthly_charges"), "monthly_charges", [charges])
    with fs.open(f"{bucket}/in/big.parquet", "wb") as fh:
        pq.write_table(table, fh, row_group_size=320_016)
    result = batchscore(
        "run",
        "--input",
        f"s3://{bucket}/in/",
        "--output",
        f"s3://{bucket}/out",
        "--model",
        binary_model_paths["model"],
        "--scaler",
        binary_model_paths["scaler"],
        "--storage-option",
        f"endpoint_url={server.endpoint}",
        "--storage-option",
        "default_block_size=5242880",
        "--batch-size",
        "8192",
        "--workers",
        "1",
        timeout=120,
    )
    assert result.returncode == 3, result.stderr
    assert_one_line_error(result.stderr, "invalid feature value")
    # The fault landed mid-write: the part's multipart upload was begun, had a 5 MiB part stored, and was aborted.
    part = f"/{bucket}/out/part-00000-00000.parquet?"
    assert [r for r in server.requests("POST", part) if "uploads" in r], server.log.read_text()
    assert [r for r in server.requests("PUT", part) if "partNumber=1" in r and '" 200 ' in r], server.log.read_text()
    assert [r for r in server.requests("DELETE", part) if "uploadId=" in r and '" 204 ' in r], server.log.read_text()
    assert _uploads(fs, bucket) == []
    assert not fs.exists(f"{bucket}/out/part-00000-00000.parquet")


def _saved_with_old_sklearn(model_path: Path, target: Path) -> Path:
    """The model, pickled as if by another scikit-learn version (scikit-learn warns on load)."""
    import copyreg
    import io
    import pickle

    import joblib

    model = joblib.load(model_path)

    class OldVersion(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if obj is model:
                state = {**obj.__getstate__(), "_sklearn_version": "1.0"}
                return copyreg.__newobj__, (type(obj),), state
            return NotImplemented

    buffer = io.BytesIO()
    OldVersion(buffer, protocol=4).dump(model)
    target.write_bytes(buffer.getvalue())
    return target


def test_json_logs_make_warnings_and_the_error_json_lines(tmp_path: Path, binary_model_paths: dict[str, Path]) -> None:
    model = _saved_with_old_sklearn(binary_model_paths["model"], tmp_path / "old-model.joblib")
    job = local_job(tmp_path, {**binary_model_paths, "model": model}, tmp_path / "out")
    (tmp_path / "out").write_text("a file where the output folder should be")
    result = batchscore("validate", *job, "--log-format", "json", timeout=60)
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON
    warnings = [r for r in records if r["event"] == "warning"]
    assert warnings and "old-model.joblib" in warnings[0]["message"] and warnings[0]["level"] == "warning"
    assert "version 1.0" in warnings[0]["message"], warnings[0]
    assert records[-1]["level"] == "error" and records[-1]["exit_code"] == 2, records[-1]
    assert result.returncode == 2
    text = batchscore("validate", *job, timeout=60)
    assert (
        "version 1.0" in text.stderr
        and "{" not in text.stderr
        and text.stderr.rstrip().splitlines()[-1].startswith("Error:")
    )


def test_storage_bounds_reach_every_s3_filesystem_unless_set_explicitly(
    tmp_path: Path, binary_model_paths: dict[str, Path]
) -> None:
    from batchscore.config import JobConfig, StorageSettings
    from batchscore.io.storage import filesystem

    given = {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"read_timeout": 60}}
    config = JobConfig(storage_options=given, storage_timeout=3, storage_retries=0)
    assert config.storage_options == given  # the user's options, as given: the bounds are settings of their own
    fs, _ = filesystem("s3://bucket/out", config.storage)
    assert fs._prepare_config_kwargs() == {
        "read_timeout": 60,
        "connect_timeout": 3.0,
        "retries": {"total_max_attempts": 1, "mode": "standard"},
    }
    assert fs.retries == 1 and fs.retry_policy.retries == 0
    default, _ = filesystem("s3://bucket/out", StorageSettings({"endpoint_url": "http://127.0.0.1:9"}))
    # botocore makes one attempt; batchscore's retry policy decides every retry (throttling apart)
    assert default._prepare_config_kwargs()["retries"] == {"total_max_attempts": 1, "mode": "standard"}
    assert (default.retry_policy.retries, default.retry_policy.throttle_seconds) == (2, 120.0)
    own, _ = filesystem(
        "s3://bucket/out",
        StorageSettings({"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 7}}}),
    )
    assert own._prepare_config_kwargs()["retries"] == {"max_attempts": 7} and own.retry_policy is None
    # Jobs in one process with the same options but other bounds never share a filesystem (and its policy).
    for retries, throttle in ((0, 120.0), (5, 120.0), (2, 7.5), (2, 120.0)):
        other = JobConfig(
            storage_options={"endpoint_url": "http://127.0.0.1:9"},
            storage_retries=retries,
            storage_throttle_seconds=throttle,
        )
        fs_other, _ = filesystem("s3://bucket/out", other.storage)
        assert (fs_other.retry_policy.retries, fs_other.retry_policy.throttle_seconds) == (retries, throttle)
        assert (fs_other is default) == ((retries, throttle) == (2, 120.0))
    job = local_job(tmp_path, binary_model_paths, tmp_path / "out")
    for flag, value in (("--storage-timeout", "0"), ("--storage-retries", "-1")):
        result = cli("validate", *job, flag, value)
        assert result.exit_code == 2 and flag.lstrip("-").replace("-", "_") in result.stderr, result.stderr
