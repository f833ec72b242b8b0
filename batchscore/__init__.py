"""batchscore: stream Parquet tables through a fitted scikit-learn model into a committed dataset.

The library API mirrors the CLI: ``validate``, ``plan``, ``run_shard``, ``commit`` and ``run``
(all in one) take a ``JobConfig`` built by ``build_config``.
"""

__version__ = "0.1.0"

from .config import JobConfig, build_config  # noqa: E402
from .errors import BatchscoreError, ConfigError, InputDataError, ModelError  # noqa: E402


def __getattr__(name: str):  # heavy modules load only when the API is used
    if name in ("validate", "run"):
        from . import job

        return getattr(job, name)
    if name in ("plan", "load_plan"):
        from . import planning

        return getattr(planning, name)
    if name == "run_shard":
        from .shard import run_shard

        return run_shard
    if name == "commit":
        from .committing import commit

        return commit
    if name == "prepare":
        from .preparation import prepare

        return prepare
    raise AttributeError(name)


__all__ = ["JobConfig", "build_config", "BatchscoreError", "ConfigError", "InputDataError", "ModelError",
           "validate", "plan", "run_shard", "commit", "run", "load_plan", "prepare"]
