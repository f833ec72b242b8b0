"""batchscore: stream Parquet tables through a fitted scikit-learn model into a committed dataset.

The library API mirrors the CLI: ``validate``, ``plan``, ``run_shard``, ``commit`` and ``run``
(all in one) take a ``JobConfig`` built by ``build_config``.
"""

from importlib.metadata import PackageNotFoundError, version

try:  # the one version is pyproject.toml's, as installed
    __version__ = version("batchscore")
except PackageNotFoundError:  # pragma: no cover - a source tree used without installing it
    __version__ = "0+unknown"

from .config import JobConfig, build_config  # noqa: E402
from .errors import BatchscoreError, ConfigError, InputDataError, ModelError  # noqa: E402


def __getattr__(name: str):  # heavy modules load only when the API is used
    if name in ("validate", "plan", "run_shard", "commit", "run", "load_plan", "prepare"):
        from . import job

        return getattr(job, name)
    raise AttributeError(name)


__all__ = ["JobConfig", "build_config", "BatchscoreError", "ConfigError", "InputDataError", "ModelError",
           "validate", "plan", "run_shard", "commit", "run", "load_plan", "prepare"]
