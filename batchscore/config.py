"""One validated ``JobConfig`` from a YAML file plus command-line overrides."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from .errors import ConfigError
from .storage import DEFAULT_STORAGE_RETRIES, DEFAULT_STORAGE_TIMEOUT, with_bounds

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


@dataclass(frozen=True)
class JobConfig:
    """Everything a scoring job needs; every field is also a YAML key of the same name."""

    input: tuple[str, ...] = ()
    output: str | None = None
    model: str | None = None
    scaler: str | None = None
    model_sha256: str | None = None
    scaler_sha256: str | None = None
    trusted_types: tuple[str, ...] = ()
    allow_pickle: bool = True
    model_version: str = "unversioned"
    features: tuple[str, ...] | None = None
    keep: tuple[str, ...] | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    on_invalid: str = "fail"
    max_invalid_fraction: float = DEFAULT_MAX_INVALID_FRACTION
    overwrite: bool = False
    workers: int | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    storage_timeout: float = DEFAULT_STORAGE_TIMEOUT
    storage_retries: int = DEFAULT_STORAGE_RETRIES
    log_format: str = "text"
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    reference: str | None = None  # a committed output whose report tonight's is compared with
    drift_warn: float = DEFAULT_DRIFT_WARN
    drift_fail: float | None = None

    def __post_init__(self) -> None:
        # Every filesystem is opened from storage_options, so they carry the bounds to each one.
        bounded = with_bounds(self.storage_options, self.storage_timeout, self.storage_retries)
        object.__setattr__(self, "storage_options", bounded)

    def require(self, *names: str) -> None:
        """Fail with a usage error naming the first required setting that is missing."""
        for name in names:
            if not getattr(self, name):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"missing required setting '{name}' (flag {flag} or YAML key '{name}')")

    @property
    def worker_count(self) -> int:
        """Workers to use: the configured number, else every core this process may use."""
        return self.workers or available_cores()


def available_cores() -> int:
    """Cores this process may use: CPU affinity, capped by a container's CPU quota (cgroup v2 or v1).

    A pod limited to 2 CPUs on a 64-core node must not start 64 workers.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            with open(quota_file) as fh:
                fields = fh.read().split()
            if period_file:
                with open(period_file) as fh:
                    fields.append(fh.read().strip())
            quota, period = fields[0], fields[1]
            if quota not in ("max", "-1") and int(period) > 0:
                cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
            break
        except (OSError, ValueError, IndexError):
            continue
    return cores


CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(JobConfig))
#: Sections the scorer ignores: they belong to the scheduler (see dags/).
IGNORED_SECTIONS = ("dag",)


def _as_tuple(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        parts = [v.strip() for v in value.split(",")] if key in ("features", "keep") else [value]
        return tuple(p for p in parts if p)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"setting '{key}' must be a string or a list of strings, got {value!r}")


#: Settings that are text: a path or a version, never a number YAML guessed.
TEXT_KEYS = ("output", "model", "scaler", "model_version", "reference")


def check_text(key: str, value: Any) -> str:
    """A text setting as written, or a usage error.

    An unquoted ``model_version: 1.10`` reaches us as the number 1.1 (and ``yes`` as true), so the
    text the user wrote is already lost: refuse it and say how to keep it.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        raise ConfigError(
            f"setting '{key}' must be text, but YAML read {value!r} as a {type(value).__name__}; "
            f"quote it in the YAML file, e.g. {key}: \"1.10\" (unquoted, 1.10 becomes 1.1)"
        )
    raise ConfigError(f"setting '{key}' must be a string, got {value!r}")


def _coerce(key: str, value: Any) -> Any:
    """Type-check one setting, naming it in the error."""
    if key in ("input", "features", "keep"):
        return _as_tuple(value, key)
    if key in TEXT_KEYS:
        return check_text(key, value)
    if key in ("model_sha256", "scaler_sha256"):
        if not isinstance(value, str) or not SHA256_HEX.fullmatch(value):
            raise ConfigError(f"setting '{key}' must be a sha256 digest (64 hex characters), got {value!r}")
        return value.lower()
    if key == "trusted_types":
        names = _as_tuple(value, key)
        bad = [name for name in names if not TYPE_NAME.fullmatch(name)]
        if bad:
            raise ConfigError(
                f"setting 'trusted_types' names each type by module and name, e.g. sklearn.tree._tree.Tree; "
                f"got {', '.join(map(repr, bad))}"
            )
        return names
    if key in ("batch_size", "workers"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"setting '{key}' must be a positive integer, got {value!r}")
        return value
    if key == "storage_timeout":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
            raise ConfigError(f"setting 'storage_timeout' must be a number of seconds from 0 to 3600, got {value!r}")
        return float(value)
    if key == "storage_retries":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20:
            raise ConfigError(f"setting 'storage_retries' must be an integer from 0 to 20, got {value!r}")
        return value
    if key == "max_invalid_fraction":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"setting 'max_invalid_fraction' must be a number from 0 to 1, got {value!r}")
        return float(value)
    if key in ("lease_seconds", "lock_timeout"):
        low = 1 if key == "lease_seconds" else 0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < math.inf:
            raise ConfigError(f"setting '{key}' must be a number of seconds, at least {low}, got {value!r}")
        return float(value)
    if key in ("drift_warn", "drift_fail"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ConfigError(f"setting '{key}' must be a PSI threshold, a number of at least 0, got {value!r}")
        return float(value)
    if key == "on_invalid" and value not in ON_INVALID_CHOICES:
        raise ConfigError(f"setting 'on_invalid' must be one of {', '.join(ON_INVALID_CHOICES)}, got {value!r}")
    if key == "log_format" and value not in LOG_FORMATS:
        raise ConfigError(f"setting 'log_format' must be one of {', '.join(LOG_FORMATS)}, got {value!r}")
    if key in ("overwrite", "allow_pickle") and not isinstance(value, bool):
        raise ConfigError(f"setting '{key}' must be true or false, got {value!r}")
    if key == "storage_options":
        if not isinstance(value, Mapping):
            raise ConfigError(f"setting 'storage_options' must be a mapping, got {value!r}")
        return dict(value)
    return value


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
    for key, value in overrides.items():
        if key not in CONFIG_KEYS:
            raise ConfigError(f"unknown setting '{key}'")
        if value is None or value == () or (key == "storage_options" and not value):
            continue
        if key == "storage_options":  # ``storage_options:`` with no value in YAML is null: none given
            value = {**(raw.get("storage_options") or {}), **value}
        raw[key] = value
    settings = {key: _coerce(key, value) for key, value in raw.items() if value is not None}
    if settings.get("scaler_sha256") and not settings.get("scaler"):
        raise ConfigError(
            "setting 'scaler_sha256' pins a scaler but no scaler is given (flag --scaler or YAML key 'scaler')"
        )
    return JobConfig(**settings)
