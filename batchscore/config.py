"""One validated ``JobConfig`` from a YAML file plus command-line overrides.

``JobConfig`` is the one declaration of a job's settings: each field's type, default, help and
constraints give the command-line options, the YAML checks, the flags a scheduler passes to the
container and the README's key table (see schema.py). To add a setting, add a field here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Callable, Literal, Optional, Tuple

import yaml
from pydantic import ConfigDict, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from . import schema
from .errors import ConfigError
from .schema import setting
from .storage import DEFAULT_STORAGE_RETRIES, DEFAULT_STORAGE_THROTTLE_SECONDS, DEFAULT_STORAGE_TIMEOUT, with_bounds

ON_INVALID_CHOICES = ("fail", "skip", "quarantine")
LOG_FORMATS = ("text", "json")
DEFAULT_BATCH_SIZE = 65_536
DEFAULT_MAX_INVALID_FRACTION = 0.05
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
#: How skops names a type: its module, a dot, its name (e.g. sklearn.tree._tree.Tree).
TYPE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
#: How long a lease on the output outlives a holder that stopped renewing it (crashed on another
#: host, or paused): long enough for a slow store to renew it, short enough for a retry to wait.
DEFAULT_LEASE_SECONDS = 120.0
DEFAULT_LOCK_TIMEOUT = 0.0
DEFAULT_DRIFT_WARN = 0.1
#: Settings that are text: a path or a version, never a number YAML guessed.
TEXT_KEYS = ("output", "model", "scaler", "model_version", "compiled_cache", "pushgateway", "job_name", "reference")
#: Settings that are lists of names, written in YAML as a list or as one comma-separated string.
LIST_KEYS = ("features", "keep")


@dataclass(frozen=True, config=ConfigDict(strict=True, extra="forbid", allow_inf_nan=False))
class JobConfig:
    """Everything a scoring job needs; every field is also a YAML key of the same name."""

    input: Tuple[str, ...] = setting((), "Parquet file, directory or glob, local, file:// or s3://; a list of them in YAML.",
                                     repeat=True, shown="required")  # fmt: skip
    output: Optional[str] = setting(None, "Output dataset directory (local or s3://).", shown="required")
    model: Optional[str] = setting(None, "Model artifact, .joblib (pickle) or .skops: a classifier, regressor or a whole Pipeline.",
                                   shown="required")  # fmt: skip
    scaler: Optional[str] = setting(None, "Scaler artifact, .joblib or .skops, applied before the model (omit for a Pipeline).")
    model_sha256: Optional[str] = setting(None, "Refuse the model unless its bytes have this sha256; checked before it is "
                                          "loaded (`batchscore inspect --sha256-only` prints it).", metavar="HEX")
    scaler_sha256: Optional[str] = setting(None, "Refuse the scaler unless its bytes have this sha256; needs a scaler.",
                                           metavar="HEX")
    trusted_types: Tuple[str, ...] = setting((), "Types a .skops artifact may hold beyond those skops trusts, by full "
                                             "name, e.g. sklearn.tree._tree.Tree.", flag="--trust", metavar="TYPE",
                                             repeat=True)  # fmt: skip
    allow_pickle: bool = setting(True, "Whether joblib (pickle) artifacts may load; false (flag --no-pickle) loads only .skops artifacts.",
                                 flag="--no-pickle", switch=False)  # fmt: skip
    model_version: str = setting("unversioned", "Written to every row and the manifest; quote it in YAML (\"1.10\").")
    features: Optional[Tuple[str, ...]] = setting(None, "Feature columns, comma-separated on the command line.", csv=True,
                                                  shown="the estimator's feature_names_in_")
    keep: Optional[Tuple[str, ...]] = setting(None, "Passthrough columns, comma-separated on the command line.", csv=True,
                                              shown="all input columns")
    batch_size: int = setting(DEFAULT_BATCH_SIZE, "Rows per batch read, scored and written.", ge=1)
    on_invalid: Literal["fail", "skip", "quarantine"] = setting(
        "fail", "Rows with null/NaN/inf features: fail, skip, or quarantine them beside the output with a reason.")
    max_invalid_fraction: float = setting(DEFAULT_MAX_INVALID_FRACTION, "Most invalid rows allowed as a fraction of "
                                          "input rows (skip or quarantine).", ge=0, le=1)  # fmt: skip
    overwrite: bool = setting(False, "Replace an existing output.", switch=True)
    workers: Optional[int] = setting(None, "Worker processes, each with one compute thread.", ge=1,
                                     shown="all cores this process may use")
    storage_options: Mapping[str, Any] = setting({}, "fsspec options for remote storage, one KEY=VALUE per flag, e.g. endpoint_url=http://127.0.0.1:9000.",
                                                 flag="--storage-option", metavar="KEY=VALUE")
    storage_timeout: float = setting(DEFAULT_STORAGE_TIMEOUT, "Seconds one storage request may wait to connect or for "
                                     "the next data.", gt=0, le=3600, unit="seconds")  # fmt: skip
    storage_retries: int = setting(DEFAULT_STORAGE_RETRIES, "Retries of a failed storage request; a stalled endpoint "
                                   "fails a call within (retries + 1) x timeout + 2^retries - 1 s (33 s).", ge=0, le=20)
    storage_throttle_seconds: float = setting(DEFAULT_STORAGE_THROTTLE_SECONDS, "Seconds one storage request is "
                                              "retried, with exponential backoff and jitter, while the store answers "
                                              "that it is throttling (503 SlowDown, 429); apart from storage_retries.",
                                              ge=0, le=3600, unit="seconds")  # fmt: skip
    log_format: Literal["text", "json"] = setting("text", "Log lines, warnings and the final error as text or JSON.")
    lease_seconds: float = setting(DEFAULT_LEASE_SECONDS, "How long the lease on the output outlives a holder that "
                                   "stopped renewing it; renewed every third of it.", ge=1, unit="seconds")
    lock_timeout: float = setting(DEFAULT_LOCK_TIMEOUT, "Seconds to wait while another job writes the output before "
                                  "giving up (exit 2).", ge=0, unit="seconds")
    engine: Literal["sklearn", "compiled", "auto"] = setting(
        "sklearn", "Score tree ensembles with scikit-learn, a compiled library verified on the job's rows first, or "
        "auto (compiled where it qualifies and agrees, else scikit-learn).")
    compiled_cache: Optional[str] = setting(None, "Folder of compiled model libraries (see `batchscore compile`), or a "
                                            "URL such as s3://bucket/compiled/ shared by every host.", metavar="DIR",
                                            shown="$BATCHSCORE_COMPILED_CACHE or ~/.cache/batchscore/compiled")
    pushgateway: Optional[str] = setting(None, "Prometheus Pushgateway that receives the job's metrics when it ends "
                                         "(see Monitoring); the flag wins over the variable, the variable over the key.",
                                         metavar="URL", envvar="BATCHSCORE_PUSHGATEWAY", shown="$BATCHSCORE_PUSHGATEWAY")
    job_name: Optional[str] = setting(None, "The job's name in its metrics (`job` label) and lineage.",
                                      shown="the config file's stem, else batchscore")
    reference: Optional[str] = setting(None, "A previous committed output (local or S3) to check drift against (PSI, "
                                       "Wasserstein) at commit.")  # fmt: skip
    drift_warn: float = setting(DEFAULT_DRIFT_WARN, "Warn about columns whose PSI against the reference is above this.",
                                ge=0)  # fmt: skip
    drift_fail: Optional[float] = setting(None, "Exit 5 without _SUCCESS when a column's PSI against the reference is "
                                          "above this.", ge=0, shown="off")  # fmt: skip

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
            raise ValueError("setting 'trusted_types' names each type by module and name, e.g. "
                             f"sklearn.tree._tree.Tree; got {', '.join(map(repr, bad))}")  # fmt: skip
        return names

    @field_validator("storage_options", mode="after")
    @classmethod
    def _plain_mapping(cls, value: Mapping[str, Any]) -> dict[str, Any]:
        return dict(value)

    def __post_init__(self) -> None:
        # Every filesystem is opened from storage_options, so they carry the bounds to each one.
        bounded = with_bounds(self.storage_options, self.storage_timeout, self.storage_retries,
                              self.storage_throttle_seconds)
        object.__setattr__(self, "storage_options", bounded)

    def require(self, *names: str) -> None:
        """Fail with a usage error naming the first required setting that is missing."""
        for name in names:
            if not getattr(self, name):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"missing required setting '{name}' (flag {flag} or YAML key '{name}')")

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


#: The declaration as data: each setting's pydantic field, in order.
FIELDS = JobConfig.__pydantic_fields__
CONFIG_KEYS = tuple(FIELDS)
#: Sections the scorer ignores: they belong to the scheduler (see dagspec.py), and what the README says of them.
IGNORED_SECTIONS = {"dag": "Scheduling settings, read only by the DAG factory (see below)."}
#: The settings every artifact command takes (``inspect`` too).
ARTIFACT_KEYS = ("model_sha256", "scaler_sha256", "trusted_types", "allow_pickle")


def key_table() -> list[str]:
    """The README's table of job keys, line by line: a test holds the README to it."""
    sections = [f"| `{key}` | none | none | {text} |" for key, text in IGNORED_SECTIONS.items()]
    return ["| key | flag | default | meaning |", "|---|---|---|---|", *schema.markdown_rows(FIELDS, True), *sections]


def check_text(key: str, value: Any) -> str:
    """A text setting as written, or a usage error.

    An unquoted ``model_version: 1.10`` reaches us as the number 1.1 (and ``yes`` as true), so the
    text the user wrote is already lost: refuse it and say how to keep it.
    """
    if isinstance(value, str) or value is None:
        return value
    if isinstance(value, (bool, int, float)):
        raise ValueError(
            f"setting '{key}' must be text, but YAML read {value!r} as a {type(value).__name__}; "
            f"quote it in the YAML file, e.g. {key}: \"1.10\" (unquoted, 1.10 becomes 1.1)"
        )
    raise ValueError(f"setting '{key}' must be a string, got {value!r}")


def validate_settings(settings: Mapping[str, Any], where: Callable[[str], str] = lambda key: "",
                      name: Callable[[str], str] = lambda key: f"setting '{key}'") -> JobConfig:
    """A JobConfig of these settings, or one ConfigError naming every bad one: ``where(key)`` says
    where the key was written (e.g. ``config file job.yaml: ``), ``name(key)`` how to call it."""
    try:
        config = JobConfig(**settings)
    except ValidationError as exc:
        raise ConfigError(schema.explain(exc, FIELDS, lambda loc: name(str(loc[0])), where)) from None
    if config.scaler_sha256 and not config.scaler:
        raise ConfigError(
            "setting 'scaler_sha256' pins a scaler but no scaler is given (flag --scaler or YAML key 'scaler')"
        )
    return config


def read_config_file(path: str) -> dict[str, Any]:
    """Read a YAML job file into raw settings, rejecting unknown keys by name."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
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
        raw[key] = value
        from_file.discard(key)
    settings = {key: value for key, value in raw.items() if value is not None}
    if path and not settings.get("job_name"):  # a job is known by its file's name
        settings["job_name"] = os.path.splitext(os.path.basename(path))[0]
    return validate_settings(settings, lambda key: f"config file {path}: " if key in from_file else "")
