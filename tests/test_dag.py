"""The Airflow side: DAG parsing, the pods it would start, and whole runs through ``dag.test()``.

Runs use the ``local`` runner (each shard a ``batchscore run`` subprocess of the worker), so
the task graph, templating, mapping, retries and the commit are Airflow's and batchscore's own;
only the container is left out.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from airflow_fixtures import DAGS_FOLDER
from batchscore.errors import PERMANENT_EXIT_CODES
from batchscore.io.layout import STATE_ROOT, plan_path
from batchscore.sample import FEATURES
from helpers import binary_model, read_inputs, read_manifest, write_inputs
from helpers import read_output as read_parts

if str(DAGS_FOLDER) not in sys.path:  # the factory module lives beside the DAG file
    sys.path.append(str(DAGS_FOLDER))

DAY = "2024-06-01"
LOGICAL_DATE = datetime(2024, 6, 1, tzinfo=timezone.utc)


def load_dags(configs_dir: Path | None = None) -> dict[str, Any]:
    """Parse dags/ the way the DAG processor does and fail on any import error."""
    from airflow.models import DagBag

    if configs_dir is not None:
        assert os.environ.get("BATCHSCORE_CONFIGS_DIR") == str(configs_dir)
    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}
    return bag.dags


@pytest.fixture
def configs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "configs"
    folder.mkdir()
    monkeypatch.setenv("BATCHSCORE_CONFIGS_DIR", str(folder))
    monkeypatch.delenv("BATCHSCORE_RUNNER", raising=False)
    return folder


def write_job(folder: Path, name: str, job: dict[str, Any], dag: dict[str, Any]) -> Path:
    import yaml

    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**job, "dag": dag}, sort_keys=False))
    return path


def single_process_run(inputs: str, output: str, model: str, scaler: str, *extra: str) -> None:
    """The reference: one ``batchscore run`` over the whole input, no plan, no shards."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "batchscore",
            "run",
            "--input",
            inputs,
            "--output",
            output,
            "--model",
            model,
            "--scaler",
            scaler,
            "--model-version",
            "test-1",
            "--features",
            ",".join(FEATURES),
            "--overwrite",
            *extra,
        ],
        check=True,
    )


def assert_same_scores(committed, reference, total_rows: int) -> None:
    """Same rows in the same order with the same values; only the scoring timestamp may differ."""
    ids = committed.column("customer_id").to_pylist()
    assert len(ids) == total_rows and len(set(ids)) == total_rows, "duplicate or missing rows"
    assert committed.drop_columns(["predicted_at"]).equals(reference.drop_columns(["predicted_at"]))


def score_tis(dag_run) -> list[Any]:
    return sorted((ti for ti in dag_run.get_task_instances() if ti.task_id == "score"), key=lambda t: t.map_index)


def shard_tries(dag_run) -> dict[int, tuple[Any, int]]:
    """Each shard's final state and how many tries it took."""
    return {ti.map_index: (ti.state, ti.try_number) for ti in score_tis(dag_run)}


@pytest.fixture(scope="module")
def local_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three multi-row-group files for one date, a fitted model, and the single-process reference."""
    root = tmp_path_factory.mktemp("local_data")
    rows = read_inputs(write_inputs(root / "events" / f"dt={DAY}", files=3, rows=1_200, row_group_size=300)).num_rows
    paths = binary_model(root / "model")
    model, scaler = str(paths["model"]), str(paths["scaler"])
    reference = root / "reference"
    single_process_run(str(root / "events" / f"dt={DAY}"), str(reference), model, scaler)
    return {"root": root, "rows": rows, "model": model, "scaler": scaler, "reference": read_parts(str(reference))}


def local_job(data: dict[str, Any], output_root: Path) -> dict[str, Any]:
    return {
        "input": str(data["root"] / "events" / "dt={{ ds }}") + "/",
        "output": str(output_root / "dt={{ ds }}") + "/",
        "model": data["model"],
        "scaler": data["scaler"],
        "model_version": "test-1",
        "features": list(FEATURES),
    }


LOCAL_DAG = {
    "schedule": "@daily",
    "start_date": "2024-01-01",
    "runner": "local",
    "shards": 3,
    "retries": 2,
    "retry_delay": 1,
    "retry_exponential_backoff": False,
}


# --------------------------------------------------------------------------- parsing


def test_repository_configs_make_the_expected_graph(airflow_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/daily_churn.yaml becomes sensor -> plan -> mapped pods -> commit -> Asset."""
    monkeypatch.delenv("BATCHSCORE_CONFIGS_DIR", raising=False)
    monkeypatch.delenv("BATCHSCORE_RUNNER", raising=False)
    dags = load_dags()
    dag = dags["batchscore_daily_churn"]
    assert set(dag.task_dict) == {"wait_for_input", "plan", "score", "commit"}
    assert dag.get_task("plan").upstream_task_ids == {"wait_for_input"}
    assert dag.get_task("score").upstream_task_ids == {"plan"}
    assert dag.get_task("commit").upstream_task_ids == {"score"}
    score = dag.get_task("score")
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    assert issubclass(score.operator_class, KubernetesPodOperator)
    assert score.partial_kwargs["max_active_tis_per_dagrun"] == 8
    assert score.partial_kwargs["retries"] == 3
    assert score.partial_kwargs["execution_timeout"].total_seconds() == 7200
    [outlet] = dag.get_task("commit").outlets
    assert outlet.uri == "s3://acme-scores/churn"
    assert dag.catchup is False and dag.max_active_runs == 1
    # Runs cover data intervals: the run that starts on June 2nd at 03:00 scores dt=2024-06-01.
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert dag.params["image"] == "ghcr.io/acme/batchscore:0.1.0"
    assert dag.params["shards"] is None
    # A job file without a dag: section (the sample) is no DAG.
    assert all(d.startswith("batchscore_") for d in dags) and "batchscore_sample" not in dags


def test_pod_for_a_mapped_shard(airflow_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Render shard 2's pod with the provider's own builder, no cluster needed."""
    monkeypatch.delenv("BATCHSCORE_CONFIGS_DIR", raising=False)
    monkeypatch.delenv("BATCHSCORE_RUNNER", raising=False)
    dag = load_dags()["batchscore_daily_churn"]
    context = {"ds": DAY, "params": {"image": dag.params["image"]}}
    from airflow_fixtures import REPO
    from batchscore_dagfactory import load_jobs, plan_uri, shard_arguments

    [job] = [j for j in load_jobs(REPO / "configs") if j.dag_id == dag.dag_id]
    common = dag.get_task("plan").render_template(list(job.common_args), context)  # what the plan task runs

    shard_args = shard_arguments(common, plan_uri(f"s3://acme-scores/churn/dt={DAY}/"), 4)

    pod_op = dag.get_task("score").unmap({"arguments": shard_args[2]})
    pod_op.render_template_fields(context)
    pod = pod_op.build_pod_request_obj(dry_run=True)

    [container] = pod.spec.containers
    assert container.image == "ghcr.io/acme/batchscore:0.1.0"
    assert not container.command  # empty: the image's ENTRYPOINT (batchscore) runs the args
    args = container.args
    assert args[0] == "run" and args[-4:] == ["--plan", plan_path(f"s3://acme-scores/churn/dt={DAY}"), "--shard", "2"]
    assert args[args.index("--input") + 1] == f"s3://acme-events/churn/dt={DAY}/"
    assert args[args.index("--output") + 1] == f"s3://acme-scores/churn/dt={DAY}/"
    assert "--overwrite" in args and "region_name=eu-west-1" in args and "{{" not in " ".join(args)
    assert container.resources.requests == {"cpu": "2", "memory": "4Gi"}
    assert container.resources.limits == {"cpu": "2", "memory": "6Gi"}
    env = {e.name: e for e in container.env}
    assert env["AWS_DEFAULT_REGION"].value == "eu-west-1"
    key_ref = env["AWS_SECRET_ACCESS_KEY"].value_from.secret_key_ref
    assert (key_ref.name, key_ref.key) == ("churn-s3-credentials", "secret_access_key")
    assert env["AWS_SECRET_ACCESS_KEY"].value is None
    assert pod.metadata.namespace == "batchscore" and pod.spec.service_account_name == "batchscore"
    assert env["OPENLINEAGE_PARENT_ID"].value == ""  # no OpenLineage provider here: no parent run to hand over
    assert args[args.index("--job-name") + 1] == "daily_churn"  # the job file's stem names metrics and lineage

    # Where the OpenLineage provider is installed, its macros hand the task's run to the pod (a
    # provider without the root macro hands the parent only).
    from types import SimpleNamespace

    parent = f"default/{dag.dag_id}.score/0193a5c4-5d2e-7f00-8000-000000000002"
    plugin = SimpleNamespace(lineage_parent_id=lambda ti: parent)
    lineage_op = dag.get_task("score").unmap({"arguments": shard_args[1]})
    lineage_op.render_template_fields(
        {**context, "macros": SimpleNamespace(OpenLineageProviderPlugin=plugin), "task_instance": SimpleNamespace()}
    )
    lineage_env = {e.name: e.value for e in lineage_op.build_pod_request_obj(dry_run=True).spec.containers[0].env}
    assert (lineage_env["OPENLINEAGE_PARENT_ID"], lineage_env["OPENLINEAGE_ROOT_PARENT_ID"]) == (parent, "")
    assert pod.spec.restart_policy == "Never"

    # A run's params pick another image without touching the job file.
    override = dag.get_task("score").unmap({"arguments": shard_args[0]})
    override.render_template_fields({**context, "params": {"image": "ghcr.io/acme/batchscore:0.2.0"}})
    assert override.build_pod_request_obj(dry_run=True).spec.containers[0].image.endswith(":0.2.0")


def test_docker_runner(airflow_env: Path, configs_dir: Path) -> None:
    """The Docker alternative: same arguments as the command, limits translated, secrets by name only."""
    write_job(
        configs_dir,
        "docker_job",
        {"input": "s3://b/in/dt={{ ds }}/", "output": "s3://b/out/dt={{ ds }}/", "model": "s3://b/m.joblib"},
        {
            "schedule": "@daily",
            "start_date": "2024-01-01",
            "runner": "docker",
            "image": "batchscore:dev",
            "resources": {"limits": {"cpu": "1500m", "memory": "3Gi"}},
            "env": {"LOG": "1"},
            "secrets": [{"secret": "s3", "key": "id", "env": "AWS_ACCESS_KEY_ID"}],
        },
    )
    dag = load_dags(configs_dir)["batchscore_docker_job"]
    op = dag.get_task("score").unmap({"command": ["run", "--shard", "0"]})
    op.render_template_fields({"params": {"image": "batchscore:dev"}})
    assert "DockerOperator" in [cls.__name__ for cls in type(op).__mro__]
    no_lineage = {"OPENLINEAGE_PARENT_ID": "", "OPENLINEAGE_ROOT_PARENT_ID": ""}  # no OpenLineage provider here
    assert (op.image, op.command, op.environment) == (
        "batchscore:dev",
        ["run", "--shard", "0"],
        {"LOG": "1", **no_lineage},
    )
    assert (op.mem_limit, op.cpus) == ("3g", 1.5)
    assert op.secret_env == ("AWS_ACCESS_KEY_ID",)


def test_spark_runner(airflow_env: Path, configs_dir: Path) -> None:
    """The spark alternative: one SparkSubmitOperator task between plan and commit, on the connection
    named, with batchscore's submit script, the sizes as spark-submit's flags, dag.env on the executors
    too, speculation as the job file says, and no image."""
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    import batchscore.spark.submit as submit
    from batchscore.orchestration.dagrun import spark_arguments

    write_job(
        configs_dir,
        "spark_job",
        {"input": "s3://b/in/dt={{ ds }}/", "output": "s3://b/out/dt={{ ds }}/", "model": "s3://b/m.joblib"},
        {
            "schedule": "@daily",
            "start_date": "2024-01-01",
            "runner": "spark",
            "spark_conn_id": "emr",
            "spark_python": "/opt/venv/bin/python",
            "spark_executor_memory": "4g",
            "spark_num_executors": 8,
            "spark_conf": {"spark.cores.max": 16, "spark.speculation": True},
            "env": {"LOG": "1"},
        },
    )
    dag = load_dags(configs_dir)["batchscore_spark_job"]
    op = dag.get_task("score")
    assert isinstance(op, SparkSubmitOperator) and "image" not in dag.params
    assert sorted(op.upstream_task_ids) == ["plan"] and sorted(op.downstream_task_ids) == ["commit"]
    assert (op._conn_id, op.application) == ("emr", submit.__file__)
    assert (op._executor_memory, op._num_executors, op._executor_cores) == ("4g", 8, None)
    assert {k: v for k, v in op.conf.items() if "OPENLINEAGE" not in k} == {
        "spark.executorEnv.LOG": "1",
        "spark.cores.max": "16",
        "spark.pyspark.python": "/opt/venv/bin/python",
        "spark.speculation": "true",
    }
    assert op.env_vars["LOG"] == "1"
    argv = spark_arguments(["--input", "in/"], "s3://b/_batchscore/out/plan.json", ["--plan-sha256", "ab" * 32])
    assert argv == [
        "--input",
        "in/",
        "--plan-sha256",
        "ab" * 32,
        "--plan",
        "s3://b/_batchscore/out/plan.json",
        "--no-commit",
    ]


def test_bad_job_files_fail_parsing_with_the_file_name(airflow_env: Path, configs_dir: Path) -> None:
    from batchscore_dagfactory import DagConfigError, load_jobs

    base = {"input": "in/", "output": "out/"}
    write_job(configs_dir, "typo", base, {"schedule": "@daily", "start_date": "2024-01-01", "shard": 3})
    with pytest.raises(DagConfigError, match=r"typo\.yaml: unknown dag key\(s\) shard"):
        load_jobs(configs_dir)
    (configs_dir / "typo.yaml").unlink()
    write_job(configs_dir, "noimage", base, {"schedule": "@daily", "start_date": "2024-01-01"})
    with pytest.raises(DagConfigError, match="dag.image is required for the kubernetes runner"):
        load_jobs(configs_dir)
    (configs_dir / "noimage.yaml").unlink()
    leaky = {**base, "storage_options": {"endpoint_url": "http://s3", "secret": "x"}}
    write_job(configs_dir, "leaky", leaky, {"schedule": "@daily", "start_date": "2024-01-01", "runner": "local"})
    with pytest.raises(DagConfigError, match="storage_options secret look like credentials"):
        load_jobs(configs_dir)
    (configs_dir / "leaky.yaml").unlink()
    write_job(
        configs_dir,
        "leaky_env",
        base,
        {"schedule": "@daily", "start_date": "2024-01-01", "runner": "local", "env": {"AWS_SECRET_ACCESS_KEY": "x"}},
    )
    with pytest.raises(DagConfigError, match="dag.env AWS_SECRET_ACCESS_KEY look like credentials"):
        load_jobs(configs_dir)
    (configs_dir / "leaky_env.yaml").unlink()
    local = {"schedule": "@daily", "start_date": "2024-01-01", "runner": "local"}
    write_job(configs_dir, "version", {**base, "model_version": 1.10}, local)
    with pytest.raises(DagConfigError, match=r"version\.yaml: setting 'model_version' must be text.*quote it"):
        load_jobs(configs_dir)
    (configs_dir / "version.yaml").unlink()
    write_job(configs_dir, "bucket_root", {**base, "output": "s3://scores/"}, local)
    with pytest.raises(DagConfigError, match=r"bucket_root\.yaml: output s3://scores/ is a bucket or filesystem root"):
        load_jobs(configs_dir)
    (configs_dir / "bucket_root.yaml").unlink()
    nulls = {**base, "storage_options": None, "keep": None}
    write_job(configs_dir, "nulls", nulls, {**local, "env": None, "tags": None})
    [parsed] = load_jobs(configs_dir)
    assert "--storage-option" not in parsed.common_args and "--keep" not in parsed.common_args
    (configs_dir / "nulls.yaml").unlink()
    write_job(configs_dir, "drift", base, {**local, "drift": {"fail": "high"}})
    with pytest.raises(DagConfigError, match=r"drift\.yaml: dag.drift.fail must be a number from 0 to 20, got 'high'"):
        load_jobs(configs_dir)
    write_job(configs_dir, "drift", base, {**local, "drift": {"threshold": 0.2}})
    with pytest.raises(DagConfigError, match=r"drift\.yaml: dag.drift.threshold is not a known setting"):
        load_jobs(configs_dir)
    (configs_dir / "drift.yaml").unlink()
    write_job(configs_dir, "unscheduled", base, {"runner": "local"})  # no schedule: not a DAG
    assert load_jobs(configs_dir) == []


def test_model_pins_and_trust_reach_the_container(airflow_env: Path, tmp_path: Path) -> None:
    """Each artifact key becomes its flag, and the CLI given those flags enforces it."""
    import hashlib
    import warnings

    import joblib
    import skops.io

    from batchscore_dagfactory import DagConfigError, common_args
    from helpers import cli, pipeline_model

    model = tmp_path / "model.skops"
    with warnings.catch_warnings():  # skops looks for numpy ufuncs in every module, Airflow's deprecated ones too
        warnings.simplefilter("ignore")
        skops.io.dump(joblib.load(pipeline_model(tmp_path)["model"]), model)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    inputs = write_inputs(tmp_path / "in", files=1, rows=496)
    job = {
        "input": str(inputs[0]),
        "output": str(tmp_path / "out"),
        "model": str(model),
        "model_sha256": "0" * 64,
        "trusted_types": ["sklearn.tree._tree.Tree", "numpy.float64"],
        "allow_pickle": False,
    }
    args = common_args(job, "job.yaml")
    assert args[args.index("--model-sha256") + 1] == "0" * 64 and "--no-pickle" in args
    assert [args[i + 1] for i, a in enumerate(args) if a == "--trust"] == job["trusted_types"]
    result = cli("validate", *args)
    assert result.exit_code == 4 and "does not match its pinned digest" in result.stderr
    assert cli("validate", *common_args({**job, "model_sha256": digest}, "job.yaml")).exit_code == 0
    assert "--no-pickle" not in common_args({**job, "allow_pickle": True}, "job.yaml")
    with pytest.raises(DagConfigError, match="job.yaml: allow_pickle must be true or false, got 'no'"):
        common_args({**job, "allow_pickle": "no"}, "job.yaml")


def test_permanent_cli_errors_are_not_retried(airflow_env: Path) -> None:
    """Exit 2/3/4 (config, data, model) fail for good; exit 1 is left to the retries."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from batchscore_dagfactory import run_cli

    with pytest.raises(AirflowFailException, match="code 3 .input data invalid"):
        run_cli([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(AirflowException, match="code 1") as info:
        run_cli([sys.executable, "-c", "raise SystemExit(1)"])
    assert not isinstance(info.value, AirflowFailException)
    assert run_cli([sys.executable, "-c", "print('{}')"], capture_stdout=True).strip() == "{}"


def test_exit_codes_no_retry_can_fix_fail_the_pod_at_once(airflow_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod whose scorer exited 2/3/4/5 fails for good; exit 1 or an OOM kill stay retryable (no cluster)."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
    from kubernetes.client import models as k8s

    monkeypatch.delenv("BATCHSCORE_CONFIGS_DIR", raising=False)
    monkeypatch.delenv("BATCHSCORE_RUNNER", raising=False)
    dag = load_dags()["batchscore_daily_churn"]
    op = dag.get_task("score").unmap({"arguments": ["run", "--shard", "0"]})
    op.render_template_fields({"params": {"image": dag.params["image"]}})

    def finished_pod(exit_code: int, reason: str = "Error") -> k8s.V1Pod:
        terminated = k8s.V1ContainerStateTerminated(exit_code=exit_code, reason=reason)
        status = k8s.V1ContainerStatus(
            name=op.base_container_name,
            image=op.image,
            image_id="",
            ready=False,
            restart_count=0,
            state=k8s.V1ContainerState(terminated=terminated),
        )
        return k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(name="batchscore-daily-churn-x", namespace="batchscore"),
            spec=k8s.V1PodSpec(containers=[k8s.V1Container(name=op.base_container_name)]),
            status=k8s.V1PodStatus(phase="Failed", container_statuses=[status]),
        )

    class FakeCoreV1:
        """The two Kubernetes API calls cleanup makes for a failed pod: read it, label it as checked."""

        def __init__(self) -> None:
            self.pod: k8s.V1Pod | None = None
            self.labelled: list[str] = []

        def read_namespaced_pod(self, name: str, namespace: str, **kwargs: Any) -> k8s.V1Pod:
            return self.pod

        def patch_namespaced_pod(self, name: str, namespace: str, body: dict[str, Any], **kwargs: Any) -> None:
            self.labelled.append(name)

    api = FakeCoreV1()
    op.__dict__["client"] = api
    for code, meaning in PERMANENT_EXIT_CODES.items():
        pod = api.pod = finished_pod(code)
        with pytest.raises(AirflowFailException, match=f"exited with code {code} .{re.escape(meaning)}.; not retrying"):
            op.cleanup(pod, pod)
    for pod in (finished_pod(1), finished_pod(137, "OOMKilled")):
        api.pod = pod
        with pytest.raises(AirflowException, match="returned a failure") as info:
            op.cleanup(pod, pod)
        assert not isinstance(info.value, AirflowFailException)
    assert len(api.labelled) == len(PERMANENT_EXIT_CODES) + 2  # each failed pod was handled as the provider handles it


class FakeDockerEngine:
    """The few Docker Engine API calls DockerOperator makes, answering with a given exit code."""

    def __init__(self, exit_code: int) -> None:
        self.exit_code = exit_code
        self.calls: list[str] = []

    def images(self, name: str) -> list[dict[str, str]]:
        return [{"Id": name}]

    def create_host_config(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs

    def create_container(self, **kwargs: Any) -> dict[str, str]:
        self.calls.append("create " + " ".join(kwargs["command"]))
        return {"Id": "c0"}

    def attach(self, **kwargs: Any) -> list[bytes]:
        return [b"batchscore: input data invalid\n"]

    def start(self, container: str) -> None:
        self.calls.append("start")

    def wait(self, container: str) -> dict[str, Any]:
        return {"StatusCode": self.exit_code, "Error": None}

    def remove_container(self, container: str, **kwargs: Any) -> None:
        self.calls.append("remove")


def test_exit_codes_no_retry_can_fix_fail_the_container_at_once(airflow_env: Path, configs_dir: Path) -> None:
    """The Docker runner: exit 2/3/4/5 fail for good, exit 1 stays retryable, 0 succeeds (no Docker engine)."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    docker = {"schedule": "@daily", "start_date": "2024-01-01", "runner": "docker", "image": "batchscore:dev"}
    write_job(configs_dir, "docker_codes", {"input": "s3://b/in/", "output": "s3://b/out/"}, docker)
    dag = load_dags(configs_dir)["batchscore_docker_codes"]

    def run_container(exit_code: int) -> FakeDockerEngine:
        op = dag.get_task("score").unmap({"command": ["run", "--shard", "0"]})
        op.render_template_fields({"params": {"image": "batchscore:dev"}})
        engine = FakeDockerEngine(exit_code)
        op.__dict__["hook"] = type("Hook", (), {"api_client": engine})()
        op.execute({})
        return engine

    for code in PERMANENT_EXIT_CODES:
        with pytest.raises(AirflowFailException, match="not retrying"):
            run_container(code)
    with pytest.raises(AirflowException, match="Docker container failed") as info:
        run_container(1)
    assert not isinstance(info.value, AirflowFailException)
    assert run_container(0).calls == ["create run --shard 0", "start", "remove"]


def test_docker_secrets_are_read_from_the_worker_when_the_task_runs(
    airflow_env: Path, configs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The container gets each secret variable the worker has; none is in the DAG or its rendered fields."""
    secrets = [
        {"secret": "s3", "key": "id", "env": "AWS_ACCESS_KEY_ID"},
        {"secret": "s3", "key": "k", "env": "UNSET_KEY"},
    ]
    docker = {
        "schedule": "@daily",
        "start_date": "2024-01-01",
        "runner": "docker",
        "image": "batchscore:dev",
        "env": {"LOG": "1"},
        "secrets": secrets,
    }
    write_job(configs_dir, "docker_secrets", {"input": "s3://b/in/", "output": "s3://b/out/"}, docker)
    monkeypatch.delenv("UNSET_KEY", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-not-in-the-dag")
    dag = load_dags(configs_dir)["batchscore_docker_secrets"]
    op = dag.get_task("score").unmap({"command": ["run", "--shard", "0"]})
    op.render_template_fields({"params": {"image": "batchscore:dev"}})
    seen: dict[str, Any] = {}

    class Engine(FakeDockerEngine):
        def create_container(self, **kwargs: Any) -> dict[str, str]:
            seen.update(kwargs)
            return super().create_container(**kwargs)

    op.__dict__["hook"] = type("Hook", (), {"api_client": Engine(0)})()
    op.execute({})
    no_lineage = {"OPENLINEAGE_PARENT_ID": "", "OPENLINEAGE_ROOT_PARENT_ID": ""}  # no OpenLineage provider here
    assert seen["environment"] == {"LOG": "1", "AWS_ACCESS_KEY_ID": "AKIA-not-in-the-dag", **no_lineage}
    assert "AKIA" not in repr({name: getattr(op, name) for name in op.template_fields})
    assert "AKIA" not in repr(dag.get_task("score").partial_kwargs)


def test_runs_without_a_logical_date_score_the_last_complete_interval(airflow_env: Path) -> None:
    """Manual and API runs on Airflow 3 have no logical date: ``{{ ds }}`` is the date the scheduler last scored."""
    from batchscore_dagfactory import parse_job, run_dates

    def ds(schedule: str | None, run_after: datetime, params: dict[str, Any] | None = None, tz: str = "UTC") -> str:
        job = parse_job(
            "job.yaml",
            {
                "input": "in/",
                "output": "out/dt={{ ds }}/",
                "dag": {"schedule": schedule, "start_date": "2024-01-01", "runner": "local", "timezone": tz},
            },
        )
        return run_dates(job, params or {}, None, run_after)["ds"]

    utc = timezone.utc
    assert ds("@daily", datetime(2024, 6, 2, 10, 0, tzinfo=utc)) == DAY
    assert ds("@daily", datetime(2024, 6, 2, 0, 0, tzinfo=utc)) == DAY  # right on the boundary
    assert ds("0 3 * * *", datetime(2024, 6, 2, 2, 59, tzinfo=utc)) == "2024-05-31"  # 06-01 is not over yet
    assert ds("0 3 * * *", datetime(2024, 6, 2, 3, 0, tzinfo=utc)) == DAY
    assert ds("@weekly", datetime(2024, 6, 5, tzinfo=utc)) == "2024-05-26"
    assert ds(None, datetime(2024, 6, 2, 10, 0, tzinfo=utc)) == "2024-06-02"  # manual-only job: the trigger date
    assert ds("@daily", datetime(2024, 7, 15, tzinfo=utc), {"date": DAY}) == DAY
    # Like Airflow's own ds, the UTC date of the interval's start (Amsterdam's June 1st starts May 31st 22:00 UTC).
    assert ds("@daily", datetime(2024, 6, 2, 10, 0, tzinfo=utc), tz="Europe/Amsterdam") == "2024-05-31"
    # A run with a logical date keeps Airflow's values.
    daily = {"schedule": "@daily", "start_date": "2024-01-01", "runner": "local"}
    job = parse_job("job.yaml", {"input": "in/", "output": "out/", "dag": daily})
    assert run_dates(job, {}, LOGICAL_DATE, datetime(2024, 6, 2, tzinfo=utc)) == {}


def test_container_env_sees_the_date_the_output_does(airflow_env: Path, configs_dir: Path) -> None:
    """``{{ ds }}`` in dag.env renders on runs without a logical date too, as the date the output gets."""
    from types import SimpleNamespace

    job = {"input": "s3://b/in/dt={{ ds }}/", "output": "s3://b/out/dt={{ ds }}/"}
    dag_cfg = {
        "schedule": "@daily",
        "start_date": "2024-01-01",
        "image": "batchscore:dev",
        "env": {"SCORED_DAY": "{{ ds }}"},
    }
    write_job(configs_dir, "env_docker", job, {**dag_cfg, "runner": "docker"})
    write_job(configs_dir, "env_kubernetes", job, {**dag_cfg, "runner": "kubernetes"})
    dags = load_dags(configs_dir)

    def scored_day(runner: str, logical_date: datetime | None, params: dict[str, Any], **context: Any) -> str:
        kwarg = {"docker": "command", "kubernetes": "arguments"}[runner]
        op = dags[f"batchscore_env_{runner}"].get_task("score").unmap({kwarg: ["run", "--shard", "0"]})
        run = SimpleNamespace(logical_date=logical_date, run_after=datetime(2024, 6, 2, 9, 30, tzinfo=timezone.utc))
        op.render_template_fields({"params": {"image": "batchscore:dev", **params}, "dag_run": run, **context})
        if runner == "docker":
            return op.environment["SCORED_DAY"]
        return {e.name: e.value for e in op.env_vars}["SCORED_DAY"]

    for runner in ("docker", "kubernetes"):
        assert scored_day(runner, None, {}) == DAY  # manual run: the last complete day
        assert scored_day(runner, None, {"date": "2024-05-20"}) == "2024-05-20"
        assert scored_day(runner, LOGICAL_DATE, {}, ds="2024-06-03") == "2024-06-03"  # Airflow's own ds stands


def test_template_syntax_errors_fail_parsing(airflow_env: Path, configs_dir: Path) -> None:
    from batchscore_dagfactory import DagConfigError, load_jobs

    write_job(
        configs_dir,
        "broken",
        {"input": "in/", "output": "out/dt={{ ds }/"},
        {"schedule": "@daily", "start_date": "2024-01-01", "runner": "local"},
    )
    with pytest.raises(DagConfigError, match=r"broken\.yaml: output: template 'out/dt=\{\{ ds \}/' is not valid"):
        load_jobs(configs_dir)


@pytest.mark.slow
def test_parsing_imports_nothing_heavy(tmp_path: Path, airflow_env: Path) -> None:
    """A DagBag of a local-runner job loads no data stack, no model code and no Kubernetes client; one
    of a spark-runner job no data stack, no Spark and no batchscore command (the Spark provider's hook
    loads the Kubernetes client where the Kubernetes provider is installed)."""
    data_stack = ["pandas", "pyarrow", "sklearn", "joblib", "batchscore.job.preparation", "batchscore.models.engine"]
    for runner, heavy in (
        ("local", [*data_stack, "kubernetes", "docker", "airflow.providers.cncf.kubernetes.operators.pod"]),
        ("spark", [*data_stack, "docker", "pyspark", "batchscore.spark.driver", "batchscore.cli"]),
    ):
        folder = tmp_path / runner
        folder.mkdir()
        write_job(
            folder,
            "light",
            {"input": "in/", "output": "out/"},
            {"schedule": None, "start_date": "2024-01-01", "runner": runner},
        )
        probe = textwrap.dedent(
            f"""
            import json, sys
            from airflow.models import DagBag
            bag = DagBag(dag_folder={str(DAGS_FOLDER)!r})
            heavy = {heavy!r}
            print(json.dumps({{"errors": list(bag.import_errors), "dags": sorted(bag.dags),
                              "loaded": [m for m in heavy if m in sys.modules]}}))
            """
        )
        env = {**os.environ, "BATCHSCORE_CONFIGS_DIR": str(folder)}
        result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report == {"errors": [], "dags": ["batchscore_light"], "loaded": []}, runner


# --------------------------------------------------------------------------- whole runs


@pytest.mark.slow
def test_local_run_commits_what_a_single_process_scores(
    airflow_home: Path, configs_dir: Path, local_data: dict[str, Any], tmp_path: Path
) -> None:
    """Three shards of a three-file input, committed; then a rerun of the date with another shard count."""
    from airflow.utils.state import DagRunState

    scores = tmp_path / "scores"
    write_job(configs_dir, "local_e2e", local_job(local_data, scores), LOCAL_DAG)
    neighbour = scores / "dt=2024-05-31" / "part-00000-00000.parquet"  # another date's output
    neighbour.parent.mkdir(parents=True)
    neighbour.write_bytes(b"not touched")
    dag = load_dags(configs_dir)["batchscore_local_e2e"]

    run = dag.test(logical_date=LOGICAL_DATE)
    assert run.state == DagRunState.SUCCESS
    assert [ti.map_index for ti in score_tis(run)] == [0, 1, 2]
    output = scores / f"dt={DAY}"
    assert (output / "_SUCCESS").exists() and read_manifest(output)["rows"]["out"] == local_data["rows"]
    assert_same_scores(read_parts(str(output)), local_data["reference"], local_data["rows"])
    first_parts = sorted(p.name for p in output.glob("part-*.parquet"))

    rerun = dag.test(logical_date=LOGICAL_DATE, run_conf={"shards": 2})
    assert rerun.state == DagRunState.SUCCESS and len(score_tis(rerun)) == 2
    assert_same_scores(read_parts(str(output)), local_data["reference"], local_data["rows"])
    # Shard boundaries moved, so parts were named differently: the first run's leftovers are gone.
    assert sorted(p.name for p in output.glob("part-*.parquet")) != first_parts
    assert neighbour.read_bytes() == b"not touched"

    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    with create_session() as session:
        events = session.query(AssetEvent).filter(AssetEvent.source_dag_id == dag.dag_id).all()
        assert [e.extra.get("output") for e in events] == [str(output) + "/"] * 2


@pytest.mark.slow
def test_s3_run_through_moto_commits_what_a_single_process_scores(
    airflow_home: Path, moto_s3: str, configs_dir: Path, tmp_path: Path
) -> None:
    """Input, model and output on S3 (moto over loopback); a run's params raise the shard count."""
    import s3fs
    from airflow.utils.state import DagRunState

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3}, skip_instance_cache=True)
    fs.mkdir("bs-data")
    inputs = write_inputs(tmp_path / "events", files=3, rows=900, row_group_size=200)
    for path in inputs:
        fs.put(str(path), f"bs-data/events/dt={DAY}/{path.name}")
    rows = read_inputs(inputs).num_rows
    paths = binary_model(tmp_path / "model")
    fs.put(str(paths["model"]), "bs-data/models/model.joblib")
    fs.put(str(paths["scaler"]), "bs-data/models/scaler.joblib")
    options = ["--storage-option", f"endpoint_url={moto_s3}"]
    single_process_run(
        f"s3://bs-data/events/dt={DAY}/",
        str(tmp_path / "reference"),
        "s3://bs-data/models/model.joblib",
        "s3://bs-data/models/scaler.joblib",
        *options,
    )

    job = {
        "input": "s3://bs-data/events/dt={{ ds }}/",
        "output": "s3://bs-data/scores/dt={{ ds }}/",
        "model": "s3://bs-data/models/model.joblib",
        "scaler": "s3://bs-data/models/scaler.joblib",
        "model_version": "test-1",
        "features": list(FEATURES),
        "storage_options": {"endpoint_url": moto_s3},
    }
    write_job(configs_dir, "s3_e2e", job, {**LOCAL_DAG, "shards": 1, "sensor": {"poke_interval": 1, "timeout": 30}})
    dag = load_dags(configs_dir)["batchscore_s3_e2e"]

    run = dag.test(logical_date=LOGICAL_DATE, run_conf={"shards": 2})
    assert run.state == DagRunState.SUCCESS
    assert [ti.map_index for ti in score_tis(run)] == [0, 1]
    fs.invalidate_cache()
    assert fs.exists(f"bs-data/scores/dt={DAY}/_SUCCESS")
    committed = read_parts(f"bs-data/scores/dt={DAY}", fs)
    assert_same_scores(committed, read_parts(str(tmp_path / "reference")), rows)


def run_wrapped(configs_dir: Path, data: dict[str, Any], scores: Path, name: str, wrapper: Path) -> Any:
    """One dated run of a two-shard local job whose ``batchscore`` is started through ``wrapper``."""
    dag_cfg = {**LOCAL_DAG, "shards": 2, "local_command": [sys.executable, str(wrapper)]}
    write_job(configs_dir, name, local_job(data, scores), dag_cfg)
    return load_dags(configs_dir)[f"batchscore_{name}"].test(logical_date=LOGICAL_DATE)


FLAKY_WRAPPER = """\
import os, subprocess, sys
args = sys.argv[1:]
with open({log!r}, "a") as fh:
    fh.write(" ".join(args) + "\\n")
code = subprocess.call([sys.executable, "-m", "batchscore", *args])
if code == 0 and args[0] == "run" and args[-2:] == ["--shard", "1"] and not os.path.exists({marker!r}):
    open({marker!r}, "w").close()
    sys.exit(1)  # the shard's output is written, then the worker dies before reporting success
sys.exit(code)
"""


@pytest.mark.slow
def test_a_shard_failing_once_is_retried_without_duplicates(
    airflow_home: Path, configs_dir: Path, local_data: dict[str, Any], tmp_path: Path
) -> None:
    from airflow.utils.state import DagRunState, TaskInstanceState

    log, marker = tmp_path / "calls.log", tmp_path / "failed-once"
    wrapper = tmp_path / "flaky_batchscore.py"
    wrapper.write_text(FLAKY_WRAPPER.format(log=str(log), marker=str(marker)))
    scores = tmp_path / "scores"
    run = run_wrapped(configs_dir, local_data, scores, "retry_e2e", wrapper)
    assert run.state == DagRunState.SUCCESS
    assert shard_tries(run) == {0: (TaskInstanceState.SUCCESS, 1), 1: (TaskInstanceState.SUCCESS, 2)}
    shard_calls = [line for line in log.read_text().splitlines() if line.startswith("run ")]
    assert sum(line.endswith("--shard 1") for line in shard_calls) == 2 and len(shard_calls) == 3
    assert_same_scores(read_parts(str(scores / f"dt={DAY}")), local_data["reference"], local_data["rows"])


ALIAS_WRAPPER = """\
import os, subprocess, sys
args = sys.argv[1:]
if args[0] == "run" and not os.path.exists({marker!r}):  # the first shard starts after the plan pinned v1
    open({marker!r}, "w").close()
    from mlflow import MlflowClient
    MlflowClient(tracking_uri={uri!r}, registry_uri={uri!r}).set_registered_model_alias("churn_dag", "champion", "2")
sys.exit(subprocess.call([sys.executable, "-m", "batchscore", *args]))
"""


@pytest.mark.slow
def test_shards_score_the_registry_version_their_plan_pinned(
    airflow_home: Path,
    configs_dir: Path,
    local_data: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job whose model is `models:/NAME@ALIAS` in a SQLite registry: the plan task resolves the
    alias; the alias then moves to another version before the first shard starts. Every shard
    scores the planned version (the output equals the file model's single-process run) and the
    manifest names it."""
    import joblib
    from airflow.utils.state import DagRunState
    from sklearn.linear_model import LogisticRegression

    from mlflow_fixtures import log_sklearn, tracking

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    first = joblib.load(local_data["model"])
    other = LogisticRegression(C=0.01).fit(local_data["reference"].select(list(FEATURES)).to_pandas(), [0, 1] * 1_800)
    monkeypatch.chdir(tmp_path)  # a SQLite registry keeps its artifacts in ./mlruns
    with tracking(uri) as client:
        assert [log_sklearn(m, "churn_dag")[0] for m in (first, other)] == ["1", "2"]
        client.set_registered_model_alias("churn_dag", "champion", "1")
    marker, wrapper = tmp_path / "moved", tmp_path / "alias_moving_batchscore.py"
    wrapper.write_text(ALIAS_WRAPPER.format(marker=str(marker), uri=uri))
    scores = tmp_path / "scores"
    job = {**local_job(local_data, scores), "model": "models:/churn_dag@champion", "registry_uri": uri}
    write_job(configs_dir, "registry_e2e", job, {**LOCAL_DAG, "local_command": [sys.executable, str(wrapper)]})
    run = load_dags(configs_dir)["batchscore_registry_e2e"].test(logical_date=LOGICAL_DATE)
    assert run.state == DagRunState.SUCCESS and marker.exists() and len(score_tis(run)) == 3
    output = scores / f"dt={DAY}"
    assert_same_scores(read_parts(str(output)), local_data["reference"], local_data["rows"])
    (model,) = [a for a in read_manifest(output)["artifacts"] if a["role"] == "model"]
    assert model["registry"]["version"] == "1" and model["registry"]["reference"] == "models:/churn_dag@champion"
    with tracking(uri) as client:
        assert str(client.get_model_version_by_alias("churn_dag", "champion").version) == "2"


ENV_WRAPPER = """\
import os, subprocess, sys
with open({log!r}, "a") as fh:
    fh.write(os.environ.get("SCORED_DAY", "unset") + " " + " ".join(sys.argv[1:]) + "\\n")
sys.exit(subprocess.call([sys.executable, "-m", "batchscore", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_a_run_without_a_logical_date_scores_the_last_complete_day(
    airflow_home: Path, configs_dir: Path, local_data: dict[str, Any], tmp_path: Path
) -> None:
    """``airflow dags trigger`` on Airflow 3: no logical date, so the run scores the day that last ended.

    Then the ``date`` param picks the date explicitly, whenever the run is triggered.
    """
    from airflow.utils.state import DagRunState

    scores, log = tmp_path / "scores", tmp_path / "calls.log"
    wrapper = tmp_path / "env_logging_batchscore.py"
    wrapper.write_text(ENV_WRAPPER.format(log=str(log)))
    dag_cfg = {
        **LOCAL_DAG,
        "shards": 2,
        "env": {"SCORED_DAY": "{{ ds }}"},
        "local_command": [sys.executable, str(wrapper)],
    }
    write_job(configs_dir, "manual_e2e", local_job(local_data, scores), dag_cfg)
    dag = load_dags(configs_dir)["batchscore_manual_e2e"]
    output = scores / f"dt={DAY}"

    run = dag.test(logical_date=None, run_after=datetime(2024, 6, 2, 9, 30, tzinfo=timezone.utc))
    assert run.logical_date is None and run.state == DagRunState.SUCCESS
    assert [p.name for p in scores.iterdir() if p.name != STATE_ROOT] == [f"dt={DAY}"]
    assert (output / "_SUCCESS").exists()
    assert_same_scores(read_parts(str(output)), local_data["reference"], local_data["rows"])
    # dag.env sees the same date as the output: in plan, in every shard, in commit and in the report
    # read for the Asset event.
    calls = [line.split(" ", 1) for line in log.read_text().splitlines()]
    assert [command.split()[0] for _, command in calls] == ["plan", "run", "run", "commit", "report"]
    assert {day for day, _ in calls} == {DAY}

    (output / "_SUCCESS").unlink()
    rerun = dag.test(logical_date=None, run_after=datetime(2024, 7, 15, tzinfo=timezone.utc), run_conf={"date": DAY})
    assert rerun.state == DagRunState.SUCCESS and len(score_tis(rerun)) == 2
    assert [p.name for p in scores.iterdir() if p.name != STATE_ROOT] == [f"dt={DAY}"] and (
        output / "_SUCCESS"
    ).exists()
    assert_same_scores(read_parts(str(output)), local_data["reference"], local_data["rows"])


EXIT_WRAPPER = """\
import subprocess, sys
args = sys.argv[1:]
if args[0] == "run":
    sys.exit({code})  # e.g. the shard's input turned out to be invalid
sys.exit(subprocess.call([sys.executable, "-m", "batchscore", *args]))
"""


@pytest.mark.slow
def test_failures_no_retry_can_fix_use_one_try(
    airflow_home: Path, configs_dir: Path, local_data: dict[str, Any], tmp_path: Path
) -> None:
    """With two retries configured, exit 3 from a shard and an undefined template each fail in one try."""
    from airflow.utils.state import DagRunState, TaskInstanceState

    wrapper = tmp_path / "invalid_input.py"
    wrapper.write_text(EXIT_WRAPPER.format(code=3))
    scores = tmp_path / "scores"
    run = run_wrapped(configs_dir, local_data, scores, "exit3_e2e", wrapper)
    assert run.state == DagRunState.FAILED
    assert shard_tries(run) == {0: (TaskInstanceState.FAILED, 1), 1: (TaskInstanceState.FAILED, 1)}
    assert not (scores / f"dt={DAY}" / "_SUCCESS").exists()

    typo = {**local_job(local_data, scores), "output": str(scores / "dt={{ dss }}") + "/"}
    write_job(configs_dir, "typo_e2e", typo, LOCAL_DAG)
    dag = load_dags(configs_dir)["batchscore_typo_e2e"]
    run = dag.test(logical_date=LOGICAL_DATE)
    assert run.state == DagRunState.FAILED
    [plan] = [ti for ti in run.get_task_instances() if ti.task_id == "plan"]
    assert (plan.state, plan.try_number) == (TaskInstanceState.FAILED, 1)


@pytest.mark.slow
def test_drift_against_the_previous_interval_fails_the_commit_without_retry(
    airflow_home: Path, configs_dir: Path, local_data: dict[str, Any], tmp_path: Path
) -> None:
    """``dag.drift`` compares each date's output with the day before's: a shifted feature fails the
    commit at once (exit 5, no _SUCCESS); the Asset event of a good day carries its figures."""
    import shutil

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState

    events = tmp_path / "events"
    shutil.copytree(local_data["root"] / "events" / f"dt={DAY}", events / f"dt={DAY}")
    for path in sorted((events / f"dt={DAY}").glob("*.parquet")):
        table = pq.read_table(path)
        table = table.set_column(table.schema.get_field_index("age"), "age", pc.add(table.column("age"), 12.0))
        (events / "dt=2024-06-02").mkdir(exist_ok=True)
        pq.write_table(table, events / "dt=2024-06-02" / path.name, row_group_size=300)
    scores = tmp_path / "scores"
    job = {**local_job(local_data, scores), "input": str(events / "dt={{ ds }}") + "/"}
    write_job(configs_dir, "drift_e2e", job, {**LOCAL_DAG, "shards": 2, "drift": {"fail": 0.25}})
    dag = load_dags(configs_dir)["batchscore_drift_e2e"]

    first = dag.test(logical_date=LOGICAL_DATE)  # no output for the day before: drift is not checked
    assert first.state == DagRunState.SUCCESS
    with create_session() as session:
        [event] = session.query(AssetEvent).filter(AssetEvent.source_dag_id == dag.dag_id).all()
        assert event.extra == {
            "output": str(scores / f"dt={DAY}") + "/",
            "rows": local_data["rows"],
            "invalid_rows": 0,
            "max_psi": None,
            "max_psi_column": None,
        }

    second = dag.test(logical_date=datetime(2024, 6, 2, tzinfo=timezone.utc))
    assert second.state == DagRunState.FAILED
    [commit] = [ti for ti in second.get_task_instances() if ti.task_id == "commit"]
    assert (commit.state, commit.try_number) == (TaskInstanceState.FAILED, 1)
    output = scores / "dt=2024-06-02"
    assert not (output / "_SUCCESS").exists() and list(output.glob("part-*.parquet"))
    from helpers import read_run_report

    report = read_run_report(output)
    assert report["held"] and report["drift"]["reference"] == str(scores / f"dt={DAY}")
    assert report["drift"]["max_psi_column"] == "age"


def incremental_delta_job(events: Path, table: Path, model: dict[str, Path]) -> dict[str, Any]:
    """A job scoring the growing prefix ``events`` incrementally into the Delta table ``table``."""
    return {
        "input": str(events) + "/",
        "output": str(table),
        "output_format": "delta",
        "incremental": True,
        "model": str(model["model"]),
        "scaler": str(model["scaler"]),
    }


@pytest.mark.slow
def test_an_hourly_incremental_dag_scores_each_delivery_once(
    airflow_home: Path, configs_dir: Path, tmp_path: Path, binary_model_paths
) -> None:
    """An hourly DAG over a growing prefix into a Delta table: the first run scores what is there;
    a run with nothing new skips its shards and commit (no empty commit, no Asset event); a run
    after a delivery scores only the new file. The table then holds every row once."""
    import deltalake
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState

    events = tmp_path / "events"
    files = write_inputs(events, files=2, rows=1_104, row_group_size=400)
    table = tmp_path / "tables" / "scores"
    job = incremental_delta_job(events, table, binary_model_paths)
    write_job(configs_dir, "hourly", job, {**LOCAL_DAG, "schedule": "@hourly", "shards": 2})
    dag = load_dags(configs_dir)["batchscore_hourly"]
    assert dag.max_active_runs == 1  # overlapping runs wait: one commit at a time, besides the lease
    first = dag.test(logical_date=LOGICAL_DATE)
    assert first.state == DagRunState.SUCCESS
    assert deltalake.DeltaTable(str(table)).version() == 0
    idle = dag.test(logical_date=LOGICAL_DATE + timedelta(hours=1))
    assert idle.state == DagRunState.SUCCESS
    states = {ti.task_id: ti.state for ti in idle.get_task_instances()}
    assert states["plan"] == TaskInstanceState.SKIPPED and states["commit"] == TaskInstanceState.SKIPPED
    assert deltalake.DeltaTable(str(table)).version() == 0
    files += write_inputs(events / "late", files=1, rows=1_104, row_group_size=400, seed=77)
    third = dag.test(logical_date=LOGICAL_DATE + timedelta(hours=2))
    assert third.state == DagRunState.SUCCESS
    dt = deltalake.DeltaTable(str(table))
    assert dt.version() == 1 and json.loads(dt.history(1)[0]["batchscore"])["inputs"] == 1
    rows = dt.to_pyarrow_table()
    assert sorted(rows["customer_id"].to_pylist()) == sorted(read_inputs(files)["customer_id"].to_pylist())
    with create_session() as session:
        found = session.query(AssetEvent).filter(AssetEvent.source_dag_id == dag.dag_id).count()
    assert found == 2


# --------------------------------------------------------------------------- Asset-triggered runs


def test_asset_keys_make_the_schedule_and_bad_ones_fail_parsing(airflow_env: Path, configs_dir: Path) -> None:
    """``dag.assets`` schedules on upstream Assets (by URI), alone or with a cron schedule (Asset or time);
    conflicting or empty values fail parsing, naming the file and the key."""
    from airflow.sdk import AssetAll, AssetAny, AssetOrTimeSchedule, CronDataIntervalTimetable
    from airflow.sdk.definitions.asset import AssetUriRef
    from airflow.sdk.definitions.timetables.assets import AssetTriggeredTimetable

    from batchscore_dagfactory import DagConfigError, load_jobs

    base = {"input": "in/", "output": "out/"}
    local = {"start_date": "2024-01-01", "runner": "local"}
    write_job(configs_dir, "on_events", base, {**local, "assets": "s3://acme-events/churn"})
    write_job(configs_dir, "on_both", base, {**local, "assets": ["s3://a/x", "s3://b/y"], "assets_match": "all"})
    write_job(configs_dir, "or_time", base, {**local, "schedule": "@hourly", "assets": ["file:///data/in"]})
    dags = load_dags(configs_dir)
    on_events = dags["batchscore_on_events"]
    assert isinstance(on_events.timetable, AssetTriggeredTimetable)
    assert on_events.timetable.asset_condition == AssetAny(AssetUriRef("s3://acme-events/churn"))
    assert dags["batchscore_on_both"].timetable.asset_condition == AssetAll(
        AssetUriRef("s3://a/x"), AssetUriRef("s3://b/y")
    )
    or_time = dags["batchscore_or_time"]
    assert isinstance(or_time.timetable, AssetOrTimeSchedule)
    assert or_time.timetable.asset_condition == AssetAny(AssetUriRef("file:///data/in"))
    assert or_time.timetable.timetable == CronDataIntervalTimetable("0 * * * *", timezone="UTC")  # data intervals
    assert all(dag.max_active_runs == 1 for dag in dags.values())
    for name in ("on_events", "on_both", "or_time"):
        (configs_dir / f"{name}.yaml").unlink()

    bad = [
        ({"schedule": "@once", "assets": ["s3://a/x"]}, r"dag.schedule '@once' cannot be combined with dag.assets"),
        ({"schedule": "@continuous", "assets": "s3://a/x"}, r"'@continuous' cannot be combined with dag.assets"),
        ({"schedule": ["s3://a/x"]}, r"dag.schedule \['s3://a/x'\] is not a cron expression.*dag.assets"),
        ({"assets": ["s3://a/x", ""]}, "dag.assets has an empty URI"),
        ({"assets": "  "}, "dag.assets has an empty URI"),
        ({"assets": []}, "dag.assets is an empty list"),
        ({"assets": ["s3://a/x y"]}, r"dag.assets URI 's3://a/x y' has white space"),
        ({"assets": ["s3://a/x", "s3://a/x"]}, "dag.assets names s3://a/x more than once"),
        ({"assets": ["airflow://x"]}, "airflow:// scheme is Airflow's own"),
        ({"assets": ["s3://a/{{ds}}"]}, r"dag.assets: 's3://a/\{\{ds\}\}' is a template"),
        ({"schedule": "@daily", "assets_match": "any"}, "dag.assets_match is given without dag.assets"),
        ({"assets": ["s3://a/x"], "assets_match": "some"}, "dag.assets_match must be one of"),
        ({"assets": {"uri": "s3://a/x"}}, "dag.assets"),
    ]
    for dag, message in bad:
        write_job(configs_dir, "bad_assets", base, {**local, **dag})
        with pytest.raises(DagConfigError, match=r"bad_assets\.yaml: .*" + message):
            load_jobs(configs_dir)


def start_asset_triggered(dag: Any) -> list[Any]:
    """What the scheduler does with queued Asset events, through its own code: it creates the
    Asset-triggered runs (``_create_dagruns_for_dags``, which leaves the events queued while the DAG has
    ``max_active_runs`` runs active) and starts them (``_start_queued_dagruns``). Returns the new runs."""
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.sqlalchemy import prohibit_commit
    from airflow.utils.state import DagRunState

    scheduler = SchedulerJobRunner(job=Job(), executors=[])
    with create_session() as session:
        before = {run.run_id for run in session.query(DagRun).filter(DagRun.dag_id == dag.dag_id)}
        with prohibit_commit(session) as guard:
            scheduler._create_dagruns_for_dags(guard, session)
    deadline = time.monotonic() + 30
    while True:  # a run is picked up once the clock has passed its queued_at
        with create_session() as session:
            scheduler._start_queued_dagruns(session)
        with create_session() as session:
            runs = session.query(DagRun).filter(DagRun.dag_id == dag.dag_id, DagRun.run_id.notin_(before)).all()
            session.expunge_all()
        if all(run.state != DagRunState.QUEUED for run in runs):
            return runs
        assert time.monotonic() < deadline, "the scheduler did not start the queued run"
        time.sleep(0.2)


def finish_run(dag: Any, run_id: str, after: dict[str, Any] | None = None) -> Any:
    """Take a started run to its end as the scheduler does (``_schedule_dag_run``: the run's state, the
    DAG's count of active runs, which tasks are due), running each due task in this process as
    ``dag.test()`` runs them (Airflow's ``_run_task``: no executor or API server is up), and
    ``after[task_id]()`` once that task has run. The finished run."""
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    from airflow.models.dagrun import DagRun
    from airflow.sdk.definitions.dag import _run_task
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState

    scheduler = SchedulerJobRunner(job=Job(), executors=[])
    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == dag.dag_id, DagRun.run_id == run_id).one()
        while run.state == DagRunState.RUNNING:
            session.expire_all()
            scheduler._schedule_dag_run(run, session)
            session.commit()
            for ti in run.get_task_instances(state=[TaskInstanceState.SCHEDULED], session=session):
                _run_task(ti=ti, task=dag.task_dict[ti.task_id])
                (after or {}).pop(ti.task_id, lambda: None)()
        session.commit()
        states = {ti.task_id: ti.state for ti in run.get_task_instances(session=session)}
        session.expunge_all()
    run.task_states = states
    return run


@pytest.mark.slow
def test_upstream_asset_events_start_incremental_runs_that_score_each_delivery_once(
    airflow_home: Path, configs_dir: Path, tmp_path: Path, binary_model_paths, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream DAG delivers files into a growing prefix and emits an Asset event for it; the
    batchscore DAG scheduled on that Asset (``dag.assets``) scores the delivery. Events that come
    while a run is active wait for it (no second run at ``max_active_runs: 1``) and are not lost: a
    delivery that landed before the active run planned is scored by it, one that landed after by the
    next run, which the waiting events start. An event with nothing new behind it starts a run that
    commits nothing; two deliveries whose events the scheduler coalesces into one run are scored once each.

    What runs is Airflow's own: the upstream through ``dag.test()`` (its task's outlet records the
    event and queues the consumer), the DAG processor's write of both DAGs (``sync_bag_to_db``), the
    scheduler's creation and start of Asset-triggered runs and its scheduling of their tasks
    (``SchedulerJobRunner``), each task run as ``dag.test()`` runs it. Only the loop that calls them
    is the test's: ``dag.test()`` makes a manual run of its own, so it cannot run an Asset-triggered one."""
    import deltalake
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.models.asset import AssetEvent
    from airflow.models.dag import DagModel
    from airflow.sdk import DAG, Asset, task
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType

    events = tmp_path / "events"
    events.mkdir()
    uri = f"file://{events}"
    delivered: list[Path] = []
    # the upstream names its Asset as it likes; the job file names it by its URI
    delivery = Asset(name="deliveries", uri=uri)

    with DAG("upstream_deliveries", schedule=None, start_date=LOGICAL_DATE, params={"seed": 0}) as upstream:

        @task(outlets=[delivery])
        def deliver(**context: Any) -> None:
            seed = context["params"]["seed"]
            if seed:
                delivered.extend(
                    write_inputs(events / f"delivery-{seed}", files=1, rows=707, row_group_size=300, seed=seed)
                )
            context["outlet_events"][delivery].extra = {"delivery": seed}

        deliver()

    table = tmp_path / "tables" / "scores"
    job = incremental_delta_job(events, table, binary_model_paths)
    write_job(configs_dir, "on_delivery", job, {**LOCAL_DAG, "schedule": None, "assets": [uri], "shards": 1})
    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}
    dag = bag.dags["batchscore_on_delivery"]
    bag.bag_dag(upstream)
    DagBundlesManager().sync_bundles_to_db()

    def parse() -> None:
        """What the DAG processor writes each time it parses the DAG files (every 30 s by default),
        among it whether each DAG is at ``max_active_runs``."""
        sync_bag_to_db(bag, "dags-folder", None)

    parse()
    with create_session() as session:  # `airflow dags unpause`: a paused DAG is not queued for events
        session.query(DagModel).filter(DagModel.dag_id == dag.dag_id).update({"is_paused": False})

    def deliveries(*seeds: int) -> None:
        for seed in seeds:
            assert upstream.test(run_conf={"seed": seed}, logical_date=None).state == DagRunState.SUCCESS

    def committed() -> list[int]:
        return sorted(deltalake.DeltaTable(str(table)).to_pyarrow_table()["customer_id"].to_pylist())

    def upstream_events() -> int:
        with create_session() as session:
            return session.query(AssetEvent).filter(AssetEvent.source_dag_id == upstream.dag_id).count()

    deliveries(1)
    [first] = start_asset_triggered(dag)
    assert first.run_type == DagRunType.ASSET_TRIGGERED and first.triggered_by == DagRunTriggeredByType.ASSET
    assert first.state == DagRunState.RUNNING
    deliveries(2)  # while the first run is active, before it plans: no second run starts
    assert start_asset_triggered(dag) == []

    def during_first() -> None:  # once the first run has planned: this delivery is not in its plan
        deliveries(3)
        assert start_asset_triggered(dag) == []

    first = finish_run(dag, first.run_id, after={"plan": during_first})
    parse()
    assert first.state == DagRunState.SUCCESS
    assert deltalake.DeltaTable(str(table)).version() == 0  # deliveries 1 and 2, planned after both landed
    assert committed() == sorted(read_inputs(delivered[:2])["customer_id"].to_pylist())

    [second] = start_asset_triggered(dag)  # the events that waited (2 and 3) start one run
    second = finish_run(dag, second.run_id)
    parse()
    dt = deltalake.DeltaTable(str(table))
    assert second.state == DagRunState.SUCCESS
    assert dt.version() == 1 and json.loads(dt.history(1)[0]["batchscore"])["inputs"] == 1  # delivery 3 only
    assert committed() == sorted(read_inputs(delivered)["customer_id"].to_pylist())

    deliveries(0)  # an event with nothing new behind it
    [idle] = start_asset_triggered(dag)
    idle = finish_run(dag, idle.run_id)
    parse()
    assert idle.state == DagRunState.SUCCESS
    assert idle.task_states["plan"] == TaskInstanceState.SKIPPED
    assert idle.task_states["commit"] == TaskInstanceState.SKIPPED
    assert deltalake.DeltaTable(str(table)).version() == 1

    deliveries(4, 5)  # both land before the scheduler looks: one run for both events
    assert upstream_events() == 6
    [last] = start_asset_triggered(dag)
    last = finish_run(dag, last.run_id)
    parse()
    assert last.state == DagRunState.SUCCESS
    dt = deltalake.DeltaTable(str(table))
    assert dt.version() == 2 and json.loads(dt.history(1)[0]["batchscore"])["inputs"] == 2
    assert len(delivered) == 5
    assert committed() == sorted(read_inputs(delivered)["customer_id"].to_pylist())  # every row once
    assert start_asset_triggered(dag) == []  # no event, no run
    with create_session() as session:
        ours = session.query(AssetEvent).filter(AssetEvent.source_dag_id == dag.dag_id).count()
    assert ours == 3  # one per commit; the run with nothing new sent none
    assert caplog.text.count(f"started by an Asset event on {uri}; ") == 4  # each plan task's log


@pytest.mark.slow
def test_a_job_scheduled_on_another_jobs_output_follows_its_asset(
    airflow_home: Path, configs_dir: Path, tmp_path: Path
) -> None:
    """A job whose ``dag.assets`` is another batchscore job's output URI is queued by that job's Asset
    events: the reference by URI resolves to the producer's Asset (named ``batchscore/<job>``), and
    no second Asset is made for the reference."""
    from airflow.assets.manager import AssetManager
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.models.asset import AssetActive, AssetDagRunQueue, AssetModel, resolve_ref_to_asset
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    from batchscore_dagfactory import asset_uri

    scores = tmp_path / "scores"
    daily = {"input": str(tmp_path / "events" / "dt={{ ds }}") + "/", "output": str(scores / "dt={{ ds }}") + "/"}
    write_job(configs_dir, "daily_scores", daily, {**LOCAL_DAG})
    downstream = {"input": str(scores) + "/", "output": str(tmp_path / "rollup"), "output_format": "delta"}
    producer_uri = asset_uri(daily["output"])
    assert producer_uri == f"file://{scores}"
    write_job(
        configs_dir,
        "rollup",
        {**downstream, "incremental": True},
        {**LOCAL_DAG, "schedule": None, "assets": producer_uri},
    )
    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}
    DagBundlesManager().sync_bundles_to_db()
    sync_bag_to_db(bag, "dags-folder", None)
    with create_session() as session:
        resolved = resolve_ref_to_asset(uri=producer_uri, session=session)
        assert resolved is not None and resolved.name == "batchscore/daily_scores"
        names = {name for (name,) in session.query(AssetModel.name).filter(AssetModel.uri == producer_uri)}
        assert names == {"batchscore/daily_scores"}  # no second Asset made for the reference
        assert session.query(AssetActive).filter(AssetActive.uri == producer_uri).count() == 1
        # an event of the producer's Asset (what its commit task emits) queues the rollup's next run
        session.query(DagModel).filter(DagModel.dag_id == "batchscore_rollup").update({"is_paused": False})
        AssetManager.register_asset_change(asset=resolved, extra={"output": "x"}, session=session)
        queued = session.query(AssetDagRunQueue).filter(AssetDagRunQueue.target_dag_id == "batchscore_rollup")
        assert queued.count() == 1
        queued.delete()  # leave no pending run behind for the tests that follow
        session.query(DagModel).filter(DagModel.dag_id == "batchscore_rollup").update({"is_paused": True})
