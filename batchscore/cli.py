"""The ``batchscore`` command line: click commands that parse options and call the library."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

# Every computation runs in single-threaded workers (see scorer), so this process needs no BLAS
# thread pool; OpenBLAS would start one as NumPy loads and keep it spinning while start-up runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import click

from . import __version__, api, logs, schema
from .config import (
    ARTIFACT_KEYS,
    COMMAND_FIELDS,
    CONFIG_KEYS,
    FIELDS,
    PLAN_FIELDS,
    JobConfig,
    build_config,
    check_numbers,
)
from .errors import EXIT_CODES, EXIT_DRIFT, EXIT_FAILURE, ConfigError, NothingToScore

EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())


log = logging.getLogger(__name__)


#: The library's parameters that are no job setting, as this command line spells them (a job
#: setting's flag is its own, see config.py); errors name parameters, see ``errors.param``.
PARAMETER_FLAGS = {
    "index": "--shard I",
    "count": "--shard I/N",
    "plan": "--plan",
    "plan_sha256": "--plan-sha256",
    "accept_drift": "--accept-drift",
    "out": "--out",
}


def flag(name: str) -> str:
    """The flag that gives the library's parameter or setting ``name``."""
    if name in PARAMETER_FLAGS:
        return PARAMETER_FLAGS[name]
    info = FIELDS.get(name) or COMMAND_FIELDS.get(name)
    return schema.flag_of(name, info) if info is not None else "--" + name.replace("_", "-")


def _fail(message: str, exit_code: int, with_traceback: bool = False) -> NoReturn:
    """Log the one ``Error:`` line (a JSON line under ``--log-format json``) and exit."""
    from .job import stopping

    stopping.reported()
    log.error(message, exc_info=with_traceback, extra=logs.event("error", exit_code=exit_code))
    sys.exit(exit_code)


def _report_stop(message: str) -> None:
    """The error line of a stop whose deadline passed (written from the stop watcher's thread)."""
    log.error(message, extra=logs.event("error", exit_code=EXIT_FAILURE))


def _handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors and storage failures into one 'Error:' line, parameters named by their
    flags, and their exit code; anything else is a bug and keeps its traceback. What a command
    observes (metrics, lineage) the library's steps observe themselves (see api.py)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .job import stopping

        _interrupt_on_sigterm()
        logs.configure(kwargs.get("log_format") or "text")  # until the job's own setting is known
        try:
            with stopping.bounded(_report_stop):  # whatever blocks, a stop ends the process in time
                return func(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except NothingToScore as exc:  # an incremental job with nothing new: done, nothing committed
            click.echo(str(exc))
            return None
        except (KeyboardInterrupt, Exception) as exc:
            failure = api.Failure.of(exc, flag)
            _fail(failure.message, failure.exit_code, with_traceback=failure.unexpected)

    return wrapper


def _interrupt_on_sigterm() -> None:
    """Schedulers stop tasks with SIGTERM: unwind like Ctrl-C so unfinished parts are discarded.
    Either one is noted at once (see stopping.py: no ``_SUCCESS`` after it)."""
    import signal
    import threading

    from .job import stopping

    owner = os.getpid()

    def interrupt(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked worker: unwind (its part is discarded), quietly when idle
            raise SystemExit(128 + signum)
        stopping.note(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, interrupt)


def declared(fields: Mapping[str, Any], *keys: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click options of these declared settings (see schema.py), as one decorator."""
    options = schema.click_options(fields, keys)

    def apply(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return apply


#: What an artifact must be before it is loaded; shared by the job commands and ``inspect``.
ARTIFACT_OPTIONS = schema.click_options(FIELDS, ARTIFACT_KEYS)


def _artifact_settings(kw: dict[str, Any]) -> dict[str, Any]:
    """Pop the artifact options out of a command's keyword arguments, as JobConfig settings."""
    return schema.from_click(FIELDS, ARTIFACT_KEYS, kw)


#: One option per JobConfig field (see config.py), after ``--config``.
JOB_OPTIONS = [
    click.option(
        "--config", "config_path", type=click.Path(dir_okay=False), help="YAML job file; flags override its keys."
    ),
    *schema.click_options(FIELDS, CONFIG_KEYS),
]


def job_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(JOB_OPTIONS):
        func = option(func)
    return func


def _config(kw: dict[str, Any]) -> JobConfig:
    """Pop the job options out of a command's keyword arguments into a JobConfig."""
    config = build_config(kw.pop("config_path"), **schema.from_click(FIELDS, CONFIG_KEYS, kw))
    logs.configure(config.log_format)  # once: every line after this one takes the job's format
    return config


def _summary(config: JobConfig, result: Any) -> None:
    """What a committed output holds (``api.CommitResult``; a ``RunResult`` adds the time taken)."""
    rows = {"in": result.rows_in, "out": result.rows_out, "invalid": result.rows_invalid}
    seconds = getattr(result, "seconds", None)
    if config.log_format == "json":
        click.echo(
            json.dumps(
                {
                    "output": result.output,
                    "rows": rows,
                    "parts": len(result.parts),
                    "seconds": seconds,
                    "plan_id": result.plan_id,
                    **({"table_version": result.manifest["table"]["version"]} if result.manifest.get("table") else {}),
                }
            )
        )
        return
    speed = f" in {seconds:.2f} s ({rows['in'] / seconds:,.0f} rows/s)" if seconds else ""
    click.echo(f"scored {rows['out']:,} of {rows['in']:,} rows, {rows['invalid']:,} invalid{speed}")
    table = result.manifest.get("table")
    if table:
        label = "snapshot" if table["format"] == "iceberg" else "version"
        click.echo(
            f"output: {result.output} ({len(result.parts)} part(s), {table['format']} {label} {table['version']})"
        )
    else:
        click.echo(f"output: {result.output} ({len(result.parts)} part(s), _SUCCESS written)")


def _parse_shard(value: str | None) -> tuple[int | None, int | None]:
    if value is None:
        return None, None
    index, _, count = value.partition("/")
    try:
        parsed = int(index), (int(count) if count else None)
    except ValueError:
        raise ConfigError(f"--shard takes I or I/N, got {value!r}") from None
    try:
        check_numbers(shard=parsed[0], shards=parsed[1])
    except ConfigError as exc:
        raise ConfigError(f"--shard {value}: {exc.render(flag)}") from None
    return parsed


@click.group(epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="batchscore")
def main() -> None:
    """Score Parquet tables with a fitted scikit-learn model, streaming, locally or on S3.

    Start with `batchscore run --config configs/sample.yaml`.
    """


@main.command(epilog=EXIT_CODES_HELP)
@job_options
@declared(PLAN_FIELDS, "plan")
@click.option("--shard", help="Score only shard I of --plan, or I/N to plan N shards on the fly; writes no _SUCCESS.")
@declared(PLAN_FIELDS, "plan_sha256")
@_handle_errors
def run(plan: str | None, shard: str | None, plan_sha256: str | None, **kw: Any) -> None:
    """Score the input and commit the output (parts, the manifest, then _SUCCESS).

    With --shard, score one shard and write its receipt; `batchscore commit` finishes the job.
    """
    config = _config(kw)
    index, count = _parse_shard(shard)
    if index is None:
        if plan:
            raise ConfigError("--plan needs --shard (or use `batchscore commit --plan` to finish a job)")
        result = api.run(config)
        _summary(config, result)
        return
    done = api.run_shard(config, index, plan=plan, count=count, plan_sha256=plan_sha256)
    click.echo(
        json.dumps(
            {
                "shard": done.shard,
                "rows_in": done.rows_in,
                "rows_out": done.rows_out,
                "rows_invalid": done.rows_invalid,
                "seconds": done.seconds,
            }
        )
    )


@main.command(epilog=EXIT_CODES_HELP)
@job_options
@declared(COMMAND_FIELDS, "shards", "rows_per_shard")
@declared(PLAN_FIELDS, "out")
@_handle_errors
def plan(shards: int | None, rows_per_shard: int | None, out: str | None, **kw: Any) -> None:
    """Check the job and split its row groups into balanced shards, from footers only.

    Prints the plan as JSON, with its sha256 and "pin": the flags (--plan-sha256, --model-sha256,
    --scaler-sha256) that hold every shard and the commit to exactly this plan and model.
    The same input always gives the same plan.
    """
    config = _config(kw)
    the_plan = api.plan(config, shards=shards, rows_per_shard=rows_per_shard, out=out)
    for chunk in the_plan.chunks(plan_sha256=the_plan.sha256, pin=the_plan.pin()):  # never all at once
        click.echo(chunk, nl=False)
    click.echo()


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("held_output", metavar="[OUTPUT]", required=False)
@job_options
@declared(PLAN_FIELDS, "plan")
@declared(COMMAND_FIELDS, "shards")
@click.option(
    "--accept-drift",
    is_flag=True,
    help=f"Commit an output held for drift (exit {EXIT_DRIFT}), as its held "
    "report describes it; `commit OUTPUT --accept-drift` needs nothing else.",
)
@declared(PLAN_FIELDS, "plan_sha256")
@_handle_errors
def commit(
    held_output: str | None,
    plan: str | None,
    shards: int | None,
    accept_drift: bool,
    plan_sha256: str | None,
    **kw: Any,
) -> None:
    """Check every shard receipt against the plan, then write the manifest and _SUCCESS.

    Without --plan, --shards N plans the job again (deterministic) and commits its N shards.
    Parts that no receipt lists (left by failed attempts) are removed. Safe to repeat.
    `commit OUTPUT --accept-drift` commits an output held for drift with the plan and settings
    its held commit recorded.
    """
    if held_output is not None:
        if kw.get("output") not in (None, held_output):
            raise ConfigError(f"commit {held_output} --output {kw['output']}: give the output once")
        kw["output"] = held_output
    config = _config(kw)
    result = api.commit(config, plan=plan, shards=shards, accept_drift=accept_drift, plan_sha256=plan_sha256)
    _summary(config, result)


@main.command(name="spark", epilog=EXIT_CODES_HELP)
@job_options
@click.option("--shards", type=int, help="Spark tasks, one shard each [default: the cluster's default parallelism].")
@click.option(
    "--master", help="Spark master URL (spark://host:7077, local[4]); under spark-submit, leave it to its --master."
)
@declared(PLAN_FIELDS, "plan", "plan_sha256", "commit")
@_handle_errors
def spark(shards: int | None, master: str | None, plan: str | None, plan_sha256: str | None, **kw: Any) -> None:
    """Score the job on a Spark cluster and commit it: plan here, one Spark task per shard, commit here.

    With --plan, score the shards of that plan (as `batchscore plan --out` wrote it); with
    --no-commit too, stop once every shard's receipt is written: `batchscore commit --plan` (the
    DAG's commit task) publishes the output. `spark-submit [options] batchscore/spark/submit.py
    [these options]` runs the same command.
    """
    from . import spark as on_spark

    commit = schema.from_click(PLAN_FIELDS, ["commit"], kw)["commit"]
    config = _config(kw)
    if commit is False:
        if plan is None:
            raise ConfigError("--no-commit needs --plan: the commit that follows reads that plan")
        scored = on_spark.score_plan(config, shards=shards, master=master, plan=plan, plan_sha256=plan_sha256)
        click.echo(json.dumps({"plan": scored.plan_uri, "plan_id": scored.plan_id, "rows": scored.rows}))
        return
    result = on_spark.run_job(config, shards=shards, master=master, plan=plan, plan_sha256=plan_sha256)
    _summary(config, result)  # each shard and the commit observe themselves


@main.command(epilog=EXIT_CODES_HELP)
@job_options
@_handle_errors
def validate(**kw: Any) -> None:
    """Check the model, every input footer and schema, and the output location; score nothing."""
    config = _config(kw)
    checked = api.validate(config)
    click.echo(
        f"ok: {checked.files} file(s), {checked.rows:,} rows; features {', '.join(checked.features)}; "
        f"output columns {', '.join(checked.output_columns)}"
    )


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("output")
@click.option(
    "--html", "html", type=click.Path(dir_okay=False), help="Also write the report as a self-contained HTML page here."
)
@declared(FIELDS, "storage_options")
@_handle_errors
def report(output: str, html: str | None, **kw: Any) -> None:
    """Print an output's run report as JSON: rows, score and feature distributions, drift.

    The report file also holds each column's sketch, left out here (see docs/monitoring.md).
    """
    found = api.report(output, schema.from_click(FIELDS, ("storage_options",), kw)["storage_options"], html=html)
    click.echo(json.dumps(found.to_dict(), indent=2))


#: The settings ``inspect`` takes besides the artifact checks: what it needs to find and read the model.
INSPECT_KEYS = ("scaler", "features", "storage_options", "registry_uri")


def _artifact_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(ARTIFACT_OPTIONS):
        func = option(func)
    return func


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("model")
@declared(FIELDS, *INSPECT_KEYS)
@_artifact_options
@click.option(
    "--sha256-only",
    is_flag=True,
    help="Print only each artifact's format and sha256, without loading it: safe on a file not yet trusted.",
)
@_handle_errors
def inspect(model: str, sha256_only: bool, **kw: Any) -> None:
    """Print a model's type, features, classes, scikit-learn version and sha256 as JSON.

    Its "pin" line gives the --model-sha256 (and --scaler-sha256) flags that pin exactly these files.
    """
    config = build_config(None, model=model, **schema.from_click(FIELDS, INSPECT_KEYS, kw), **_artifact_settings(kw))
    click.echo(json.dumps(api.inspect(config, sha256_only=sha256_only).to_dict(), indent=2, default=str))


#: The settings ``compile`` takes besides the artifact checks: where the model is.
COMPILE_KEYS = ("storage_options", "registry_uri")


@main.command(name="compile", epilog=EXIT_CODES_HELP)
@click.argument("model")
@click.option(
    "--out",
    help="Folder or URL (s3://...) to put the library in [default: the compiled cache, see "
    "run --compiled-cache]; a URL also keeps a copy in the local cache.",
)
@declared(FIELDS, *COMPILE_KEYS)
@_artifact_options
@_handle_errors
def compile_(model: str, out: str | None, **kw: Any) -> None:
    """Compile a tree ensemble for --engine compiled/auto ahead of time (needs a C compiler).

    Runs that find the library in their --compiled-cache load it without compiling, so an image
    without a compiler can use it. Prints the library's path and sha256 as JSON.
    """
    config = build_config(None, model=model, **schema.from_click(FIELDS, COMPILE_KEYS, kw), **_artifact_settings(kw))
    click.echo(json.dumps(api.compile_model(config, out).to_dict()))


@main.command(epilog=EXIT_CODES_HELP)
@click.option(
    "--out-dir",
    default="sample_data",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for churn.parquet and model/.",
)
@declared(COMMAND_FIELDS, "rows")
@click.option("--model-only", is_flag=True, help="Only (re)train the model from the existing sample data.")
@_handle_errors
def sample(out_dir: str, rows: int | None, model_only: bool) -> None:
    """Write the sample churn Parquet file and train its scaler + classifier (.joblib and .skops)."""
    import os

    from . import sample as samples

    check_numbers(rows=rows)
    data = os.path.join(out_dir, samples.DATA_FILE)
    if not model_only:
        samples.write_sample_data(out_dir, rows or samples.SAMPLE_ROWS)
    elif not os.path.exists(data):
        raise ConfigError(f"--model-only needs existing sample data at {data}")
    scaler_path, model_path = samples.train_sample_model(data, os.path.join(out_dir, samples.MODEL_DIR))
    click.echo(
        f"sample data: {data}\nscaler: {scaler_path}\nmodel: {model_path}\n"
        f"pickle-free copies: {samples.skops_path(scaler_path)}, {samples.skops_path(model_path)}"
    )
