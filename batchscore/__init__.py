"""batchscore: stream Parquet tables through a fitted scikit-learn model into a committed dataset.

The library API mirrors the CLI (see ``batchscore.api``): ``validate``, ``plan``, ``run_shard``,
``commit``, ``run`` (all in one), ``inspect`` and ``compile_model`` take a ``JobConfig`` built by
``build_config`` and return typed results; ``report`` reads an output's run report.
"""

from importlib.metadata import PackageNotFoundError, version

try:  # the one version is pyproject.toml's, as installed
    __version__ = version("batchscore")
except PackageNotFoundError:  # pragma: no cover - a source tree used without installing it
    __version__ = "0+unknown"

from .api import (  # noqa: E402
    CommitResult,
    CompileResult,
    InspectResult,
    ReportResult,
    RunResult,
    ShardResult,
    ValidateResult,
    commit,
    compile_model,
    inspect,
    load_plan,
    plan,
    report,
    run,
    run_shard,
    validate,
)
from .config import JobConfig, build_config  # noqa: E402
from .errors import BatchscoreError, ConfigError, InputDataError, ModelError  # noqa: E402

__all__ = [
    "JobConfig",
    "build_config",
    "BatchscoreError",
    "ConfigError",
    "InputDataError",
    "ModelError",
    "validate",
    "plan",
    "run_shard",
    "commit",
    "run",
    "inspect",
    "load_plan",
    "compile_model",
    "report",
    "ValidateResult",
    "ShardResult",
    "CommitResult",
    "RunResult",
    "InspectResult",
    "CompileResult",
    "ReportResult",
]
