"""What hears how one step of a job goes and ends: its metrics push and its lineage run.

The library's steps (``batchscore.run``, ``run_shard``, ``commit``) each start one ``Observers``
from the job's settings and hand it down to the code that loads the model and scores, so a caller
of the library is observed exactly as the CLI is, and no module keeps a "current job" of its own.
``NONE`` hears nothing: what the steps' modules use when no one observes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import JobConfig
    from .lineage import LineageRun
    from .metrics import JobMetrics

#: A job's name in its metrics and lineage when its settings give none.
DEFAULT_JOB_NAME = "batchscore"


class Observers:
    """One step's metrics (if it pushes any) and lineage run (if lineage is configured)."""

    def __init__(self, metrics: JobMetrics | None = None, lineage: LineageRun | None = None):
        self.metrics, self.lineage = metrics, lineage

    @classmethod
    def start(cls, config: JobConfig, shard: int | None = None, lineage: bool = True) -> Observers:
        """Start observing a step of ``config``'s job (shard ``shard`` of it); a scoring step's
        lineage run emits its START event now."""
        from . import lineage as lineage_runs
        from . import metrics

        name = config.job_name or DEFAULT_JOB_NAME
        return cls(
            metrics.start(config.pushgateway, name, config.model_version, shard),
            lineage_runs.start(config, name, shard) if lineage else None,
        )

    def model_loaded(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.model_loaded(seconds)

    def batch_scored(self, rows: int, seconds: float) -> None:
        """A worker scored a batch of ``rows`` in ``seconds`` (heard in the parent process)."""
        if self.metrics is not None:
            self.metrics.batch_scored(rows, seconds)

    def succeeded(self, result: Mapping[str, Any] | None) -> None:
        """The step ended with this manifest or receipt; each observer hears of a step's end once."""
        for observer in self._ending():
            observer.succeeded(result)

    def failed(self, exit_code: int, message: str) -> None:
        """The step failed with this exit code (the one the CLI exits with) and message."""
        for observer in self._ending():
            observer.failed(exit_code, message)

    def _ending(self) -> list[Any]:
        ending = [o for o in (self.metrics, self.lineage) if o is not None]
        self.metrics = self.lineage = None
        return ending


#: Observes nothing.
NONE = Observers()
