"""Build one Airflow DAG per batchscore job config: plan -> score (one task per shard) -> commit.

This module is pure wiring. Building a DAG reads nothing but the YAML file already loaded by
the caller: no storage access, no model loading, and only the provider of the configured runner
is imported (inside the function that builds its operator). All real work happens at run time,
on the worker or in the scoring container, through the ``batchscore`` command line.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import jinja2
import yaml
from airflow.sdk import DAG, Asset, Param, task

try:
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # Airflow 3.0
    from airflow.exceptions import AirflowException, AirflowFailException  # type: ignore[no-redef]

# Light: the job keys and their checks only (no data stack, no model code).
from batchscore.config import CONFIG_KEYS, TEXT_KEYS, check_text
from batchscore.errors import ConfigError

RUNNERS = ("kubernetes", "docker", "local")
#: Parse-time override of every job's runner (``local`` on a laptop or in CI).
RUNNER_ENV = "BATCHSCORE_RUNNER"
PLAN_NAME = "_plan.json"

_DAG_KEYS = (
    "dag_id", "description", "tags", "schedule", "timezone", "start_date", "end_date", "catchup",
    "max_active_runs", "runner", "image", "image_pull_policy", "shards", "rows_per_shard",
    "resources", "env", "secrets", "namespace", "service_account", "kubernetes_conn_id",
    "node_selector", "docker_url", "docker_conn_id", "local_command", "retries", "retry_delay",
    "retry_exponential_backoff", "max_retry_delay", "execution_timeout",
    "max_active_tis_per_dagrun", "sensor", "drift",
)  # fmt: skip
_SENSOR_KEYS = ("path", "marker", "poke_interval", "timeout", "mode")
_DRIFT_KEYS = ("reference", "warn", "fail")
#: Names that hold credentials: they belong in dag.secrets, never in the job file or arguments.
_SECRET_NAME = re.compile(r"secret|token|passw|credential|private|(^|_)key$|access_key", re.IGNORECASE)
#: Exit codes of the CLI that a retry cannot fix (usage/config, invalid input, model error).
_PERMANENT_EXIT_CODES = {2: "usage or config error", 3: "input data invalid", 4: "model error",
                         5: "drift above threshold: review the report, then commit with --accept-drift"}
#: A run's param that picks the date it scores (YYYY-MM-DD), whatever kind of run it is.
DATE_PARAM = "date"
#: Cron presets Airflow knows and croniter does not.
_CRON_PRESETS = {"@quarterly": "0 0 1 */3 *"}


class TemplateUndefinedError(jinja2.UndefinedError, AirflowFailException):
    """A template names a variable the run does not have; rendering it again cannot succeed."""


class RunTemplateUndefined(jinja2.StrictUndefined):
    """Undefined names fail the task at once instead of using up its retries."""

    __slots__ = ()

    def __init__(self, hint: Any = None, obj: Any = jinja2.utils.missing, name: Any = None, exc: Any = None) -> None:
        super().__init__(hint, obj, name, TemplateUndefinedError)


class DagConfigError(ValueError):
    """A job file's ``dag:`` section (or job keys) cannot make a DAG; the message names the file."""


@dataclass(frozen=True)
class SecretRef:
    """A Kubernetes secret exposed as environment: the whole secret, or one key as one variable."""

    secret: str
    key: str | None = None
    env: str | None = None


@dataclass(frozen=True)
class SensorSettings:
    """Wait for the input partition before planning (off unless configured)."""

    path: tuple[str, ...] = ()
    marker: str | None = None
    poke_interval: float = 300.0
    timeout: float = 6 * 3600.0
    mode: str = "reschedule"


@dataclass(frozen=True)
class DriftSettings:
    """Check the committed output against a reference run (by default the previous interval's output)."""

    reference: str | None = None
    warn: float | None = None
    fail: float | None = None


@dataclass(frozen=True)
class JobSettings:
    """Everything one DAG is built from, validated at parse time so a typo fails loudly."""

    name: str
    source: str
    dag_id: str
    schedule: str | None
    timezone: str
    start_date: datetime
    end_date: datetime | None
    catchup: bool
    description: str | None
    tags: tuple[str, ...]
    max_active_runs: int
    runner: str
    image: str | None
    image_pull_policy: str | None
    shards: int | None
    rows_per_shard: int | None
    requests: dict[str, str]
    limits: dict[str, str]
    env: dict[str, str]
    secrets: tuple[SecretRef, ...]
    namespace: str
    service_account: str | None
    kubernetes_conn_id: str | None
    node_selector: dict[str, str]
    docker_url: str | None
    docker_conn_id: str | None
    local_command: tuple[str, ...]
    retries: int
    retry_delay: timedelta
    retry_exponential_backoff: float
    max_retry_delay: timedelta | None
    execution_timeout: timedelta | None
    max_active_tis_per_dagrun: int
    sensor: SensorSettings | None
    output: str
    inputs: tuple[str, ...]
    storage_options: dict[str, str]
    common_args: tuple[str, ...] = field(default=())
    drift: DriftSettings | None = None


# --------------------------------------------------------------------------- parsing


def _fail(source: str, message: str) -> DagConfigError:
    return DagConfigError(f"{source}: {message}")


def _seconds(value: Any, key: str, source: str) -> timedelta | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise _fail(source, f"dag.{key} must be a number of seconds, got {value!r}")
    return timedelta(seconds=value)


def _positive_int(value: Any, key: str, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(source, f"{key} must be a positive integer, got {value!r}")
    return value


def _str_map(value: Any, key: str, source: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(source, f"{key} must be a mapping, got {value!r}")
    return {str(k): _flag_value(v) for k, v in value.items()}


def _flag_value(value: Any) -> str:
    """How a YAML scalar is spelled on the command line (YAML booleans as true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _as_datetime(value: Any, key: str, source: str, tz: str) -> datetime | None:
    """A YAML date or datetime, in the job's time zone unless it names its own."""
    from zoneinfo import ZoneInfo

    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise _fail(source, f"dag.{key} must be a date like 2024-01-01, got {value!r}") from None
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=ZoneInfo(tz))
    raise _fail(source, f"dag.{key} must be a date like 2024-01-01, got {value!r}")


def _plain_env(value: Any, source: str) -> dict[str, str]:
    """``dag.env`` is visible in the UI and the pod spec, so it must not carry credentials."""
    env = _str_map(value, "dag.env", source)
    leaked = sorted(k for k in env if _SECRET_NAME.search(k))
    if leaked:
        raise _fail(source, f"dag.env {', '.join(leaked)} look like credentials; use dag.secrets instead")
    return env


def _secrets(value: Any, source: str) -> tuple[SecretRef, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _fail(source, "dag.secrets must be a list of {secret, key, env} entries")
    refs = []
    for item in value:
        if isinstance(item, str):
            item = {"secret": item}
        if not isinstance(item, Mapping) or not item.get("secret") or set(item) - {"secret", "key", "env"}:
            raise _fail(source, f"dag.secrets entry must be {{secret, key, env}}, got {item!r}")
        if bool(item.get("key")) != bool(item.get("env")):
            raise _fail(source, f"dag.secrets entry {item!r}: give both 'key' and 'env', or neither")
        refs.append(SecretRef(str(item["secret"]), item.get("key"), item.get("env")))
    return tuple(refs)


def _switch(value: Any, name: str, keys: tuple[str, ...], source: str) -> Mapping[str, Any] | None:
    """A ``dag.<name>`` that is off (absent, false), on with defaults (true) or a mapping of ``keys``."""
    if value in (None, False):
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping) or set(value) - set(keys):
        raise _fail(source, f"dag.{name} must be true or a mapping with keys {', '.join(keys)}")
    return value


def _sensor(value: Any, inputs: tuple[str, ...], source: str) -> SensorSettings | None:
    value = _switch(value, "sensor", _SENSOR_KEYS, source)
    if value is None:
        return None
    path = value.get("path") or list(inputs)
    paths = (path,) if isinstance(path, str) else tuple(str(p) for p in path)
    mode = value.get("mode", "reschedule")
    if mode not in ("poke", "reschedule"):
        raise _fail(source, f"dag.sensor.mode must be poke or reschedule, got {mode!r}")
    return SensorSettings(
        path=paths,
        marker=value.get("marker"),
        poke_interval=float(value.get("poke_interval", 300)),
        timeout=float(value.get("timeout", 6 * 3600)),
        mode=mode,
    )


def _drift(value: Any, source: str) -> DriftSettings | None:
    value = _switch(value, "drift", _DRIFT_KEYS, source)
    if value is None:
        return None
    for key in ("warn", "fail"):
        if value.get(key) is not None and (isinstance(value[key], bool) or not isinstance(value[key], (int, float))):
            raise _fail(source, f"dag.drift.{key} must be a PSI threshold (a number), got {value[key]!r}")
    return DriftSettings(value.get("reference"), value.get("warn"), value.get("fail"))


def _backoff(value: Any, source: str) -> float:
    """``true`` means doubling; a number is the multiplier itself; ``false``/0 disables it."""
    if value is None or value is False:
        return 0.0
    if value is True:
        return 2.0
    if isinstance(value, (int, float)) and value >= 0:
        return float(value)
    raise _fail(source, f"dag.retry_exponential_backoff must be true/false or a multiplier, got {value!r}")


def common_args(job: Mapping[str, Any], source: str) -> tuple[str, ...]:
    """The job keys as ``batchscore`` flags: the container has no config file, only its arguments.

    ``--overwrite`` is always given: a run of a logical date owns that date's output.
    """
    unknown = sorted(set(job) - set(CONFIG_KEYS))
    if unknown:
        raise _fail(source, f"unknown key(s) {', '.join(unknown)}")
    options = _str_map(job.get("storage_options"), "storage_options", source)
    leaked = sorted(k for k in options if _SECRET_NAME.search(k))
    if leaked:
        raise _fail(source, f"storage_options {', '.join(leaked)} look like credentials: they would be "
                    "passed as arguments; use dag.secrets or the worker's environment instead")  # fmt: skip
    for key in TEXT_KEYS:
        if job.get(key) is not None:
            try:
                check_text(key, job[key])
            except ConfigError as exc:
                raise _fail(source, str(exc)) from None
    args: list[str] = []
    inputs = job.get("input")
    for value in [inputs] if isinstance(inputs, str) else list(inputs or []):
        args += ["--input", str(value)]
    for key in ("output", "model", "scaler", "model_sha256", "scaler_sha256", "model_version", "batch_size",
                "on_invalid", "max_invalid_fraction", "workers", "storage_timeout", "storage_retries",
                "log_format", "lease_seconds", "lock_timeout", "reference", "drift_warn", "drift_fail"):  # fmt: skip
        if job.get(key) is not None:
            args += ["--" + key.replace("_", "-"), _flag_value(job[key])]
    trusted = job.get("trusted_types")
    for name in [trusted] if isinstance(trusted, str) else list(trusted or []):
        args += ["--trust", str(name)]
    allow_pickle = job.get("allow_pickle", True)
    if not isinstance(allow_pickle, bool):  # a typo must not quietly allow pickles again
        raise _fail(source, f"allow_pickle must be true or false, got {allow_pickle!r}")
    if not allow_pickle:
        args.append("--no-pickle")
    for key in ("features", "keep"):
        value = job.get(key)
        if value:
            args += ["--" + key, value if isinstance(value, str) else ",".join(map(str, value))]
    for key, value in options.items():
        args += ["--storage-option", f"{key}={value}"]
    args.append("--overwrite")
    return tuple(args)


def _strings(value: Any) -> list[str]:
    """Every string in a YAML value, however deep in its lists and mappings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    return [s for item in value for s in _strings(item)] if isinstance(value, list) else []


def _check_templates(values: Mapping[str, Any], source: str) -> None:
    """A template that cannot even be parsed fails when the DAG is parsed, not at 3 a.m."""
    env = jinja2.Environment()
    for key, value in values.items():
        for text in _strings(value):
            if "{{" in text or "{%" in text:
                try:
                    env.parse(text)
                except jinja2.TemplateSyntaxError as exc:
                    raise _fail(source, f"{key}: template {text!r} is not valid: {exc}") from None


def asset_uri(output: str) -> str:
    """The stable part of a templated output (``s3://b/scores/dt={{ ds }}/`` -> ``s3://b/scores``)."""
    head = output.split("{{", 1)[0]
    if "{{" in output:
        head = head.rsplit("/", 1)[0]
    head = head.rstrip("/") or "/"
    return head if "://" in head else "file://" + os.path.abspath(head)


def parse_job(source: str, data: Mapping[str, Any]) -> JobSettings:
    """Validate one job file (already loaded from YAML) into settings for one DAG."""
    if not isinstance(data, Mapping):
        raise _fail(source, "a job file must hold a mapping")
    dag_cfg = data.get("dag") or {}
    if not isinstance(dag_cfg, Mapping):
        raise _fail(source, "the 'dag' section must be a mapping")
    unknown = sorted(set(dag_cfg) - set(_DAG_KEYS))
    if unknown:
        raise _fail(source, f"unknown dag key(s) {', '.join(unknown)}; known: {', '.join(_DAG_KEYS)}")
    job = {k: v for k, v in data.items() if k != "dag"}
    args = common_args(job, source)
    _check_templates({**job, "dag.env": dag_cfg.get("env"), "dag.sensor": dag_cfg.get("sensor"),
                      "dag.drift": dag_cfg.get("drift")}, source)
    if not job.get("input") or not job.get("output"):
        raise _fail(source, "a scheduled job needs 'input' and 'output'")
    name = Path(source).stem

    runner = os.environ.get(RUNNER_ENV) or dag_cfg.get("runner", "kubernetes")
    if runner not in RUNNERS:
        raise _fail(source, f"dag.runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    image = dag_cfg.get("image")
    if runner != "local" and not image:
        raise _fail(source, f"dag.image is required for the {runner} runner")
    shards = _positive_int(dag_cfg.get("shards"), "dag.shards", source)
    rows_per_shard = _positive_int(dag_cfg.get("rows_per_shard"), "dag.rows_per_shard", source)
    if shards and rows_per_shard:
        raise _fail(source, "give dag.shards or dag.rows_per_shard, not both")
    resources = dag_cfg.get("resources") or {}
    if not isinstance(resources, Mapping) or set(resources) - {"requests", "limits"}:
        raise _fail(source, "dag.resources must be a mapping with 'requests' and/or 'limits'")
    local_command = dag_cfg.get("local_command") or ()
    if isinstance(local_command, str):
        local_command = shlex.split(local_command)
    inputs = job["input"]
    inputs = (inputs,) if isinstance(inputs, str) else tuple(str(i) for i in inputs)
    tz = str(dag_cfg.get("timezone") or "UTC")
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(tz)
    except (KeyError, ValueError):
        raise _fail(source, f"dag.timezone {tz!r} is not a known time zone") from None
    start_date = _as_datetime(dag_cfg.get("start_date"), "start_date", source, tz)
    if start_date is None:
        raise _fail(source, "dag.start_date is required")
    schedule = dag_cfg.get("schedule")
    if schedule is not None and not isinstance(schedule, str):
        raise _fail(source, f"dag.schedule must be a cron expression or preset, got {schedule!r}")
    tags = dag_cfg.get("tags") or []

    return JobSettings(
        name=name,
        source=source,
        dag_id=str(dag_cfg.get("dag_id") or f"batchscore_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"),
        schedule=schedule,
        timezone=tz,
        start_date=start_date,
        end_date=_as_datetime(dag_cfg.get("end_date"), "end_date", source, tz),
        catchup=bool(dag_cfg.get("catchup", False)),
        description=dag_cfg.get("description"),
        tags=("batchscore", *map(str, tags)),
        max_active_runs=_positive_int(dag_cfg.get("max_active_runs", 1), "dag.max_active_runs", source) or 1,
        runner=runner,
        image=image,
        image_pull_policy=dag_cfg.get("image_pull_policy"),
        shards=shards,
        rows_per_shard=rows_per_shard,
        requests=_str_map(resources.get("requests"), "dag.resources.requests", source),
        limits=_str_map(resources.get("limits"), "dag.resources.limits", source),
        env=_plain_env(dag_cfg.get("env"), source),
        secrets=_secrets(dag_cfg.get("secrets"), source),
        namespace=str(dag_cfg.get("namespace") or "default"),
        service_account=dag_cfg.get("service_account"),
        kubernetes_conn_id=dag_cfg.get("kubernetes_conn_id"),
        node_selector=_str_map(dag_cfg.get("node_selector"), "dag.node_selector", source),
        docker_url=dag_cfg.get("docker_url"),
        docker_conn_id=dag_cfg.get("docker_conn_id"),
        local_command=tuple(str(c) for c in local_command),
        retries=int(dag_cfg.get("retries", 2)),
        retry_delay=_seconds(dag_cfg.get("retry_delay", 60), "retry_delay", source) or timedelta(0),
        retry_exponential_backoff=_backoff(dag_cfg.get("retry_exponential_backoff", True), source),
        max_retry_delay=_seconds(dag_cfg.get("max_retry_delay"), "max_retry_delay", source),
        execution_timeout=_seconds(dag_cfg.get("execution_timeout"), "execution_timeout", source),
        max_active_tis_per_dagrun=_positive_int(
            dag_cfg.get("max_active_tis_per_dagrun", 8), "dag.max_active_tis_per_dagrun", source
        )
        or 8,
        sensor=_sensor(dag_cfg.get("sensor"), inputs, source),
        drift=_drift(dag_cfg.get("drift"), source),
        output=str(job["output"]),
        inputs=inputs,
        storage_options=_str_map(job.get("storage_options"), "storage_options", source),
        common_args=args,
    )


def load_jobs(configs_dir: str | os.PathLike[str]) -> list[JobSettings]:
    """Every ``*.yaml``/``*.yml`` in the folder whose ``dag:`` section has a ``schedule`` key."""
    jobs = []
    folder = Path(configs_dir)
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        with open(path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise _fail(str(path), f"not valid YAML: {exc}") from None
        if isinstance(data, Mapping) and isinstance(data.get("dag"), Mapping) and "schedule" in data["dag"]:
            jobs.append(parse_job(str(path), data))
    return jobs


# --------------------------------------------------------------------------- run time helpers


def _cli(settings: JobSettings) -> list[str]:
    """How the worker starts ``batchscore``: the configured wrapper, else this interpreter."""
    return list(settings.local_command) or [sys.executable, "-m", "batchscore"]


def run_cli(argv: list[str], env: Mapping[str, str] | None = None, capture_stdout: bool = False) -> str:
    """Run one ``batchscore`` command on the worker, streaming its log into the task log.

    A usage, data or model error (exit 2, 3, 4) fails the task without retries: running the same
    command again cannot fix it. Anything else (exit 1, a killed process) is left to the retries.
    """
    import logging
    import subprocess

    log = logging.getLogger("batchscore.dag")
    log.info("running: %s", shlex.join(argv))
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE if capture_stdout else None,
        stderr=None,
        env={**os.environ, **(env or {})},
        text=True,
    )
    out, _ = proc.communicate()
    command = next((a for a in argv if a in ("plan", "run", "commit", "validate", "report")), "")
    permanent = permanent_failure(proc.returncode, f"batchscore {command}")
    if permanent is not None:
        raise permanent
    if proc.returncode != 0:
        raise AirflowException(f"batchscore {command} exited with code {proc.returncode}")
    return out or ""


def last_interval(schedule: str | None, tz: str, moment: datetime) -> tuple[datetime, datetime] | None:
    """The schedule's last complete interval at ``moment`` (what the scheduler's latest run covered)."""
    from zoneinfo import ZoneInfo

    from croniter import croniter

    if schedule is None or schedule in ("@once", "@continuous"):
        return None
    zone = ZoneInfo(tz)
    local = moment.astimezone(zone).replace(tzinfo=None)
    fires = croniter(_CRON_PRESETS.get(schedule, schedule), local + timedelta(microseconds=1))
    end = fires.get_prev(datetime)
    start = fires.get_prev(datetime)
    return start.replace(tzinfo=zone), end.replace(tzinfo=zone)


def run_dates(settings: JobSettings, params: Mapping[str, Any], logical_date: Any, run_after: Any) -> dict[str, Any]:
    """The date keys (``ds``, ``logical_date``, ...) that a run's templates see.

    A run with a logical date (the scheduler's runs, ``--logical-date``, backfills) keeps Airflow's
    own values. A run without one (``airflow dags trigger`` or the API on Airflow 3) scores the
    schedule's last complete interval at its ``run_after``, the date the scheduler's latest run
    scored; a job without a cron schedule scores the ``run_after`` date. The ``date`` param wins over
    both. Returns ``{}`` when Airflow's own values stand.
    """
    from zoneinfo import ZoneInfo

    import pendulum

    chosen = params.get(DATE_PARAM)
    if chosen:
        try:
            day = date.fromisoformat(str(chosen))
        except ValueError:
            message = f"the '{DATE_PARAM}' param must be a date like 2024-06-01, got {chosen!r}"
            raise AirflowFailException(message) from None
        start = datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(settings.timezone))
        end, ds = start + timedelta(days=1), day.isoformat()
    elif logical_date is not None:
        return {}
    else:
        moment = pendulum.instance(run_after) if run_after is not None else pendulum.now("UTC")
        start, end = last_interval(settings.schedule, settings.timezone, moment) or (moment, moment)
        ds = pendulum.instance(start).in_timezone("UTC").strftime("%Y-%m-%d")  # as Airflow's own ``ds``
    return interval_dates(start, end, ds)


def interval_dates(start: datetime, end: datetime, ds: str) -> dict[str, Any]:
    """The date keys templates see for the interval from ``start`` to ``end``."""
    import pendulum

    start, end = pendulum.instance(start), pendulum.instance(end)
    ts = start.isoformat()
    return {
        "logical_date": start,
        "data_interval_start": start,
        "data_interval_end": end,
        "ds": ds,
        "ds_nodash": ds.replace("-", ""),
        "ts": ts,
        "ts_nodash": start.strftime("%Y%m%dT%H%M%S"),
        "ts_nodash_with_tz": ts.replace("-", "").replace(":", ""),
    }


def render(settings: JobSettings, value: Any, context: Mapping[str, Any]) -> Any:
    """Render the job's templates for this run, on every kind of run (see ``run_dates``).

    A template that still fails fails the task for good, naming the job file: a retry renders
    the same template.
    """
    import logging

    dag_run = context["dag_run"]
    dates = run_dates(settings, context["params"], getattr(dag_run, "logical_date", None),
                      getattr(dag_run, "run_after", None))  # fmt: skip
    if dates:
        logging.getLogger("batchscore.dag").info("templates see ds=%s (%s)", dates["ds"], "the 'date' param"
                                                 if context["params"].get(DATE_PARAM) else "no logical date: "
                                                 "the schedule's last complete interval")  # fmt: skip
    task_ = context["task"]
    try:
        return task_.render_template(value, {**context, **dates}, task_.dag.get_template_env())
    except jinja2.TemplateError as exc:
        raise AirflowFailException(f"{settings.source}: cannot render the job's templates: {exc}") from None


def previous_output(settings: JobSettings, context: Mapping[str, Any]) -> str | None:
    """The output of the interval before this run's (the default drift reference); None without a
    cron schedule."""
    import pendulum

    dag_run = context["dag_run"]
    dates = run_dates(settings, context["params"], getattr(dag_run, "logical_date", None),
                      getattr(dag_run, "run_after", None)) or context  # fmt: skip
    start = dates.get("logical_date")  # the date this run scores and names its output after
    previous = last_interval(settings.schedule, settings.timezone, start) if start is not None else None
    if previous is None:
        return None
    ds = pendulum.instance(previous[0]).in_timezone("UTC").strftime("%Y-%m-%d")
    task_ = context["task"]
    rendered = task_.render_template(settings.output, {**context, **interval_dates(*previous, ds)},
                                     task_.dag.get_template_env())  # fmt: skip
    return str(rendered)


def drift_args(settings: JobSettings, context: Mapping[str, Any], output: str) -> list[str]:
    """``--reference``/``--drift-warn``/``--drift-fail`` for commit, from ``dag.drift``."""
    import logging

    drift = settings.drift
    if drift is None:
        return []
    reference = render(settings, drift.reference, context) if drift.reference else previous_output(settings, context)
    if not reference or reference.rstrip("/") == output.rstrip("/"):
        logging.getLogger("batchscore.dag").warning("drift not checked: no reference output before %s", output)
        return []
    args = ["--reference", reference]
    args += ["--drift-warn", str(drift.warn)] if drift.warn is not None else []
    return args + (["--drift-fail", str(drift.fail)] if drift.fail is not None else [])


def asset_extra(settings: JobSettings, context: Mapping[str, Any], output: str) -> dict[str, Any]:
    """What the Asset event tells consumers: the output, its rows, invalid rows and largest PSI."""
    import json

    import logging

    options = render(settings, dict(settings.storage_options), context)
    argv = [*_cli(settings), "report", output, *[f"--storage-option={k}={v}" for k, v in options.items()]]
    try:  # the output is committed: a report that cannot be read must not fail the task
        report = json.loads(run_cli(argv, env=settings.env, capture_stdout=True))
    except Exception as exc:
        logging.getLogger("batchscore.dag").warning("no run report for the Asset event: %s", exc)
        return {"output": output}
    drift = report.get("drift") or {}
    return {"output": output, "rows": report["rows"]["scored"], "invalid_rows": report["rows"]["invalid"],
            "max_psi": drift.get("max_psi"), "max_psi_column": drift.get("max_psi_column")}


def plan_uri(output: str) -> str:
    return output.rstrip("/") + "/" + PLAN_NAME


def size_args(settings: JobSettings, params: Mapping[str, Any]) -> list[str]:
    """``--shards``/``--rows-per-shard``: a run's params win over the job file."""
    shards, rows = params.get("shards"), params.get("rows_per_shard")
    if shards and rows:
        raise ValueError("give the 'shards' or the 'rows_per_shard' param, not both")
    if not shards and not rows:
        shards, rows = settings.shards, settings.rows_per_shard
    if shards:
        return ["--shards", str(int(shards))]
    if rows:
        return ["--rows-per-shard", str(int(rows))]
    return []


def shard_arguments(common: list[str], plan: str, num_shards: int) -> list[list[str]]:
    """One argument list per shard: ``run <job flags> --plan P --shard I``."""
    return [["run", *common, "--plan", plan, "--shard", str(i)] for i in range(num_shards)]


def input_present(paths: list[str], marker: str | None, storage_options: Mapping[str, str]) -> bool:
    """True when every input path exists (or its marker file does); a glob needs one match."""
    from fsspec.core import url_to_fs

    for path in paths:
        options = dict(storage_options) if "://" in path and not path.startswith("file://") else {}
        fs, stripped = url_to_fs(path, **options)
        if marker:
            if not fs.exists(stripped.rstrip("/") + "/" + marker):
                return False
        elif any(ch in stripped for ch in "*?["):
            if not fs.glob(stripped):
                return False
        elif not fs.exists(stripped):
            return False
    return True


# --------------------------------------------------------------------------- operators


def permanent_failure(exit_code: int | None, where: str) -> AirflowFailException | None:
    """The no-retry failure for an exit code that no retry can fix, else None."""
    if exit_code not in _PERMANENT_EXIT_CODES:
        return None
    return AirflowFailException(
        f"{where} exited with code {exit_code} ({_PERMANENT_EXIT_CODES[exit_code]}); not retrying"
    )


def pod_exit_code(pod: Any, container: str) -> int | None:
    """The exit code of one container of a finished pod, if it terminated."""
    statuses = (pod.status.container_statuses if pod is not None and pod.status else None) or []
    status = next((s for s in statuses if s.name == container), None)
    terminated = status.state.terminated if status is not None and status.state else None
    return terminated.exit_code if terminated is not None else None


def _k8s_score(settings: JobSettings, shard_args: Any) -> Any:
    """Score shards in pods: the image's entrypoint is ``batchscore``, the arguments the shard."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.providers.cncf.kubernetes.secret import Secret
    from kubernetes.client import models as k8s

    class BatchscorePodOperator(KubernetesPodOperator):
        """Fails for good when the scorer exits 2, 3 or 4 (every path, deferrable too, ends in cleanup)."""

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

    secrets = [Secret("env", ref.env if ref.key else None, ref.secret, ref.key) for ref in settings.secrets]
    resources = k8s.V1ResourceRequirements(requests=settings.requests or None, limits=settings.limits or None)
    optional: dict[str, Any] = {}
    if settings.kubernetes_conn_id:
        optional["kubernetes_conn_id"] = settings.kubernetes_conn_id
    if settings.service_account:
        optional["service_account_name"] = settings.service_account
    if settings.image_pull_policy:
        optional["image_pull_policy"] = settings.image_pull_policy
    return BatchscorePodOperator.partial(
        task_id="score",
        name=f"batchscore-{settings.name}".lower().replace("_", "-")[:50],
        image="{{ params.image }}",
        namespace=settings.namespace,
        env_vars=dict(settings.env),
        secrets=secrets,
        container_resources=resources,
        node_selector=settings.node_selector or None,
        labels={"app": "batchscore", "batchscore-job": settings.name.lower().replace("_", "-")[:63]},
        get_logs=True,
        on_finish_action="delete_succeeded_pod",
        max_active_tis_per_dagrun=settings.max_active_tis_per_dagrun,
        execution_timeout=settings.execution_timeout,
        **optional,
    ).expand(arguments=shard_args)


def _docker_score(settings: JobSettings, shard_args: Any) -> Any:
    """Score shards in local Docker containers; secrets are forwarded from the worker's environment."""
    from airflow.providers.docker.exceptions import DockerContainerFailedSkipException
    from airflow.providers.docker.operators.docker import DockerOperator

    class BatchscoreDockerOperator(DockerOperator):
        """Reads secret values at run time only, so they never reach the DAG, the UI or the logs.

        Exit codes 2, 3 and 4 are the provider's "skip" codes, turned here into a failure without
        retries: the provider reports those codes apart from any other failure.
        """

        def __init__(self, *, secret_env: tuple[str, ...] = (), **kwargs: Any) -> None:
            super().__init__(skip_on_exit_code=sorted(_PERMANENT_EXIT_CODES), **kwargs)
            self.secret_env = secret_env

        def execute(self, context: Any) -> Any:
            self._private_environment = {k: os.environ[k] for k in self.secret_env if k in os.environ}
            try:
                return super().execute(context)
            except DockerContainerFailedSkipException as exc:
                codes = ", ".join(f"{code} ({meaning})" for code, meaning in _PERMANENT_EXIT_CODES.items())
                raise AirflowFailException(
                    f"the scoring container exited with one of {codes}; see its log above; not retrying"
                ) from exc

    optional: dict[str, Any] = {}
    if settings.docker_url:
        optional["docker_url"] = settings.docker_url
    if settings.docker_conn_id:
        optional["docker_conn_id"] = settings.docker_conn_id
    if "memory" in settings.limits:
        optional["mem_limit"] = docker_memory(settings.limits["memory"])
    if "cpu" in settings.limits:
        optional["cpus"] = k8s_cpu(settings.limits["cpu"])
    return BatchscoreDockerOperator.partial(
        task_id="score",
        image="{{ params.image }}",
        environment=dict(settings.env),
        secret_env=tuple(ref.env for ref in settings.secrets if ref.env),
        auto_remove="success",
        mount_tmp_dir=False,
        max_active_tis_per_dagrun=settings.max_active_tis_per_dagrun,
        execution_timeout=settings.execution_timeout,
        **optional,
    ).expand(command=shard_args)


def _local_score(settings: JobSettings, shard_args: Any) -> Any:
    """Score shards as subprocesses of the worker (laptops, CI): same command line as the container."""

    @task(
        task_id="score",
        max_active_tis_per_dagrun=settings.max_active_tis_per_dagrun,
        execution_timeout=settings.execution_timeout,
    )
    def score(arguments: list[str]) -> None:
        run_cli([*_cli(settings), *arguments], env=settings.env)

    return score.expand(arguments=shard_args)


def docker_memory(quantity: str) -> str:
    """A Kubernetes memory quantity (``4Gi``, ``512Mi``, ``1G``) as Docker spells it (``4g``)."""
    match = re.fullmatch(r"(\d+)([KMGT]i?)?", str(quantity).strip())
    if not match:
        raise ValueError(f"cannot convert memory limit {quantity!r} for Docker")
    number, unit = match.groups()
    return number + (unit[0].lower() if unit else "b")


def k8s_cpu(quantity: str) -> float:
    """A Kubernetes CPU quantity (``2``, ``500m``) as a number of CPUs."""
    text = str(quantity).strip()
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --------------------------------------------------------------------------- the DAG


def _retry_kwargs(settings: JobSettings) -> dict[str, Any]:
    from airflow.sdk import BaseOperator

    backoff: float | bool = settings.retry_exponential_backoff
    if isinstance(getattr(BaseOperator, "retry_exponential_backoff", 0), bool):  # Airflow < 3.2
        backoff = bool(backoff)
    kwargs: dict[str, Any] = {
        "retries": settings.retries,
        "retry_delay": settings.retry_delay,
        "retry_exponential_backoff": backoff,
    }
    if settings.max_retry_delay is not None:
        kwargs["max_retry_delay"] = settings.max_retry_delay
    return kwargs


def timetable(settings: JobSettings) -> Any:
    """Cron schedules cover data intervals, whatever ``create_cron_data_intervals`` says.

    The run for 2024-06-01 of a daily job starts once that day is over and its ``{{ ds }}`` is
    2024-06-01: the date a run scores is the date its output is named after.
    """
    if settings.schedule is None or settings.schedule in ("@once", "@continuous"):
        return settings.schedule
    try:
        from airflow.sdk import CronDataIntervalTimetable
    except ImportError:  # Airflow 3.0
        from airflow.timetables.interval import CronDataIntervalTimetable  # type: ignore[no-redef]
    return CronDataIntervalTimetable(settings.schedule, timezone=settings.timezone)


def build_dag(settings: JobSettings) -> DAG:
    """plan -> score (mapped over the plan's shards) -> commit, with the output as an Asset."""
    output_asset = Asset(name=f"batchscore/{settings.name}", uri=asset_uri(settings.output))
    params: dict[str, Param] = {
        "shards": Param(None, type=["null", "integer"], minimum=1,
                        description=f"Shards for this run (job file: {settings.shards or 'unset'})."),
        "rows_per_shard": Param(None, type=["null", "integer"], minimum=1,
                                description=f"Rows per shard (job file: {settings.rows_per_shard or 'unset'})."),
    }  # fmt: skip
    params[DATE_PARAM] = Param(None, type=["null", "string"], pattern=r"^\d{4}-\d{2}-\d{2}$",
                               description="Score this date (YYYY-MM-DD) instead of the run's own.")  # fmt: skip
    if settings.runner != "local":
        params["image"] = Param(settings.image, type="string", description="Scoring image for this run.")

    with DAG(
        dag_id=settings.dag_id,
        description=settings.description or f"batchscore job {settings.name} ({settings.source})",
        schedule=timetable(settings),
        start_date=settings.start_date,
        end_date=settings.end_date,
        catchup=settings.catchup,
        max_active_runs=settings.max_active_runs,
        tags=list(settings.tags),
        params=params,
        default_args=_retry_kwargs(settings),
        template_undefined=RunTemplateUndefined,
        doc_md=f"Scores `{', '.join(settings.inputs)}` into `{settings.output}` "
        f"with the **{settings.runner}** runner. Job file: `{settings.source}`.",
    ) as dag:
        @task(task_id="plan")
        def plan() -> list[list[str]]:
            """Split the input into shards (Parquet footers only) and hand each shard its arguments."""
            import json

            from airflow.sdk import get_current_context

            context = get_current_context()
            params = context["params"]
            common, output = render(settings, [list(settings.common_args), settings.output], context)
            out = plan_uri(output)
            argv = [*_cli(settings), "plan", *common, *size_args(settings, params), "--out", out]
            document = json.loads(run_cli(argv, env=settings.env, capture_stdout=True))
            num_shards = int(document["num_shards"])
            if num_shards < 1:
                raise ValueError(f"the plan for {output} has no shard")
            return shard_arguments(common, out, num_shards)

        @task(task_id="commit", outlets=[output_asset])
        def commit() -> str:
            """Publish the output only once every shard's receipt checks out."""
            from airflow.sdk import get_current_context

            context = get_current_context()
            common, output = render(settings, [list(settings.common_args), settings.output], context)
            drift = drift_args(settings, context, output)
            run_cli([*_cli(settings), "commit", *common, *drift, "--plan", plan_uri(output)], env=settings.env)
            context["outlet_events"][output_asset].extra = asset_extra(settings, context, output)
            return output

        shard_args = plan()
        if settings.sensor is not None:
            sensor = settings.sensor

            @task.sensor(
                task_id="wait_for_input",
                poke_interval=sensor.poke_interval,
                timeout=sensor.timeout,
                mode=sensor.mode,
            )
            def wait_for_input() -> bool:
                from airflow.sdk import get_current_context

                values = [list(sensor.path), dict(settings.storage_options)]
                paths, storage_options = render(settings, values, get_current_context())
                return input_present(paths, sensor.marker, storage_options)

            wait_for_input() >> shard_args

        builders = {"kubernetes": _k8s_score, "docker": _docker_score, "local": _local_score}
        scored = builders[settings.runner](settings, shard_args)
        scored >> commit()
    return dag


def configs_dir(dags_file: str) -> Path:
    """``$BATCHSCORE_CONFIGS_DIR``, else ``configs/`` beside the dags folder."""
    return Path(os.environ.get("BATCHSCORE_CONFIGS_DIR") or Path(dags_file).resolve().parent.parent / "configs")
