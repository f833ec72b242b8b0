"""The ``batchscore`` command line: click commands that parse options and call the library."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from typing import Any, Callable, Mapping

# Every computation runs in single-threaded workers (see scorer), so this process needs no BLAS
# thread pool; OpenBLAS would start one as NumPy loads and keep it spinning while start-up runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import click

from . import __version__, api, logs, schema
from .config import ARTIFACT_KEYS, CONFIG_KEYS, FIELDS, JobConfig, build_config, check_numbers
from .errors import EXIT_CODES, EXIT_FAILURE, BatchscoreError, ConfigError

EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())


log = logging.getLogger(__name__)


#: What hears how this command ends (its metrics push, its lineage run), once its config is known.
_observers: list[Any] = []


def _observe(config: JobConfig, shard: int | None = None, lineage: bool = True) -> None:
    """Push this command's metrics when it ends and, for scoring, report it as lineage, where configured."""
    from . import lineage as lineage_run
    from . import metrics

    name = config.job_name or "batchscore"
    started = [metrics.start(config.pushgateway, name, config.model_version, shard),
               lineage_run.start(config, name, shard) if lineage else None]
    _observers[:] = [observer for observer in started if observer is not None]


def _observed(result: Mapping[str, Any] | None) -> None:
    """The command succeeded with this manifest or receipt: tell its observers."""
    for observer in _observers:
        observer.succeeded(result)
    _observers.clear()


def _observed_failure(exit_code: int, message: str) -> None:
    """The command failed with this exit code: tell its observers."""
    for observer in _observers:
        observer.failed(exit_code, message)
    _observers.clear()


def _fail(message: str, exit_code: int, with_traceback: bool = False) -> None:
    """Log the one ``Error:`` line (a JSON line under ``--log-format json``), report the failure to
    the command's observers, and exit."""
    from . import stopping

    stopping.reported()
    log.error(message, exc_info=with_traceback, extra=logs.event("error", exit_code=exit_code))
    _observed_failure(exit_code, message)
    sys.exit(exit_code)


def _report_stop(message: str) -> None:
    """The error line of a stop whose deadline passed (written from the stop watcher's thread)."""
    log.error(message, extra=logs.event("error", exit_code=EXIT_FAILURE))


def _storage_failure(exc: BaseException) -> str | None:
    """One sentence for a storage failure that reached the top without a path-specific message."""
    from .storage import failure_cause

    cause = failure_cause(exc)
    if cause is None:
        return None
    filename = getattr(exc, "filename", None)
    return f"storage failure on {filename}: {cause}" if filename else f"storage failure: {cause}"


def _handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors and storage failures into one 'Error:' line and their exit code; anything
    else is a bug and keeps its traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from . import stopping

        _interrupt_on_sigterm()
        _observers.clear()
        logs.configure(kwargs.get("log_format") or "text")  # until the job's own setting is known
        try:
            with stopping.bounded(_report_stop):  # whatever blocks, a stop ends the process in time
                result = func(*args, **kwargs)
        except BatchscoreError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was committed", EXIT_FAILURE)
        except (click.exceptions.Exit, click.ClickException, SystemExit) as exc:
            _exited(exc)
            raise
        except Exception as exc:
            message = _storage_failure(exc)
            if message is None:  # pragma: no cover - exercised only by bugs
                _fail(f"unexpected {type(exc).__name__}: {exc}", EXIT_FAILURE, with_traceback=True)
            _fail(message, EXIT_FAILURE)
        _observed(None)  # a command that returned without handing its result over still succeeded
        return result

    return wrapper


def _exited(exc: BaseException) -> None:
    """A command that ended by exiting (with any code) is observed to end like any other."""
    code = exc.code if isinstance(exc, SystemExit) else getattr(exc, "exit_code", EXIT_FAILURE)
    code = 0 if code is None else code if isinstance(code, int) else EXIT_FAILURE
    if code == 0:
        _observed(None)
        return
    _observed_failure(code, str(exc) or f"exit code {code}")


def _interrupt_on_sigterm() -> None:
    """Schedulers stop tasks with SIGTERM: unwind like Ctrl-C so unfinished parts are discarded.
    Either one is noted at once (see stopping.py: no ``_SUCCESS`` after it)."""
    import signal
    import threading

    from . import stopping

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


def _parse_storage_options(values: tuple[str, ...]) -> dict[str, Any]:
    return schema.parse_pairs(values, "--storage-option")


#: What an artifact must be before it is loaded; shared by the job commands and ``inspect``.
ARTIFACT_OPTIONS = schema.click_options(FIELDS, ARTIFACT_KEYS)


def _artifact_settings(kw: dict[str, Any]) -> dict[str, Any]:
    """Pop the artifact options out of a command's keyword arguments, as JobConfig settings."""
    return schema.from_click(FIELDS, ARTIFACT_KEYS, kw)


#: One option per JobConfig field (see config.py), after ``--config``.
JOB_OPTIONS = [
    click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML job file; flags override its keys."),
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
        click.echo(json.dumps({"output": result.output, "rows": rows, "parts": len(result.parts),
                               "seconds": seconds, "plan_id": result.plan_id}))
        return
    speed = f" in {seconds:.2f} s ({rows['in'] / seconds:,.0f} rows/s)" if seconds else ""
    click.echo(f"scored {rows['out']:,} of {rows['in']:,} rows, {rows['invalid']:,} invalid{speed}")
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
        raise ConfigError(f"--shard {value}: {exc}") from None
    return parsed


@click.group(epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="batchscore")
def main() -> None:
    """Score Parquet tables with a fitted scikit-learn model, streaming, locally or on S3.

    Start with `batchscore run --config configs/sample.yaml`.
    """


@main.command(epilog=EXIT_CODES_HELP)
@job_options
@click.option("--plan", "plan_uri", help="Plan JSON (from `batchscore plan`) whose shard to score.")
@click.option("--shard", help="Score only shard I of --plan, or I/N to plan N shards on the fly; writes no _SUCCESS.")
@click.option("--plan-sha256", "plan_sha256", help="Refuse a --plan whose sha256 is not this one (as `plan` printed it).")
@_handle_errors
def run(plan_uri: str | None, shard: str | None, plan_sha256: str | None, **kw: Any) -> None:
    """Score the input and commit the output (parts, the manifest, then _SUCCESS).

    With --shard, score one shard and write its receipt; `batchscore commit` finishes the job.
    """
    config = _config(kw)
    index, count = _parse_shard(shard)
    _observe(config, shard=index)
    if index is None:
        if plan_uri:
            raise ConfigError("--plan needs --shard (or use `batchscore commit --plan` to finish a job)")
        result = api.run(config)
        _observed(result.manifest)
        _summary(config, result)
        return
    done = api.run_shard(config, index, plan=plan_uri, count=count, plan_sha256=plan_sha256)
    _observed(done.receipt)
    click.echo(json.dumps({"shard": done.shard, "rows_in": done.rows_in, "rows_out": done.rows_out,
                           "rows_invalid": done.rows_invalid, "seconds": done.seconds}))


@main.command(epilog=EXIT_CODES_HELP)
@job_options
@click.option("--shards", type=int, help="Number of shards [default: 1].")
@click.option("--rows-per-shard", type=int, help="Aim for this many rows per shard instead of --shards.")
@click.option("--out", "out", help="Also write the plan JSON here, never inside the output "
              "(e.g. <parent>/_batchscore/<output name>/plan.json, beside it).")
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
@job_options
@click.option("--plan", "plan_uri", help="The plan the shards ran from.")
@click.option("--shards", type=int, help="Without --plan: plan N shards again (deterministic) and commit them.")
@click.option("--accept-drift", is_flag=True, help="Commit an output held for drift (exit 5), as its held report describes it.")
@click.option("--plan-sha256", "plan_sha256", help="Refuse a --plan whose sha256 is not this one (as `plan` printed it).")
@_handle_errors
def commit(plan_uri: str | None, shards: int | None, accept_drift: bool, plan_sha256: str | None, **kw: Any) -> None:
    """Check every shard receipt against the plan, then write the manifest and _SUCCESS.

    Parts that no receipt lists (left by failed attempts) are removed. Safe to repeat.
    """
    config = _config(kw)
    _observe(config, lineage=False)
    result = api.commit(config, plan=plan_uri, shards=shards, accept_drift=accept_drift, plan_sha256=plan_sha256)
    _observed(result.manifest)
    _summary(config, result)


@main.command(epilog=EXIT_CODES_HELP)
@job_options
@_handle_errors
def validate(**kw: Any) -> None:
    """Check the model, every input footer and schema, and the output location; score nothing."""
    config = _config(kw)
    checked = api.validate(config)
    click.echo(f"ok: {checked.files} file(s), {checked.rows:,} rows; features {', '.join(checked.features)}; "
               f"output columns {', '.join(checked.output_columns)}")


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("output")
@click.option("--html", "html", type=click.Path(dir_okay=False), help="Also write the report as a self-contained HTML page here.")
@click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE", help="fsspec storage option. Repeatable.")
@_handle_errors
def report(output: str, html: str | None, storage_option: tuple[str, ...]) -> None:
    """Print an output's run report as JSON: rows, score and feature distributions, drift.

    The report file also holds each column's sketch, left out here (see README, Monitoring).
    """
    found = api.report(output, _parse_storage_options(storage_option), html=html)
    click.echo(json.dumps(found.to_dict(), indent=2))


def _artifact_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(ARTIFACT_OPTIONS):
        func = option(func)
    return func


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("model")
@click.option("--scaler", help="Scaler artifact to inspect with the model.")
@click.option("--features", help="Comma-separated feature names, for a model fitted without them.")
@click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE", help="fsspec storage option. Repeatable.")
@_artifact_options
@click.option("--sha256-only", is_flag=True, help="Print only each artifact's format and sha256, without loading it: safe on a file not yet trusted.")
@_handle_errors
def inspect(model: str, scaler: str | None, features: str | None, storage_option: tuple[str, ...], sha256_only: bool,
            **kw: Any) -> None:
    """Print a model's type, features, classes, scikit-learn version and sha256 as JSON.

    Its "pin" line gives the --model-sha256 (and --scaler-sha256) flags that pin exactly these files.
    """
    config = build_config(None, model=model, scaler=scaler, features=features,
                          storage_options=_parse_storage_options(storage_option), **_artifact_settings(kw))
    click.echo(json.dumps(api.inspect(config, sha256_only=sha256_only).to_dict(), indent=2, default=str))


@main.command(name="compile", epilog=EXIT_CODES_HELP)
@click.argument("model")
@click.option("--out", help="Folder or URL (s3://...) to put the library in [default: the compiled cache, see "
              "run --compiled-cache]; a URL also keeps a copy in the local cache.")
@click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE", help="fsspec storage option. Repeatable.")
@_artifact_options
@_handle_errors
def compile_(model: str, out: str | None, storage_option: tuple[str, ...], **kw: Any) -> None:
    """Compile a tree ensemble for --engine compiled/auto ahead of time (needs a C compiler).

    Runs that find the library in their --compiled-cache load it without compiling, so an image
    without a compiler can use it. Prints the library's path and sha256 as JSON.
    """
    config = build_config(None, model=model, storage_options=_parse_storage_options(storage_option),
                          **_artifact_settings(kw))
    click.echo(json.dumps(api.compile_model(config, out).to_dict()))


@main.command(epilog=EXIT_CODES_HELP)
@click.option("--out-dir", default="sample_data", show_default=True, type=click.Path(file_okay=False), help="Folder for churn.parquet and model/.")
@click.option("--rows", default=None, type=int, help="Rows of sample data [default: 10000].")
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
    click.echo(f"sample data: {data}\nscaler: {scaler_path}\nmodel: {model_path}\n"
               f"pickle-free copies: {samples.skops_path(scaler_path)}, {samples.skops_path(model_path)}")
