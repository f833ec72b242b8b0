"""What the DAG's tasks do when they run: start ``batchscore``, render a run's dates, judge exit codes.

The DAG factory in ``dags/`` only wires tasks; the code those tasks run lives here, beside the
``dag:`` declaration (dagspec.py), so it is tested like the rest of the package. Needs Airflow.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import Any

import jinja2

try:
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # Airflow 3.0
    from airflow.exceptions import AirflowException, AirflowFailException  # type: ignore[no-redef]  # 3.0's home

from .. import schema
from ..config import COMMAND_FIELDS, PLAN_FIELDS, shard_size_conflict
from ..config import FIELDS as JOB_FIELDS
from ..errors import NOTHING_NEW, PERMANENT_EXIT_CODES
from ..io.layout import plan_path
from .dagspec import ONE_OFF_SCHEDULES, JobSettings

log = logging.getLogger(__name__)
#: A run's param that picks the date it scores (YYYY-MM-DD), whatever kind of run it is.
DATE_PARAM = "date"
#: Cron presets Airflow knows and croniter does not.
_CRON_PRESETS = {"@quarterly": "0 0 1 */3 *"}
#: The shard task's OpenLineage run, handed to the scorer so its lineage runs hang under the task's
#: (see batchscore.observe.lineage). Rendered where the worker has the OpenLineage provider (whose plugin
#: holds the macros), else empty.
_LINEAGE_MACRO = (
    "{{{{ macros.OpenLineageProviderPlugin.{0}(task_instance) if macros is defined and "
    "macros.OpenLineageProviderPlugin is defined and macros.OpenLineageProviderPlugin.{0} is defined "
    "else '' }}}}"
)
LINEAGE_ENV = {
    "OPENLINEAGE_PARENT_ID": _LINEAGE_MACRO.format("lineage_parent_id"),
    "OPENLINEAGE_ROOT_PARENT_ID": _LINEAGE_MACRO.format("lineage_root_parent_id"),
}


class TemplateUndefinedError(jinja2.UndefinedError, AirflowFailException):
    """A template names a variable the run does not have; rendering it again cannot succeed."""


class RunTemplateUndefined(jinja2.StrictUndefined):
    """Undefined names fail the task at once instead of using up its retries."""

    __slots__ = ()

    def __init__(self, hint: Any = None, obj: Any = jinja2.utils.missing, name: Any = None, exc: Any = None) -> None:
        super().__init__(hint, obj, name, TemplateUndefinedError)


def cli_command(settings: JobSettings) -> list[str]:
    """How the worker starts ``batchscore``: the configured wrapper, else this interpreter."""
    return list(settings.dag.local_command) or [sys.executable, "-m", "batchscore"]


def run_cli(argv: list[str], env: Mapping[str, str] | None = None, capture_stdout: bool = False) -> str:
    """Run one ``batchscore`` command on the worker, streaming its log into the task log.

    A usage, data or model error, or drift above ``dag.drift.fail`` (``PERMANENT_EXIT_CODES``), fails the
    task without retries: running the same command again cannot fix it. Anything else (exit 1, a killed process) is left to the retries.
    """
    import subprocess

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
        start = datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(settings.dag.timezone))
        end, ds = start + timedelta(days=1), day.isoformat()
    elif logical_date is not None:
        return {}
    else:
        moment = pendulum.instance(run_after) if run_after is not None else pendulum.now("UTC")
        start, end = last_interval(settings.dag.schedule, settings.dag.timezone, moment) or (moment, moment)
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
    dag_run = context["dag_run"]
    dates = run_dates(
        settings, context["params"], getattr(dag_run, "logical_date", None), getattr(dag_run, "run_after", None)
    )
    if dates:
        why = (
            "the 'date' param"
            if context["params"].get(DATE_PARAM)
            else "no logical date: the schedule's last complete interval"
        )
        log.info("templates see ds=%s (%s)", dates["ds"], why)
    task_ = context["task"]
    try:
        return task_.render_template(value, {**context, **dates}, task_.dag.get_template_env())
    except jinja2.TemplateError as exc:
        raise AirflowFailException(f"{settings.source}: cannot render the job's templates: {exc}") from None


class RunDatesMixin:
    """For an operator class: its templated fields (``dag.env`` among them) see the same dates as the
    job's templates (see ``run_dates``), so ``{{ ds }}`` means one date everywhere in a run."""

    job_settings: JobSettings

    def _do_render_template_fields(
        self, parent: Any, template_fields: Any, context: Any, jinja_env: Any, seen_oids: set[int]
    ) -> None:
        dag_run = context.get("dag_run")
        if dag_run is not None:
            dates = run_dates(
                self.job_settings,
                context.get("params") or {},
                getattr(dag_run, "logical_date", None),
                getattr(dag_run, "run_after", None),
            )
            context = {**context, **dates}
        super()._do_render_template_fields(parent, template_fields, context, jinja_env, seen_oids)  # type: ignore[misc]  # a mixin


def rendered_env(settings: JobSettings, context: Mapping[str, Any]) -> dict[str, str]:
    """``dag.env`` for the command the worker itself runs, rendered like the job's templates."""
    return render(settings, dict(settings.dag.env), context)


def score_environment(settings: JobSettings) -> dict[str, str]:
    """A scoring container's environment: the job's ``dag.env`` and its task's lineage ids (templates
    that the operator renders)."""
    return {**settings.dag.env, **LINEAGE_ENV}


def local_score_environment(settings: JobSettings) -> dict[str, str]:
    """A local scoring subprocess's environment: ``score_environment`` rendered for the running task,
    with the same dates as the job's templates."""
    from airflow.sdk import get_current_context

    return render(settings, score_environment(settings), get_current_context())


def previous_output(settings: JobSettings, context: Mapping[str, Any]) -> str | None:
    """The output of the interval before this run's (the default drift reference); None without a
    cron schedule."""
    import pendulum

    dag_run = context["dag_run"]
    dates = (
        run_dates(
            settings, context["params"], getattr(dag_run, "logical_date", None), getattr(dag_run, "run_after", None)
        )
        or context
    )
    start = dates.get("logical_date")  # the date this run scores and names its output after
    previous = last_interval(settings.dag.schedule, settings.dag.timezone, start) if start is not None else None
    if previous is None:
        return None
    ds = pendulum.instance(previous[0]).in_timezone("UTC").strftime("%Y-%m-%d")
    task_ = context["task"]
    rendered = task_.render_template(
        settings.output, {**context, **interval_dates(*previous, ds)}, task_.dag.get_template_env()
    )
    return str(rendered)


def drift_args(settings: JobSettings, context: Mapping[str, Any], output: str) -> list[str]:
    """``--reference``/``--drift-warn``/``--drift-fail`` for commit, from ``dag.drift``."""
    drift = settings.dag.drift
    if drift is None:
        return []
    reference = render(settings, drift.reference, context) if drift.reference else previous_output(settings, context)
    if not reference or reference.rstrip("/") == output.rstrip("/"):
        log.warning("drift not checked: no reference output before %s", output)
        return []
    return schema.to_argv(JOB_FIELDS, {"reference": reference, "drift_warn": drift.warn, "drift_fail": drift.fail})


def asset_extra(settings: JobSettings, context: Mapping[str, Any], output: str) -> dict[str, Any]:
    """What the Asset event tells consumers: the output, its rows, invalid rows and largest PSI."""
    import json

    options = render(settings, dict(settings.storage_options), context)
    argv = [*cli_command(settings), "report", output, *schema.to_argv(JOB_FIELDS, {"storage_options": options})]
    try:  # the output is committed: a report that cannot be read must not fail the task
        report = json.loads(run_cli(argv, env=rendered_env(settings, context), capture_stdout=True))
    except Exception as exc:
        log.warning("no run report for the Asset event: %s", exc)
        return {"output": output}
    drift = report.get("drift") or {}
    return {
        "output": output,
        "rows": report["rows"]["scored"],
        "invalid_rows": report["rows"]["invalid"],
        "max_psi": drift.get("max_psi"),
        "max_psi_column": drift.get("max_psi_column"),
    }


def size_args(settings: JobSettings, params: Mapping[str, Any]) -> list[str]:
    """``--shards``/``--rows-per-shard``: a run's params win over the job file."""
    shards, rows = params.get("shards") or None, params.get("rows_per_shard") or None
    conflict = shard_size_conflict(shards, rows, lambda key: f"the '{key}' param")
    if conflict:
        raise ValueError(conflict)
    if shards is None and rows is None:
        shards, rows = settings.dag.shards, settings.dag.rows_per_shard
    return schema.to_argv(
        COMMAND_FIELDS,
        {"shards": None if shards is None else int(shards), "rows_per_shard": None if rows is None else int(rows)},
    )


#: The XCom key under which the plan task hands the commit the plan's pin (see ``plan_shards``).
PIN_XCOM_KEY = "pin"


def shard_arguments(common: list[str], plan: str, num_shards: int, pin: Sequence[str] = ()) -> list[list[str]]:
    """One argument list per shard: ``run <job flags> <pin> --plan P --shard I``, where the pin
    (``--plan-sha256``, ``--model-sha256``...) holds the shard to the plan and model just made."""
    return [
        [
            "run",
            *common,
            *pin,
            *schema.to_argv(PLAN_FIELDS, {"plan": plan}),
            *schema.to_argv(COMMAND_FIELDS, {"shard": i}),
        ]
        for i in range(num_shards)
    ]


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


def permanent_failure(exit_code: int | None, where: str) -> AirflowFailException | None:
    """The no-retry failure for an exit code that no retry can fix, else None."""
    if exit_code not in PERMANENT_EXIT_CODES:
        return None
    return AirflowFailException(
        f"{where} exited with code {exit_code} ({PERMANENT_EXIT_CODES[exit_code]}); not retrying"
    )


def pod_exit_code(pod: Any, container: str) -> int | None:
    """The exit code of one container of a finished pod, if it terminated."""
    statuses = (pod.status.container_statuses if pod is not None and pod.status else None) or []
    status = next((s for s in statuses if s.name == container), None)
    terminated = status.state.terminated if status is not None and status.state else None
    return terminated.exit_code if terminated is not None else None


def retry_kwargs(settings: JobSettings) -> dict[str, Any]:
    """Every task's retry settings, in the types this Airflow takes."""
    from airflow.sdk import BaseOperator

    spec = settings.dag
    backoff: float | bool = spec.retry_exponential_backoff
    if isinstance(getattr(BaseOperator, "retry_exponential_backoff", 0), bool):  # Airflow < 3.2
        backoff = bool(backoff)
    kwargs: dict[str, Any] = {
        "retries": spec.retries,
        "retry_delay": timedelta(seconds=spec.retry_delay),
        "retry_exponential_backoff": backoff,
    }
    if spec.max_retry_delay is not None:
        kwargs["max_retry_delay"] = timedelta(seconds=spec.max_retry_delay)
    return kwargs


def execution_timeout(settings: JobSettings) -> timedelta | None:
    seconds = settings.dag.execution_timeout
    return None if seconds is None else timedelta(seconds=seconds)


def secret_environment(names: tuple[str, ...], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The secret variables a Docker container gets, read from the worker's environment when the
    task runs, so their values never reach the DAG, the UI or the logs; unset ones are left out."""
    return {name: environ[name] for name in names if name in environ}


def plan_uri(output: str) -> str:
    """Where the plan task stores the plan the shards and the commit read: in the output's state
    folder, never inside the output, where readers look."""
    return plan_path(output)


def timetable(settings: JobSettings) -> Any:
    """Cron schedules cover data intervals, whatever ``create_cron_data_intervals`` says; with
    ``dag.assets``, Asset events start runs too (alone, or Asset or time).

    The run for 2024-06-01 of a daily job starts once that day is over and its ``{{ ds }}`` is
    2024-06-01: the date a run scores is the date its output is named after.
    """
    condition = upstream_assets(settings)
    if settings.dag.schedule is None or settings.dag.schedule in ONE_OFF_SCHEDULES:
        return condition if condition is not None else settings.dag.schedule
    try:
        from airflow.sdk import CronDataIntervalTimetable
    except ImportError:  # Airflow 3.0
        from airflow.timetables.interval import CronDataIntervalTimetable  # type: ignore[assignment]  # 3.0's home
    cron = CronDataIntervalTimetable(settings.dag.schedule, timezone=settings.dag.timezone)
    if condition is None:
        return cron
    try:
        from airflow.sdk import AssetOrTimeSchedule
    except ImportError:  # Airflow 3.0
        from airflow.timetables.assets import AssetOrTimeSchedule  # type: ignore[assignment]  # 3.0's home
    return AssetOrTimeSchedule(timetable=cron, assets=condition)


def upstream_assets(settings: JobSettings) -> Any:
    """``dag.assets`` as the condition Airflow schedules on, or None without them.

    Each is a reference by URI (``Asset.ref``): it matches the producer's Asset whatever name the
    producer gave it (a batchscore job names its output ``batchscore/<job>``).
    """
    from airflow.sdk import Asset, AssetAll, AssetAny

    spec = settings.dag
    if not spec.assets:
        return None
    refs = [Asset.ref(uri=uri) for uri in spec.assets]
    return AssetAny(*refs) if spec.assets_match == "any" else AssetAll(*refs)


def triggering_events(context: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The upstream Asset events this run consumed (none for a scheduled or manual run), oldest first:
    each one's URI, its producer's run and its ``extra``."""
    events: dict[tuple[Any, ...], dict[str, Any]] = {}
    for found in (context.get("triggering_asset_events") or {}).values():
        for event in found:  # an event reached through an alias too is listed under both: keep one
            key = (event.asset.uri, str(event.timestamp), event.source_run_id, event.source_map_index)
            events[key] = {
                "uri": event.asset.uri,
                "timestamp": str(event.timestamp),
                "source_dag_id": event.source_dag_id,
                "source_run_id": event.source_run_id,
                "extra": dict(event.extra or {}),
            }
    return sorted(events.values(), key=lambda event: event["timestamp"])


def log_triggering_events(settings: JobSettings, context: Mapping[str, Any]) -> None:
    """Say in the plan task's log that an Asset event started this run, and which events, where Airflow
    attached them to the run (3.3 attaches none to a run started through a URI reference)."""
    dag_run = context.get("dag_run")
    run_type = getattr(dag_run, "run_type", None)
    if getattr(run_type, "value", run_type) != "asset_triggered":
        return
    events = triggering_events(context)
    log.info(
        "started by an Asset event on %s; %d event(s) attached to the run",
        " or ".join(settings.dag.assets) if settings.dag.assets_match == "any" else " and ".join(settings.dag.assets),
        len(events),
    )
    for event in events:
        log.info(
            "  %s at %s from %s/%s, extra %s",
            event["uri"],
            event["timestamp"],
            event["source_dag_id"],
            event["source_run_id"],
            event["extra"],
        )


# --------------------------------------------------------------------------- the tasks' bodies


def plan_shards(settings: JobSettings, context: Mapping[str, Any]) -> list[list[str]]:
    """``batchscore plan`` for this run; each shard's ``batchscore run`` arguments.

    The plan's digest and its model's travel from here to every shard and to the commit as flags
    (through XCom), so the orchestrator, not the bucket holding the plan, says which plan is the job's.
    """
    common, out, num_shards, pin = _plan(settings, context)
    return shard_arguments(common, out, num_shards, pin)


def plan_spark(settings: JobSettings, context: Mapping[str, Any]) -> list[str]:
    """``batchscore plan`` for this run; the arguments of the one ``batchscore spark`` that scores
    every shard of it in Spark tasks and leaves the commit to the commit task."""
    common, out, _, pin = _plan(settings, context)
    return spark_arguments(common, out, pin)


def spark_arguments(common: list[str], plan: str, pin: Sequence[str]) -> list[str]:
    """``<job flags> <pin> --plan P --no-commit``, the options of ``batchscore spark`` that
    ``spark/submit.py`` takes: every shard of the plan, held to the plan and model just made, and
    no commit (the DAG's commit task follows)."""
    return [*common, *pin, *schema.to_argv(PLAN_FIELDS, {"plan": plan, "commit": False})]


def spark_application(settings: JobSettings) -> str:
    """The script ``spark-submit`` runs: ``dag.spark_application``, else the installed batchscore's
    ``spark/submit.py`` (found without importing it: parsing the DAG loads no Spark)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return settings.dag.spark_application or os.path.join(package, "spark", "submit.py")


def spark_conf(settings: JobSettings) -> dict[str, str]:
    """The Spark properties of the submission: ``dag.spark_conf``, the Python of ``dag.spark_python``,
    ``dag.env`` on the executors too (speculation is the cluster's choice: see docs/spark.md)."""
    spec = settings.dag
    conf = {f"spark.executorEnv.{key}": value for key, value in score_environment(settings).items()}
    conf.update(spec.spark_conf)
    if spec.spark_python:
        conf["spark.pyspark.python"] = spec.spark_python
    return conf


def _plan(settings: JobSettings, context: Mapping[str, Any]) -> tuple[list[str], str, int, list[str]]:
    """Run ``batchscore plan`` for this run and hand its pin to the commit (XCom): the job's flags
    rendered, the plan's URI, its shard count and its pin."""
    import json

    common, output = render(settings, [list(settings.common_args), settings.output], context)
    out = plan_uri(output)
    argv = [
        *cli_command(settings),
        "plan",
        *common,
        *size_args(settings, context["params"]),
        *schema.to_argv(PLAN_FIELDS, {"out": out}),
    ]
    printed = run_cli(argv, env=rendered_env(settings, context), capture_stdout=True)
    if printed.startswith(NOTHING_NEW):  # an incremental job: its shards and commit are skipped, no Asset event
        try:
            from airflow.sdk.exceptions import AirflowSkipException
        except ImportError:  # Airflow 3.0
            from airflow.exceptions import AirflowSkipException  # type: ignore[no-redef]

        raise AirflowSkipException(printed.strip())
    document = json.loads(printed)
    num_shards = int(document["num_shards"])
    if num_shards < 1:
        raise ValueError(f"the plan for {output} has no shard")
    pin = [str(flag) for flag in document["pin"]]
    context["ti"].xcom_push(key=PIN_XCOM_KEY, value=pin)
    return common, out, num_shards, pin


def commit_shards(settings: JobSettings, context: Mapping[str, Any]) -> str:
    """``batchscore commit`` of this run's plan (with ``dag.drift``'s flags); the output it committed."""
    common, output = render(settings, [list(settings.common_args), settings.output], context)
    pin = context["ti"].xcom_pull(task_ids="plan", key=PIN_XCOM_KEY)
    if not pin:
        raise AirflowFailException(f"no plan digest from this run's plan task for {output}; run the whole DAG again")
    argv = [
        *cli_command(settings),
        "commit",
        *common,
        *drift_args(settings, context, output),
        *schema.to_argv(PLAN_FIELDS, {"plan": plan_uri(output)}),
        *pin,
    ]
    run_cli(argv, env=rendered_env(settings, context))
    return output


def inputs_ready(settings: JobSettings, context: Mapping[str, Any]) -> bool:
    """Whether this run's input (or its marker file) is there yet."""
    sensor = settings.dag.sensor
    assert sensor is not None
    paths, storage_options, marker = render(
        settings, [list(settings.sensor_paths), dict(settings.storage_options), sensor.marker], context
    )
    return input_present(paths, marker, storage_options)
