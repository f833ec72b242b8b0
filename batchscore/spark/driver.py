"""Run a job on Spark: plan on the driver, one Spark task per shard, commit on the driver.

The guarantees are the sharded job's (see docs/sharding.md), with Spark as the orchestrator:

- The driver plans with ``batchscore.plan`` into as many shards as the cluster runs tasks at once
  (or ``shards``) and writes the plan beside the output, taking the output's lease for the plan.
- Each task runs ``batchscore.run_shard`` for its shard, held to the plan's sha256 and the
  model's pinned digests: it reads its own row groups in input order through batchscore's
  storage layer (local, S3 through fsspec), in batches bounded by rows and bytes; it loads the
  model from its bytes (never pickled into the task) once per Python worker, kept there for the
  worker's later tasks; it writes parts named for its attempt, then claims the shard's receipt.
- Attempts of one shard never write the same file: a retry, or a speculative copy running beside
  the original, writes parts of its own, and the first receipt written stands (a later attempt
  returns it). The commit keeps the parts that receipt names and removes every other attempt's.
  Errors a retry cannot fix (exit 2, 3, 4) end the task with their message instead of being retried.
- The driver commits with ``batchscore.commit`` only after every task succeeded and no attempt
  of the stage is still running, never with Spark's own writer or its overwrite mode.
- ``score_plan`` stops before the commit and scores a plan someone else made (the Airflow DAG's
  plan task), held to the sha256 it was handed: the orchestrator's next step commits.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from .. import api
from ..config import JobConfig
from ..errors import (
    EXIT_DRIFT,
    EXIT_INPUT,
    EXIT_MODEL,
    EXIT_USAGE,
    BatchscoreError,
    ConfigError,
    DriftError,
    InputDataError,
    ModelError,
    param,
)
from ..io import layout
from ..job.preparation import check_challenger_output

log = logging.getLogger(__name__)

#: Errors a task reports instead of raising: no retry would fix them, so none is made.
PERMANENT = {EXIT_USAGE: ConfigError, EXIT_INPUT: InputDataError, EXIT_MODEL: ModelError, EXIT_DRIFT: DriftError}
#: A fault for the tests to inject into an executor: ``SHARD:WHEN`` makes the first attempt of task
#: SHARD die (``os._exit``) at ``start``, once its first ``part`` is written (at the latest after its
#: receipt), or after its ``receipt`` (Spark sees a lost task either way); with ``executor``, kill
#: the executor's JVM (SIGKILL) once its first part is written (Spark sees a lost executor); or, with
#: ``slow``, score one row per batch, so that Spark sees a straggler (and, with speculation on, starts a copy).
FAULT_ENV = "BATCHSCORE_SPARK_FAULT"
#: How long the driver waits, after the last task succeeded, for attempts Spark is killing
#: (speculative copies, attempts of a lost executor) to end before it commits.
SETTLE_SECONDS = 60.0


def anchored(config: JobConfig) -> JobConfig:
    """The job with its local paths made absolute: executors run in folders of their own."""

    def absolute(uri: str | None) -> str | None:
        return uri if uri is None or "://" in uri else os.path.abspath(uri)

    return replace(
        config,
        input=tuple(u if "://" in u else os.path.abspath(u) for u in config.input),
        output=absolute(config.output),
        model=absolute(config.model),
        scaler=absolute(config.scaler),
        compiled_cache=absolute(config.compiled_cache),
    )


def session(app_name: str, master: str | None = None) -> Any:
    """The Spark session ``spark-submit`` (or ``master``) describes, its settings as given:
    speculation and task retries included (see docs/spark.md)."""
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    return (builder.master(master) if master else builder).getOrCreate()


def run_job(
    config: JobConfig,
    spark: Any = None,
    shards: int | None = None,
    master: str | None = None,
    plan: str | None = None,
    plan_sha256: str | None = None,
) -> api.CommitResult:
    """Plan (or take ``plan``), score every shard in a Spark task, then commit; returns the committed output.

    ``spark`` is a session to use (else one is started, on ``master`` if given); ``shards`` the
    number of tasks (else the cluster's default parallelism); ``plan`` a plan already written by
    ``batchscore plan --out`` (held to ``plan_sha256`` when given), scored instead of a new one."""
    scored = score_plan(config, spark=spark, shards=shards, master=master, plan=plan, plan_sha256=plan_sha256)
    return api.commit(scored.config, plan=scored.plan_uri, plan_sha256=scored.plan_sha256)


@dataclass(frozen=True)
class ScoredPlan:
    """Every shard of a plan scored on Spark, receipts written, nothing committed yet."""

    #: The job as its tasks ran it: paths absolute, held to the plan's artifact digests.
    config: JobConfig
    plan_uri: str
    plan_sha256: str
    plan_id: str
    #: One entry per shard: the task attempt that scored it and its rows.
    shards: list[dict[str, Any]]

    @property
    def rows(self) -> dict[str, int]:
        return {key: sum(s[f"rows_{key}"] for s in self.shards) for key in ("in", "out", "invalid")}


def score_plan(
    config: JobConfig,
    spark: Any = None,
    shards: int | None = None,
    master: str | None = None,
    plan: str | None = None,
    plan_sha256: str | None = None,
) -> ScoredPlan:
    """Score every shard of ``plan`` (or of a plan made here, written beside the output) in a Spark
    task and wait until no attempt is still running; commits nothing (``batchscore commit --plan``
    or ``run_job`` does). Errors no retry could fix raise at once, with their exit code."""
    config.require("input")
    config.require("output")
    config.require("model")
    check_challenger_output(config)  # refused before a session starts
    if plan is not None and shards is not None:
        raise ConfigError(f"{param('shards')} would plan the job again: {param('plan')} is scored as it was planned")
    if plan is None and plan_sha256:
        raise ConfigError(f"{param('plan_sha256')} needs {param('plan')}")
    spark = spark or session(f"batchscore {config.job_name or config.output}", master)
    context = spark.sparkContext
    config = anchored(config)
    if plan is None:
        plan_uri = layout.plan_path(config.output)  # type: ignore[arg-type]
        the_plan = api.plan(config, shards=shards or context.defaultParallelism, out=plan_uri)
    else:  # the orchestrator's plan, held to the digest it was handed (as `run --shard` holds it)
        plan_uri = plan if "://" in plan else os.path.abspath(plan)
        the_plan = api.load_plan(plan_uri, config, plan_sha256=plan_sha256)
    pinned = _pinned(config, the_plan.artifacts)
    count = the_plan.num_shards
    from ..job.planning import parts_location

    folder = parts_location(config, the_plan).uri  # a table output's parts go to the plan's data folder
    first_parts = [s.units[0].part_name if s.units else None for s in the_plan.shards]
    log.info(
        f"spark: {the_plan.total_rows:,} rows in {count} shard(s) of plan {the_plan.plan_id}, "
        f"default parallelism {context.defaultParallelism}"
    )
    group = f"batchscore-{the_plan.plan_id}-{time.time_ns()}"
    context.setJobGroup(group, f"batchscore {the_plan.output}", interruptOnCancel=True)
    task = functools.partial(score_shard_task, pinned, plan_uri, the_plan.sha256, first_parts, folder)
    try:
        results = context.parallelize(range(count), count).map(task).collect()
    finally:
        _settle(context, group)
    failures = [r for r in results if "error" in r]
    if failures:
        first = min(failures, key=lambda r: r["shard"])
        raise PERMANENT.get(first["exit_code"], BatchscoreError)(first["error"])
    log.info(
        "spark: every shard scored: "
        + ", ".join(
            f"shard {r['shard']} by task attempt {r['task_attempt']} ({r['rows_out']:,} rows; Python worker "
            f"{r['worker']}, {'loaded the model' if r['model_loaded'] else 'model already loaded'})"
            for r in results
        )
    )
    return ScoredPlan(pinned, plan_uri, the_plan.sha256, the_plan.plan_id, sorted(results, key=lambda r: r["shard"]))


def _pinned(config: JobConfig, artifacts: Any) -> JobConfig:
    """The job held to the digests of the artifacts it was planned with: every executor checks
    the bytes it fetches against them before anything deserializes them."""
    digests = {a["role"]: a["sha256"] for a in artifacts}
    return replace(
        config,
        model_sha256=config.model_sha256 or digests.get("model"),
        scaler_sha256=config.scaler_sha256 or digests.get("scaler"),
        workers=config.workers or 1,
    )  # Spark runs tasks side by side: one core each


def _settle(context: Any, group: str) -> None:
    """Wait until no attempt of this job's stages is running (speculative copies, attempts being
    killed): nothing may still write a part when the commit reads them."""
    tracker, deadline = context.statusTracker(), time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        stages = [s for job in tracker.getJobIdsForGroup(group) for s in (tracker.getJobInfo(job) or _NO_JOB).stageIds]
        active = sum(info.numActiveTasks for info in (tracker.getStageInfo(s) for s in stages) if info is not None)
        if not active:
            return
        time.sleep(0.2)
    log.warning(
        f"spark: task attempts still running {SETTLE_SECONDS:.0f} s after the job ended; "
        f"the commit checks every part's attempt against its receipt"
    )


class _NoJob:
    stageIds: list[int] = []


_NO_JOB = _NoJob()


def score_shard_task(
    config: JobConfig, plan_uri: str, plan_sha256: str, first_parts: list[str | None], output: str, index: int
) -> dict[str, Any]:
    """One Spark task: score shard ``index`` of the plan (runs on an executor).

    The model stays loaded in this Python worker for its later tasks (Spark reuses workers);
    parts are named for this attempt, since a speculative copy may score the shard beside it."""
    from pyspark import TaskContext

    from ..models.artifacts import kept_loads

    context = TaskContext.get()
    attempt = context.attemptNumber() if context is not None else 0
    fault = _fault(index, attempt)
    if fault == "start":
        os._exit(137)
    if fault == "slow":
        config = replace(config, batch_size=1)  # the same rows, one batch each: a straggler
    watching = _die_once_written(output, first_parts[index], config, fault) if fault in ("part", "executor") else None
    loads = kept_loads()
    try:
        done = api.run_shard(config, index, plan=plan_uri, plan_sha256=plan_sha256, keep_model=True, concurrent=True)
    except BatchscoreError as exc:
        if exc.exit_code not in PERMANENT:
            raise  # storage failures and the like: Spark retries the task
        return {"shard": index, "task_attempt": attempt, "error": str(exc), "exit_code": exc.exit_code}
    finally:
        if watching is not None:
            watching.set()
    if fault in ("part", "receipt", "executor"):  # a shard of one part may finish before the watch saw it
        _die(fault)
    return {
        "shard": index,
        "task_attempt": attempt,
        "attempt": done.receipt.get("attempt"),  # none for a plan the table holds already
        "rows_in": done.rows_in,
        "rows_out": done.rows_out,
        "rows_invalid": done.rows_invalid,
        "seconds": done.seconds,
        "worker": os.getpid(),
        "model_loaded": kept_loads() > loads,  # else kept from an earlier task of this worker
    }


def _fault(index: int, attempt: int) -> str | None:
    """The fault ``FAULT_ENV`` asks of this task attempt, if any (first attempts only)."""
    shard, _, when = os.environ.get(FAULT_ENV, "").partition(":")
    return when if shard and attempt == 0 and int(shard) == index else None


def _die(fault: str) -> None:
    """End this Python worker, and for ``executor`` first the executor JVM it works for (the
    ancestor running ``CoarseGrainedExecutorBackend``, on every cluster manager; none in local mode)."""
    if fault == "executor":
        pid = os.getppid()
        while pid > 1:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    if b"CoarseGrainedExecutorBackend" in cmdline.read():
                        os.kill(pid, signal.SIGKILL)
                        break
                with open(f"/proc/{pid}/stat") as stat:
                    pid = int(stat.read().rpartition(")")[2].split()[1])
            except OSError:
                break
    os._exit(137)


def _die_once_written(output: str, part_name: str | None, config: JobConfig, fault: str) -> threading.Event:
    """End this process (``_die``) as soon as a part of the planned ``part_name`` is in ``output``
    (whatever attempt it is named for: an attempt killed between parts), until the returned event is set."""
    from ..io.sink import listing
    from ..io.storage import resolve

    done = threading.Event()
    if part_name is None:
        return done
    where = resolve(output, config.storage)  # batchscore's storage layer: its options and bounds
    stem = part_name[: -len(".parquet")]

    def written() -> bool:
        return any(
            layout.PART_PATTERN.match(name) and name.startswith(stem) and name[len(stem)] in "._"
            for name in listing(where.fs, where.path)
        )

    def watch() -> None:
        while not done.is_set():
            if written() and not done.is_set():
                _die(fault)
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
    return done
