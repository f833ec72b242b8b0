"""batchscore on Apache Spark: the same job, and the same scorer for DataFrames.

``run_job`` runs a job file's job on a Spark cluster: the driver plans it with ``batchscore.plan``,
each Spark task scores one shard with ``batchscore.run_shard`` (reading its row groups itself, in
input order, through batchscore's own storage layer), and the driver commits with
``batchscore.commit`` only after every task has succeeded and no attempt is still running
(``batchscore spark`` on the command line, or ``spark-submit`` of ``batchscore/spark/submit.py``).
``score_plan`` scores the shards of a plan an orchestrator made and leaves the commit to its next
step (``batchscore spark --plan P --no-commit``, what the Airflow DAG submits).
``score`` scores a DataFrame a Spark job already has, with ``mapInArrow`` over the same predictor.

Their modules, and pyspark with them, are imported only when one of them is first used (the
``spark`` extra installs pyspark).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .driver import run_job, score_plan
    from .frame import score

#: Where each entry point lives: its module (and pyspark with it) is imported on first use.
_HOMES = {"run_job": "driver", "score_plan": "driver", "score": "frame"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)


__all__ = ["run_job", "score", "score_plan"]
