"""Metrics pushed to a real Prometheus Pushgateway (the prometheus-pushgateway binary on 127.0.0.1)
and read back from its /metrics page."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.observe.metrics import PUSH_TIMEOUT_SECONDS
from batchscore.sample import churn_table
from helpers import cli, read_manifest, write_inputs

ROWS_PER_FILE = 4_816
BATCH = 1_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Pushgateway on a free loopback port with its own persistence file, stopped after."""
    binary = shutil.which("prometheus-pushgateway")
    if binary is None:
        pytest.skip("prometheus-pushgateway is not installed (apt-get install prometheus-pushgateway; .ci/run does)")
    folder = tmp_path_factory.mktemp("pushgateway")
    url = f"http://127.0.0.1:{_free_port()}"
    with open(folder / "log", "wb") as log:  # the gateway holds its own copy
        proc = subprocess.Popen(
            [binary, f"--web.listen-address={url[len('http://') :]}", f"--persistence.file={folder / 'metrics.data'}"],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Pushgateway did not start: {(folder / 'log').read_text()}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def pushed(url: str, job: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the gateway holds for ``job``: (name, labels other than job/instance) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=5) as answer:
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("job") == job and sample.name.startswith("batchscore_"):
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in ("job", "instance")))
                samples[(sample.name, labels)] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _job_file(tmp_path: Path, name: str, model: dict[str, Path], inputs: Path, **keys: object) -> Path:
    settings = {
        "input": str(inputs),
        "output": str(tmp_path / "out"),
        "model": str(model["model"]),
        "scaler": str(model["scaler"]),
        "model_version": "2.1",
        "batch_size": BATCH,
        "workers": 2,
        "overwrite": True,
        **keys,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(settings))  # JSON is YAML
    return path


def _inputs_with_invalid_rows(folder: Path) -> tuple[Path, int]:
    """Three files of 4,816 rows; the last one has 32 rows whose age is NaN."""
    write_inputs(folder, files=2, rows=ROWS_PER_FILE, row_group_size=BATCH)
    table = churn_table(ROWS_PER_FILE, seed=21, first_id=1 + 2 * ROWS_PER_FILE)
    age = table.column("age").to_numpy().copy()
    age[::151][:32] = np.nan
    pq.write_table(
        table.set_column(table.schema.get_field_index("age"), "age", pa.array(age)),
        folder / "day-02.parquet",
        row_group_size=BATCH,
    )
    return folder, 32


def test_run_pushes_counts_timings_and_success(tmp_path: Path, pushgateway: str, binary_model_paths) -> None:
    inputs, invalid = _inputs_with_invalid_rows(tmp_path / "in")
    job_file = _job_file(
        tmp_path, "nightly_churn", binary_model_paths, inputs, pushgateway=pushgateway, on_invalid="skip"
    )
    before = time.time()
    result = cli("run", "--config", job_file)
    assert result.exit_code == 0, result.output + result.stderr
    manifest = read_manifest(tmp_path / "out")
    assert manifest["rows"] == {"in": 3 * ROWS_PER_FILE, "out": 3 * ROWS_PER_FILE - invalid, "invalid": invalid}

    got = pushed(pushgateway, "nightly_churn")  # the job is named after its config file
    assert value(got, "batchscore_predictions_total", model_version="2.1", status="ok") == manifest["rows"]["out"]
    assert value(got, "batchscore_predictions_total", model_version="2.1", status="invalid") == invalid
    assert value(got, "batchscore_rows_read") == manifest["rows"]["in"]
    batches = 3 * -(-ROWS_PER_FILE // BATCH)  # each file: four full row groups and one of 816 rows
    assert value(got, "batchscore_batch_seconds_count") == batches
    assert value(got, "batchscore_batch_seconds_bucket", le="+Inf") == batches
    assert 0 < value(got, "batchscore_batch_seconds_sum") < value(got, "batchscore_duration_seconds")
    assert 0 < value(got, "batchscore_model_load_seconds") < value(got, "batchscore_duration_seconds")
    assert before <= value(got, "batchscore_last_success_timestamp_seconds") <= time.time()
    assert not [key for key in got if key[0] == "batchscore_last_failure_timestamp_seconds"]


def test_failure_is_pushed_without_erasing_the_last_success(
    tmp_path: Path, pushgateway: str, binary_model_paths
) -> None:
    inputs = tmp_path / "in"
    write_inputs(inputs, files=1, rows=ROWS_PER_FILE, row_group_size=BATCH)
    job_file = _job_file(tmp_path, "flaky", binary_model_paths, inputs)
    assert cli("run", "--config", job_file, "--pushgateway", pushgateway).exit_code == 0
    success = value(pushed(pushgateway, "flaky"), "batchscore_last_success_timestamp_seconds")

    missing_model = cli("run", "--config", job_file, "--pushgateway", pushgateway, "--model", tmp_path / "gone.joblib")
    assert missing_model.exit_code == 4
    got = pushed(pushgateway, "flaky")
    assert value(got, "batchscore_last_success_timestamp_seconds") == success
    assert value(got, "batchscore_last_failure_timestamp_seconds", exit_code="4") > success
    assert value(got, "batchscore_rows_read") == 0  # the failed run's own numbers replace the success's

    refused = cli(
        "run",
        "--input",
        inputs,
        "--output",
        tmp_path / "out",
        "--model",
        binary_model_paths["model"],
        "--scaler",
        binary_model_paths["scaler"],
        "--job-name",
        "flaky",
        "--pushgateway",
        pushgateway,
    )
    assert refused.exit_code == 2, refused.stderr  # the output exists and --overwrite is not given
    got = pushed(pushgateway, "flaky")
    failures = {labels: v for (name, labels), v in got.items() if name == "batchscore_last_failure_timestamp_seconds"}
    assert list(failures) == [(("exit_code", "2"),)]  # one series: the last failure's exit code
    assert value(got, "batchscore_last_success_timestamp_seconds") == success


def test_shards_and_commit_push_under_their_own_grouping_key(
    tmp_path: Path, pushgateway: str, binary_model_paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = tmp_path / "in"
    write_inputs(inputs, files=2, rows=ROWS_PER_FILE, row_group_size=BATCH)
    monkeypatch.setenv("BATCHSCORE_PUSHGATEWAY", pushgateway)
    common = [
        "--input",
        inputs,
        "--output",
        tmp_path / "out",
        "--model",
        binary_model_paths["model"],
        "--scaler",
        binary_model_paths["scaler"],
        "--job-name",
        "sharded",
        "--batch-size",
        BATCH,
        "--workers",
        1,
    ]
    receipts = []
    for shard in (0, 1):
        result = cli("run", *common, "--shard", f"{shard}/2")
        assert result.exit_code == 0, result.stderr
        receipts.append(json.loads(result.stdout))
    assert cli("commit", *common, "--shards", 2).exit_code == 0
    manifest = read_manifest(tmp_path / "out")

    got = pushed(pushgateway, "sharded")
    for receipt in receipts:
        shard = str(receipt["shard"])
        assert value(got, "batchscore_rows_read", shard=shard) == receipt["rows_in"]
        assert (
            value(got, "batchscore_predictions_total", model_version="unversioned", status="ok", shard=shard)
            == receipt["rows_out"]
        )
        assert value(got, "batchscore_batch_seconds_count", shard=shard) == -(
            -receipt["rows_in"] // BATCH
        )  # one file each
        assert value(got, "batchscore_last_success_timestamp_seconds", shard=shard) > 0
    # The job's own group is the commit's: the whole output's counts.
    assert (
        value(got, "batchscore_predictions_total", model_version="unversioned", status="ok") == manifest["rows"]["out"]
    )
    assert value(got, "batchscore_rows_read") == manifest["rows"]["in"] == 2 * ROWS_PER_FILE
    assert sum(v for (name, labels), v in got.items() if name == "batchscore_rows_read") == 4 * ROWS_PER_FILE


@pytest.mark.fault
@pytest.mark.parametrize("gateway", ["refused", "stalled"])
def test_an_unreachable_gateway_costs_a_warning_not_the_job(tmp_path: Path, binary_model_paths, gateway: str) -> None:
    """A real process: exit 0, its output committed, one warning line, and the push bounded in time."""
    inputs = tmp_path / "in"
    write_inputs(inputs, files=1, rows=ROWS_PER_FILE, row_group_size=BATCH)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    if gateway == "stalled":
        listener.listen(8)  # connections are accepted by the kernel, and never answered
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    if gateway == "refused":
        listener.close()
    job_file = _job_file(tmp_path, "unreachable", binary_model_paths, inputs)
    try:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "batchscore", "run", "--config", str(job_file)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "BATCHSCORE_PUSHGATEWAY": url},
        )
        elapsed = time.monotonic() - started
        if gateway == "stalled":  # the push did reach the stalled gateway: its connection waits to be accepted
            listener.settimeout(0)
            listener.accept()[0].close()
    finally:
        listener.close()
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "_SUCCESS").exists()
    warnings = [line for line in proc.stderr.splitlines() if "could not push metrics" in line]
    assert len(warnings) == 1 and url in warnings[0], proc.stderr
    assert "Traceback" not in proc.stderr
    manifest = read_manifest(tmp_path / "out")
    assert elapsed - manifest["seconds"] < PUSH_TIMEOUT_SECONDS + 15  # start-up, imports and one bounded push


@pytest.mark.fault
def test_a_run_stopped_by_sigterm_pushes_its_failure(tmp_path: Path, pushgateway: str, binary_model_paths) -> None:
    """What a scheduler's kill leaves for the on-call: the failure, exit code 1, and the rows read until then."""
    inputs = tmp_path / "in"
    write_inputs(inputs, files=2, rows=48_016, row_group_size=4_816)
    job_file = _job_file(
        tmp_path, "stopped", binary_model_paths, inputs, pushgateway=pushgateway, batch_size=16, workers=1
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchscore", "run", "--config", str(job_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:  # scoring has begun: stop it
            if "shard 0/1" in proc.stderr.readline():
                time.sleep(1)
                break
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 1, stderr
    got = pushed(pushgateway, "stopped")
    assert value(got, "batchscore_last_failure_timestamp_seconds", exit_code="1") > 0
    assert not [key for key in got if key[0] == "batchscore_last_success_timestamp_seconds"]
    assert 0 < value(got, "batchscore_rows_read") < 2 * 48_016  # what was scored before the stop
    assert value(got, "batchscore_batch_seconds_count") * 16 >= value(got, "batchscore_rows_read")


#: What differs between two pushes of the same job by the clock alone: timings, timestamps and how
#: the batches' timings fall into the histogram's buckets (their count, the +Inf bucket, does not).
def _by_count(samples: dict) -> dict:
    timed = (
        "batchscore_duration_seconds",
        "batchscore_model_load_seconds",
        "batchscore_batch_seconds_sum",
        "batchscore_last_success_timestamp_seconds",
        "batchscore_last_failure_timestamp_seconds",
    )
    return {
        key: "timed"
        if key[0] in timed or (key[0] == "batchscore_batch_seconds_bucket" and ("le", "+Inf") not in key[1])
        else value
        for key, value in samples.items()
    }


def test_the_library_pushes_what_the_cli_pushes(
    tmp_path: Path, pushgateway: str, binary_model_paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``batchscore.run``, ``run_shard`` and ``commit`` called from Python push the CLI's metrics,
    the same families, labels and counts, on success and on failure; no CLI is involved."""
    import batchscore

    monkeypatch.delenv("BATCHSCORE_PUSHGATEWAY", raising=False)
    inputs, invalid = _inputs_with_invalid_rows(tmp_path / "in")
    job = {
        "input": (str(inputs),),
        "model": str(binary_model_paths["model"]),
        "scaler": str(binary_model_paths["scaler"]),
        "model_version": "2.1",
        "batch_size": BATCH,
        "workers": 2,
        "on_invalid": "skip",
        "pushgateway": pushgateway,
    }
    flags = [
        "--input",
        inputs,
        "--model",
        binary_model_paths["model"],
        "--scaler",
        binary_model_paths["scaler"],
        "--model-version",
        "2.1",
        "--batch-size",
        BATCH,
        "--workers",
        2,
        "--on-invalid",
        "skip",
        "--pushgateway",
        pushgateway,
    ]

    def library(name: str, **settings: object) -> batchscore.JobConfig:
        return batchscore.build_config(None, **{**job, "output": str(tmp_path / name), "job_name": name, **settings})

    def command_line(name: str, *extra: object) -> list[object]:
        return [*flags, "--output", tmp_path / name, "--job-name", name, *extra]

    # A whole run: counts, timings and the success timestamp.
    ran = batchscore.run(library("library_run"))
    assert (ran.rows_in, ran.rows_invalid) == (3 * ROWS_PER_FILE, invalid)
    assert cli("run", *command_line("cli_run")).exit_code == 0
    got = pushed(pushgateway, "library_run")
    assert value(got, "batchscore_batch_seconds_count") == 3 * -(-ROWS_PER_FILE // BATCH)
    assert 0 < value(got, "batchscore_model_load_seconds") < value(got, "batchscore_duration_seconds")
    assert value(got, "batchscore_last_success_timestamp_seconds") > 0
    assert _by_count(got) == _by_count(pushed(pushgateway, "cli_run"))

    # The same job failing: its exit code, without erasing the last success.
    for exit_code, settings, extra in (
        (4, {"model": str(tmp_path / "gone.joblib")}, ["--model", tmp_path / "gone.joblib"]),
        (2, {}, []),
    ):  # 2: the output exists and overwrite is not given
        with pytest.raises(batchscore.BatchscoreError) as failed:
            batchscore.run(library("library_run", **settings))
        assert failed.value.exit_code == exit_code
        assert cli("run", *command_line("cli_run", *extra)).exit_code == exit_code
        got = pushed(pushgateway, "library_run")
        assert value(got, "batchscore_last_failure_timestamp_seconds", exit_code=str(exit_code)) > value(
            got, "batchscore_last_success_timestamp_seconds"
        )
        assert _by_count(got) == _by_count(pushed(pushgateway, "cli_run"))

    # Shards and their commit, each under its own grouping key.
    for shard in (1, 0):
        assert batchscore.run_shard(library("library_shards"), shard, count=2).shard == shard
        assert cli("run", *command_line("cli_shards", "--shard", f"{shard}/2")).exit_code == 0
    committed = batchscore.commit(library("library_shards"), shards=2)
    assert cli("commit", *command_line("cli_shards", "--shards", 2)).exit_code == 0
    got = pushed(pushgateway, "library_shards")
    assert value(got, "batchscore_rows_read") == committed.rows_in == 3 * ROWS_PER_FILE
    assert value(got, "batchscore_batch_seconds_count", shard="0") > 0
    assert value(got, "batchscore_batch_seconds_count", shard="1") > 0
    assert _by_count(got) == _by_count(pushed(pushgateway, "cli_shards"))
    with pytest.raises(batchscore.InputDataError):  # three shards were never scored
        batchscore.commit(library("library_shards"), shards=3)
    assert cli("commit", *command_line("cli_shards", "--shards", 3)).exit_code == 3
    got = pushed(pushgateway, "library_shards")
    assert value(got, "batchscore_last_failure_timestamp_seconds", exit_code="3") > 0
    assert _by_count(got) == _by_count(pushed(pushgateway, "cli_shards"))


def test_accepting_a_held_output_alone_pushes_under_the_held_job(
    tmp_path: Path, pushgateway: str, binary_model_paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run held for drift pushes its failure (exit 5); ``commit OUTPUT --accept-drift`` given nothing
    else pushes the commit's success under the job's own name and gateway, as the held run recorded them."""
    monkeypatch.delenv("BATCHSCORE_PUSHGATEWAY", raising=False)
    inputs = tmp_path / "in"
    write_inputs(inputs, files=1, rows=ROWS_PER_FILE, row_group_size=BATCH)
    reference = tmp_path / "reference"
    job = ["--model", binary_model_paths["model"], "--scaler", binary_model_paths["scaler"], "--workers", 1]
    assert cli("run", "--input", inputs, "--output", reference, *job).exit_code == 0
    shifted = tmp_path / "shifted"
    write_inputs(shifted, files=1, rows=ROWS_PER_FILE, row_group_size=BATCH, seed=99)
    table = pq.read_table(shifted / "day-00.parquet")
    age = pa.array(table.column("age").to_numpy() + 20.0)
    pq.write_table(table.set_column(table.schema.get_field_index("age"), "age", age), shifted / "day-00.parquet")
    held = cli(
        "run",
        "--input",
        shifted,
        "--output",
        tmp_path / "out",
        *job,
        "--reference",
        reference,
        "--drift-fail",
        0.25,
        "--job-name",
        "held_nightly",
        "--pushgateway",
        pushgateway,
    )
    assert held.exit_code == 5, held.stderr
    assert value(pushed(pushgateway, "held_nightly"), "batchscore_last_failure_timestamp_seconds", exit_code="5") > 0

    accepted = cli("commit", tmp_path / "out", "--accept-drift")
    assert accepted.exit_code == 0, accepted.stderr
    got = pushed(pushgateway, "held_nightly")
    assert value(got, "batchscore_rows_read") == read_manifest(tmp_path / "out")["rows"]["in"] == ROWS_PER_FILE
    assert value(got, "batchscore_last_success_timestamp_seconds") > value(
        got, "batchscore_last_failure_timestamp_seconds", exit_code="5"
    )
