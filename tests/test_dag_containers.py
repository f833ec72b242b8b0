"""The DAG's docker runner starting real scoring containers through the Docker Engine API.

``podman system service`` serves that API on a unix socket (the ``docker_engine`` fixture); the
DAG's ``docker_url`` points at it, so Airflow's DockerOperator and the ``docker`` client do what they
do against a Docker engine. Plan and commit run in the worker, each shard in its own container that
sees the job's folders through ``dag.mounts`` at the same paths.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.sample import FEATURES
from container_fixtures import podman
from helpers import binary_model, read_inputs, read_manifest, write_inputs
from helpers import read_output as read_parts
from test_dag import (  # noqa: F401  (configs_dir is a fixture)
    DAY,
    LOGICAL_DATE,
    assert_same_scores,
    configs_dir,
    load_dags,
    score_tis,
    shard_tries,
    single_process_run,
    write_job,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def docker_job(tmp_path: Path) -> dict[str, Any]:
    """Three input files for one date, a fitted model and the single-process reference."""
    root = tmp_path / "job"
    inputs = write_inputs(root / "events" / f"dt={DAY}", files=3, rows=1_203, row_group_size=300)
    paths = binary_model(root / "model")
    reference = tmp_path / "reference"
    single_process_run(str(root / "events" / f"dt={DAY}"), str(reference), str(paths["model"]), str(paths["scaler"]))
    scores = tmp_path / "scores"
    scores.mkdir()
    return {
        "root": root,
        "scores": scores,
        "rows": read_inputs(inputs).num_rows,
        "model": paths["model"],
        "scaler": paths["scaler"],
        "reference": read_parts(str(reference)),
    }


def job_file(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "input": str(data["root"] / "events" / "dt={{ ds }}") + "/",
        "output": str(data["scores"] / "dt={{ ds }}") + "/",
        "model": str(data["model"]),
        "scaler": str(data["scaler"]),
        "model_version": "test-1",
        "features": list(FEATURES),
    }


def docker_dag(data: dict[str, Any], image: str, engine: str) -> dict[str, Any]:
    """Shards in containers of ``image``: the job's folders mounted at their own paths, the worker's user."""
    return {
        "schedule": "@daily",
        "start_date": "2024-01-01",
        "runner": "docker",
        "image": image,
        "docker_url": engine,
        "shards": 3,
        "retries": 2,
        "retry_delay": 1,
        "retry_exponential_backoff": False,
        "mounts": [f"{data['root']}:{data['root']}:ro", f"{data['scores']}:{data['scores']}"],
        "user": f"{os.getuid()}:{os.getgid()}",
        "network_mode": "none",
    }


def containers_of(job: str, running: bool = False) -> list[str]:
    """Ids of the containers a job's shards run in (or ran in, unless removed)."""
    args = ["ps", "--quiet", "--filter", f"label=batchscore-job={job}", *([] if running else ["--all"])]
    return podman(*args).stdout.split()


def remove_containers(job: str) -> None:
    ids = containers_of(job)
    if ids:
        podman("rm", "--force", "--time", "0", *ids, check=False)


def test_docker_runner_scores_shards_in_real_containers(
    airflow_home: Path,
    configs_dir: Path,
    docker_engine: str,
    scoring_image: str,
    docker_job: dict[str, Any],  # noqa: F811
) -> None:
    """plan -> three shard containers -> commit: every row as one process scores it; containers removed."""
    from airflow.utils.state import DagRunState

    write_job(configs_dir, "docker_e2e", job_file(docker_job), docker_dag(docker_job, scoring_image, docker_engine))
    try:
        run = load_dags(configs_dir)["batchscore_docker_e2e"].test(logical_date=LOGICAL_DATE)
        assert run.state == DagRunState.SUCCESS
        assert [ti.map_index for ti in score_tis(run)] == [0, 1, 2]
        output = docker_job["scores"] / f"dt={DAY}"
        assert (output / "_SUCCESS").exists() and read_manifest(output)["rows"]["out"] == docker_job["rows"]
        assert_same_scores(read_parts(str(output)), docker_job["reference"], docker_job["rows"])
        assert containers_of("docker-e2e") == []  # each succeeded shard's container was removed
    finally:
        remove_containers("docker-e2e")


@pytest.mark.fault
def test_container_exiting_3_fails_at_once_and_a_killed_one_is_retried(
    airflow_home: Path,
    configs_dir: Path,
    docker_engine: str,
    scoring_image: str,
    docker_job: dict[str, Any],  # noqa: F811
) -> None:
    """A shard whose container exits 3 (invalid input) fails in one try; a container killed from outside
    (``podman kill``) while it scores is retried, and the job commits every row exactly."""
    from airflow.utils.state import DagRunState, TaskInstanceState

    # Invalid data: one NaN feature in the last file, which the last of three shards scores.
    bad = docker_job["root"] / "bad" / f"dt={DAY}"
    bad.mkdir(parents=True)
    for path in sorted((docker_job["root"] / "events" / f"dt={DAY}").glob("*.parquet")):
        table = pq.read_table(path)
        if path.name == "day-02.parquet":
            age = table.column("age").to_numpy().copy()
            age[1_001] = np.nan
            table = table.set_column(table.schema.get_field_index("age"), "age", pa.array(age))
        pq.write_table(table, bad / path.name, row_group_size=300)
    invalid = {**job_file(docker_job), "input": str(docker_job["root"] / "bad" / "dt={{ ds }}") + "/"}
    write_job(configs_dir, "docker_exit3", invalid, docker_dag(docker_job, scoring_image, docker_engine))
    kill_job = {**docker_job, "scores": docker_job["scores"].parent / "scores-kill"}  # its own output
    kill_job["scores"].mkdir()
    write_job(configs_dir, "docker_kill", job_file(kill_job), docker_dag(kill_job, scoring_image, docker_engine))
    dags = load_dags(configs_dir)
    try:
        run = dags["batchscore_docker_exit3"].test(logical_date=LOGICAL_DATE)
        assert run.state == DagRunState.FAILED
        tries = shard_tries(run)
        assert tries[2] == (TaskInstanceState.FAILED, 1), tries
        assert tries[0] == tries[1] == (TaskInstanceState.SUCCESS, 1), tries
        assert not (docker_job["scores"] / f"dt={DAY}" / "_SUCCESS").exists()
        assert containers_of("docker-exit3") == []  # the provider removes a shard's container however it ended

        killed: list[str] = []

        def kill_shard_1() -> None:
            """Kill shard 1's first container once it runs (the scorer inside is busy scoring)."""
            deadline = time.monotonic() + 240
            while not killed and time.monotonic() < deadline:
                for cid in containers_of("docker-kill", running=True):
                    args = podman("inspect", "--format", "{{json .Args}}", cid, check=False).stdout
                    if '"--shard","1"' in args.replace(" ", ""):
                        time.sleep(0.5)  # well inside the run: the model is loading or rows are scored
                        if podman("kill", cid, check=False).returncode == 0:
                            killed.append(cid)
                        return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_shard_1, daemon=True)
        killer.start()
        run = dags["batchscore_docker_kill"].test(logical_date=LOGICAL_DATE)
        killer.join(timeout=60)
        assert killed, "shard 1's container was never seen running"
        assert run.state == DagRunState.SUCCESS
        assert shard_tries(run) == {
            0: (TaskInstanceState.SUCCESS, 1),
            1: (TaskInstanceState.SUCCESS, 2),
            2: (TaskInstanceState.SUCCESS, 1),
        }
        output = kill_job["scores"] / f"dt={DAY}"
        assert (output / "_SUCCESS").exists()
        assert_same_scores(read_parts(str(output)), docker_job["reference"], docker_job["rows"])
    finally:
        remove_containers("docker-exit3")
        remove_containers("docker-kill")
