"""batchscore on Spark: the same job through spark-submit on a standalone cluster, and ``score(df)``.

The cluster tests submit real jobs (a JVM driver, an executor with Python workers) to a master
and worker on 127.0.0.1; the DataFrame tests use one ``local[2]`` session.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import batchscore
from batchscore.errors import ConfigError, InputDataError, ModelError
from batchscore.io.layout import attempt_part_name, plan_path
from helpers import (
    assert_exact,
    binary_model,
    multiclass_model,
    read_inputs,
    read_manifest,
    read_output,
    receipt_file,
    training_frame,
    write_inputs,
)
from spark_fixtures import spark_cluster, spark_local  # noqa: F401  (fixtures)


def _job_file(folder: Path, **job: Any) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({"model_version": "2.1.0", **{k: v for k, v in job.items() if v is not None}}))
    return path


def _local_job(folder: Path, models: dict[str, Path], **job: Any) -> tuple[Path, Path]:
    """A job file scoring ``folder/in`` with ``models`` into ``folder/out``, and that output."""
    output = folder / "out"
    model, scaler = str(models["model"]), str(models["scaler"])
    return _job_file(folder, input=str(folder / "in"), output=str(output), model=model, scaler=scaler, **job), output


def _output_files(output: Path) -> list[str]:
    return sorted(os.listdir(output))


# --- the same job file on a standalone cluster, through spark-submit -------------------------------------------


@pytest.mark.slow
def test_submitted_job_is_exact_and_survives_a_killed_task_attempt(
    spark_cluster: Any, tmp_path: Path, binary_model_paths: dict[str, Path]
) -> None:
    """Five files of several row groups, three shards of two or three files each; the first attempt
    of shard 1 dies (os._exit) once its first part is written. Spark retries it; the commit is
    exact, in input order, with one part per planned unit and nothing else in the output."""
    paths = write_inputs(tmp_path / "in", files=5, rows=656, row_group_size=200)
    job, output = _local_job(tmp_path, binary_model_paths)
    done = spark_cluster.submit(
        ["--config", str(job), "--shards", "3"], conf={"spark.executorEnv.BATCHSCORE_SPARK_FAULT": "1:part"}
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "scored 3,280 of 3,280 rows, 0 invalid" in done.stdout
    assert "shard 1 by task attempt 1" in done.stdout + done.stderr, spark_cluster.batchscore_lines(done)
    assert_exact(read_output(output), read_inputs(paths), binary_model_paths)
    manifest = read_manifest(output)
    assert manifest["rows"] == {"in": 3_280, "out": 3_280, "invalid": 0}
    assert [s["index"] for s in manifest["shards"]] == [0, 1, 2]
    assert len(manifest["parts"]) >= 6, "each shard spans files: several parts each"
    assert _output_files(output) == sorted([p["name"] for p in manifest["parts"]] + ["_SUCCESS"])
    for shard in manifest["shards"]:  # every part is the attempt its shard's receipt names
        receipt = receipt_file(output, shard["index"])
        assert receipt.exists()
    for part in manifest["parts"]:
        footer = pq.read_metadata(output / part["name"]).metadata
        assert footer[b"batchscore.attempt"].decode() in {s["attempt"] for s in manifest["shards"]}


@pytest.mark.slow
@pytest.mark.fault
def test_submitted_job_survives_a_killed_executor(
    spark_cluster: Any, tmp_path: Path, binary_model_paths: dict[str, Path]
) -> None:
    """The executor running shard 1's first attempt is killed (SIGKILL of its JVM) once that attempt
    has written its first part: Spark loses the executor, runs the shard again on a live one, and
    the commit is exact, holding the parts of the attempts whose receipts stand and nothing else."""
    paths = write_inputs(tmp_path / "in", files=4, rows=528, row_group_size=200)
    job, output = _local_job(tmp_path, binary_model_paths)
    done = spark_cluster.submit(
        ["--config", str(job), "--shards", "2"], conf={"spark.executorEnv.BATCHSCORE_SPARK_FAULT": "1:executor"}
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.search(r"Lost executor \d+", done.stderr), spark_cluster.batchscore_lines(done)
    assert "shard 1 by task attempt 1" in done.stdout + done.stderr, spark_cluster.batchscore_lines(done)
    assert_exact(read_output(output), read_inputs(paths), binary_model_paths)
    manifest = read_manifest(output)
    assert manifest["rows"] == {"in": 2_112, "out": 2_112, "invalid": 0}
    assert _output_files(output) == sorted([p["name"] for p in manifest["parts"]] + ["_SUCCESS"])


#: Spark's speculation, as eager as it goes: a task running 1.2 times the median of those done
#: (after a third of them) gets a copy on another host, checked every 100 ms.
SPECULATION = {
    "spark.speculation": "true",
    "spark.speculation.interval": "100ms",
    "spark.speculation.multiplier": "1.2",
    "spark.speculation.quantile": "0.3",
    "spark.speculation.minTaskRuntime": "200ms",
    "spark.speculation.efficiency.enabled": "false",
}


@pytest.mark.slow
@pytest.mark.fault
def test_a_real_speculative_copy_commits_exactly_without_stray_parts(
    spark_cluster: Any, tmp_path: Path, binary_model_paths: dict[str, Path]
) -> None:
    """Speculation on, and the first attempt of shard 1 a straggler (one row per batch): Spark
    starts a copy of it on the other host while it still writes parts, the first receipt stands,
    and Spark kills the other attempt. The committed output is exact, holds the parts of the
    attempt whose receipt stands and nothing else, and every part of the other attempt is gone."""
    paths = write_inputs(tmp_path / "in", files=12, rows=752, row_group_size=376)  # a part a file, 4 a shard
    job, output = _local_job(tmp_path, binary_model_paths)
    done = spark_cluster.submit(
        ["--config", str(job), "--shards", "3"],
        conf={**SPECULATION, "spark.executorEnv.BATCHSCORE_SPARK_FAULT": "1:slow"},
    )
    text = done.stdout + done.stderr
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.search(r"Marking task 1 in stage \S+ .* as speculatable", text), spark_cluster.batchscore_lines(done)
    assert re.search(r"Starting task 1\.1 in stage", text), "no speculative copy of task 1 ran"
    assert "shard 1 by task attempt 1" in text, "the straggler won: nothing it wrote was left to remove"
    assert_exact(read_output(output), read_inputs(paths), binary_model_paths)
    manifest = read_manifest(output)
    assert manifest["rows"] == {"in": 9_024, "out": 9_024, "invalid": 0}
    parts = [p["name"] for p in manifest["parts"]]
    assert _output_files(output) == sorted([*parts, "_SUCCESS"]), "a stray part is in the committed output"
    for shard in manifest["shards"]:
        receipt = json.loads(receipt_file(output, shard["index"]).read_text())
        assert receipt["attempt"] == shard["attempt"]
        for part in receipt["parts"]:
            assert part["name"].endswith(f"_{shard['attempt']}.parquet")
            footer = pq.read_metadata(output / part["name"]).metadata
            assert footer[b"batchscore.attempt"].decode() == shard["attempt"]
    assert len(parts) == len(set(parts)) == 12
    assert not [n for n in os.listdir(output) if n.startswith(".")], "a temporary part was left behind"
    assert manifest["removed_stray_files"] >= 1, "the straggler's parts were not there to remove"


@pytest.mark.slow
def test_submitted_job_reads_and_writes_s3(
    spark_cluster: Any, tmp_path: Path, s3: Any, binary_model_paths: dict[str, Path]
) -> None:
    """Input, model and output on the loopback S3 server: each task reads its row groups through
    batchscore's own fsspec storage, the driver commits there."""
    fs, bucket, options = s3
    paths = write_inputs(tmp_path / "in", files=2, rows=992, row_group_size=256)
    for path in paths:
        fs.put(str(path), f"{bucket}/in/{path.name}")
    for path in binary_model_paths.values():
        fs.put(str(path), f"{bucket}/model/{path.name}")
    job = _job_file(
        tmp_path,
        input=f"s3://{bucket}/in/*.parquet",
        output=f"s3://{bucket}/scores/out",
        model=f"s3://{bucket}/model/model.joblib",
        scaler=f"s3://{bucket}/model/scaler.joblib",
        storage_options=options,
    )
    credentials = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    done = spark_cluster.submit(
        ["--config", str(job)], conf={f"spark.executorEnv.{k}": v for k, v in credentials.items()}, env=credentials
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert_exact(read_output(f"{bucket}/scores/out", fs), read_inputs(paths), binary_model_paths)
    assert read_manifest(f"{bucket}/scores/out", fs)["rows"]["out"] == 1_984


@pytest.mark.slow
def test_submitted_job_with_a_wrong_pin_exits_4_and_writes_nothing(
    spark_cluster: Any, tmp_path: Path, binary_model_paths: dict[str, Path]
) -> None:
    write_inputs(tmp_path / "in", files=1, rows=480, row_group_size=160)
    job, output = _local_job(tmp_path, binary_model_paths, model_sha256="0" * 64)
    done = spark_cluster.submit(["--config", str(job)])
    assert done.returncode == 4, done.stderr[-4000:]
    assert "does not match its pinned digest" in done.stdout + done.stderr
    assert not output.exists()


# --- the job from Python, on local[2] ---------------------------------------------------------------------------


def test_run_job_retries_a_task_killed_after_its_receipt(
    spark_local: Any,
    tmp_path: Path,
    binary_model_paths: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An attempt that wrote its parts and its receipt, then died before Spark heard of it: the
    retry finds that receipt standing and returns it (the shard is not scored twice), and the
    commit publishes exactly the parts it names, each named for that attempt."""
    from batchscore.spark import run_job

    environment = spark_local.sparkContext.environment  # what Python workers started from now on see
    monkeypatch.setitem(environment, "BATCHSCORE_SPARK_FAULT", "0:receipt")
    paths = write_inputs(tmp_path / "in", files=2, rows=640, row_group_size=200)
    output = tmp_path / "out"
    config = batchscore.build_config(
        None,
        input=(str(tmp_path / "in"),),
        output=str(output),
        model=str(binary_model_paths["model"]),
        scaler=str(binary_model_paths["scaler"]),
        model_version="3",
    )
    with caplog.at_level(logging.INFO, logger="batchscore.spark.driver"):
        result = run_job(config, spark=spark_local, shards=2)
    assert "shard 0 by task attempt 1" in caplog.text
    attempts = [s["attempt"] for s in result.manifest["shards"]]
    planned = ("part-00000-00000.parquet", "part-00001-00000.parquet")
    assert result.rows_out == 1_280 and result.parts == tuple(map(attempt_part_name, planned, attempts))
    assert_exact(read_output(output), read_inputs(paths), binary_model_paths)
    assert _output_files(output) == ["_SUCCESS", *result.parts]
    receipt = json.loads(receipt_file(output, 0).read_text())
    assert receipt["attempt"] == attempts[0]
    assert result.manifest["removed_stray_files"] == 0, "the retry wrote nothing of its own"


def test_run_job_refuses_bad_input_without_retrying(
    spark_local: Any, tmp_path: Path, binary_model_paths: dict[str, Path]
) -> None:
    """A null feature under on_invalid fail is the data's fault: exit 3, the file named, nothing committed."""
    from batchscore.spark import run_job

    paths = write_inputs(tmp_path / "in", files=2, rows=320, row_group_size=160)
    table = pq.read_table(paths[1])
    tenure = table.column("tenure").to_pylist()
    tenure[200] = None
    pq.write_table(
        table.set_column(table.schema.get_field_index("tenure"), "tenure", pa.array(tenure, pa.int64())),
        paths[1],
        row_group_size=160,
    )
    config = batchscore.build_config(
        None,
        input=(str(tmp_path / "in"),),
        output=str(tmp_path / "out"),
        model=str(binary_model_paths["model"]),
        scaler=str(binary_model_paths["scaler"]),
    )
    with pytest.raises(
        InputDataError, match=r"day-01\.parquet: row 200 has an invalid feature value \(tenure is null\)"
    ):
        run_job(config, spark=spark_local, shards=2)
    assert not (tmp_path / "out" / "_SUCCESS").exists()


# --- score(df) --------------------------------------------------------------------------------------------------


def _scored(frame: Any, key: str = "customer_id") -> pa.Table:
    return pa.Table.from_pandas(frame.toPandas(), preserve_index=False).sort_by(key)


def test_score_is_exact_with_the_cli_columns(spark_local: Any, tmp_path: Path) -> None:
    """Every row bit for bit what predict/predict_proba gives on the pandas frame, for a binary and
    a string-class multiclass model; the columns are the CLI's, in its order."""
    from batchscore.spark import score

    paths = write_inputs(tmp_path / "in", files=2, rows=1_008, row_group_size=300)
    df = spark_local.read.parquet(str(tmp_path / "in"))
    inputs = read_inputs(paths).sort_by("customer_id")
    for build in (binary_model, multiclass_model):
        model = build(tmp_path / build.__name__)
        settings = {"scaler": str(model["scaler"])}
        scored = score(df, str(model["model"]), model_version="7", batch_size=97, **settings)
        cli_output = tmp_path / f"cli-{build.__name__}"
        batchscore.run(
            batchscore.build_config(
                None,
                input=(str(paths[0]),),
                output=str(cli_output),
                model=str(model["model"]),
                model_version="7",
                **settings,
            )
        )
        assert scored.columns == read_output(cli_output).column_names
        table = _scored(scored)
        assert_exact(table, inputs, model, passthrough=["customer_id", "tenure", "monthly_charges"])
        assert table.column("region").to_pylist() == inputs.column("region").to_pylist()  # large_string from pandas
        assert set(table.column("model_version").to_pylist()) == {"7"}
        assert len(set(table.column("predicted_at").to_pylist())) == 1


def test_score_keeps_skips_and_refuses(spark_local: Any, tmp_path: Path, binary_model_paths: dict[str, Path]) -> None:
    from batchscore.spark import score

    rows = 160
    table = write_inputs(tmp_path / "in", files=1, rows=rows, row_group_size=rows)[0]
    frame = pq.read_table(table)
    charges = frame.column("monthly_charges").to_numpy().copy()
    charges[[3, 77]] = [np.nan, np.inf]
    frame = frame.set_column(frame.schema.get_field_index("monthly_charges"), "monthly_charges", pa.array(charges))
    pq.write_table(frame, table)
    df = spark_local.read.parquet(str(table))
    model = str(binary_model_paths["model"])
    scaler = str(binary_model_paths["scaler"])
    kept = score(df, model, scaler=scaler, keep=("customer_id",), on_invalid="skip")
    assert kept.columns == ["customer_id", "prediction", "probability", "predicted_at", "model_version"]
    ids = sorted(r.customer_id for r in kept.select("customer_id").collect())
    assert ids == sorted(
        set(frame.column("customer_id").to_pylist())
        - {frame.column("customer_id")[3].as_py(), frame.column("customer_id")[77].as_py()}
    )
    with pytest.raises(Exception, match=r"invalid feature value \(monthly_charges is NaN\)"):
        score(df, model, scaler=scaler).collect()
    with pytest.raises(ConfigError, match="quarantine"):
        score(df, model, scaler=scaler, on_invalid="quarantine")
    with pytest.raises(ModelError, match="does not match its pinned digest"):
        score(df, model, scaler=scaler, model_sha256="f" * 64)
    with pytest.raises(InputDataError, match="no feature column"):
        score(df.drop("tenure"), model, scaler=scaler)
    with pytest.raises(ConfigError, match="would be overwritten"):
        score(df.withColumnRenamed("churned", "probability"), model, scaler=scaler)
    pair = [{"name": "lr", "role": "champion", "model": model, "scaler": scaler}, {"name": "again", "model": model}]
    with pytest.raises(ConfigError, match=r"names challengers \(again\)"):
        score(df, str(_job_file(tmp_path, models=pair)))  # one pass of every model is a job's: batchscore spark
    with pytest.raises(ConfigError, match="engine compiled"):
        score(df, model, scaler=scaler, engine="compiled")


def test_slices_bound_rows_and_bytes() -> None:
    from batchscore.spark.frame import slices

    batch = pa.record_batch({"a": pa.array(np.arange(1_001, dtype=np.float64)), "b": pa.array(["x" * 100] * 1_001)})
    width = batch.nbytes / batch.num_rows
    for rows, max_bytes in ((1_000_000, 10_000), (37, 1 << 30), (37, 3_000), (5, 1)):
        pieces = list(slices(batch, rows, max_bytes))
        assert pa.Table.from_batches(pieces).equals(pa.Table.from_batches([batch]))
        assert all(p.num_rows <= rows and (p.num_rows == 1 or p.num_rows * width <= max_bytes) for p in pieces)
    assert list(slices(batch.slice(0, 0), 10, 10)) == []


# --- two attempts of one shard at once (what speculative execution would do) ----------------------------------


#: One attempt of shard 0 of the plan, as a Spark task runs it: ``concurrent``, the model kept.
_ATTEMPT = (
    "import sys, batchscore; config = batchscore.build_config(sys.argv[1]); "
    "batchscore.run_shard(config, 0, plan=sys.argv[2], plan_sha256=sys.argv[3], keep_model=True, concurrent=True)"
)


@pytest.mark.fault
def test_two_attempts_of_one_shard_at_once_commit_exactly(tmp_path: Path, binary_model_paths: dict[str, Path]) -> None:
    """Two processes score the same shard of a plan at the same time, as Spark's speculative copy
    and its original do: each writes parts named for itself, one receipt stands, and the commit
    publishes exactly that attempt's parts and removes the other's. Two trials (the second finds
    the first trial's receipt standing: a copy started after the shard was done); then the job
    planned again, whose attempt does not take the earlier run's receipt for its own; then a plain
    rerun of the shard replaces it, and the commit removes every part named for an attempt."""
    paths = write_inputs(tmp_path / "in", files=4, rows=1_600, row_group_size=400)
    job, output = _local_job(tmp_path, binary_model_paths, workers=2)
    config = batchscore.build_config(str(job))
    plan = batchscore.plan(config, shards=1, out=plan_path(str(output)))
    attempt = [sys.executable, "-c", _ATTEMPT, str(job), plan_path(str(output)), plan.sha256]
    units = sum(len(s.units) for s in plan.shards)
    standing = set()
    for trial in range(2):
        attempts = [
            subprocess.Popen(attempt, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)
        ]
        for process in attempts:
            _, err = process.communicate(timeout=180)
            assert process.returncode == 0, err[-3000:]
        written = len([n for n in _output_files(output) if n.startswith("part-")])
        assert written in ((units, 2 * units) if trial == 0 else (units,)), written  # two sets, or a copy found it done
        result = batchscore.commit(config, plan=plan_path(str(output)), plan_sha256=plan.sha256)
        assert_exact(read_output(output), read_inputs(paths), binary_model_paths)
        winner = result.manifest["shards"][0]["attempt"]
        standing.add(winner)
        assert _output_files(output) == ["_SUCCESS", *result.parts]
        assert all(name.endswith(f"_{winner}.parquet") for name in result.parts) and len(result.parts) == units
        assert {pq.read_metadata(output / p).metadata[b"batchscore.attempt"].decode() for p in result.parts} == {winner}
        assert result.manifest["removed_stray_files"] == written - units
    assert len(standing) == 1, "a later attempt replaced the receipt that stood"
    # The job planned again (the same plan id: plans are deterministic; another sha256): the
    # receipt of the earlier run is stale, and an attempt of this run scores the shard itself.
    config = replace(config, overwrite=True)
    again = batchscore.plan(config, shards=1, out=plan_path(str(output)))
    assert again.plan_id == plan.plan_id and again.sha256 != plan.sha256
    rerun = batchscore.run_shard(config, 0, plan=plan_path(str(output)), plan_sha256=again.sha256, concurrent=True)
    assert rerun.receipt["attempt"] not in standing
    result = batchscore.commit(config, plan=plan_path(str(output)), plan_sha256=again.sha256)
    assert all(name.endswith(f"_{rerun.receipt['attempt']}.parquet") for name in result.parts)
    assert _output_files(output) == ["_SUCCESS", *result.parts]
    assert_exact(read_output(output), read_inputs(paths), binary_model_paths)
    batchscore.run_shard(config, 0, plan=plan_path(str(output)), plan_sha256=again.sha256)
    result = batchscore.commit(config, plan=plan_path(str(output)), plan_sha256=again.sha256)
    assert_exact(read_output(output), read_inputs(paths), binary_model_paths)
    assert _output_files(output) == ["_SUCCESS", *result.parts] and result.parts[0] == "part-00000-00000.parquet"
    assert result.manifest["removed_stray_files"] == units


# --- the Airflow DAG's spark runner: spark-submit through the provider's operator, to a master from a connection ---

DAG_DAY = "2024-06-01"


def _spark_dag_job(
    configs: Path, root: Path, model_paths: dict[str, Path], name: str, **dag: Any
) -> tuple[Path, list[Path]]:
    """A dated job (3 files of several row groups) whose DAG runs on the spark runner; its output
    folder and input files."""
    import sys

    paths = write_inputs(root / "events" / f"dt={DAG_DAY}", files=3, rows=656, row_group_size=200)
    job = {
        "input": str(root / "events" / "dt={{ ds }}") + "/",
        "output": str(root / "scores" / "dt={{ ds }}") + "/",
        "model": str(model_paths["model"]),
        "scaler": str(model_paths["scaler"]),
        "model_version": "2.1.0",
        "dag": {
            "schedule": "@daily",
            "start_date": "2024-01-01",
            "runner": "spark",
            "shards": 2,
            "retries": 2,
            "retry_delay": 1,
            "retry_exponential_backoff": False,
            "spark_python": sys.executable,
            "spark_executor_memory": "512m",
            "spark_driver_memory": "512m",
            "spark_conf": {
                "spark.driver.host": "127.0.0.1",
                "spark.ui.enabled": False,
                "spark.task.maxFailures": 2,
            },
            **dag,
        },
    }
    (configs / f"{name}.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    return root / "scores" / f"dt={DAG_DAY}", paths


@pytest.fixture
def spark_dags(
    spark_cluster: Any, airflow_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, Any]:
    """A configs folder for the DAG factory, the cluster's master as the `spark_default` connection and
    `local[2]` as `spark_local` (set the way a deployment sets them, in the environment), and
    `spark-submit` on the worker's PATH; returns the folder and a loader of its DAGs."""
    from spark_fixtures import spark_env, spark_home

    configs = tmp_path / "configs"
    configs.mkdir()
    monkeypatch.setenv("BATCHSCORE_CONFIGS_DIR", str(configs))
    monkeypatch.delenv("BATCHSCORE_RUNNER", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", spark_cluster.master)  # spark://127.0.0.1:PORT
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_LOCAL", json.dumps({"conn_type": "spark", "host": "local[2]"}))
    for key in ("SPARK_LOCAL_IP", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON"):
        monkeypatch.setenv(key, spark_env()[key])
    monkeypatch.setenv("PATH", f"{spark_home() / 'bin'}{os.pathsep}{os.environ['PATH']}")

    def load(dag_id: str) -> Any:
        import sys

        from airflow.models import DagBag

        from airflow_fixtures import DAGS_FOLDER

        if str(DAGS_FOLDER) not in sys.path:
            sys.path.append(str(DAGS_FOLDER))
        bag = DagBag(dag_folder=str(DAGS_FOLDER))
        assert bag.import_errors == {}
        return bag.dags[dag_id]

    return configs, load


def _states(run: Any) -> dict[str, tuple[str, int, int]]:
    return {ti.task_id: (ti.state, ti.try_number, ti.map_index) for ti in run.get_task_instances()}


@pytest.mark.slow
def test_dag_spark_runner_submits_to_the_connections_master_and_commits_exactly(
    spark_dags: tuple[Path, Any], tmp_path: Path, binary_model_paths: dict[str, Path]
) -> None:
    """sensor -> plan -> one SparkSubmitOperator task (the master from `spark_default`) -> commit
    (drift on) -> Asset: two shards scored by Spark tasks, committed by the DAG's commit, every row
    equal to the model's predict_proba on the pandas frame, in input order."""
    from datetime import datetime, timezone

    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState

    configs, load = spark_dags
    output, paths = _spark_dag_job(
        configs,
        tmp_path,
        binary_model_paths,
        "spark_e2e",
        sensor={"poke_interval": 1, "timeout": 60},
        drift=True,
    )
    dag = load("batchscore_spark_e2e")
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    assert isinstance(dag.get_task("score"), SparkSubmitOperator)

    run = dag.test(logical_date=datetime(2024, 6, 1, tzinfo=timezone.utc))
    assert run.state == DagRunState.SUCCESS, _states(run)
    done = TaskInstanceState.SUCCESS
    assert _states(run) == {
        "wait_for_input": (done, 1, -1),
        "plan": (done, 1, -1),
        "score": (done, 1, -1),  # one Spark job, not a task per shard
        "commit": (done, 1, -1),
    }
    assert (output / "_SUCCESS").exists()
    assert_exact(read_output(output), read_inputs(paths), binary_model_paths)
    manifest = read_manifest(output)
    assert manifest["rows"] == {"in": 1_968, "out": 1_968, "invalid": 0}
    assert [s["index"] for s in manifest["shards"]] == [0, 1]
    assert _output_files(output) == sorted([p["name"] for p in manifest["parts"]] + ["_SUCCESS"])
    with create_session() as session:
        [event] = session.query(AssetEvent).filter(AssetEvent.source_dag_id == dag.dag_id).all()
        assert event.extra["output"] == str(output) + "/" and event.extra["rows"] == 1_968


@pytest.mark.slow
@pytest.mark.fault
def test_dag_spark_runner_fails_at_once_on_bad_input_and_commits_nothing(
    spark_dags: tuple[Path, Any], tmp_path: Path, binary_model_paths: dict[str, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    """A null feature the plan cannot see (footers only) fails a Spark task (on `local[2]`, from the
    `spark_local` connection) with exit 3: spark-submit
    exits 3, the task log names the file and row, the score task fails in one try (two retries
    configured), the commit never runs and the output has no _SUCCESS."""
    from datetime import datetime, timezone

    from airflow.utils.state import DagRunState, TaskInstanceState

    configs, load = spark_dags
    output, paths = _spark_dag_job(
        configs, tmp_path, binary_model_paths, "spark_bad_input", spark_conn_id="spark_local"
    )
    table = pq.read_table(paths[2])
    tenure = table.column("tenure").to_pylist()
    tenure[437] = None
    pq.write_table(
        table.set_column(table.schema.get_field_index("tenure"), "tenure", pa.array(tenure, pa.int64())),
        paths[2],
        row_group_size=200,
    )
    dag = load("batchscore_spark_bad_input")

    run = dag.test(logical_date=datetime(2024, 6, 1, tzinfo=timezone.utc))
    assert run.state == DagRunState.FAILED
    states = _states(run)
    assert states["plan"][0] == TaskInstanceState.SUCCESS
    assert states["score"][:2] == (TaskInstanceState.FAILED, 1), states
    assert states["commit"][0] == TaskInstanceState.UPSTREAM_FAILED
    task_log = capfd.readouterr().out
    assert "spark-submit --master local[2] " in task_log
    assert "day-02.parquet: row 437 has an invalid feature value (tenure is null)" in task_log
    assert "spark-submit of batchscore spark exited with code 3 (input data invalid); not retrying" in task_log
    assert not (output / "_SUCCESS").exists()


def test_spark_command_refuses_a_commit_it_cannot_make(tmp_path: Path, binary_model_paths: dict[str, Path]) -> None:
    """--no-commit without --plan, and --plan with --shards, are usage errors (exit 2) before Spark starts."""
    import subprocess
    import sys

    job = _job_file(
        tmp_path,
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        model=str(binary_model_paths["model"]),
    )
    for extra, message in (
        (["--no-commit"], "--no-commit needs --plan"),
        (
            ["--plan", str(tmp_path / "plan.json"), "--shards", "2"],
            "--shards would plan the job again: --plan is scored as it was planned",
        ),
        (["--plan-sha256", "ab" * 32], "--plan-sha256 needs --plan"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "batchscore", "spark", "--config", str(job), *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2 and message in done.stderr, (extra, done.stderr[-2000:])
    assert not (tmp_path / "out").exists()


def test_run_job_loads_the_model_once_per_python_worker(
    spark_local: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Seven shards on local[2]: Spark reuses its Python workers, and each loads the model (from
    its bytes, checked against the plan's pins) for its first task only; the later tasks of the
    worker score with the model kept there."""
    from batchscore.spark import run_job

    model = binary_model(tmp_path / "model")  # URIs of its own: no worker kept it for another test
    paths = write_inputs(tmp_path / "in", files=7, rows=336, row_group_size=112)
    config = batchscore.build_config(
        None,
        input=(str(tmp_path / "in"),),
        output=str(tmp_path / "out"),
        model=str(model["model"]),
        scaler=str(model["scaler"]),
    )
    with caplog.at_level(logging.INFO, logger="batchscore.spark.driver"):
        run_job(config, spark=spark_local, shards=7)
    assert_exact(read_output(tmp_path / "out"), read_inputs(paths), model)
    tasks = re.findall(
        r"shard (\d+) by task attempt \d+ \([\d,]+ rows; Python worker (\d+), (loaded the model|model already loaded)\)",
        caplog.text,
    )
    assert sorted(int(t[0]) for t in tasks) == list(range(7)), caplog.text
    workers: dict[str, list[bool]] = {}
    for _, worker, loaded in tasks:
        workers.setdefault(worker, []).append(loaded == "loaded the model")
    assert all(sum(loads) == 1 for loads in workers.values()), workers
    assert len(workers) < 7, f"no Python worker ran two tasks: {workers}"


def test_run_job_bounds_batches_by_bytes(spark_local: Any, tmp_path: Path, binary_model_paths: dict[str, Path]) -> None:
    """A wide-row file of one row group, through the Spark job path: each task reads its rows in
    batches of at most ``max_batch_bytes`` (one row group of the part it writes per batch), exact."""
    from batchscore.spark import run_job
    from test_batch_bytes import MAX_BYTES, wide_table, written_batches

    (tmp_path / "in").mkdir()
    for i, kind in enumerate(("distinct", "repeated")):
        pq.write_table(wide_table(1_008, kind, seed=i), tmp_path / "in" / f"wide-{i}.parquet", row_group_size=1_008)
    config = batchscore.build_config(
        None,
        input=(str(tmp_path / "in"),),
        output=str(tmp_path / "out"),
        model=str(binary_model_paths["model"]),
        scaler=str(binary_model_paths["scaler"]),
        max_batch_bytes=MAX_BYTES,
    )
    run_job(config, spark=spark_local, shards=2)
    inputs = read_inputs(sorted((tmp_path / "in").iterdir()))
    assert_exact(read_output(tmp_path / "out"), inputs, binary_model_paths)
    batches = written_batches(tmp_path / "out")
    assert sum(batches) == 2_016 and max(batches) <= MAX_BYTES // 3_900 and len(batches) >= 20, batches


def test_spark_command_scores_a_champion_and_a_challenger_exactly(spark_local: Any, tmp_path: Path) -> None:
    """`batchscore spark` on local[2]: the driver plans, each task runs its shard (run_shard) with
    the champion and a challenger loaded as the plan pinned them; both exact, one manifest."""
    from helpers import cli, pipeline_model
    from test_challengers import assert_challenger_exact

    paths = write_inputs(tmp_path / "in", files=2, rows=1_104, row_group_size=300)
    champion, forest = binary_model(tmp_path / "champion"), pipeline_model(tmp_path / "forest")
    out = tmp_path / "out"
    job = _job_file(
        tmp_path,
        input=str(tmp_path / "in"),
        output=str(out),
        models=[
            {"name": "lr", "role": "champion", "model": str(champion["model"]), "scaler": str(champion["scaler"])},
            {"name": "forest", "model": str(forest["model"]), "model_version": "f-3"},
        ],
    )
    result = cli("spark", "--config", str(job), "--master", "local[2]", "--shards", "3")
    assert result.exit_code == 0, result.stderr
    output, inputs = read_output(out), read_inputs(paths)
    assert_exact(output.select([c for c in output.column_names if "__" not in c]), inputs, champion)
    assert_challenger_exact(output, inputs, forest, "forest")
    assert set(output.column("model_version__forest").to_pylist()) == {"f-3"}
    manifest = read_manifest(out)
    (entry,) = manifest["challengers"]
    assert entry["status"] == "ok" and entry["agreement"]["rows_compared"] == output.num_rows
    assert [a["role"] for a in entry["artifacts"]] == ["challenger:forest:model"]


@pytest.mark.slow
def test_score_a_registry_alias_scores_the_version_resolved_when_called(
    spark_local: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """score(df, "models:/NAME@ALIAS") against a SQLite registry file resolves the alias on the
    driver; the alias moved before the (lazy) DataFrame is computed, every task still scores that version."""
    import joblib

    from batchscore.spark import score
    from mlflow_fixtures import log_sklearn, tracking
    from test_registry import pipeline

    paths = write_inputs(tmp_path / "in", files=2, rows=1_008, row_group_size=300)
    registry = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.chdir(tmp_path)  # a SQLite registry keeps artifacts in ./mlruns
    first, second = pipeline(), pipeline(c=0.02)
    joblib.dump(first, tmp_path / "v1.joblib")
    with tracking(registry) as client:
        log_sklearn(first, "churn")
        log_sklearn(second, "churn")
        client.set_registered_model_alias("churn", "champion", "1")
        scored = score(spark_local.read.parquet(str(tmp_path / "in")), "models:/churn@champion", registry_uri=registry)
        client.set_registered_model_alias("churn", "champion", "2")
        table = _scored(scored)
    inputs = read_inputs(paths).sort_by("customer_id")
    assert_exact(table, inputs, {"model": tmp_path / "v1.joblib"}, passthrough=["customer_id", "tenure"])
    assert set(table.column("model_version").to_pylist()) == {"1"}


def test_run_job_into_a_delta_table_and_a_rerun_commits_nothing(
    spark_local: Any, tmp_path: Path, binary_model_paths: dict[str, Path]
) -> None:
    """A Delta output on Spark: the tasks' parts (named for their attempts) go to the plan's data
    folder and one table version; the same job again finds its rows committed, scores nothing,
    counts the rows the table holds (under the names its attempts gave their parts), and adds no version."""
    import deltalake

    from batchscore.spark import run_job
    from batchscore.spark.driver import score_plan

    paths = write_inputs(tmp_path / "in", files=2, rows=728, row_group_size=250)
    table = tmp_path / "scores"
    config = batchscore.build_config(
        None,
        input=(str(tmp_path / "in"),),
        output=str(table),
        model=str(binary_model_paths["model"]),
        scaler=str(binary_model_paths["scaler"]),
        output_format="delta",
    )
    first = run_job(config, spark=spark_local, shards=2)
    assert first.rows_out == 1_456 and len(first.parts) == 2
    version = deltalake.DeltaTable(str(table)).version()
    assert_exact(
        deltalake.DeltaTable(str(table)).to_pyarrow_table().sort_by("customer_id"),
        read_inputs(paths).sort_by("customer_id"),
        binary_model_paths,
    )
    again = score_plan(config, spark=spark_local, shards=2)
    assert again.rows == {"in": 1_456, "out": 1_456, "invalid": 0}
    batchscore.commit(again.config, plan=again.plan_uri, plan_sha256=again.plan_sha256)
    assert deltalake.DeltaTable(str(table)).version() == version
    assert_exact(
        deltalake.DeltaTable(str(table)).to_pyarrow_table().sort_by("customer_id"),
        read_inputs(paths).sort_by("customer_id"),
        binary_model_paths,
    )


def test_run_job_with_the_compiled_engine_is_verified_in_every_task(spark_local: Any, tmp_path: Path) -> None:
    """`engine: compiled` on local[2]: every task scores with the library built once into the job's
    cache, verified against scikit-learn on its own shard's rows; the output agrees with a
    scikit-learn run within the engine's tolerance, classes identical, in input order."""
    import joblib
    from sklearn.ensemble import HistGradientBoostingClassifier

    from batchscore.models.verification import TOLERANCE
    from batchscore.sample import FEATURES
    from batchscore.spark import run_job

    frame = training_frame()
    model = HistGradientBoostingClassifier(max_iter=12, max_depth=3, random_state=0)
    joblib.dump(model.fit(frame[list(FEATURES)], frame["churned"]), tmp_path / "hgb.joblib")
    write_inputs(tmp_path / "in", files=3, rows=1_003, row_group_size=400)

    def job(out: str, **settings: Any) -> Any:
        return batchscore.build_config(
            None,
            input=(str(tmp_path / "in"),),
            output=str(tmp_path / out),
            model=str(tmp_path / "hgb.joblib"),
            **settings,
        )

    batchscore.run(job("sklearn"))
    run_job(job("compiled", engine="compiled", compiled_cache=str(tmp_path / "cache")), spark=spark_local, shards=3)
    expected, got = read_output(tmp_path / "sklearn"), read_output(tmp_path / "compiled")
    assert got.num_rows == expected.num_rows == 3_009
    for column in got.column_names:
        if column == "probability":
            a, b = got.column(column).to_numpy(), expected.column(column).to_numpy()
            assert np.max(np.abs(a - b)) <= TOLERANCE
        elif column != "predicted_at":
            assert got.column(column).equals(expected.column(column)), column
    engine = read_manifest(tmp_path / "compiled")["engine"]
    assert engine["used"] == "compiled" and engine["class_mismatches"] == 0
    assert engine["largest_difference"] <= TOLERANCE and engine["checked_rows"] >= 3 * 256
    assert len(engine["shards"]) == 3 and {s["library_sha256"] for s in engine["shards"]} == {engine["library_sha256"]}


def test_run_job_writes_challenger_folders_exactly_through_a_killed_attempt(
    spark_local: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`challenger_output: folders` on local[2], shard 0's first attempt killed once its first part
    is written: the output holds the champion's parts alone, the challenger's folder its own rows
    exactly, and the commit keeps only the standing attempts' parts in both."""
    from batchscore.spark import run_job
    from helpers import pipeline_model
    from test_challenger_folders import assert_folder_exact, folder, part_names

    monkeypatch.setitem(spark_local.sparkContext.environment, "BATCHSCORE_SPARK_FAULT", "0:part")
    paths = write_inputs(tmp_path / "in", files=3, rows=688, row_group_size=300)
    champion, forest = binary_model(tmp_path / "champion"), pipeline_model(tmp_path / "forest")
    out = tmp_path / "out"
    job = _job_file(
        tmp_path,
        input=str(tmp_path / "in"),
        output=str(out),
        challenger_output="folders",
        models=[
            {"name": "lr", "role": "champion", "model": str(champion["model"]), "scaler": str(champion["scaler"])},
            {"name": "forest", "model": str(forest["model"]), "model_version": "forest-7"},
        ],
    )
    with caplog.at_level(logging.INFO, logger="batchscore.spark.driver"):
        result = run_job(batchscore.build_config(str(job)), spark=spark_local, shards=2)
    assert "shard 0 by task attempt 1" in caplog.text
    inputs = read_inputs(paths)
    assert_exact(read_output(out), inputs, champion)
    assert_folder_exact(out, "forest", inputs, forest)
    (entry,) = result.manifest["challengers"]
    assert entry["status"] == "ok" and entry["rows"]["out"] == inputs.num_rows
    attempts = {s["attempt"] for s in result.manifest["shards"]}
    for where in (str(out), folder(out, "forest")):  # the standing attempts' parts, and nothing else
        names = part_names(where)
        assert len(names) == len(result.parts) and all(any(a in n for a in attempts) for n in names), names
