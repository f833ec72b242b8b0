"""One validated ``JobConfig`` from a YAML file plus command-line overrides.

``JobConfig`` is the one declaration of a job's settings: each field's type, default, help and
constraints give the command-line options, the YAML checks, the flags a scheduler passes to the
container and the key table of docs/configuration.md (see schema.py, reference.py). To add a setting,
add a field here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from . import schema
from .errors import EXIT_DRIFT, EXIT_USAGE, ConfigError, param
from .schema import setting
from .strict_yaml import DuplicateKeyError, load_yaml

DEFAULT_BATCH_SIZE = 65_536
#: The most bytes of read columns one batch holds: 64 MiB, a few hundred bytes a row at the default batch_size.
DEFAULT_MAX_BATCH_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_INVALID_FRACTION = 0.05
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
#: How skops names a type: its module, a dot, its name (e.g. sklearn.tree._tree.Tree).
TYPE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
#: How long a lease on the output outlives a holder that stopped renewing it (crashed on another
#: host, or paused): long enough for a slow store to renew it, short enough for a retry to wait.
DEFAULT_LEASE_SECONDS = 120.0
DEFAULT_LOCK_TIMEOUT = 0.0
DEFAULT_DRIFT_WARN = 0.1
#: Seconds one storage request may wait for a connection or for the next bytes of an answer.
DEFAULT_STORAGE_TIMEOUT = 10.0
#: Times a failed request is retried (connection refused, timeout, server error); throttling has its own bound.
DEFAULT_STORAGE_RETRIES = 2
#: Seconds one request keeps being retried while the store answers that it is throttling (SlowDown, 429).
DEFAULT_STORAGE_THROTTLE_SECONDS = 120.0
#: The longest a call to a stalled endpoint takes with the defaults: every try times out, between them the backoff.
DEFAULT_STALLED_CALL_SECONDS = (DEFAULT_STORAGE_RETRIES + 1) * DEFAULT_STORAGE_TIMEOUT + 2**DEFAULT_STORAGE_RETRIES - 1
#: What ``model_version`` is unless a job gives one (a registry model's version takes its place).
DEFAULT_MODEL_VERSION = "unversioned"
#: The variable MLflow reads the tracking server from: the registry a job's ``models:/`` URIs name when ``registry_uri`` does not.
REGISTRY_ENV = "MLFLOW_TRACKING_URI"
#: The variable that names the compiled engine's cache folder when ``compiled_cache`` does not.
COMPILED_CACHE_ENV = "BATCHSCORE_COMPILED_CACHE"
#: Upper bounds: each number a job takes has one, so a typo is a usage error and not a crash deep
#: inside the job; the reasons are the settings' ``why``.
MAX_BATCH_SIZE = 2**24
MAX_BATCH_BYTES = 2**34
MAX_WORKERS = 1024
DAY_SECONDS = 86_400.0
#: PSI is computed with each bar's share floored at 1e-4 (see drift.py), so it never exceeds
#: 2 * ln(10^4) = 18.4: a threshold above 20 could never be crossed.
MAX_PSI = 20.0
PSI_WHY = "PSI never exceeds 18.4 with its bars floored at 1e-4"
#: Settings that are text: a path or a version, never a number YAML guessed.
#: A table partition as a job names it, ``COLUMN=VALUE``: a plain column name, a value safe in a path.
#: (No ``:`` or ``+``: a table's log names files by URI, where those would need escaping.)
PARTITION_PATTERN = re.compile(r"^([A-Za-z][A-Za-z0-9_]{0,127})=([A-Za-z0-9][A-Za-z0-9._-]{0,127})$")
#: An Iceberg table identifier: namespace(s) and name, dotted.
ICEBERG_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
TEXT_KEYS = (
    "output",
    "model",
    "scaler",
    "registry_uri",
    "model_version",
    "compiled_cache",
    "pushgateway",
    "job_name",
    "reference",
)


#: Jinja's markers (``{{ ds }}``, ``{% if %}``, ``{# #}``): a value holding one is a template.
TEMPLATE = re.compile(r"\{\{|\{%|\{#")
#: Set while the DAG factory checks a job file: Airflow renders its templates before batchscore runs.
_TEMPLATES_RENDERED: ContextVar[bool] = ContextVar("templates_rendered", default=False)


class TemplateLeftError(ConfigError):
    """A setting still holds a template where nothing renders it; ``key`` names the setting."""

    def __init__(self, key: str, text: str) -> None:
        super().__init__(
            f"setting '{key}' holds the template {text!r}, which nothing renders here (only the "
            f"Airflow DAG renders a job's templates, before it starts batchscore); give the value itself"
        )
        self.key = key


def _texts(value: Any) -> list[str]:
    """Every string in a value, however deep in its lists and mappings (keys too)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        value = [*value.keys(), *value.values()]
    return [s for item in value for s in _texts(item)] if isinstance(value, (list, tuple)) else []


def refuse_template(key: str, value: Any) -> None:
    """Refuse a value that still holds a template: ``out/dt={{ ds }}`` run outside Airflow would
    write into a folder literally named ``dt={{ ds }}``."""
    for text in _texts(value):
        if TEMPLATE.search(text):
            raise TemplateLeftError(key, text)


@contextmanager
def templates_rendered() -> Iterator[None]:
    """Accept templates in job settings within the block: for the DAG factory, whose templates
    Airflow renders before the container runs."""
    token = _TEMPLATES_RENDERED.set(True)
    try:
        yield
    finally:
        _TEMPLATES_RENDERED.reset(token)


@dataclasses.dataclass(frozen=True)
class StorageSettings:
    """The storage settings of a job, as one value handed to whatever opens a filesystem.

    ``options`` are the user's fsspec options (they reach remote filesystems only); the bounds are
    batchscore's own and bound every S3 request (see ``io.storage``). The defaults are the
    settings' defaults, for callers without a job (``batchscore report``).
    """

    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    timeout: float = DEFAULT_STORAGE_TIMEOUT
    retries: int = DEFAULT_STORAGE_RETRIES
    throttle_seconds: float = DEFAULT_STORAGE_THROTTLE_SECONDS
    registry_uri: str | None = None  # where models:/ and runs:/ URIs resolve (see models.registry)


#: How a challenger may be named: it becomes part of its output columns (``probability__NAME``).
MODEL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")
#: What a ``models:`` entry's ``role`` may be.
ROLES = ("champion", "challenger")


@dataclass(frozen=True, config=ConfigDict(strict=True, extra="forbid"))
class ModelEntry:
    """One model of a job's ``models:`` list: the champion (the job's own ``model``) or a challenger
    scored on the same rows, in the same pass (see docs/challengers.md)."""

    name: str
    model: str
    role: Literal["champion", "challenger"] = "challenger"
    scaler: str | None = None
    model_sha256: str | None = None
    scaler_sha256: str | None = None
    model_version: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not MODEL_NAME.fullmatch(value):
            raise ValueError(
                f"model name {value!r} must start with a letter and hold only letters, digits and _ "
                f"(at most 63): it names the challenger's columns, e.g. probability__{value}"
            )
        return value

    @field_validator("model_sha256", "scaler_sha256")
    @classmethod
    def _digest(cls, value: str | None, info: Any) -> str | None:
        if value is not None and not SHA256_HEX.fullmatch(value):
            raise ValueError(f"models: '{info.field_name}' must be a sha256 digest (64 hex characters), got {value!r}")
        return value.lower() if value else value

    @field_validator("model", "scaler", "model_version", mode="before")
    @classmethod
    def _text(cls, value: Any, info: Any) -> Any:
        return check_text(info.field_name, value)

    def __post_init__(self) -> None:
        if self.scaler_sha256 and not self.scaler:
            raise ValueError(f"models: entry {self.name!r} pins a scaler (scaler_sha256) but gives no scaler")

    def flag_text(self) -> str:
        """The entry as ``--challenger`` takes it: ``NAME=URI``, or JSON when it says more."""
        given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "role"}
        if set(given) == {"name", "model"} and "=" not in self.name:
            return f"{self.name}={self.model}"
        return json.dumps(given, sort_keys=True)


def model_entry(value: Any) -> Any:
    """A ``--challenger`` value (``NAME=URI``, or a JSON/YAML mapping) or a ``models:`` item, as
    the mapping ``ModelEntry`` is made of."""
    if isinstance(value, ModelEntry):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = load_yaml(text)
            except yaml.YAMLError as exc:
                raise ValueError(f"--challenger {value!r} is not a valid JSON/YAML mapping: {exc}") from None
        else:
            name, sep, uri = text.partition("=")
            if not sep or not name or not uri:
                raise ValueError(f"--challenger takes NAME=URI (or a JSON mapping), got {value!r}")
            return ModelEntry(name=name.strip(), model=uri.strip())
    if isinstance(value, Mapping):
        return ModelEntry(**dict(value))
    raise ValueError(f"setting 'models' holds mappings (name, role, model, scaler ...), got {value!r}")


@dataclass(frozen=True, config=ConfigDict(strict=True, extra="forbid", allow_inf_nan=False))
class JobConfig:
    """Everything a scoring job needs; every field is also a YAML key of the same name."""

    input: tuple[str, ...] = setting(
        (),
        "Parquet file, directory or glob, local, file:// or s3://; a list of them in YAML.",
        repeat=True,
        shown="required",
    )
    output: str | None = setting(None, "Output dataset directory (local or s3://).", shown="required")
    model: str | None = setting(
        None,
        "Model artifact, .joblib (pickle) or .skops: a classifier, regressor or a whole Pipeline; or a "
        "registry model, models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH (see Models from a registry).",
        shown="required",
    )
    scaler: str | None = setting(
        None, "Scaler artifact, .joblib or .skops, or a registry URI, applied before the model (omit for a Pipeline)."
    )
    registry_uri: str | None = setting(
        None,
        "MLflow tracking server (http://host:5000) or registry file (sqlite:///mlruns.db) that models:/ and "
        "runs:/ URIs resolve against; the flag wins over the key, the key over the variable.",
        metavar="URI",
        shown=f"${REGISTRY_ENV}",
    )
    model_sha256: str | None = setting(
        None,
        "Refuse the model unless its bytes have this sha256; checked before it is "
        "loaded (`batchscore inspect --sha256-only` prints it).",
        metavar="HEX",
    )
    scaler_sha256: str | None = setting(
        None, "Refuse the scaler unless its bytes have this sha256; needs a scaler.", metavar="HEX"
    )
    trusted_types: tuple[str, ...] = setting(
        (),
        "Types a .skops artifact may hold beyond those skops trusts, by full name, e.g. sklearn.tree._tree.Tree.",
        flag="--trust",
        metavar="TYPE",
        repeat=True,
    )
    allow_pickle: bool = setting(
        True,
        "Whether joblib (pickle) artifacts may load; false (flag --no-pickle) loads only .skops artifacts.",
        flag="--no-pickle",
        switch=False,
    )
    model_version: str = setting(
        DEFAULT_MODEL_VERSION,
        'Written to every row and the manifest; quote it in YAML ("1.10"). A registry model\'s version unless given.',
    )
    features: tuple[str, ...] | None = setting(
        None,
        "Feature columns, comma-separated on the command line.",
        csv=True,
        shown="the estimator's feature_names_in_",
    )
    keep: tuple[str, ...] | None = setting(
        None, "Passthrough columns, comma-separated on the command line.", csv=True, shown="all input columns"
    )
    batch_size: int = setting(
        DEFAULT_BATCH_SIZE,
        "Rows per batch read, scored and written.",
        ge=1,
        le=MAX_BATCH_SIZE,
        why="a few batches per worker are held in memory at once, and 2^24 rows of features already take gigabytes",
    )
    max_batch_bytes: int = setting(
        DEFAULT_MAX_BATCH_BYTES,
        "Most bytes of read columns per batch, whatever batch_size says: wide rows make smaller batches.",
        ge=1,
        le=MAX_BATCH_BYTES,
        unit="bytes",
        why="16 GiB of input columns in one batch is no bound on a worker's memory",
    )
    on_invalid: Literal["fail", "skip", "quarantine"] = setting(
        "fail", "Rows with null/NaN/inf features: fail, skip, or quarantine them beside the output with a reason."
    )
    max_invalid_fraction: float = setting(
        DEFAULT_MAX_INVALID_FRACTION,
        "Most invalid rows allowed as a fraction of input rows (skip or quarantine).",
        ge=0,
        le=1,
        why="a fraction",
    )
    overwrite: bool = setting(False, "Replace an existing output.", switch=True)
    output_format: Literal["parquet", "delta", "iceberg"] = setting(
        "parquet",
        "parquet: the output is a folder of Parquet parts; delta: a Delta Lake table (local or s3://), "
        "iceberg: an Apache Iceberg table at that location, that commit adds the parts to in one "
        "transaction (needs batchscore[delta] or batchscore[iceberg]).",
    )
    table_mode: Literal["append", "replace"] = setting(
        "append",
        "For a table output: append the run's rows, or replace the rows of `partition` (of the whole table "
        "without one) with them, in one transaction.",
    )
    partition: str | None = setting(
        None,
        "For a table output: the partition COLUMN=VALUE every row of the run goes to (e.g. dt=2026-11-24); "
        "the table is partitioned by COLUMN, a string.",
        metavar="COLUMN=VALUE",
    )
    incremental: bool = setting(
        False,
        "For a table output (Delta or Iceberg): score only input files the table has not recorded as scored with this model, "
        "these scoring settings and this batchscore version; a file that changed is rescored and its rows "
        "replaced in the same commit.",
        switch=True,
    )
    full_refresh: bool = setting(
        False,
        "With incremental: rescore every input file, replacing every row of the table, in one commit.",
        switch=True,
    )
    iceberg_catalog: str | None = setting(
        None,
        "For an Iceberg output: the pyiceberg catalog to commit through, by name, configured as pyiceberg "
        "reads it (.pyiceberg.yaml, PYICEBERG_CATALOG__NAME__* variables).",
        metavar="NAME",
        shown="a SQLite catalog in the table's state folder (local outputs)",
    )
    iceberg_table: str | None = setting(
        None,
        "For an Iceberg output: the table's identifier in the catalog, NAMESPACE.NAME.",
        metavar="NAMESPACE.NAME",
        shown="batchscore.<output name>",
    )
    workers: int | None = setting(
        None,
        "Worker processes, each with one compute thread.",
        ge=1,
        le=MAX_WORKERS,
        shown="all cores this process may use",
        why="each worker is a process with its own copy of the model; no host has "
        f"more than {MAX_WORKERS} cores to give them",
    )
    storage_options: Mapping[str, Any] = setting(
        {},
        "fsspec options for remote storage, one KEY=VALUE per flag, e.g. endpoint_url=http://127.0.0.1:9000.",
        flag="--storage-option",
        metavar="KEY=VALUE",
    )
    storage_timeout: float = setting(
        DEFAULT_STORAGE_TIMEOUT,
        "Seconds one storage request may wait to connect or for the next data.",
        gt=0,
        le=3600,
        unit="seconds",
        why="a request stalled for an hour has failed",
    )
    storage_retries: int = setting(
        DEFAULT_STORAGE_RETRIES,
        "Retries of a failed storage request; a stalled endpoint "
        f"fails a call within (retries + 1) x timeout + 2^retries - 1 s "
        f"({DEFAULT_STALLED_CALL_SECONDS:g} s).",
        ge=0,
        le=20,
        why="backoff doubles per retry: 20 retries already wait 2^20 s, 12 days",
    )
    storage_throttle_seconds: float = setting(
        DEFAULT_STORAGE_THROTTLE_SECONDS,
        "Seconds one storage request is "
        "retried, with exponential backoff and jitter, while the store answers "
        "that it is throttling (503 SlowDown, 429); apart from storage_retries.",
        ge=0,
        le=3600,
        unit="seconds",
        why="a request throttled for an hour has failed: the store is down for this job",
    )
    log_format: Literal["text", "json"] = setting("text", "Log lines, warnings and the final error as text or JSON.")
    lease_seconds: float = setting(
        DEFAULT_LEASE_SECONDS,
        "How long the lease on the output outlives a holder that stopped renewing it; renewed every third of it.",
        ge=1,
        le=DAY_SECONDS,
        unit="seconds",
        why="a crashed holder blocks the output this long; a day is already a lost run",
    )
    lock_timeout: float = setting(
        DEFAULT_LOCK_TIMEOUT,
        f"Seconds to wait while another job writes the output before giving up (exit {EXIT_USAGE}).",
        ge=0,
        le=DAY_SECONDS,
        unit="seconds",
        why="a job that waits a day for another has missed its schedule",
    )
    engine: Literal["sklearn", "compiled", "auto"] = setting(
        "sklearn",
        "Score tree ensembles with scikit-learn, a compiled library verified on the job's rows first, or "
        "auto (compiled where it qualifies and agrees, else scikit-learn).",
    )
    compiled_cache: str | None = setting(
        None,
        "Folder of compiled model libraries (see `batchscore compile`), or a "
        "URL such as s3://bucket/compiled/ shared by every host.",
        metavar="DIR",
        shown=f"${COMPILED_CACHE_ENV} or ~/.cache/batchscore/compiled",
    )
    pushgateway: str | None = setting(
        None,
        "Prometheus Pushgateway that receives the job's metrics when it ends "
        "(see Monitoring); the flag wins over the variable, the variable over the key.",
        metavar="URL",
        envvar="BATCHSCORE_PUSHGATEWAY",
    )
    job_name: str | None = setting(
        None,
        "The job's name in its metrics (`job` label) and lineage.",
        shown="the config file's stem, else batchscore",
    )
    reference: str | None = setting(
        None, "A previous committed output (local or S3) to check drift against (PSI, Wasserstein) at commit."
    )
    drift_warn: float = setting(
        DEFAULT_DRIFT_WARN,
        "Warn about columns whose PSI against the reference is above this.",
        ge=0,
        le=MAX_PSI,
        why=PSI_WHY,
    )
    drift_fail: float | None = setting(
        None,
        f"Exit {EXIT_DRIFT} without _SUCCESS when a column's PSI against the reference is above this.",
        ge=0,
        le=MAX_PSI,
        shown="off",
        why=PSI_WHY,
    )

    models: tuple[ModelEntry, ...] = setting(
        (),
        "Challengers scored in the same pass as the champion, each adding its own columns (or folder); YAML: a list of "
        "name, role, model, scaler, model_sha256, scaler_sha256, model_version (see Champion and challengers).",
        flag="--challenger",
        metavar="NAME=URI",
        repeat=True,
    )
    challengers_required: bool = setting(
        False,
        "Fail the job (exit 4; exit 1 when its registry or store did not answer; nothing committed) when a "
        "challenger fails to load or raises; by default "
        "the champion's output commits and the report and metrics record the failure.",
        switch=True,
    )
    challenger_output: Literal["columns", "folders"] = setting(
        "columns",
        "columns: each challenger adds its own columns (prediction__NAME, ...) to the output; folders: each "
        "writes its own folder of parts, as a job of that model alone would, in the state folder, committed "
        "by the output's _SUCCESS and manifest (Parquet folder outputs, not tables; see Champion and challengers).",
    )

    @field_validator("input", "trusted_types", "features", "keep", mode="before")
    @classmethod
    def _names(cls, value: Any, info: Any) -> tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, str):
            parts = [v.strip() for v in value.split(",")] if info.field_name in LIST_KEYS else [value]
            return tuple(p for p in parts if p)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError(f"setting '{info.field_name}' must be a string or a list of strings, got {value!r}")

    @field_validator(*TEXT_KEYS, mode="before")
    @classmethod
    def _text(cls, value: Any, info: Any) -> Any:
        return check_text(info.field_name, value)

    @field_validator("model_sha256", "scaler_sha256")
    @classmethod
    def _digest(cls, value: str | None, info: Any) -> str | None:
        if value is not None and not SHA256_HEX.fullmatch(value):
            raise ValueError(f"setting '{info.field_name}' must be a sha256 digest (64 hex characters), got {value!r}")
        return value.lower() if value else value

    @field_validator("trusted_types")
    @classmethod
    def _type_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        bad = [name for name in names if not TYPE_NAME.fullmatch(name)]
        if bad:
            raise ValueError(
                "setting 'trusted_types' names each type by module and name, e.g. "
                f"sklearn.tree._tree.Tree; got {', '.join(map(repr, bad))}"
            )
        return names

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: Any) -> tuple[ModelEntry, ...]:
        if value is None:
            return ()
        items = [value] if isinstance(value, (str, Mapping)) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"setting 'models' must be a list of models, got {value!r}")
        entries = tuple(model_entry(item) for item in items)
        names = [e.name for e in entries]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"setting 'models' names {', '.join(twice)} more than once; each model needs its own name")
        if any(e.role == "champion" for e in entries):  # moved into model/scaler by validate_settings
            raise ValueError(
                "setting 'models': the champion is the job's model (key 'model', or one entry of role champion)"
            )
        return entries

    @field_validator("partition")
    @classmethod
    def _partition(cls, value: str | None) -> str | None:
        if value is not None and not PARTITION_PATTERN.fullmatch(value):
            raise ValueError(
                f"setting 'partition' must be COLUMN=VALUE (a column name, then a value of letters, digits "
                f"and ._-), got {value!r}"
            )
        return value

    @field_validator("iceberg_table")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        if value is not None and not ICEBERG_IDENTIFIER.fullmatch(value):
            raise ValueError(f"setting 'iceberg_table' must be NAMESPACE.NAME (letters, digits, _), got {value!r}")
        return value

    @field_validator("storage_options", mode="after")
    @classmethod
    def _plain_mapping(cls, value: Mapping[str, Any]) -> dict[str, Any]:
        return dict(value)

    def __post_init__(self) -> None:
        if not _TEMPLATES_RENDERED.get():
            for key in FIELDS:
                refuse_template(key, getattr(self, key))

    @property
    def storage(self) -> StorageSettings:
        """How this job reaches storage: every filesystem it opens is opened with these."""
        return StorageSettings(
            dict(self.storage_options),
            self.storage_timeout,
            self.storage_retries,
            self.storage_throttle_seconds,
            self.registry_uri or os.environ.get(REGISTRY_ENV) or None,
        )

    def require(self, name: str) -> str:
        """The value of a required setting (``model``, ``output``), or a usage error naming it."""
        value = getattr(self, name)
        if not value:
            raise ConfigError(f"missing required setting {param(name)} (YAML key '{name}')")
        return value

    @property
    def worker_count(self) -> int:
        """Workers to use: the configured number, else every core this process may use.

        joblib counts the CPUs of this process's affinity, capped by a container's CPU quota
        (cgroup v1 or v2): a pod limited to 2 CPUs on a 64-core node must not start 64 workers.
        """
        if self.workers:
            return self.workers
        import joblib

        return joblib.cpu_count()


#: The most shards a job splits into: each is a task (a pod) and a receipt that commit reads, and
#: part names keep five digits up to here.
MAX_SHARDS = 10_000
#: More rows than any one job holds (a trillion): a larger count is a typo.
MAX_ROWS = 10**12
SHARDS_WHY = "each shard is a task and a receipt that commit reads; more would swamp the scheduler"
ROWS_WHY = "a trillion rows is more than one job holds"
#: Rows of sample data that ``batchscore sample`` writes unless told.
SAMPLE_ROWS = 10_000


@dataclass(frozen=True, config=ConfigDict(strict=True, extra="forbid"))
class CommandNumbers:
    """Numbers that only a command's flags give, not job keys: how a job is split, the sample's size.

    Declared like the job's settings so that they are bounded (and tested) the same way.
    """

    shards: int | None = setting(
        None, "Number of shards (plan, commit; `dag.shards`).", ge=1, le=MAX_SHARDS, shown="1", why=SHARDS_WHY
    )
    rows_per_shard: int | None = setting(
        None, "Target rows per shard instead of --shards.", ge=1, le=MAX_ROWS, why=ROWS_WHY
    )
    shard: int | None = setting(
        None,
        "The shard to score, I of --shard I or I/N.",
        ge=0,
        le=MAX_SHARDS - 1,
        flag="--shard",
        why=f"shards are numbered from 0 below the most a job has, {MAX_SHARDS}",
    )
    rows: int | None = setting(
        None,
        "Rows of sample data (batchscore sample).",
        ge=1,
        le=10**8,
        shown=str(SAMPLE_ROWS),
        why="the sample is built in memory: 10^8 rows take gigabytes",
    )


COMMAND_FIELDS = CommandNumbers.__pydantic_fields__  # type: ignore[attr-defined]  # set by pydantic's @dataclass


def shard_size_conflict(shards: Any, rows_per_shard: Any, name: Callable[[str], str] = param) -> str | None:
    """The one rule on how a job is split: by a number of shards or by rows per shard, never both.

    Returns the refusal, naming the two as ``name`` does (parameters, rendered as flags by the CLI;
    ``dag:`` keys; a run's params), or None when at most one is given.
    """
    if shards is not None and rows_per_shard is not None:
        return f"give {name('shards')} or {name('rows_per_shard')}, not both"
    return None


def check_numbers(names: Mapping[str, str] | None = None, **values: Any) -> None:
    """Refuse a command's numbers out of their declared range, naming each as the caller called it
    (``names``: e.g. ``shard`` is ``run_shard``'s ``index``), and a split given both ways (see
    :func:`shard_size_conflict`)."""
    given = {key: value for key, value in values.items() if value is not None}
    conflict = shard_size_conflict(given.get("shards"), given.get("rows_per_shard"))
    if conflict:
        raise ConfigError(conflict)
    try:
        CommandNumbers(**given)
    except ValidationError as exc:
        name = lambda loc: param((names or {}).get(str(loc[0]), str(loc[0])))  # noqa: E731
        raise ConfigError(schema.explain(exc, COMMAND_FIELDS, name)) from None


@dataclass(frozen=True, config=ConfigDict(strict=True, extra="forbid"))
class PlanFlags:
    """The flags that tie a step of a sharded job to one plan: the DAG hands them from its plan task
    to every shard and to the commit. Declared here so that the CLI and the DAG spell them alike."""

    plan: str | None = setting(
        None,
        "Plan JSON written by `batchscore plan --out`: run scores its --shard, spark every "
        "shard, commit checks every shard's receipt against it.",
        metavar="URI",
    )
    plan_sha256: str | None = setting(
        None, "Refuse a --plan whose sha256 is not this one (as `plan` printed it).", metavar="HEX"
    )
    out: str | None = setting(
        None,
        "Also write the plan JSON here, never inside the output: beside it, e.g. in "
        "the output's state folder, where the DAG puts it.",
        metavar="URI",
    )
    commit: bool = setting(
        True,
        "`spark --plan` only: score every shard of the plan and stop, leaving the output to "
        "`batchscore commit --plan` (the DAG's commit task).",
        flag="--no-commit",
        switch=False,
    )


PLAN_FIELDS = PlanFlags.__pydantic_fields__  # type: ignore[attr-defined]  # set by pydantic's @dataclass


#: The declaration as data: each setting's pydantic field, in order.
FIELDS = JobConfig.__pydantic_fields__  # type: ignore[attr-defined]  # set by pydantic's @dataclass
#: Settings that are lists of names, written in YAML as a list or on the command line as one comma-separated string.
LIST_KEYS = tuple(key for key, info in FIELDS.items() if schema.extra(info).get("csv"))
CONFIG_KEYS = tuple(FIELDS)
#: Sections the scorer ignores: they belong to the scheduler (see dagspec.py), and what the docs say of them.
IGNORED_SECTIONS = {"dag": "Scheduling settings, read only by the Airflow DAG factory."}
#: The settings every artifact command takes (``inspect`` too).
ARTIFACT_KEYS = ("model_sha256", "scaler_sha256", "trusted_types", "allow_pickle")


def check_text(key: str, value: Any) -> str | None:
    """A text setting as written, or a usage error.

    An unquoted ``model_version: 1.10`` reaches us as the number 1.1 (and ``yes`` as true), so the
    text the user wrote is already lost: refuse it and say how to keep it.
    """
    if isinstance(value, str) or value is None:
        return value
    if isinstance(value, (bool, int, float)):
        raise ValueError(
            f"setting '{key}' must be text, but YAML read {value!r} as a {type(value).__name__}; "
            f'quote it in the YAML file, e.g. {key}: "1.10" (unquoted, 1.10 becomes 1.1)'
        )
    raise ValueError(f"setting '{key}' must be a string, got {value!r}")


#: The keys of a ``models:`` entry of role champion, and the job setting each one gives.
CHAMPION_KEYS = {"model": "model", "scaler": "scaler", "model_sha256": "model_sha256", "scaler_sha256": "scaler_sha256"}
#: The settings a champion entry may give.
CHAMPION_SETTINGS = (*CHAMPION_KEYS.values(), "model_version")


def _champion_from_models(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings with a ``models:`` entry of role champion moved into ``model``, ``scaler``, their
    pins and ``model_version``: the champion is scored and written exactly as a job's one model."""
    settings = dict(settings)
    models = settings.get("models")
    if not isinstance(models, (list, tuple)):
        return settings
    champions = [m for m in models if isinstance(m, Mapping) and m.get("role") == "champion"]
    if not champions:
        return settings
    if len(champions) > 1:
        raise ConfigError("setting 'models' has more than one entry of role champion; a job has one champion")
    champion = champions[0]
    unknown = sorted(set(champion) - {*CHAMPION_KEYS, "name", "role", "model_version"})
    if unknown:
        raise ConfigError(f"setting 'models': the champion entry has unknown key(s) {', '.join(unknown)}")
    for key, setting_key in (*CHAMPION_KEYS.items(), ("model_version", "model_version")):
        if champion.get(key) is None:
            continue
        if settings.get(setting_key) is not None:
            raise ConfigError(
                f"the champion's {key} is given twice: as setting '{setting_key}' and in the models: entry of "
                f"role champion; keep one"
            )
        settings[setting_key] = champion[key]
    settings["models"] = [m for m in models if m is not champion]
    return settings


def validate_settings(
    settings: Mapping[str, Any],
    where: Callable[[str], str] = lambda key: "",
    name: Callable[[str], str] = lambda key: f"setting '{key}'",
) -> JobConfig:
    """A JobConfig of these settings, or one ConfigError naming every bad one: ``where(key)`` says
    where the key was written (e.g. ``config file job.yaml: ``), ``name(key)`` how to call it."""
    try:
        config = JobConfig(**_champion_from_models(settings))
    except ValidationError as exc:
        raise ConfigError(schema.explain(exc, FIELDS, lambda loc: name(str(loc[0])), where)) from None
    except TemplateLeftError as exc:
        raise ConfigError(where(exc.key) + str(exc)) from None
    if config.scaler_sha256 and not config.scaler:
        raise ConfigError(
            f"setting 'scaler_sha256' pins a scaler but no scaler is given: give {param('scaler')} (YAML key 'scaler')"
        )
    if config.output_format == "parquet" and (config.partition or config.table_mode != "append"):
        key = "partition" if config.partition else "table_mode"
        raise ConfigError(
            f"setting '{key}' applies to a table output; give {param('output_format')} delta (YAML key 'output_format')"
        )
    if config.full_refresh and not config.incremental:
        raise ConfigError(f"{param('full_refresh')} applies to an incremental job: give {param('incremental')} too")
    if config.incremental and config.output_format == "parquet":
        raise ConfigError(
            f"{param('incremental')} needs {param('output_format')} delta or iceberg: a folder output cannot "
            "record which files it scored atomically with its parts; rescore everything instead"
        )
    return config


def read_config_file(path: str) -> dict[str, Any]:
    """Read a YAML job file into raw settings, rejecting unknown and repeated keys by name."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = load_yaml(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except DuplicateKeyError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    unknown = sorted(set(data) - set(CONFIG_KEYS) - set(IGNORED_SECTIONS))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(CONFIG_KEYS)}"
        )
    return {k: v for k, v in data.items() if k not in IGNORED_SECTIONS}


def build_config(path: str | None = None, **overrides: Any) -> JobConfig:
    """Merge the YAML file (if any) with overrides.

    ``None`` means "not given", whether a flag left out or a YAML key without a value.
    """
    raw: dict[str, Any] = read_config_file(path) if path else {}
    from_file = {key for key, value in raw.items() if value is not None}
    for key, value in overrides.items():
        if key not in CONFIG_KEYS:
            raise ConfigError(f"unknown setting '{key}'")
        if value is None or value == () or (key == "storage_options" and not value):
            continue
        if key == "storage_options":  # ``storage_options:`` with no value in YAML is null: none given
            value = {**(raw.get("storage_options") or {}), **value}
        if key == "models":  # each --challenger adds a challenger to those of the file
            value = [*(raw.get("models") or ()), *value]
        raw[key] = value
        from_file.discard(key)
    settings = {key: value for key, value in raw.items() if value is not None}
    if path and not settings.get("job_name"):  # a job is known by its file's name
        settings["job_name"] = os.path.splitext(os.path.basename(path))[0]
    return validate_settings(settings, lambda key: f"config file {path}: " if key in from_file else "")
