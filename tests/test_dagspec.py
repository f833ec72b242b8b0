"""The ``dag:`` section's declaration (batchscore.orchestration.dagspec), checked without Airflow."""

from __future__ import annotations

import re
import subprocess
import sys
from decimal import Decimal
from typing import Any

import pytest

from batchscore.orchestration.dagspec import DAG_FIELDS, DagConfigError, parse_job
from batchscore.orchestration.quantity import docker_cpus, docker_memory, quantity_value
from batchscore.reference import dag_keys
from helpers import REPO

LOCAL = {"schedule": "@daily", "start_date": "2024-01-01", "runner": "local"}
JOB = {"input": "in/dt={{ ds }}/", "output": "out/dt={{ ds }}/"}

#: Quantities as Kubernetes reads them (k8s.io/apimachinery resource.Quantity).
QUANTITIES = {
    "1G": Decimal(10**9),
    "1Gi": Decimal(2**30),
    "1.5Gi": Decimal(3 * 2**29),
    "512Mi": Decimal(512 * 2**20),
    "500m": Decimal("0.5"),
    "2": Decimal(2),
    "0.25": Decimal("0.25"),
    ".5": Decimal("0.5"),
    "5.": Decimal(5),
    "+3k": Decimal(3000),
    "100n": Decimal("1E-7"),
    "1e3": Decimal(1000),
    "12E-1": Decimal("1.2"),
    "2Ei": Decimal(2**61),
}
NOT_QUANTITIES = ["1GB", "1gi", "1K", "1ki", "1.5.0", "", "Gi", "1 Gi", "1e1.5", "one", "-1", "0x10"]


@pytest.mark.parametrize("text", sorted(QUANTITIES))
def test_quantities_follow_kubernetes(text: str) -> None:
    assert quantity_value(text) == QUANTITIES[text]
    from kubernetes.utils import parse_quantity  # the provider's own parser (the airflow extra)

    assert parse_quantity(text) == QUANTITIES[text]


@pytest.mark.parametrize("text", NOT_QUANTITIES)
def test_what_kubernetes_would_refuse_fails_parsing_with_the_file_and_key(text: str) -> None:
    dag = {**LOCAL, "resources": {"limits": {"memory": text}}}
    with pytest.raises(
        DagConfigError,
        match=re.escape(
            f"job.yaml: dag.resources.limits.memory must be a Kubernetes quantity such as 500m, 2, 4G or 1.5Gi, got {text!r}"
        ),
    ):
        parse_job("job.yaml", {**JOB, "dag": dag})


def test_docker_gets_the_same_amounts() -> None:
    assert [docker_memory(q) for q in ("3Gi", "1.5Gi", "512Mi", "1G", "100M", "1Ki", "1")] == [
        "3g",
        "1536m",
        "512m",
        "1000000000b",
        "100000000b",
        "1k",
        "1b",
    ]
    assert (docker_cpus("1500m"), docker_cpus("2"), docker_cpus("0.5")) == (1.5, 2.0, 0.5)
    job = parse_job("job.yaml", {**JOB, "dag": {**LOCAL, "resources": {"requests": {"cpu": 2, "memory": "1.5Gi"}}}})
    assert job.dag.resources.requests == {"cpu": "2", "memory": "1.5Gi"}  # as written: the pod spec takes them so


@pytest.mark.parametrize(
    ("dag", "message"),
    [
        ({"shards": 0}, "dag.shards must be an integer from 1 to 10000, got 0"),
        ({"shards": 2, "rows_per_shard": 10}, "give dag.shards or dag.rows_per_shard, not both"),
        ({"start_date": None}, "dag.start_date is required"),
        ({"start_date": "June"}, "dag.start_date must be a date like 2024-06-01, got 'June'"),
        ({"timezone": "Mars/Olympus"}, "dag.timezone 'Mars/Olympus' is not a known time zone"),
        ({"runner": "ssh"}, "dag.runner must be one of kubernetes, docker, local, spark, got 'ssh'"),
        ({"retry_delay": -1}, "dag.retry_delay must be a number of seconds from 0 to 86400, got -1"),
        ({"catchup": "no"}, "dag.catchup must be true or false, got 'no'"),
        ({"sensor": {"mode": "wait"}}, "dag.sensor.mode must be one of poke, reschedule, got 'wait'"),
        ({"secrets": [{"secret": "s3", "key": "id"}]}, "give both 'key' and 'env', or neither"),
        ({"secrets": [{"name": "s3"}]}, "dag.secrets.0.name is not a known setting"),
        ({"env": {"API_TOKEN": "x"}}, "dag.env API_TOKEN look like credentials; use dag.secrets instead"),
        ({"shard": 3}, "unknown dag key(s) shard; known: schedule, assets, assets_match, start_date"),
    ],
)
def test_bad_dag_keys_are_named_with_their_file(dag: dict[str, Any], message: str) -> None:
    with pytest.raises(DagConfigError, match=f"^job.yaml: .*{re.escape(message)}"):
        parse_job("job.yaml", {**JOB, "dag": {**LOCAL, **dag}})


SPARK = {**LOCAL, "runner": "spark"}


@pytest.mark.parametrize(
    ("dag", "message"),
    [
        ({"spark_conn_id": " "}, "dag.spark_conn_id must name an Airflow connection"),
        ({"spark_executor_cores": 0}, "dag.spark_executor_cores must be an integer from 1 to 512"),
        ({"spark_num_executors": 0}, "dag.spark_num_executors must be an integer from 1 to 10000"),
        (
            {"spark_executor_memory": "4 GB"},
            "dag.spark_executor_memory must be a size as Spark writes it, like 512m or 4g, got '4 GB'",
        ),
        ({"spark_driver_memory": "1.5g"}, "dag.spark_driver_memory must be a size as Spark writes it"),
        (
            {"spark_conf": {"spark.executorEnv.AWS_SECRET_ACCESS_KEY": "x"}},
            "dag.spark_conf spark.executorEnv.AWS_SECRET_ACCESS_KEY look like credentials",
        ),
        ({"spark_conf": {"spark.app.name": "{{ ds }}"}}, "dag.spark_conf: '{{ ds }}' is a template"),
        ({"spark_python": ["python3"]}, "dag.spark_python must be text, got ['python3']"),
    ],
)
def test_bad_spark_settings_are_named_with_their_file(dag: dict[str, Any], message: str) -> None:
    with pytest.raises(DagConfigError, match=f"^job.yaml: .*{re.escape(message)}"):
        parse_job("job.yaml", {**JOB, "dag": {**SPARK, **dag}})


def test_spark_settings_are_read_as_declared() -> None:
    """The spark runner needs no image; sizes and properties are kept as Spark writes them."""
    dag = {
        **SPARK,
        "spark_conf": {"spark.executor.instances": 4, "spark.dynamicAllocation.enabled": False},
        "spark_executor_memory": "4g",
        "spark_driver_memory": "1024M",
        "spark_executor_cores": 2,
        "spark_python": "/opt/venv/bin/python",
    }
    spec = parse_job("job.yaml", {**JOB, "dag": dag}).dag
    assert (spec.runner, spec.image, spec.spark_conn_id) == ("spark", None, "spark_default")
    assert spec.spark_conf == {"spark.executor.instances": "4", "spark.dynamicAllocation.enabled": "false"}
    assert (spec.spark_executor_memory, spec.spark_driver_memory, spec.spark_executor_cores) == ("4g", "1024M", 2)
    assert parse_job("job.yaml", {**JOB, "dag": {**SPARK, "spark_conf": {"spark.speculation": "false"}}})


def test_job_keys_in_a_dag_file_are_checked_as_the_cli_checks_them() -> None:
    for job, message in [
        ({"batch_size": 0}, "batch_size must be an integer from 1 to 16777216, got 0"),
        ({"model_sha256": "abc"}, "setting 'model_sha256' must be a sha256 digest"),
        ({"scaler_sha256": "e" * 64}, "'scaler_sha256' pins a scaler but no scaler is given"),
        ({"outptu": "x"}, "unknown key(s) outptu"),
    ]:
        with pytest.raises(DagConfigError, match=f"^job.yaml: .*{re.escape(message)}"):
            parse_job("job.yaml", {**JOB, **job, "dag": LOCAL})


def test_values_are_read_as_declared(monkeypatch: pytest.MonkeyPatch) -> None:
    dag = {
        **LOCAL,
        "runner": "kubernetes",
        "image": "img:1",
        "timezone": "Europe/Amsterdam",
        "tags": ["a", 2],
        "env": {"DEBUG": True, "N": 3},
        "secrets": ["whole", {"secret": "s3", "key": "id", "env": "AWS_ACCESS_KEY_ID"}],
        "local_command": "python -X dev -m batchscore",
        "retry_exponential_backoff": True,
        "sensor": True,
        "max_retry_delay": None,
    }
    job = parse_job("configs/daily.yaml", {**JOB, "keep": ["id"], "dag": dag})
    spec = job.dag
    assert (job.name, job.dag_id) == ("daily", "batchscore_daily")
    assert spec.start_date.isoformat() == "2024-01-01T00:00:00+01:00"
    assert spec.tags == ("a", "2") and spec.env == {"DEBUG": "true", "N": "3"}
    assert [(s.secret, s.key, s.env) for s in spec.secrets] == [
        ("whole", None, None),
        ("s3", "id", "AWS_ACCESS_KEY_ID"),
    ]
    assert spec.local_command == ("python", "-X", "dev", "-m", "batchscore")
    assert spec.retry_exponential_backoff == 2.0 and spec.max_retry_delay is None and spec.retries == 2
    assert spec.sensor is not None and job.sensor_paths == ("in/dt={{ ds }}/",)
    assert job.common_args == (
        "--input",
        "in/dt={{ ds }}/",
        "--output",
        "out/dt={{ ds }}/",
        "--keep",
        "id",
        "--overwrite",
        "--job-name",
        "daily",
    )
    monkeypatch.setenv("BATCHSCORE_RUNNER", "local")  # parse-time override: no image needed any more
    assert parse_job("job.yaml", {**JOB, "dag": {k: v for k, v in dag.items() if k != "image"}}).dag.runner == "local"


def test_docs_dag_table_is_the_declaration() -> None:
    """Every ``dag:`` key and the keys of its sections, as DagSpec declares them (``make docs`` writes it)."""
    text = (REPO / "docs" / "airflow.md").read_text()
    section = text[text.index("## The `dag:` section") :]
    expected = dag_keys()
    assert expected in section, "run `make docs`\n" + expected
    for key in DAG_FIELDS:
        assert f"\n| `{key}` |" in expected, key
    for nested in ("`dag.sensor`", "`dag.drift`", "`dag.resources`", "`dag.secrets[]`", "| `poke_interval` |"):
        assert nested in expected, nested


def test_the_declaration_imports_without_airflow_or_the_data_stack() -> None:
    probe = (
        "import sys, batchscore.orchestration.dagspec; print(sorted(m for m in ('airflow', 'pandas', 'pyarrow', 'sklearn', "
        "'joblib', 'kubernetes', 'jinja2') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
