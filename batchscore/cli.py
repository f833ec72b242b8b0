"""The ``batchscore`` command line: click commands that parse options and call the library."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from typing import Any, Callable

# Every computation runs in single-threaded workers (see scorer), so this process needs no BLAS
# thread pool; OpenBLAS would start one as NumPy loads and keep it spinning while start-up runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import click
import yaml

from . import __version__
from .config import LOG_FORMATS, ON_INVALID_CHOICES, JobConfig, build_config
from .errors import EXIT_CODES, EXIT_FAILURE, BatchscoreError, ConfigError

EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())


#: How the final error is written: set from the job's ``log_format`` once it is known.
_error_format = {"log_format": "text"}


def _fail(message: str, exit_code: int) -> None:
    """Write the one ``Error:`` line (a JSON line under ``--log-format json``) and exit."""
    if _error_format["log_format"] == "json":
        from .report import json_line

        click.echo(json_line("error", "error", message, exit_code=exit_code), err=True)
    else:
        click.echo(f"Error: {message}", err=True)
    sys.exit(exit_code)


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
        _interrupt_on_sigterm()
        _error_format["log_format"] = kwargs.get("log_format") or "text"
        try:
            return func(*args, **kwargs)
        except BatchscoreError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was committed", EXIT_FAILURE)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:
            message = _storage_failure(exc)
            if message is None:  # pragma: no cover - exercised only by bugs
                traceback.print_exc()
                message = f"unexpected {type(exc).__name__}: {exc}"
            _fail(message, EXIT_FAILURE)

    return wrapper


def _json_warnings() -> None:
    """Python warnings (e.g. scikit-learn's about a model's version) as JSON lines on stderr."""
    import warnings

    from .report import json_line

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        text = json_line("warning", "warning", f"{category.__name__}: {message}", category=category.__name__,
                         source=f"{filename}:{lineno}")
        (file or sys.stderr).write(text + "\n")

    warnings.showwarning = show


def _interrupt_on_sigterm() -> None:
    """Schedulers stop tasks with SIGTERM: unwind like Ctrl-C so unfinished parts are discarded."""
    import signal
    import threading

    owner = os.getpid()

    def interrupt(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked worker: unwind (its part is discarded), quietly when idle
            raise SystemExit(128 + signum)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def _parse_storage_options(values: tuple[str, ...]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--storage-option takes key=value, got {item!r}")
        options[key] = yaml.safe_load(value) if value else ""
    return options


#: What an artifact must be before it is loaded; shared by the job commands and ``inspect``.
ARTIFACT_OPTIONS = [
    click.option("--model-sha256", metavar="HEX", help="Refuse the model unless its bytes have this sha256; checked before it is loaded (see inspect)."),
    click.option("--scaler-sha256", metavar="HEX", help="Refuse the scaler unless its bytes have this sha256; checked before it is loaded."),
    click.option("--trust", multiple=True, metavar="TYPE", help="Let .skops artifacts hold this type too, e.g. sklearn.tree._tree.Tree. Repeatable."),
    click.option("--no-pickle", is_flag=True, default=None, help="Refuse joblib (pickle) artifacts: only .skops artifacts load."),
]


def _artifact_settings(kw: dict[str, Any]) -> dict[str, Any]:
    """Pop the artifact options out of a command's keyword arguments, as JobConfig settings."""
    return {
        "model_sha256": kw.pop("model_sha256"),
        "scaler_sha256": kw.pop("scaler_sha256"),
        "trusted_types": kw.pop("trust"),
        "allow_pickle": False if kw.pop("no_pickle") else None,
    }


JOB_OPTIONS = [
    click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML job file; flags override its keys."),
    click.option("--input", "input_", multiple=True, help="Parquet file, directory, or glob; local, file:// or s3://. Repeatable."),
    click.option("--output", help="Output dataset directory (local or s3://)."),
    click.option("--model", help="Model artifact, .joblib or .skops (a classifier, regressor or a whole Pipeline)."),
    click.option("--scaler", help="Scaler artifact, .joblib or .skops, applied before the model (omit for a Pipeline)."),
    *ARTIFACT_OPTIONS,
    click.option("--model-version", help="Written to every row and the manifest [default: unversioned]."),
    click.option("--features", help="Comma-separated feature columns [default: the estimator's feature_names_in_]."),
    click.option("--keep", help="Comma-separated passthrough columns [default: all input columns]."),
    click.option("--batch-size", type=int, help="Rows per batch read, scored and written [default: 65536]."),
    click.option("--on-invalid", type=click.Choice(ON_INVALID_CHOICES), help="Rows with null/NaN/inf features: fail, skip, or quarantine to _rejected/ [default: fail]."),
    click.option("--max-invalid-fraction", type=float, help="Most invalid rows allowed as a fraction of input rows [default: 0.05]."),
    click.option("--overwrite", is_flag=True, default=None, help="Replace an existing output."),
    click.option("--workers", type=int, help="Worker processes, one core each [default: all cores]."),
    click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE", help="fsspec storage option, e.g. endpoint_url=http://127.0.0.1:9000. Repeatable."),
    click.option("--storage-timeout", type=float, help="Seconds one storage request may wait to connect or for data [default: 10]."),
    click.option("--storage-retries", type=int, help="Retries of a failed storage request [default: 2]."),
    click.option("--log-format", type=click.Choice(LOG_FORMATS), help="Log lines, warnings and errors as text or JSON [default: text]."),
    click.option("--lease-seconds", type=float, help="How long the lease on the output outlives a crashed holder; renewed every third of it [default: 120]."),
    click.option("--lock-timeout", type=float, help="Seconds to wait for another job writing the output before giving up [default: 0]."),
    click.option("--reference", help="A previous committed output to check drift against (PSI, Wasserstein) at commit."),
    click.option("--drift-warn", type=float, help="Warn about columns whose PSI against --reference is above this [default: 0.1]."),
    click.option("--drift-fail", type=float, help="Exit 5 without _SUCCESS when a column's PSI is above this [default: off]."),
]


def job_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(JOB_OPTIONS):
        func = option(func)
    return func


def _config(kw: dict[str, Any]) -> JobConfig:
    """Pop the job options out of a command's keyword arguments into a JobConfig."""
    config = build_config(
        kw.pop("config_path"),
        input=kw.pop("input_"),
        output=kw.pop("output"),
        model=kw.pop("model"),
        scaler=kw.pop("scaler"),
        model_version=kw.pop("model_version"),
        features=kw.pop("features"),
        keep=kw.pop("keep"),
        batch_size=kw.pop("batch_size"),
        on_invalid=kw.pop("on_invalid"),
        max_invalid_fraction=kw.pop("max_invalid_fraction"),
        overwrite=kw.pop("overwrite"),
        workers=kw.pop("workers"),
        storage_options=_parse_storage_options(kw.pop("storage_option")),
        storage_timeout=kw.pop("storage_timeout"),
        storage_retries=kw.pop("storage_retries"),
        log_format=kw.pop("log_format"),
        **_artifact_settings(kw),
        lease_seconds=kw.pop("lease_seconds"),
        lock_timeout=kw.pop("lock_timeout"),
        reference=kw.pop("reference"),
        drift_warn=kw.pop("drift_warn"),
        drift_fail=kw.pop("drift_fail"),
    )
    _error_format["log_format"] = config.log_format
    if config.log_format == "json":
        _json_warnings()
    return config


def _reporter(config: JobConfig) -> Any:
    from .report import Reporter

    return Reporter(config.log_format)


def _summary(config: JobConfig, manifest: dict[str, Any]) -> None:
    rows = manifest["rows"]
    if config.log_format == "json":
        click.echo(json.dumps({"output": manifest["output"], "rows": rows, "parts": len(manifest["parts"]),
                               "seconds": manifest.get("seconds"), "plan_id": manifest["plan_id"]}))
        return
    seconds = manifest.get("seconds")
    speed = f" in {seconds:.2f} s ({rows['in'] / seconds:,.0f} rows/s)" if seconds else ""
    click.echo(f"scored {rows['out']:,} of {rows['in']:,} rows, {rows['invalid']:,} invalid{speed}")
    click.echo(f"output: {manifest['output']} ({len(manifest['parts'])} part(s), _SUCCESS written)")


def _parse_shard(value: str | None) -> tuple[int | None, int | None]:
    if value is None:
        return None, None
    index, _, count = value.partition("/")
    try:
        return int(index), (int(count) if count else None)
    except ValueError:
        raise ConfigError(f"--shard takes I or I/N, got {value!r}") from None


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
@_handle_errors
def run(plan_uri: str | None, shard: str | None, **kw: Any) -> None:
    """Score the input and commit the output (parts, _manifest.json, then _SUCCESS).

    With --shard, score one shard and write its receipt; `batchscore commit` finishes the job.
    """
    from . import job

    config = _config(kw)
    reporter = _reporter(config)
    index, count = _parse_shard(shard)
    if index is None:
        if plan_uri:
            raise ConfigError("--plan needs --shard (or use `batchscore commit --plan` to finish a job)")
        _summary(config, job.run(config, reporter))
        return
    if plan_uri:
        the_plan = job.load_plan(plan_uri, config)
        if count is not None and count != the_plan.num_shards:
            raise ConfigError(f"--shard {shard}: plan {plan_uri} has {the_plan.num_shards} shards, not {count}")
        receipt = job.run_shard(config, the_plan, index, reporter)
    elif count is not None:
        receipt = job.run_shard_of(config, index, count, reporter)
    else:
        raise ConfigError("--shard I needs --plan, or give it as I/N")
    click.echo(json.dumps({k: receipt[k] for k in ("shard", "rows_in", "rows_out", "rows_invalid", "seconds")}))


@main.command(epilog=EXIT_CODES_HELP)
@job_options
@click.option("--shards", type=int, help="Number of shards [default: 1].")
@click.option("--rows-per-shard", type=int, help="Aim for this many rows per shard instead of --shards.")
@click.option("--out", "out", help="Also write the plan JSON here (e.g. <output>/_plan.json).")
@_handle_errors
def plan(shards: int | None, rows_per_shard: int | None, out: str | None, **kw: Any) -> None:
    """Check the job and split its row groups into balanced shards, from footers only.

    Prints the plan as JSON. The same input always gives the same plan.
    """
    from . import job

    config = _config(kw)
    the_plan = job.plan(config, shards=shards, rows_per_shard=rows_per_shard, out=out)
    click.echo(json.dumps(the_plan.to_dict()))


@main.command(epilog=EXIT_CODES_HELP)
@job_options
@click.option("--plan", "plan_uri", help="The plan the shards ran from.")
@click.option("--shards", type=int, help="Without --plan: plan N shards again (deterministic) and commit them.")
@click.option("--accept-drift", is_flag=True, help="Commit an output held for drift (exit 5), as its held report describes it.")
@_handle_errors
def commit(plan_uri: str | None, shards: int | None, accept_drift: bool, **kw: Any) -> None:
    """Check every shard receipt against the plan, then write _manifest.json and _SUCCESS.

    Parts that no receipt lists (left by failed attempts) are removed. Safe to repeat.
    """
    from . import job

    config = _config(kw)
    if plan_uri:
        the_plan = job.load_plan(plan_uri, config)
    elif shards:
        the_plan = job.plan_again(config, shards)
    else:
        raise ConfigError("commit needs --plan (or --shards N to plan again)")
    manifest = job.commit(config, the_plan, _reporter(config), accept_drift=accept_drift)
    _summary(config, manifest)


@main.command(epilog=EXIT_CODES_HELP)
@job_options
@_handle_errors
def validate(**kw: Any) -> None:
    """Check the model, every input footer and schema, and the output location; score nothing."""
    from . import job

    config = _config(kw)
    prepared = job.validate(config)
    rows = sum(f.num_rows for f in prepared.files)
    click.echo(f"ok: {len(prepared.files)} file(s), {rows:,} rows; features {', '.join(prepared.model.features)}; "
               f"output columns {', '.join(prepared.output_schema.names)}")


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("output")
@click.option("--html", "html", type=click.Path(dir_okay=False), help="Also write the report as a self-contained HTML page here.")
@click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE", help="fsspec storage option. Repeatable.")
@_handle_errors
def report(output: str, html: str | None, storage_option: tuple[str, ...]) -> None:
    """Print an output's run report as JSON: rows, score and feature distributions, drift.

    The report file also holds each column's sketch, left out here (see README, Monitoring).
    """
    from .run_report import read_report, without_sketches

    found = read_report(output, _parse_storage_options(storage_option))
    if html:
        from .report_html import write_html

        write_html(found, html)
    click.echo(json.dumps(without_sketches(found), indent=2))


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
    from .model import ArtifactPolicy, artifact_digests, describe, load_model, pin_flags

    config = build_config(None, model=model, scaler=scaler, features=features,
                          storage_options=_parse_storage_options(storage_option), **_artifact_settings(kw))
    policy = ArtifactPolicy.of(config)
    if sha256_only:
        artifacts = artifact_digests(model, config.scaler, config.storage_options, policy)
        click.echo(json.dumps({"artifacts": [a.to_dict() for a in artifacts], "pin": pin_flags(artifacts)}, indent=2))
        return
    loaded = load_model(model, config.scaler, config.features, config.storage_options, policy)
    click.echo(json.dumps(describe(loaded), indent=2, default=str))


@main.command(epilog=EXIT_CODES_HELP)
@click.option("--out-dir", default="sample_data", show_default=True, type=click.Path(file_okay=False), help="Folder for churn.parquet and model/.")
@click.option("--rows", default=None, type=int, help="Rows of sample data [default: 10000].")
@click.option("--model-only", is_flag=True, help="Only (re)train the model from the existing sample data.")
@_handle_errors
def sample(out_dir: str, rows: int | None, model_only: bool) -> None:
    """Write the sample churn Parquet file and train its scaler + classifier (.joblib and .skops)."""
    import os

    from . import sample as samples

    data = os.path.join(out_dir, samples.DATA_FILE)
    if not model_only:
        samples.write_sample_data(out_dir, rows or samples.SAMPLE_ROWS)
    elif not os.path.exists(data):
        raise ConfigError(f"--model-only needs existing sample data at {data}")
    scaler_path, model_path = samples.train_sample_model(data, os.path.join(out_dir, samples.MODEL_DIR))
    click.echo(f"sample data: {data}\nscaler: {scaler_path}\nmodel: {model_path}\n"
               f"pickle-free copies: {samples.skops_path(scaler_path)}, {samples.skops_path(model_path)}")
