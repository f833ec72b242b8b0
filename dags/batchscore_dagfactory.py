"""Build one Airflow DAG per batchscore job config: plan -> score (one task per shard, or one Spark job) -> commit.

This module only wires tasks. What a job file says is checked by ``batchscore.orchestration.dagspec`` (the
``dag:`` section is declared there, beside the job's keys) and what the tasks do when they run is
``batchscore.orchestration.dagrun``. Building a DAG reads nothing but the YAML files: no storage access, no model
loading, and only the provider of the configured runner is imported (inside the function that
builds its operator).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import DAG, Asset, Param, task

from batchscore.config import MAX_ROWS, MAX_SHARDS
from batchscore.orchestration.dagrun import (
    DATE_PARAM,
    PERMANENT_EXIT_CODES,
    AirflowFailException,
    RunDatesMixin,
    RunTemplateUndefined,
    asset_extra,
    cli_command,
    commit_shards,
    execution_timeout,
    inputs_ready,
    local_score_environment,
    log_triggering_events,
    permanent_failure,
    plan_shards,
    plan_spark,
    plan_uri,
    pod_exit_code,
    retry_kwargs,
    run_cli,
    run_dates,
    score_environment,
    secret_environment,
    shard_arguments,
    spark_application,
    spark_conf,
    timetable,
)
from batchscore.orchestration.dagspec import (
    DagConfigError,
    JobSettings,
    asset_uri,
    common_args,
    configs_dir,
    docker_mounts,
    load_jobs,
    parse_job,
)
from batchscore.orchestration.quantity import docker_cpus, docker_memory

__all__ = [
    "DagConfigError",
    "JobSettings",
    "build_dag",
    "common_args",
    "configs_dir",
    "load_jobs",
    "parse_job",
    "plan_uri",
    "run_cli",
    "run_dates",
    "shard_arguments",
]


def _k8s_score(settings: JobSettings, shard_args: Any) -> Any:
    """Score shards in pods: the image's entrypoint is ``batchscore``, the arguments the shard."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.providers.cncf.kubernetes.secret import Secret
    from kubernetes.client import models as k8s

    class BatchscorePodOperator(RunDatesMixin, KubernetesPodOperator):
        """Fails for good when the scorer exits with a code no retry can fix (``PERMANENT_EXIT_CODES``;
        every path, deferrable too, ends in cleanup)."""

        job_settings = settings

        def cleanup(self, pod: Any, remote_pod: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().cleanup(pod, remote_pod, *args, **kwargs)
            except AirflowFailException:
                raise
            except Exception as exc:
                name = pod.metadata.name if pod is not None and pod.metadata else "?"
                permanent = permanent_failure(pod_exit_code(remote_pod, self.base_container_name), f"pod {name}")
                if permanent is not None:
                    raise permanent from exc
                raise

    spec = settings.dag
    secrets = [Secret("env", ref.env if ref.key else None, ref.secret, ref.key) for ref in spec.secrets]
    resources = k8s.V1ResourceRequirements(
        requests=spec.resources.requests or None, limits=spec.resources.limits or None
    )
    optional = {
        "kubernetes_conn_id": spec.kubernetes_conn_id,
        "service_account_name": spec.service_account,
        "image_pull_policy": spec.image_pull_policy,
    }
    return BatchscorePodOperator.partial(
        task_id="score",
        name=settings.pod_name,
        image="{{ params.image }}",
        namespace=spec.namespace,
        env_vars=score_environment(settings),
        secrets=secrets,
        container_resources=resources,
        node_selector=dict(spec.node_selector) or None,
        labels={"app": "batchscore", "batchscore-job": settings.label},
        get_logs=True,
        on_finish_action="delete_succeeded_pod",
        max_active_tis_per_dagrun=spec.max_active_tis_per_dagrun,
        execution_timeout=execution_timeout(settings),
        **{key: value for key, value in optional.items() if value},
    ).expand(arguments=shard_args)


def _docker_score(settings: JobSettings, shard_args: Any) -> Any:
    """Score shards in local Docker containers; secrets are forwarded from the worker's environment."""
    from airflow.providers.docker.exceptions import DockerContainerFailedSkipException
    from airflow.providers.docker.operators.docker import DockerOperator

    class BatchscoreDockerOperator(RunDatesMixin, DockerOperator):
        """Reads secret values at run time only, so they never reach the DAG, the UI or the logs.

        The exit codes no retry can fix (``PERMANENT_EXIT_CODES``) are the provider's "skip" codes, turned
        here into a failure without retries: the provider reports those codes apart from any other failure.
        """

        job_settings = settings

        def __init__(self, *, secret_env: tuple[str, ...] = (), **kwargs: Any) -> None:
            super().__init__(skip_on_exit_code=sorted(PERMANENT_EXIT_CODES), **kwargs)
            self.secret_env = secret_env

        def execute(self, context: Any) -> Any:
            self._private_environment = secret_environment(self.secret_env)
            try:
                return super().execute(context)
            except DockerContainerFailedSkipException as exc:
                codes = ", ".join(f"{code} ({meaning})" for code, meaning in PERMANENT_EXIT_CODES.items())
                raise AirflowFailException(
                    f"the scoring container exited with one of {codes}; see its log above; not retrying"
                ) from exc

    spec, limits = settings.dag, settings.dag.resources.limits
    optional = {
        "docker_url": spec.docker_url,
        "docker_conn_id": spec.docker_conn_id,
        "mem_limit": docker_memory(limits["memory"]) if "memory" in limits else None,
        "cpus": docker_cpus(limits["cpu"]) if "cpu" in limits else None,
        "mounts": docker_mounts(spec) or None,
        "network_mode": spec.network_mode,
        "user": spec.user,
    }
    return BatchscoreDockerOperator.partial(
        task_id="score",
        image="{{ params.image }}",
        environment=score_environment(settings),
        secret_env=tuple(ref.env for ref in spec.secrets if ref.env),
        auto_remove="success",
        mount_tmp_dir=False,
        labels={"app": "batchscore", "batchscore-job": settings.label},
        max_active_tis_per_dagrun=spec.max_active_tis_per_dagrun,
        execution_timeout=execution_timeout(settings),
        **{key: value for key, value in optional.items() if value is not None},
    ).expand(command=shard_args)


def _local_score(settings: JobSettings, shard_args: Any) -> Any:
    """Score shards as subprocesses of the worker (laptops, CI): same command line as the container."""

    @task(
        task_id="score",
        max_active_tis_per_dagrun=settings.dag.max_active_tis_per_dagrun,
        execution_timeout=execution_timeout(settings),
    )
    def score(arguments: list[str]) -> None:
        run_cli([*cli_command(settings), *arguments], env=local_score_environment(settings))

    return score.expand(arguments=shard_args)


def _spark_score(settings: JobSettings, spark_args: Any) -> Any:
    """Score every shard in Spark tasks: one ``spark-submit`` of ``batchscore spark --plan P --no-commit``
    to the master of ``dag.spark_conn_id``; the commit task publishes the output."""
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    class BatchscoreSparkSubmitOperator(RunDatesMixin, SparkSubmitOperator):
        """Fails for good when ``batchscore spark`` exits with a code no retry can fix
        (``PERMANENT_EXIT_CODES``): in client mode ``spark-submit`` exits with the driver's code."""

        job_settings = settings

        def execute(self, context: Any) -> Any:
            try:
                return super().execute(context)
            except AirflowFailException:
                raise
            except Exception as exc:
                process = getattr(self._hook, "_submit_sp", None)  # the provider's spark-submit process
                permanent = permanent_failure(getattr(process, "returncode", None), "spark-submit of batchscore spark")
                if permanent is not None:
                    raise permanent from exc
                raise

    spec = settings.dag
    return BatchscoreSparkSubmitOperator(
        task_id="score",
        application=spark_application(settings),
        application_args=spark_args,
        conn_id=spec.spark_conn_id,
        conf=spark_conf(settings),
        env_vars=score_environment(settings),
        name=settings.pod_name,
        executor_cores=spec.spark_executor_cores,  # None: the cluster's default, as the provider leaves it
        executor_memory=spec.spark_executor_memory,
        num_executors=spec.spark_num_executors,
        driver_memory=spec.spark_driver_memory,
        execution_timeout=execution_timeout(settings),
    )


def build_dag(settings: JobSettings) -> DAG:
    """plan -> score (mapped over the plan's shards, or one Spark job) -> commit, with the output as an Asset."""
    spec = settings.dag
    output_asset = Asset(name=f"batchscore/{settings.name}", uri=asset_uri(settings.output))
    params: dict[str, Param] = {
        "shards": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=MAX_SHARDS,
            description=f"Shards for this run (job file: {spec.shards or 'unset'}).",
        ),
        "rows_per_shard": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=MAX_ROWS,
            description=f"Rows per shard (job file: {spec.rows_per_shard or 'unset'}).",
        ),
        DATE_PARAM: Param(
            None,
            type=["null", "string"],
            pattern=r"^\d{4}-\d{2}-\d{2}$",
            description="Score this date (YYYY-MM-DD) instead of the run's own.",
        ),
    }
    if spec.runner in ("kubernetes", "docker"):
        params["image"] = Param(spec.image, type="string", description="Scoring image for this run.")

    with DAG(
        dag_id=settings.dag_id,
        description=spec.description or f"batchscore job {settings.name} ({settings.source})",
        schedule=timetable(settings),
        start_date=spec.start_date,
        end_date=spec.end_date,
        catchup=spec.catchup,
        max_active_runs=spec.max_active_runs,
        tags=["batchscore", *spec.tags],
        params=params,
        default_args=retry_kwargs(settings),
        template_undefined=RunTemplateUndefined,
        doc_md=f"Scores `{', '.join(settings.inputs)}` into `{settings.output}` "
        f"with the **{spec.runner}** runner. Job file: `{settings.source}`.",
    ) as dag:

        @task(task_id="plan")
        def plan() -> list[list[str]] | list[str]:
            """Split the input into shards (Parquet footers only) and hand each shard its arguments
            (the spark runner: the one Spark job's arguments)."""
            from airflow.sdk import get_current_context

            context = get_current_context()
            log_triggering_events(settings, context)
            return plan_spark(settings, context) if spec.runner == "spark" else plan_shards(settings, context)

        @task(task_id="commit", outlets=[output_asset])
        def commit() -> str:
            """Publish the output only once every shard's receipt (and drift, with dag.drift) checks out."""
            from airflow.sdk import get_current_context

            context = get_current_context()
            output = commit_shards(settings, context)
            context["outlet_events"][output_asset].extra = asset_extra(settings, context, output)
            return output

        shard_args = plan()
        if spec.sensor is not None:

            @task.sensor(
                task_id="wait_for_input",
                poke_interval=spec.sensor.poke_interval,
                timeout=spec.sensor.timeout,
                mode=spec.sensor.mode,
            )
            def wait_for_input() -> bool:
                from airflow.sdk import get_current_context

                return inputs_ready(settings, get_current_context())

            wait_for_input() >> shard_args

        builders = {"kubernetes": _k8s_score, "docker": _docker_score, "local": _local_score, "spark": _spark_score}
        scored = builders[spec.runner](settings, shard_args)
        scored >> commit()
    return dag
