"""The library API: every step of a job, as the CLI runs it, each returning a typed result.

``validate`` checks a job, ``plan`` splits it into shards, ``run_shard`` scores one shard (of a plan,
or of ``count`` shards planned on the fly), ``commit`` checks the shards' receipts and publishes the
output, ``run`` does all of it in one process, ``inspect`` describes a model, ``compile_model``
compiles a tree ensemble for the compiled engine and ``report`` reads a committed output's run
report. Each takes a
``JobConfig``, may be called any number of times in one process, and raises a ``BatchscoreError``
subclass whose ``exit_code`` is what the CLI exits with; its message names the parameters and
settings as Python spells them (the CLI says its flags instead).

``run``, ``run_shard`` and ``commit`` are observed as the job's settings ask, whoever calls them:
each pushes its metrics to ``config.pushgateway`` when it ends, and ``run`` and ``run_shard`` report
themselves as OpenLineage runs where lineage is configured (see observe/observers.py).

The steps' modules are imported when a step is called, not when ``batchscore`` is: importing the
package (as Airflow does to parse a DAG) loads no pyarrow, pandas or scikit-learn.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import JobConfig, StorageSettings, check_numbers, refuse_template
from .errors import EXIT_FAILURE, BatchscoreError, ConfigError, NothingToScore, param

if TYPE_CHECKING:
    from .job.planning import Plan
    from .observe.observers import Observers


@dataclass(frozen=True)
class Failure:
    """How a step ended that raised ``exc``: the exit code the CLI exits with, one line saying why
    (parameters named by ``name``), and whether it is a bug, whose traceback is worth showing."""

    exit_code: int
    message: str
    unexpected: bool = False

    @classmethod
    def of(cls, exc: BaseException, name: Any = None) -> Failure:
        from .io.storage import failure_cause

        if isinstance(exc, BatchscoreError):
            return cls(exc.exit_code, exc.render(name) if name is not None else str(exc))
        if isinstance(exc, KeyboardInterrupt):
            return cls(EXIT_FAILURE, "interrupted; nothing was committed")
        if isinstance(exc, SystemExit):
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else EXIT_FAILURE
            return cls(code, str(exc.code) if exc.code not in (None, 0) else f"exit code {code}")
        cause = failure_cause(exc)
        if cause is None:
            return cls(EXIT_FAILURE, f"unexpected {type(exc).__name__}: {exc}", unexpected=True)
        filename = getattr(exc, "filename", None)
        return cls(EXIT_FAILURE, f"storage failure on {filename}: {cause}" if filename else f"storage failure: {cause}")


@contextlib.contextmanager
def _observed(config: JobConfig, shard: int | None = None, lineage: bool = True) -> Iterator[Observers]:
    """Observe one step: its metrics and lineage start now and hear how it ends, success (the
    step calls ``succeeded`` with its manifest or receipt) or failure (with its exit code)."""
    from .observe.observers import Observers

    observers = Observers.start(config, shard, lineage)
    try:
        yield observers
    except NothingToScore:  # an incremental job with nothing new succeeded, committing nothing
        observers.succeeded(None)
        raise
    except BaseException as exc:
        failure = Failure.of(exc)
        observers.failed(failure.exit_code, failure.message)
        raise
    observers.succeeded(None)  # a step that handed over no result still succeeded (heard once)


@dataclass(frozen=True)
class ValidateResult:
    """A job that would run: its inputs, the model's features and the columns it would write."""

    output: str
    files: int
    rows: int
    features: tuple[str, ...]
    output_columns: tuple[str, ...]


@dataclass(frozen=True)
class ShardResult:
    """One scored shard, from its receipt (``receipt``, written next to the output)."""

    shard: int
    plan_id: str
    rows_in: int
    rows_out: int
    rows_invalid: int
    parts: tuple[str, ...]
    seconds: float
    receipt: Mapping[str, Any]

    @classmethod
    def of(cls, receipt: Mapping[str, Any]) -> ShardResult:
        return cls(
            receipt["shard"],
            receipt["plan_id"],
            receipt["rows_in"],
            receipt["rows_out"],
            receipt["rows_invalid"],
            tuple(p["name"] for p in receipt["parts"]),
            receipt["seconds"],
            receipt,
        )

    @property
    def engine(self) -> Mapping[str, Any]:
        """What scored the shard (``used``: sklearn or compiled) and the verification it passed."""
        return self.receipt["engine"]


@dataclass(frozen=True)
class CommitResult:
    """A committed output, from its manifest (``manifest``, written with ``_SUCCESS``); ``state`` is
    the folder beside the output that holds the manifest, receipts and rejected rows."""

    output: str
    plan_id: str
    rows_in: int
    rows_out: int
    rows_invalid: int
    parts: tuple[str, ...]
    state: str
    manifest: Mapping[str, Any]

    @classmethod
    def of(cls, manifest: Mapping[str, Any]) -> Any:
        rows = manifest["rows"]
        return cls(
            manifest["output"],
            manifest["plan_id"],
            rows["in"],
            rows["out"],
            rows["invalid"],
            tuple(p["name"] for p in manifest["parts"]),
            manifest["state"],
            manifest,
        )

    @property
    def engine(self) -> Mapping[str, Any]:
        """What scored the shards (``used``), with the compiled engine's verification figures."""
        return self.manifest["engine"]


@dataclass(frozen=True)
class RunResult(CommitResult):
    """A whole job scored and committed in one process; ``seconds`` from start to commit."""

    @property
    def seconds(self) -> float:
        return self.manifest["seconds"]


@dataclass(frozen=True)
class CompileResult:
    """A model's compiled library, built now or found in the cache, for ``--engine compiled/auto``."""

    model: str
    model_sha256: str
    path: str
    library: Mapping[str, Any]  # its name, sha256, whether it was compiled now and how long it took

    def to_dict(self) -> dict[str, Any]:
        """What ``batchscore compile`` prints."""
        return {"model": self.model, "model_sha256": self.model_sha256, "path": self.path, **self.library}


@dataclass(frozen=True)
class InspectResult:
    """A model's artifacts and the flags that pin them; ``description`` once it has been loaded."""

    artifacts: tuple[Mapping[str, Any], ...]
    pin: str
    description: Mapping[str, Any] | None = None  # None when only hashed (sha256_only)

    def to_dict(self) -> dict[str, Any]:
        """What ``batchscore inspect`` prints."""
        if self.description is not None:
            return dict(self.description)
        return {"artifacts": [dict(a) for a in self.artifacts], "pin": self.pin}


@dataclass(frozen=True)
class ReportResult:
    """An output's run report: rows, score and feature distributions, drift against its reference.

    ``committed`` says whether its ``_SUCCESS`` is there; ``held`` that drift above ``drift_fail``
    kept it from being committed (``commit --accept-drift`` commits it as the report describes).
    """

    output: str
    committed: bool
    held: bool
    rows_scored: int
    rows_invalid: int
    max_psi: float | None
    report: Mapping[str, Any]

    @classmethod
    def of(cls, report: Mapping[str, Any]) -> ReportResult:
        drift = report.get("drift") or {}
        return cls(
            report["output"],
            bool(report.get("committed")),
            bool(report.get("held")),
            report["rows"]["scored"],
            report["rows"]["invalid"],
            drift.get("max_psi"),
            report,
        )

    def to_dict(self) -> dict[str, Any]:
        """What ``batchscore report`` prints: the report without the columns' sketches."""
        from .observe.run_report import without_sketches

        return without_sketches(self.report)


def validate(config: JobConfig) -> ValidateResult:
    """Check model, inputs and schemas, the output and its lease, and everything ``run`` would
    write or read (probe files are written and removed; see preflight.py); score nothing."""
    from .io.output_guard import guard_output
    from .job.preflight import check_access, check_lease, check_table_output
    from .job.preparation import prepare

    prepared = prepare(config)
    guard_output(config, prepared.location, prepared.files)
    check_table_output(prepared)
    check_lease(prepared)
    check_access(prepared)
    return ValidateResult(
        prepared.output,
        len(prepared.files),
        prepared.files.total_rows,
        tuple(prepared.model.features),
        tuple(prepared.output_schema.names),
    )


def plan(
    config: JobConfig, shards: int | None = None, rows_per_shard: int | None = None, out: str | None = None
) -> Plan:
    """Check the whole job, then split it into shards (``shards``, or about ``rows_per_shard`` rows
    each); with ``out``, also write the plan there for ``run_shard`` and ``commit`` to read."""
    from .job import planning

    check_numbers(shards=shards, rows_per_shard=rows_per_shard)
    refuse_template("out", out)
    return planning.plan(config, shards=shards, rows_per_shard=rows_per_shard, out=out)


def load_plan(uri: str, config: JobConfig, plan_sha256: str | None = None) -> Plan:
    """The plan written at ``uri``; refused unless it is for the job's output and artifacts (and,
    given ``plan_sha256``, it is the plan ``plan`` printed)."""
    from .job import planning

    refuse_template("plan", uri)
    return planning.load_plan(uri, config, expected_sha256=plan_sha256)


def run_shard(
    config: JobConfig,
    index: int,
    plan: Plan | str | None = None,
    count: int | None = None,
    plan_sha256: str | None = None,
    *,
    keep_model: bool = False,
    concurrent: bool = False,
) -> ShardResult:
    """Score shard ``index`` of ``plan`` (a ``Plan`` or the URI of one), or of ``count`` shards
    planned on the fly, and write its receipt; ``commit`` publishes the shards together.

    A plan is refused unless every file it names is one the job's input matches, its artifacts have
    the job's pinned digests, and (given ``plan_sha256``, as ``plan`` printed it) it is that plan.
    With a plan, ``keep_model`` keeps the pinned model loaded in this process for the next shard
    (a Spark executor's worker), and ``concurrent`` makes the shard safe to score twice at once
    (Spark's speculative copies: parts named for their attempt, the first receipt stands)."""
    from .job import shard

    check_numbers(names={"shard": "index", "shards": "count"}, shard=index, shards=count)
    with _observed(config, shard=index) as observers:
        refuse_template("plan", plan if isinstance(plan, str) else None)
        if plan is None:
            if count is None:
                raise ConfigError(
                    f"{param('index')} needs {param('plan')}, or {param('count')} to plan the shards on the fly"
                )
            if plan_sha256:
                raise ConfigError(f"{param('plan_sha256')} needs {param('plan')}")
            if config.incremental:
                raise ConfigError(_INCREMENTAL_SHARDS)
            receipt = shard.run_shard_of(config, index, count, observers)
        else:
            the_plan = _the_plan(plan, config, plan_sha256)
            if count is not None and count != the_plan.num_shards:
                raise ConfigError(
                    f"shard {index}/{count}: plan {plan if isinstance(plan, str) else the_plan.plan_id} "
                    f"has {the_plan.num_shards} shards, not {count} ({param('count')})"
                )
            receipt = shard.run_shard(
                config,
                the_plan,
                index,
                source=_source(plan),
                observers=observers,
                keep_model=keep_model,
                concurrent=concurrent,
            )
        observers.succeeded(receipt)
    return ShardResult.of(receipt)


#: Why the shards of an incremental job share a plan file: each planning on the fly could see
#: another set of new files (one arriving between them), and the commit another still.
_INCREMENTAL_SHARDS = (
    f"an incremental job's shards need a plan file ({param('plan')}, from `batchscore plan --out`): shards "
    "planned on the fly could each find other new files"
)


def _source(plan: Plan | str) -> str:
    return plan if isinstance(plan, str) else f"plan {plan.plan_id}"


def _the_plan(plan: Plan | str, config: JobConfig, plan_sha256: str | None) -> Plan:
    """A plan read from its URI (or given), held to ``plan_sha256`` when that is given."""
    from .errors import InputDataError
    from .job import planning

    if isinstance(plan, str):
        return planning.load_plan(plan, config, expected_sha256=plan_sha256)
    if plan_sha256 and plan.sha256 != plan_sha256.strip().lower():
        raise InputDataError(
            f"plan {plan.plan_id} is not the plan that was made: its sha256 is {plan.sha256}, "
            f"{param('plan_sha256')} says {plan_sha256}; plan again"
        )
    return plan


def commit(
    config: JobConfig,
    plan: Plan | str | None = None,
    shards: int | None = None,
    accept_drift: bool = False,
    plan_sha256: str | None = None,
) -> CommitResult:
    """Check every shard's receipt against ``plan`` (a ``Plan`` or the URI of one), or against the
    plan of ``shards`` shards made again, then write the run report, the manifest and ``_SUCCESS``.
    Safe to repeat. Drift above ``config.drift_fail`` raises ``DriftError`` with the report written
    and held; ``accept_drift`` then commits the output as that held report describes it, and needs
    no more than ``config.output`` (and its ``storage_options``): without ``plan`` or ``shards`` it
    commits the plan the held commit recorded beside the output, with the job's settings as recorded.

    A plan is first made again from the job's own input specs and artifacts: it is refused unless
    its files are exactly those the input matches now, with the planned row groups and identities,
    and its artifacts are the job's (and, given ``plan_sha256``, it is the plan ``plan`` printed)."""
    from .job import committing, planning

    held = None
    if accept_drift and plan is None and not shards and not plan_sha256:
        try:
            held, config = planning.held_job(config)
        except BaseException:
            with _observed(config, lineage=False):  # observed under the caller's settings
                raise
    with _observed(config, lineage=False) as observers:
        check_numbers(shards=shards)
        refuse_template("plan", plan if isinstance(plan, str) else None)
        if held is not None:
            the_plan = held
            if config.input:  # a job given in full: its input must still be what was planned
                planning.check_against_input(config, the_plan, f"held for drift at {config.output}")
        elif plan is not None:
            the_plan = _the_plan(plan, config, plan_sha256)
            planning.check_against_input(config, the_plan, _source(plan))
        elif plan_sha256:
            raise ConfigError(f"{param('plan_sha256')} needs {param('plan')}")
        elif shards:
            if config.incremental:
                raise ConfigError(_INCREMENTAL_SHARDS)
            the_plan = planning.plan_again(config, shards)
        else:
            raise ConfigError(
                f"commit needs {param('plan')}, or {param('shards')} to plan again (or "
                f"{param('accept_drift')} alone, for an output held for drift)"
            )
        manifest = committing.commit(config, the_plan, accept_drift=accept_drift)
        observers.succeeded(manifest)
    return CommitResult.of(manifest)


def run(config: JobConfig) -> RunResult:
    """Score everything as one shard and commit: the terminal user's one command."""
    from .io.lease import run_holder
    from .io.output_guard import guard_output
    from .job.committing import commit as commit_plan
    from .job.planning import committed_already, hold, plan_of
    from .job.preflight import check_access
    from .job.preparation import now, prepare
    from .job.shard import score_shard

    clock = time.perf_counter()
    with _observed(config) as observers:
        prepared = prepare(config, observers=observers)
        guard_output(config, prepared.location, prepared.files)  # a refused run leaves the output untouched
        the_plan = plan_of(prepared, shards=1, predicted_at=now().isoformat())
        with hold(config, the_plan, "run", release="always", holder=run_holder(), output=prepared.location) as lease:
            guard_output(config, prepared.location, prepared.files)  # again: another job may have just finished
            check_access(prepared)  # what validate checks: nothing is scored that cannot be written
            if not committed_already(config, the_plan, lease.location):  # a table holding this plan's rows
                guard_output(config, lease.location, prepared.files)  # a table's data folder: only own files
                score_shard(prepared, the_plan, 0, lease, observers)
            manifest = commit_plan(
                config, the_plan, extra={"seconds": round(time.perf_counter() - clock, 3)}, lease=lease
            )
        observers.succeeded(manifest)
    return RunResult.of(manifest)


def inspect(config: JobConfig, sha256_only: bool = False) -> InspectResult:
    """Describe ``config.model`` (and ``config.scaler``): type, features, classes, versions, sha256.

    With ``sha256_only`` the artifacts are only hashed, not loaded: safe on a file not yet trusted.
    Either way they must first pass the job's pins and formats.
    """
    from .models.artifacts import ArtifactPolicy, artifact_digests, describe, load_model, pin_flags

    model_uri = config.require("model")
    policy = ArtifactPolicy.of(config)
    if sha256_only:
        artifacts = artifact_digests(model_uri, config.scaler, config.storage, policy)
        return InspectResult(tuple(a.to_dict() for a in artifacts), pin_flags(artifacts))
    loaded = load_model(model_uri, config.scaler, config.features, config.storage, policy)
    return InspectResult(tuple(a.to_dict() for a in loaded.artifacts), pin_flags(loaded.artifacts), describe(loaded))


def compile_model(config: JobConfig, out: str | None = None) -> CompileResult:
    """Compile ``config.model`` (a tree ensemble) into ``out``, by default the job's compiled cache,
    so a run whose cache holds the library loads it without a C compiler; checks pins and formats first."""
    from .models.artifacts import ArtifactPolicy
    from .models.compiled import compile_ahead

    model_uri = config.require("model")
    refuse_template("out", out)
    artifact, library = compile_ahead(
        model_uri, config.storage, ArtifactPolicy.of(config), out or config.compiled_cache
    )
    return CompileResult(artifact.uri, artifact.sha256, library.path, library.to_dict())


def report(output: str, storage_options: Mapping[str, Any] | None = None, html: str | None = None) -> ReportResult:
    """The run report of ``output`` (written by ``commit`` beside the manifest); with ``html``, also
    write it there as a self-contained HTML page."""
    from .io.storage import resolve
    from .observe.run_report import read_report

    for key, value in (("output", output), ("storage_options", storage_options), ("html", html)):
        refuse_template(key, value)
    result = ReportResult.of(read_report(resolve(output, StorageSettings(dict(storage_options or {})))))
    if html:
        from .observe.report_html import write_html

        write_html(result.report, html)
    return result
