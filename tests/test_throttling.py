"""A store that throttles is asking for less traffic, not failing: runs behind it must commit exactly.

A proxy in front of the moto server answers a seeded-random share of requests the way S3 does when
it throttles (``503 SlowDown``, ``503 ServiceUnavailable``) or the way other stores do (``429``).
Runs with default settings must commit exactly; a store that throttles everything must fail the run
within ``storage_throttle_seconds`` with one ``Error:`` line saying so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.sample import churn_table
from helpers import assert_exact, read_manifest, read_output
from s3proxy import SERVICE_UNAVAILABLE, SLOW_DOWN, TOO_MANY_REQUESTS, S3Proxy

ROWS = (10_016, 7_504)


@pytest.fixture
def throttled_job(s3: tuple[Any, str, dict[str, str]], binary_model_paths: dict[str, Path]) -> Iterator[dict[str, Any]]:
    """Two input files in a fresh bucket, a proxy in front of the S3 server, and the job's flags through it."""
    fs, bucket, options = s3
    tables = []
    for i, rows in enumerate(ROWS):
        table = churn_table(rows, seed=20 + i, first_id=1 + i * 20_000)
        with fs.open(f"{bucket}/in/day-{i}.parquet", "wb") as fh:
            pq.write_table(table, fh, row_group_size=2_016)
        tables.append(table)
    proxy = S3Proxy(options["endpoint_url"], seed=1234)
    try:
        args = [
            "--input",
            f"s3://{bucket}/in/",
            "--model",
            binary_model_paths["model"],
            "--scaler",
            binary_model_paths["scaler"],
            "--storage-option",
            f"endpoint_url={proxy.endpoint}",
            "--batch-size",
            "1000",
            "--workers",
            "2",
        ]
        yield {
            "fs": fs,
            "bucket": bucket,
            "proxy": proxy,
            "args": [str(a) for a in args],
            "input": pa.concat_tables(tables),
        }
    finally:
        proxy.close()


def batchscore(*args: str, timeout: float = 180) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "batchscore", *args], capture_output=True, text=True, timeout=timeout, env={**os.environ}
    )
    return result, time.monotonic() - started


@pytest.mark.fault
@pytest.mark.parametrize("answer", [SLOW_DOWN, TOO_MANY_REQUESTS, SERVICE_UNAVAILABLE], ids=lambda a: a[1])
def test_runs_behind_a_store_throttling_a_fifth_of_requests_commit_exactly(
    throttled_job: dict[str, Any], binary_model_paths: dict[str, Path], answer: tuple[int, str, str]
) -> None:
    fs, bucket, proxy = throttled_job["fs"], throttled_job["bucket"], throttled_job["proxy"]
    runs = 3 if answer is SLOW_DOWN else 2
    for attempt in range(runs):
        proxy.throttle(0.2, answer)
        output = f"s3://{bucket}/out-{attempt}"
        seen, throttled = proxy.requests, proxy.throttled
        result, seconds = batchscore("run", *throttled_job["args"], "--output", output)
        proxy.throttle(0.0)
        print(
            f"{answer[1]}: run {attempt + 1}/{runs}: exit {result.returncode} in {seconds:.1f} s, "
            f"{proxy.throttled - throttled} of {proxy.requests - seen} requests throttled"
        )
        assert result.returncode == 0, result.stderr
        assert proxy.throttled - throttled > 0, "the proxy throttled nothing: the test tests nothing"
        assert fs.exists(f"{bucket}/out-{attempt}/_SUCCESS")
        manifest = read_manifest(f"{bucket}/out-{attempt}", fs)
        assert manifest["rows"] == {"in": sum(ROWS), "out": sum(ROWS), "invalid": 0}
        assert_exact(read_output(f"{bucket}/out-{attempt}", fs), throttled_job["input"], binary_model_paths)


@pytest.mark.fault
@pytest.mark.parametrize("answer", [SLOW_DOWN, TOO_MANY_REQUESTS], ids=lambda a: a[1])
def test_a_store_that_throttles_everything_fails_within_the_throttle_bound(
    throttled_job: dict[str, Any], answer: tuple[int, str, str]
) -> None:
    fs, bucket, proxy = throttled_job["fs"], throttled_job["bucket"], throttled_job["proxy"]
    proxy.throttle(1.0, answer)
    result, seconds = batchscore(
        "run", *throttled_job["args"], "--output", f"s3://{bucket}/out", "--storage-throttle-seconds", "4", timeout=120
    )
    proxy.throttle(0.0)
    print(
        f"{answer[1]} on every request, storage_throttle_seconds 4: exit {result.returncode} after {seconds:.1f} s "
        f"({proxy.throttled} throttled answers)"
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and result.stderr.rstrip().splitlines()[-1] == errors[0], result.stderr
    # The store's error code, or its HTTP status where the request was a HEAD (an answer without a body).
    assert "throttled" in errors[0] and (answer[1] in errors[0] or f"{answer[0]}: " in errors[0]), errors[0]
    assert seconds < 4 + 30, f"took {seconds:.1f} s"
    assert proxy.throttled >= 3, "throttled requests are retried with backoff before giving up"
    assert not fs.exists(f"{bucket}/out/_SUCCESS")


def test_throttling_is_retried_apart_from_stalls() -> None:
    """The policy itself: throttled answers do not use up ``storage_retries``, stalls still do."""
    from botocore.exceptions import ReadTimeoutError

    from batchscore.io.storage import RetryPolicy

    class Response:
        def __init__(self, status: int) -> None:
            self.status_code = status

    policy = RetryPolicy(retries=2, throttle_seconds=3600)
    request: dict[str, Any] = {"context": {}}
    throttled = (Response(503), {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}})
    for attempt in range(1, 13):  # twelve throttled answers in a row: all retried, the waits growing
        delay = policy(
            response=throttled, attempts=attempt, operation=None, caught_exception=None, request_dict=request
        )
        assert isinstance(delay, float) and 0 <= delay <= 20, delay
    stalled = {
        "response": None,
        "operation": None,
        "caught_exception": ReadTimeoutError(endpoint_url="x"),
        "request_dict": request,
    }
    assert isinstance(policy(attempts=13, **stalled), float)  # the first stall is retried: 2 retries left
    assert isinstance(policy(attempts=14, **stalled), float)
    assert policy(attempts=15, **stalled) is False  # the third stall ends the request
    budget = RetryPolicy(retries=2, throttle_seconds=0)
    assert (
        budget(response=throttled, attempts=1, operation=None, caught_exception=None, request_dict={"context": {}})
        is False
    )  # no time left for throttling: the answer is the error
