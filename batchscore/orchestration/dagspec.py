"""A job file's ``dag:`` section, declared once, and the settings one Airflow DAG is built from.

``DagSpec`` declares every ``dag:`` key (type, default, help, constraints) the way ``JobConfig``
declares the job's keys; ``parse_job`` checks a whole job file at DAG-parse time, so a typo fails
when the DAGs are parsed, naming the file, instead of at 3 a.m. This module needs neither Airflow
nor the data stack: the DAG factory in ``dags/`` only wires tasks from what it returns.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .. import schema
from ..config import (
    CHAMPION_SETTINGS,
    DAY_SECONDS,
    MAX_PSI,
    MAX_ROWS,
    MAX_SHARDS,
    PSI_WHY,
    ROWS_WHY,
    SHARDS_WHY,
    TEMPLATE,
    shard_size_conflict,
    templates_rendered,
    validate_settings,
)
from ..config import FIELDS as JOB_FIELDS
from ..errors import EXIT_DRIFT, ConfigError
from ..io.layout import check_output
from ..schema import setting
from ..strict_yaml import DuplicateKeyError, load_yaml
from .quantity import Quantity

#: Parse-time override of every job's runner (``local`` on a laptop or in CI).
RUNNER_ENV = "BATCHSCORE_RUNNER"
#: Names that hold credentials: they belong in dag.secrets, never in the job file or arguments.
SECRET_NAME = re.compile(r"secret|token|passw|credential|private|(^|_)key$|access_key", re.IGNORECASE)


class DagConfigError(ValueError):
    """A job file's ``dag:`` section (or job keys) cannot make a DAG; the message names the file."""


# --------------------------------------------------------------------------- the dag: section


def _strings(value: Any) -> Any:
    """A YAML list (or one string) as a tuple of strings; other values are left to the type check."""
    if isinstance(value, str):
        return (value,)
    return tuple(map(str, value)) if isinstance(value, list) else value


def _string_map(value: Any) -> Any:
    """A YAML mapping with values as the command line spells them (true/false, numbers as written)."""
    return {str(k): schema.flag_text(v) for k, v in value.items()} if isinstance(value, Mapping) else value


def _as_datetime(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, date) and not isinstance(value, datetime):
        return datetime(value.year, value.month, value.day)
    return value


Strings = Annotated[tuple[str, ...], BeforeValidator(_strings)]
StringMap = Annotated[dict[str, str], BeforeValidator(_string_map)]
When = Annotated[datetime, BeforeValidator(_as_datetime)]
#: A week: the longest any wait or task of a scheduled job may take.
WEEK_SECONDS = 7 * DAY_SECONDS
#: Runs or shards at once: each is a pod with a worker per core, and the scheduler's pools are far smaller.
MAX_PARALLEL = 1024
PARALLEL_WHY = f"each is a pod or process at once; the scheduler runs far fewer than {MAX_PARALLEL} tasks at a time"
#: Cores of one Spark executor: the largest machines have a few hundred.
MAX_EXECUTOR_CORES = 512
#: A size as Spark's ``--executor-memory`` takes it (a number, then k, m, g, t or p).
SPARK_SIZE = re.compile(r"[0-9]+[kmgtp]?b?", re.IGNORECASE)
#: Schedules that are not a time table, so an Asset-or-time schedule cannot be built on them.
ONE_OFF_SCHEDULES = ("@once", "@continuous")
STRICT = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class SecretRef(BaseModel):
    """A Kubernetes secret exposed as environment: the whole secret, or one key as one variable."""

    model_config = STRICT
    secret: str = setting(..., "Kubernetes secret name.", min_length=1)
    key: str | None = setting(None, "One key of the secret.")
    env: str | None = setting(None, "The variable that key becomes.")

    @model_validator(mode="before")
    @classmethod
    def _whole_secret(cls, value: Any) -> Any:
        return {"secret": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _key_and_env(self) -> SecretRef:
        if bool(self.key) != bool(self.env):
            raise ValueError(
                f"dag.secrets entry {self.model_dump(exclude_none=True)}: give both 'key' and 'env', or neither"
            )
        return self


class Resources(BaseModel):
    model_config = STRICT
    requests: dict[str, Quantity] = setting({}, "Amounts the scheduler reserves, e.g. {cpu: 2, memory: 4Gi}.")
    limits: dict[str, Quantity] = setting({}, "Amounts the container may not exceed.")


class SensorSpec(BaseModel):
    """Wait for the input partition before planning (off unless configured)."""

    model_config = STRICT
    path: Strings = setting((), "Paths to wait for.", shown="the inputs")
    marker: str | None = setting(None, "File inside each path to wait for instead, e.g. _SUCCESS.")
    poke_interval: float = setting(
        300.0,
        "Seconds between checks.",
        gt=0,
        le=DAY_SECONDS,
        unit="seconds",
        why="checking less than daily would miss a daily input by a day",
    )
    timeout: float = setting(
        6 * 3600.0,
        "Seconds to wait in all.",
        gt=0,
        le=WEEK_SECONDS,
        unit="seconds",
        why="a sensor waiting past a week holds a run that has long missed its date",
    )
    mode: Literal["poke", "reschedule"] = setting("reschedule", "Hold a worker slot (poke) or not (reschedule).")


class DriftSpec(BaseModel):
    """Check each committed output against a reference output (off unless configured)."""

    model_config = STRICT
    reference: str | None = setting(
        None, "Output to compare with (a template).", shown="the output of the interval before the run's date"
    )
    warn: float | None = setting(
        None,
        "PSI above which a column is warned about (`--drift-warn`).",
        ge=0,
        le=MAX_PSI,
        shown="the job's `drift_warn`",
        why=PSI_WHY,
    )
    fail: float | None = setting(
        None,
        f"PSI above which commit exits {EXIT_DRIFT} without `_SUCCESS` (`--drift-fail`).",
        ge=0,
        le=MAX_PSI,
        shown="the job's `drift_fail`",
        why=PSI_WHY,
    )


def _listed(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _backoff(value: Any) -> Any:
    """``true`` means doubling, ``false`` (or nothing) a fixed delay; a number is the multiplier."""
    if value is True:
        return 2.0
    return 0.0 if value is False else value


def _switch(value: Any) -> Any:
    """A section that is off (``false``), on with its defaults (``true``) or a mapping of its keys."""
    if value is True:
        return {}
    return None if value is False else value


class DagSpec(BaseModel):
    """The ``dag:`` section of a job file; every field is a key of that section."""

    model_config = STRICT
    schedule: str | None = setting(
        None,
        'Cron expression or preset ("0 3 * * *", "@daily"). Runs cover **data intervals**: the run for '
        "2024-06-01 of a daily job starts once that interval has ended, and its `{{ ds }}` is `2024-06-01`.",
        shown="required unless `assets` (may be `null`: manual runs only)",
    )
    assets: Strings = setting(
        (),
        "URIs of upstream Airflow Assets, e.g. `s3://acme-events/churn` (another batchscore job's: its output "
        "without the date folder); their events start runs (see `assets_match`). With a `schedule` too, the DAG "
        "runs on either (Asset or time).",
        shown="none",
    )
    assets_match: Literal["any", "all"] = setting(
        "any",
        "`any`: an event for any of `assets` starts a run; `all`: every one of them must have been updated "
        "since the last run (Airflow's rule for a list).",
    )
    start_date: When = setting(..., "First date to schedule, like 2024-06-01.", shown="required")
    end_date: When | None = setting(None, "Last date to schedule.")
    timezone: str = setting("UTC", "Time zone of the schedule and of dates without one.")
    catchup: bool = setting(False, "Create runs for missed intervals after `start_date`.")
    max_active_runs: int = setting(1, "Dates scored at the same time.", ge=1, le=MAX_PARALLEL, why=PARALLEL_WHY)
    dag_id: str | None = setting(None, "The DAG's id.", shown="`batchscore_<file name>`")
    description: str | None = setting(None, "The DAG's description.", shown="the job file's name")
    tags: Strings = setting((), "Tags besides `batchscore`.")
    runner: Literal["kubernetes", "docker", "local", "spark"] = setting(
        "kubernetes",
        "Where shards run: pods, Docker containers, subprocesses of the worker, or one `spark-submit` "
        "whose Spark tasks score them. The environment variable `BATCHSCORE_RUNNER` overrides it for every job "
        "when the DAGs are parsed (e.g. `local` on a laptop).",
    )
    image: str | None = setting(
        None, "Scoring image; a run's `image` param overrides it.", shown="required unless `local` or `spark`"
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = setting(
        None, "Kubernetes `imagePullPolicy`.", shown="cluster default"
    )
    shards: int | None = setting(
        None,
        "Number of shards (or give `rows_per_shard`); a run's params override it.",
        ge=1,
        le=MAX_SHARDS,
        shown="one shard",
        why=SHARDS_WHY,
    )
    rows_per_shard: int | None = setting(
        None, "Target rows per shard instead of `shards`; a run's params override it.", ge=1, le=MAX_ROWS, why=ROWS_WHY
    )
    max_active_tis_per_dagrun: int = setting(
        8, "Shards running at once within one run.", ge=1, le=MAX_PARALLEL, why=PARALLEL_WHY
    )
    resources: Resources = setting(
        Resources(),
        shown="none",
        help="`{requests: {cpu, memory}, limits: {cpu, memory}}` as Kubernetes "
        "quantities (`500m`, `4Gi`, `1G` = 10^9). Docker takes `limits` (`cpus`, `mem_limit`).",
    )
    env: StringMap = setting({}, "Environment variables for the scorer; no credentials (they would show in the UI).")
    secrets: Annotated[tuple[SecretRef, ...], BeforeValidator(_listed)] = setting(
        (),
        "List of `{secret: NAME, key: KEY, env: VAR}` (one key as one "
        "variable), or `{secret: NAME}` (the whole secret as environment).",
    )
    namespace: str = setting("default", "Kubernetes namespace.")
    service_account: str | None = setting(None, "Pod service account (e.g. bound to an IAM role for S3).")
    kubernetes_conn_id: str | None = setting(None, "Airflow connection to the cluster.", shown="`kubernetes_default`")
    node_selector: StringMap = setting({}, "Pod node selector.")
    docker_url: str | None = setting(None, "Docker runner only: the engine to use.", shown="`DOCKER_HOST`")
    docker_conn_id: str | None = setting(None, "Docker runner only: Airflow connection to a registry.")
    mounts: Annotated[tuple[str, ...], BeforeValidator(_strings)] = setting(
        (),
        "Docker runner only: host folders for the container, as `HOST:CONTAINER` or `HOST:CONTAINER:ro` "
        "(list), like `docker run -v`; both paths absolute.",
    )
    network_mode: str | None = setting(
        None,
        "Docker runner only: the container's network (`bridge`, `host`, `none`, a network's name).",
        shown="the engine's default",
    )
    user: str | None = setting(
        None,
        "Docker runner only: `UID[:GID]` (or a name) the scorer runs as, e.g. the owner of mounted folders.",
        shown="the image's user (10001)",
    )
    local_command: Strings = setting(
        (), "`local` runner only: the command that starts batchscore (list or string).", shown="`python -m batchscore`"
    )
    spark_conn_id: str = setting(
        "spark_default",
        "`spark` runner only: the Airflow connection (Spark type) naming the master (`spark://host:7077`, "
        "`yarn`, `k8s://https://host`, `local[4]`) and its `deploy-mode` extra.",
    )
    spark_application: str | None = setting(
        None,
        "`spark` runner only: `batchscore/spark/submit.py` as `spark-submit` on the worker sees it.",
        shown="the worker's installed batchscore's",
    )
    spark_python: str | None = setting(
        None,
        "`spark` runner only: the Python with batchscore's `spark` extra on the driver and executors "
        "(`spark.pyspark.python`).",
        shown="the cluster's `PYSPARK_PYTHON`",
    )
    spark_conf: StringMap = setting(
        {},
        "`spark` runner only: Spark properties (`--conf`), e.g. `{spark.executor.instances: 4, spark.cores.max: 16}`; "
        "no credentials (they would show in the UI and the command line).",
    )
    spark_executor_cores: int | None = setting(
        None,
        "`spark` runner only: cores of each executor (`--executor-cores`).",
        ge=1,
        le=MAX_EXECUTOR_CORES,
        shown="the cluster's default",
        why=f"no machine Spark runs on offers one executor more than {MAX_EXECUTOR_CORES} cores",
    )
    spark_executor_memory: str | None = setting(
        None,
        "`spark` runner only: memory of each executor (`--executor-memory`), as Spark writes sizes (`4g`, `512m`).",
        shown="the cluster's default",
    )
    spark_num_executors: int | None = setting(
        None,
        "`spark` runner only: executors to start (`--num-executors`; YARN and Kubernetes).",
        ge=1,
        le=MAX_SHARDS,
        shown="the cluster's default",
        why=f"a job has at most {MAX_SHARDS} shards, and an executor beyond one per shard sits idle",
    )
    spark_driver_memory: str | None = setting(
        None,
        "`spark` runner only: memory of the driver (`--driver-memory`), as Spark writes sizes.",
        shown="the cluster's default",
    )
    retries: int = setting(
        2, "Retries of every task.", ge=0, le=100, why="a task that failed 100 times will not succeed on the 101st"
    )
    retry_delay: float = setting(
        60.0,
        "Seconds before the first retry.",
        ge=0,
        le=DAY_SECONDS,
        unit="seconds",
        why="a retry a day later has missed its schedule",
    )
    retry_exponential_backoff: Annotated[float, BeforeValidator(_backoff)] = setting(
        2.0,
        "`true` doubles the delay at each retry; a number is the multiplier; `false` keeps the delay fixed.",
        ge=0,
        le=10,
        shown="true",
        why="each retry waits that many times longer: 10 is already steeper than any backoff needs",
    )
    max_retry_delay: float | None = setting(
        None,
        "Upper bound on the delay, in seconds.",
        ge=0,
        le=DAY_SECONDS,
        unit="seconds",
        why="a retry a day later has missed its schedule",
    )
    execution_timeout: float | None = setting(
        None,
        "Seconds one shard may run before it is failed (and retried).",
        ge=0,
        le=WEEK_SECONDS,
        unit="seconds",
        why="a shard running a week is stuck",
    )
    sensor: Annotated[SensorSpec | None, BeforeValidator(_switch)] = setting(
        None,
        "`true`, or `{path, marker, poke_interval, timeout, mode}`. It waits for `path` (default: the inputs) or "
        "for `<path>/<marker>` (e.g. `_SUCCESS`). `mode` is `reschedule` (default) or `poke`.",
        shown="off",
    )
    drift: Annotated[DriftSpec | None, BeforeValidator(_switch)] = setting(
        None,
        "`true`, or `{reference, warn, fail}`: `commit` checks drift (see Monitoring) against `reference` (a "
        "template; default: the output of the interval before the run's date) with `--drift-warn warn` and "
        "`--drift-fail fail`. With no such output yet, drift is not checked.",
        shown="off",
    )

    @field_validator("local_command", mode="before")
    @classmethod
    def _split_command(cls, value: Any) -> Any:
        return shlex.split(value) if isinstance(value, str) else value

    @field_validator("mounts")
    @classmethod
    def _bind_mounts(cls, mounts: tuple[str, ...]) -> tuple[str, ...]:
        for mount in mounts:
            parts = mount.split(":")
            if not (
                len(parts) in (2, 3) and all(p.startswith("/") for p in parts[:2]) and parts[2:] in ([], ["ro"], ["rw"])
            ):
                raise ValueError(f"dag.mounts entry {mount!r} is not HOST:CONTAINER[:ro] with absolute paths")
        return mounts

    @field_validator("spark_executor_memory", "spark_driver_memory")
    @classmethod
    def _spark_size(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not SPARK_SIZE.fullmatch(value):
            raise ValueError(f"dag.{info.field_name} must be a size as Spark writes it, like 512m or 4g, got {value!r}")
        return value

    @field_validator("spark_conn_id")
    @classmethod
    def _connection_named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("dag.spark_conn_id must name an Airflow connection, got ''")
        return value

    @field_validator("spark_conf")
    @classmethod
    def _plain_spark_conf(cls, conf: dict[str, str]) -> dict[str, str]:
        """Spark properties reach the command line and the UI: no credentials among them."""
        leaked = sorted(k for k in conf if SECRET_NAME.search(k))
        if leaked:
            raise ValueError(
                f"dag.spark_conf {', '.join(leaked)} look like credentials; give them to the cluster "
                "(an instance role, its own spark-defaults.conf) instead"
            )
        return conf

    @field_validator("schedule", mode="before")
    @classmethod
    def _not_assets(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple, Mapping)):
            raise ValueError(
                f"dag.schedule {value!r} is not a cron expression or preset; name upstream Assets in dag.assets"
            )
        return value

    @field_validator("assets")
    @classmethod
    def _asset_uris(cls, uris: tuple[str, ...]) -> tuple[str, ...]:
        """An Asset is named by its URI exactly: a blank, spaced or repeated one would match nothing or twice."""
        for uri in uris:
            if not uri.strip():
                raise ValueError("dag.assets has an empty URI; give each upstream Asset's URI, like s3://bucket/prefix")
            if uri != uri.strip() or any(ch.isspace() for ch in uri):
                raise ValueError(f"dag.assets URI {uri!r} has white space; an Asset's URI has none")
            if uri.split("://", 1)[0].lower() == "airflow" and "://" in uri:
                raise ValueError(f"dag.assets URI {uri!r}: the airflow:// scheme is Airflow's own")
        repeated = sorted({uri for uri in uris if uris.count(uri) > 1})
        if repeated:
            raise ValueError(f"dag.assets names {', '.join(repeated)} more than once")
        return uris

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(value)
        except (KeyError, ValueError):
            raise ValueError(f"dag.timezone {value!r} is not a known time zone") from None
        return value

    @field_validator("env")
    @classmethod
    def _no_credentials(cls, env: dict[str, str]) -> dict[str, str]:
        """``dag.env`` is visible in the UI and the pod spec, so it must not carry credentials."""
        leaked = sorted(k for k in env if SECRET_NAME.search(k))
        if leaked:
            raise ValueError(f"dag.env {', '.join(leaked)} look like credentials; use dag.secrets instead")
        return env

    @model_validator(mode="after")
    def _consistent(self) -> DagSpec:
        from zoneinfo import ZoneInfo

        if self.runner in ("kubernetes", "docker") and not self.image:
            raise ValueError(f"dag.image is required for the {self.runner} runner")
        if self.assets and self.schedule in ONE_OFF_SCHEDULES:
            raise ValueError(
                f"dag.schedule {self.schedule!r} cannot be combined with dag.assets: give assets alone "
                "(runs on Asset events) or with a cron schedule (Asset events or time)"
            )
        if "assets" in self.model_fields_set and not self.assets:
            raise ValueError("dag.assets is an empty list; name at least one upstream Asset's URI, or leave it out")
        if "assets_match" in self.model_fields_set and not self.assets:
            raise ValueError("dag.assets_match is given without dag.assets; name the upstream Assets")
        conflict = shard_size_conflict(self.shards, self.rows_per_shard, lambda key: f"dag.{key}")
        if conflict:
            raise ValueError(conflict)
        zone = ZoneInfo(self.timezone)
        for key in ("start_date", "end_date"):  # dates without a zone are in the job's time zone
            value = getattr(self, key)
            if value is not None and value.tzinfo is None:
                object.__setattr__(self, key, value.replace(tzinfo=zone))
        return self


DAG_FIELDS = DagSpec.model_fields


def docker_mounts(spec: DagSpec) -> list[dict[str, Any]]:
    """``dag.mounts`` as the Docker provider's bind mounts (keyword arguments of ``docker.types.Mount``)."""
    mounts = []
    for mount in spec.mounts:
        source, target, *mode = mount.split(":")
        mounts.append({"source": source, "target": target, "type": "bind", "read_only": mode == ["ro"]})
    return mounts


# --------------------------------------------------------------------------- one job file


@dataclass(frozen=True)
class JobSettings:
    """Everything one DAG is built from, checked when the DAGs are parsed."""

    name: str
    source: str
    dag_id: str
    dag: DagSpec
    output: str
    inputs: tuple[str, ...]
    storage_options: dict[str, str]
    #: The job's keys as ``batchscore`` flags (templates still in them).
    common_args: tuple[str, ...]
    #: What the input sensor waits for (the inputs unless ``dag.sensor.path`` says).
    sensor_paths: tuple[str, ...]

    @property
    def pod_name(self) -> str:
        """The job's pods' name: a DNS label, short enough for the suffix Kubernetes adds."""
        return f"batchscore-{self.name}".lower().replace("_", "-")[:50]

    @property
    def label(self) -> str:
        """The job's name as a Kubernetes label value."""
        return self.name.lower().replace("_", "-")[:63]


def _dag_name(loc: tuple[Any, ...]) -> str:
    return "dag." + ".".join(map(str, loc))


def read_dag(source: str, section: Any) -> DagSpec:
    """The ``dag:`` section checked against its declaration; keys without a value count as absent."""
    if not isinstance(section, Mapping):
        raise DagConfigError(f"{source}: the 'dag' section must be a mapping")
    unknown = sorted(set(section) - set(DAG_FIELDS))
    if unknown:
        raise DagConfigError(f"{source}: unknown dag key(s) {', '.join(unknown)}; known: {', '.join(DAG_FIELDS)}")
    values = {key: value for key, value in section.items() if value is not None}
    if os.environ.get(RUNNER_ENV):
        values["runner"] = os.environ[RUNNER_ENV]
    try:
        return DagSpec(**values)
    except ValidationError as exc:
        raise DagConfigError(f"{source}: {schema.explain(exc, DAG_FIELDS, _dag_name)}") from None


def common_args(job: Mapping[str, Any], source: str) -> tuple[str, ...]:
    """The job keys as ``batchscore`` flags: the container has no config file, only its arguments.

    The keys are checked as the CLI checks them. ``--overwrite`` is always given: a run of a
    logical date owns that date's output.
    """
    unknown = sorted(set(job) - set(JOB_FIELDS))
    if unknown:
        raise DagConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
    given = {key: value for key, value in job.items() if value is not None}
    leaked = sorted(k for k in given.get("storage_options") or {} if SECRET_NAME.search(str(k)))
    if leaked:
        raise DagConfigError(
            f"{source}: storage_options {', '.join(leaked)} look like credentials: they would be "
            "passed as arguments; use dag.secrets or the worker's environment instead"
        )
    try:
        with templates_rendered():  # Airflow renders them before the container runs
            config = validate_settings(given, name=lambda key: key)  # named like the dag: keys, without "setting"
    except ConfigError as exc:
        raise DagConfigError(f"{source}: {exc}") from None
    # A champion given as a ``models:`` entry of role champion is the job's model, scaler, pins and version.
    champion = CHAMPION_SETTINGS if "models" in given else ()
    values = {key: getattr(config, key) for key in JOB_FIELDS if key in given or key in champion}
    values["job_name"] = config.job_name or Path(source).stem  # names its metrics and lineage, as the CLI would
    return tuple(schema.to_argv(JOB_FIELDS, {**values, "overwrite": True}))


def _template_texts(value: Any) -> list[str]:
    """Every string in a YAML value, however deep in its lists and mappings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    return [s for item in value for s in _template_texts(item)] if isinstance(value, (list, tuple)) else []


#: The ``dag:`` keys whose templates the DAG renders for each run (see dagrun.py); a template in any
#: other ``dag:`` key would reach Airflow or the pod spec as it is written.
RENDERED_DAG_KEYS = ("env", "sensor.path", "sensor.marker", "drift.reference")


def refuse_unrendered(section: Mapping[str, Any], source: str) -> None:
    """A template in a ``dag:`` key that nothing renders fails when the DAG is parsed, naming the key."""
    for key, value in section.items():
        inner = value.items() if isinstance(value, Mapping) and key in ("sensor", "drift") else [(None, value)]
        for name, item in inner:
            dotted = f"{key}.{name}" if name is not None else key
            if dotted in RENDERED_DAG_KEYS:
                continue
            for text in _template_texts(item):
                if TEMPLATE.search(text):
                    raise DagConfigError(
                        f"{source}: dag.{dotted}: {text!r} is a template, but the DAG does not "
                        f"render dag.{dotted} (only the job's keys and dag."
                        f"{', dag.'.join(RENDERED_DAG_KEYS)}); give the value itself"
                    )


def check_templates(values: Mapping[str, Any], source: str) -> None:
    """A template that cannot even be parsed fails when the DAG is parsed, not at 3 a.m."""
    import jinja2

    env = jinja2.Environment()
    for key, value in values.items():
        for text in _template_texts(value):
            if "{{" in text or "{%" in text:
                try:
                    env.parse(text)
                except jinja2.TemplateSyntaxError as exc:
                    raise DagConfigError(f"{source}: {key}: template {text!r} is not valid: {exc}") from None


def parse_job(source: str, data: Mapping[str, Any]) -> JobSettings:
    """Check one job file (already loaded from YAML) into the settings of one DAG."""
    if not isinstance(data, Mapping):
        raise DagConfigError(f"{source}: a job file must hold a mapping")
    section = data.get("dag") or {}
    job = {k: v for k, v in data.items() if k != "dag"}
    dag = read_dag(source, section)
    refuse_unrendered(section, source)
    args = common_args(job, source)
    sections = {f"dag.{key}": section.get(key) for key in ("sensor", "drift") if isinstance(section.get(key), Mapping)}
    check_templates({**job, "dag.env": section.get("env"), **sections}, source)
    if not job.get("input") or not job.get("output"):
        raise DagConfigError(f"{source}: a scheduled job needs 'input' and 'output'")
    try:
        check_output(str(job["output"]))
    except ConfigError as exc:
        raise DagConfigError(f"{source}: {exc}") from None
    name = Path(source).stem
    inputs = _strings(job["input"])
    return JobSettings(
        name=name,
        source=source,
        dag_id=dag.dag_id or f"batchscore_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}",
        dag=dag,
        output=str(job["output"]),
        inputs=inputs,
        storage_options=_string_map(job.get("storage_options") or {}),
        common_args=args,
        sensor_paths=(dag.sensor.path or inputs) if dag.sensor else (),
    )


#: A ``dag:`` section with one of these keys makes a DAG.
SCHEDULE_KEYS = {"schedule", "assets"}


def load_jobs(configs_dir: str | os.PathLike[str]) -> list[JobSettings]:
    """Every ``*.yaml``/``*.yml`` in the folder whose ``dag:`` section has a ``schedule`` or ``assets`` key."""
    jobs = []
    folder = Path(configs_dir)
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        with open(path, encoding="utf-8") as fh:
            try:
                data = load_yaml(fh) or {}
            except DuplicateKeyError as exc:
                raise DagConfigError(f"{path}: {exc}") from None
            except yaml.YAMLError as exc:
                raise DagConfigError(f"{path}: not valid YAML: {exc}") from None
        if isinstance(data, Mapping) and isinstance(data.get("dag"), Mapping) and SCHEDULE_KEYS & set(data["dag"]):
            jobs.append(parse_job(str(path), data))
    return jobs


def asset_uri(output: str) -> str:
    """The stable part of a templated output (``s3://b/scores/dt={{ ds }}/`` -> ``s3://b/scores``)."""
    head = output.split("{{", 1)[0]
    if "{{" in output:
        head = head.rsplit("/", 1)[0]
    head = head.rstrip("/") or "/"
    return head if "://" in head else "file://" + os.path.abspath(head)


def configs_dir(dags_file: str) -> Path:
    """``$BATCHSCORE_CONFIGS_DIR``, else ``configs/`` beside the dags folder."""
    return Path(os.environ.get("BATCHSCORE_CONFIGS_DIR") or Path(dags_file).resolve().parent.parent / "configs")
