"""OpenLineage events of real `batchscore` processes, received by an HTTP endpoint on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from batchscore.observe.lineage import EMIT_TIMEOUT_SECONDS, dataset_name, parse_parent
from helpers import read_manifest, write_inputs

ROWS = 4_816
PARENT_RUN = str(uuid.uuid4())
ROOT_RUN = str(uuid.uuid4())


class Receiver:
    """The events posted to it, in arrival order."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.events.append(json.loads(body))
                self.send_response(201)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    endpoint = Receiver()
    thread = threading.Thread(target=endpoint.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        endpoint.server.shutdown()
        endpoint.server.server_close()


def batchscore(*args: Any, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The real CLI in a process of its own, with only these OpenLineage settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENLINEAGE")}
    return subprocess.run(
        [sys.executable, "-m", "batchscore", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **env},
    )


def job_args(tmp_path: Path, model: dict[str, Path]) -> list[Any]:
    write_inputs(tmp_path / "in", files=2, rows=ROWS, row_group_size=1_000)
    return [
        "--input",
        tmp_path / "in",
        "--output",
        tmp_path / "out",
        "--model",
        model["model"],
        "--scaler",
        model["scaler"],
        "--workers",
        1,
    ]


def test_run_emits_start_and_complete_with_datasets_rows_and_parent(
    tmp_path: Path, receiver: Receiver, binary_model_paths
) -> None:
    env = {
        "OPENLINEAGE_URL": receiver.url,
        "OPENLINEAGE_PARENT_ID": f"airflow-prod/batchscore_churn.score/{PARENT_RUN}",
        "OPENLINEAGE_ROOT_PARENT_ID": f"airflow-prod/batchscore_churn/{ROOT_RUN}",
    }
    proc = batchscore("run", *job_args(tmp_path, binary_model_paths), "--job-name", "churn", env=env)
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(tmp_path / "out")

    start, complete = receiver.events
    assert (start["eventType"], complete["eventType"]) == ("START", "COMPLETE")
    assert start["run"]["runId"] == complete["run"]["runId"] != PARENT_RUN
    assert complete["job"] == {**complete["job"], "namespace": "airflow-prod", "name": "churn"}
    for event in (start, complete):
        assert [(d["namespace"], d["name"]) for d in event["inputs"]] == [("file", str(tmp_path / "in"))]
        assert [(d["namespace"], d["name"]) for d in event["outputs"]] == [("file", str(tmp_path / "out"))]
        parent = event["run"]["facets"]["parent"]
        assert (parent["job"]["namespace"], parent["job"]["name"], parent["run"]["runId"]) == (
            "airflow-prod",
            "batchscore_churn.score",
            PARENT_RUN,
        )
        assert (parent["root"]["job"]["name"], parent["root"]["run"]["runId"]) == ("batchscore_churn", ROOT_RUN)
    statistics = complete["outputs"][0]["outputFacets"]["outputStatistics"]
    assert statistics["rowCount"] == manifest["rows"]["out"] == 2 * ROWS
    assert statistics["fileCount"] == len(manifest["parts"])
    assert [f["name"] for f in complete["outputs"][0]["facets"]["schema"]["fields"]] == [
        c["name"] for c in manifest["schema"]
    ]


def test_shards_emit_their_own_runs_and_a_failure_its_exit_code(
    tmp_path: Path, receiver: Receiver, binary_model_paths
) -> None:
    args = job_args(tmp_path, binary_model_paths)
    env = {"OPENLINEAGE_URL": receiver.url, "OPENLINEAGE_NAMESPACE": "scoring"}
    shard = batchscore("run", *args, "--shard", "1/2", "--job-name", "churn", env=env)
    assert shard.returncode == 0, shard.stderr
    receipt = json.loads(shard.stdout)
    refused = batchscore("run", *args, "--shard", "0/2", "--job-name", "churn", "--model-sha256", "0" * 64, env=env)
    assert refused.returncode == 4, refused.stderr

    runs: dict[str, list[dict[str, Any]]] = {}
    for event in receiver.events:
        runs.setdefault(event["run"]["runId"], []).append(event)
    (ok, failed) = runs.values()
    assert [e["eventType"] for e in ok] == ["START", "COMPLETE"]
    assert [e["eventType"] for e in failed] == ["START", "FAIL"]
    assert {e["job"]["name"] for e in ok} == {"churn.shard-1"}
    assert {e["job"]["name"] for e in failed} == {"churn.shard-0"}
    assert {e["job"]["namespace"] for e in receiver.events} == {"scoring"}
    assert "parent" not in ok[0]["run"]["facets"]  # no scheduler handed a parent run
    assert ok[1]["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] == receipt["rows_out"] == ROWS
    error = failed[1]["run"]["facets"]["errorMessage"]
    assert error["message"].startswith("exit code 4: ") and "sha256" in error["message"]


@pytest.mark.fault
def test_lineage_never_fails_the_job(tmp_path: Path, receiver: Receiver, binary_model_paths) -> None:
    """An endpoint that is gone costs one warning line and little time; OPENLINEAGE_DISABLED sends nothing."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{sock.getsockname()[1]}"
    args = job_args(tmp_path, binary_model_paths)
    started = time.monotonic()
    proc = batchscore("run", *args, env={"OPENLINEAGE_URL": gone})
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "OpenLineage" in line]
    assert len(warnings) == 1 and "START" in warnings[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed - read_manifest(tmp_path / "out")["seconds"] < EMIT_TIMEOUT_SECONDS + 15

    disabled = batchscore(
        "run", *args, "--overwrite", env={"OPENLINEAGE_URL": receiver.url, "OPENLINEAGE_DISABLED": "true"}
    )
    assert disabled.returncode == 0, disabled.stderr
    assert receiver.events == []


def test_dataset_names_follow_openlineage_naming() -> None:
    assert dataset_name("s3://scores/churn/dt=2026-11-25/") == ("s3://scores", "churn/dt=2026-11-25")
    assert dataset_name("s3a://raw/events/*/part-*.parquet") == ("s3://raw", "events")
    assert dataset_name("file:///data/in/day.parquet") == ("file", "/data/in/day.parquet")
    assert dataset_name("relative/in") == ("file", os.path.abspath("relative/in"))
    assert parse_parent(f"ns/dag.task/{PARENT_RUN}", "X") == ("ns", "dag.task", PARENT_RUN)
    assert parse_parent("ns/dag.task/not-a-uuid", "X") is None


def _shape(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a run's events say, less what differs from run to run (ids, times, the output's name)."""

    def statistics(event: dict[str, Any]) -> Any:
        return [d.get("outputFacets", {}).get("outputStatistics") for d in event["outputs"]]

    runs: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        runs.setdefault(event["run"]["runId"], []).append(event)
    return [
        tuple(
            (
                e["eventType"],
                e["job"]["namespace"],
                e["job"]["name"],
                [d["name"] for d in e["inputs"]],
                statistics(e),
                e["run"]["facets"].get("parent", {}).get("run"),
                e["run"]["facets"].get("errorMessage", {}).get("message", "").split(":")[0],
            )
            for e in run
        )
        for run in runs.values()
    ]


def test_the_library_emits_what_the_cli_emits(
    tmp_path: Path, receiver: Receiver, binary_model_paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``batchscore.run`` and ``run_shard`` called from Python report START then COMPLETE or FAIL,
    as the CLI's processes do for the same steps; ``commit`` reports no lineage run, as the CLI's."""
    import dataclasses

    import batchscore as library

    args = job_args(tmp_path, binary_model_paths)  # the CLI's output: out
    env = {
        "OPENLINEAGE_URL": receiver.url,
        "OPENLINEAGE_NAMESPACE": "scoring",
        "OPENLINEAGE_PARENT_ID": f"airflow-prod/batchscore_churn.score/{PARENT_RUN}",
    }
    for step, code in (
        (["run"], 0),
        (["run", "--shard", "1/2"], 0),
        (["run", "--shard", "0/2", "--model-sha256", "0" * 64], 4),
        (["run", "--shard", "0/2"], 0),
        (["commit", "--shards", "2"], 0),
    ):
        proc = batchscore(step[0], *args, "--job-name", "churn", *step[1:], env=env)
        assert proc.returncode == code, proc.stderr
    by_cli, receiver.events[:] = list(receiver.events), []

    for name in [n for n in os.environ if n.startswith("OPENLINEAGE")]:
        monkeypatch.delenv(name)
    for name, setting in env.items():
        monkeypatch.setenv(name, setting)
    config = library.build_config(
        None,
        input=(str(tmp_path / "in"),),
        output=str(tmp_path / "library"),
        model=str(binary_model_paths["model"]),
        scaler=str(binary_model_paths["scaler"]),
        workers=1,
        job_name="churn",
    )
    ran = library.run(config)
    shard = library.run_shard(config, 1, count=2)
    with pytest.raises(library.ModelError):
        library.run_shard(dataclasses.replace(config, model_sha256="0" * 64), 0, count=2)
    library.run_shard(config, 0, count=2)
    library.commit(config, shards=2)
    by_library = receiver.events
    # The calling process's environment is as it was: nothing the client set outlives a run.
    assert {name for name in os.environ if name.startswith("OPENLINEAGE")} == set(env)

    assert [[e[0] for e in run] for run in _shape(by_library)] == [
        ["START", "COMPLETE"],
        ["START", "COMPLETE"],
        ["START", "FAIL"],
        ["START", "COMPLETE"],
    ]
    assert _shape(by_library) == _shape(by_cli)
    assert by_library[1]["outputs"][0]["name"] == str(tmp_path / "library")
    assert by_library[1]["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] == ran.rows_out == 2 * ROWS
    assert by_library[3]["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] == shard.rows_out
    assert by_library[5]["run"]["facets"]["errorMessage"]["message"].startswith("exit code 4: ")
