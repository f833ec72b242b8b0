"""batchscore on Apache Spark: the same job, and the same scorer for DataFrames.

``run_job`` runs a job file's job on a Spark cluster: the driver plans it with ``batchscore.plan``,
each Spark task scores one shard with ``batchscore.run_shard`` (reading its row groups itself, in
input order, through batchscore's own storage layer), and the driver commits with
``batchscore.commit`` only after every task has succeeded and no attempt is still running
(``batchscore spark`` on the command line, or ``spark-submit`` of ``batchscore/spark/submit.py``).
``score_plan`` scores the shards of a plan an orchestrator made and leaves the commit to its next
step (``batchscore spark --plan P --no-commit``, what the Airflow DAG submits).
``score`` scores a DataFrame a Spark job already has, with ``mapInArrow`` over the same predictor.

pyspark is imported only when one of them is called (the ``spark`` extra installs it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..api import CommitResult
    from ..config import JobConfig
    from .driver import ScoredPlan


def run_job(
    config: JobConfig,
    spark: Any = None,
    shards: int | None = None,
    master: str | None = None,
    plan: str | None = None,
    plan_sha256: str | None = None,
) -> CommitResult:
    """Score ``config``'s job on Spark and commit it; see ``batchscore.spark.driver``."""
    from .driver import run_job as run

    return run(config, spark=spark, shards=shards, master=master, plan=plan, plan_sha256=plan_sha256)


def score_plan(
    config: JobConfig,
    spark: Any = None,
    shards: int | None = None,
    master: str | None = None,
    plan: str | None = None,
    plan_sha256: str | None = None,
) -> ScoredPlan:
    """Score every shard of ``plan`` on Spark without committing (an orchestrator's commit step
    follows); see ``batchscore.spark.driver``."""
    from .driver import score_plan as score_shards

    return score_shards(config, spark=spark, shards=shards, master=master, plan=plan, plan_sha256=plan_sha256)


def score(df: Any, config_or_model: Any, **settings: Any) -> Any:
    """``df`` with the job's prediction columns; see ``batchscore.spark.frame``."""
    from .frame import score as score_frame

    return score_frame(df, config_or_model, **settings)


__all__ = ["run_job", "score", "score_plan"]
