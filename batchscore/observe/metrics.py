"""Push what a job did to a Prometheus Pushgateway as it ends, whether it succeeded or failed.

A batch job is gone before Prometheus could scrape it, so its numbers are pushed once, under the
grouping key ``job`` (plus ``shard`` for a shard). Every push uses ``pushadd``: it replaces the
metrics it carries and leaves the others, so a failure never erases the last success's timestamp.
A push that fails costs one warning line and at most ``PUSH_TIMEOUT_SECONDS``, never the job.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.error import HTTPError

log = logging.getLogger(__name__)

#: How long one push may wait for the Pushgateway: an unreachable one must not hold the job.
PUSH_TIMEOUT_SECONDS = 5.0
#: The measures ``batchscore_challenger_agreement`` carries (observe/agreement.py's ``MEASURES``).
AGREEMENT_MEASURES = (
    "class_agreement",
    "abs_delta_mean",
    "abs_delta_p95",
    "abs_delta_max",
    "spearman",
    "psi",
    "top1_overlap",
)
#: Upper bounds of the per-batch scoring time histogram, in seconds (a 65,536-row batch takes
#: tens of milliseconds with a linear model, seconds with a large ensemble).
BATCH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class Metric:
    """One metric a command pushes: its name (a counter's without ``_total``), kind, help and labels."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()


#: Every metric a command may push, declared once: the pushes and the docs' table come from here.
METRICS = {
    metric.name: metric
    for metric in (
        Metric(
            "batchscore_predictions",
            "counter",
            "Rows of the last successful run: ok scored, invalid skipped or quarantined.",
            ("model_version", "status"),
        ),
        Metric(
            "batchscore_rows_read",
            "gauge",
            "Input rows the last run read (after a failure: the rows scored before it stopped).",
        ),
        Metric(
            "batchscore_batch_seconds",
            "histogram",
            "Seconds a worker took to score one batch (feature matrix, checks, predict, hand-off to the writer).",
        ),
        Metric("batchscore_model_load_seconds", "gauge", "Seconds to fetch, check and load the model (and scaler)."),
        Metric(
            "batchscore_duration_seconds", "gauge", "Wall-clock seconds of the command (for commit, the commit itself)."
        ),
        Metric(
            "batchscore_last_success_timestamp_seconds",
            "gauge",
            "Unix time the last successful run ended; pushed only on success.",
        ),
        Metric(
            "batchscore_challenger_ok",
            "gauge",
            "1 when a challenger scored every row the champion scored, 0 when it failed to load, verify or score "
            "(the champion's output is committed all the same, unless challengers_required).",
            ("challenger", "model_version"),
        ),
        Metric(
            "batchscore_challenger_agreement",
            "gauge",
            "A challenger's agreement with the champion, by measure: class_agreement, abs_delta_mean, abs_delta_p95, "
            "abs_delta_max, spearman, psi, top1_overlap (see docs/challengers.md for how exact each is).",
            ("challenger", "measure"),
        ),
        Metric(
            "batchscore_last_failure_timestamp_seconds",
            "gauge",
            "Unix time the last failed run ended, labelled with its exit code.",
            ("exit_code",),
        ),
    )
}


@dataclass
class Outcome:
    """Rows a finished command accounted for, whichever command it was."""

    rows_in: int
    rows_out: int
    rows_invalid: int
    parts: int = 0


def outcome_of(result: Mapping[str, Any]) -> Outcome:
    """The row counts of a manifest (``run``, ``commit``) or a shard's receipt."""
    if "rows" in result:
        rows = result["rows"]
        return Outcome(rows["in"], rows["out"], rows["invalid"], len(result.get("parts", ())))
    return Outcome(result["rows_in"], result["rows_out"], result["rows_invalid"], len(result.get("parts", ())))


@dataclass
class JobMetrics:
    """What one command measures while it runs, and its push when it ends."""

    gateway: str
    job: str
    model_version: str
    shard: int | None = None
    started: float = field(default_factory=time.monotonic)
    batch_seconds: list[float] = field(default_factory=list)
    rows_scored: int = 0
    model_load_seconds: float | None = None
    finished: bool = False
    challengers: list[Mapping[str, Any]] = field(default_factory=list)

    @property
    def grouping_key(self) -> dict[str, str]:
        return {"shard": str(self.shard)} if self.shard is not None else {}

    def succeeded(self, result: Mapping[str, Any] | None) -> None:
        if result is not None and result.get("model_version"):  # what was scored, e.g. by commit's shards
            self.model_version = result["model_version"]
        if result is not None:
            self.challengers = list(result.get("challengers") or ())
        self._push(outcome_of(result) if result is not None else None, exit_code=0)

    def failed(self, exit_code: int, message: str = "") -> None:
        self._push(None, exit_code=exit_code)

    def batch_scored(self, rows: int, seconds: float) -> None:
        """A worker scored a batch of ``rows`` in ``seconds`` (heard in the parent process)."""
        self.rows_scored += rows
        self.batch_seconds.append(seconds)

    def model_loaded(self, seconds: float) -> None:
        self.model_load_seconds = seconds

    def families(self, outcome: Outcome | None, exit_code: int, now: float) -> Iterator[Any]:
        """The metrics of this push: counts of what was scored, timings, and the success or
        failure timestamp. A failed command pushes no prediction counts (it committed nothing);
        its rows read are those scored before it stopped."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        def family(name: str, **kwargs: Any) -> Any:
            metric = METRICS[name]
            kind = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
            labels = {"labels": list(metric.labels)} if metric.labels else {}
            return kind[metric.kind](name, metric.help, **labels, **kwargs)

        if outcome is not None:
            predictions = family("batchscore_predictions")
            predictions.add_metric([self.model_version, "ok"], outcome.rows_out)
            predictions.add_metric([self.model_version, "invalid"], outcome.rows_invalid)
            yield predictions
        rows_read = outcome.rows_in if outcome is not None else self.rows_scored
        yield family("batchscore_rows_read", value=rows_read)
        yield family("batchscore_duration_seconds", value=now - self.started)
        if self.model_load_seconds is not None:
            yield family("batchscore_model_load_seconds", value=self.model_load_seconds)
        if self.batch_seconds:
            yield family("batchscore_batch_seconds", buckets=self._buckets(), sum_value=sum(self.batch_seconds))
        if self.challengers:
            ok, agreement = family("batchscore_challenger_ok"), family("batchscore_challenger_agreement")
            for c in self.challengers:
                ok.add_metric([c["name"], c.get("model_version") or ""], 1.0 if c["status"] == "ok" else 0.0)
                for measure, value in (c.get("agreement") or {}).items():
                    if measure in AGREEMENT_MEASURES and value is not None:
                        agreement.add_metric([c["name"], measure], float(value))
            yield ok
            yield agreement
        if exit_code == 0:
            yield family("batchscore_last_success_timestamp_seconds", value=time.time())
        else:
            failure = family("batchscore_last_failure_timestamp_seconds")
            failure.add_metric([str(exit_code)], time.time())
            yield failure

    def _buckets(self) -> list[tuple[str, float]]:
        ordered = sorted(self.batch_seconds)
        buckets = [(repr(bound), float(bisect.bisect_right(ordered, bound))) for bound in BATCH_SECONDS_BUCKETS]
        return buckets + [("+Inf", float(len(ordered)))]

    def _push(self, outcome: Outcome | None, exit_code: int) -> None:
        if self.finished:  # a command ends once
            return
        self.finished = True
        try:
            from prometheus_client import CollectorRegistry, pushadd_to_gateway

            families = list(self.families(outcome, exit_code, time.monotonic()))
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Fixed(families))
            pushadd_to_gateway(
                self.gateway,
                job=self.job,
                registry=registry,
                grouping_key=self.grouping_key,
                timeout=PUSH_TIMEOUT_SECONDS,
            )
        except Exception as exc:  # never the job's failure: the output is what matters
            reason = exc if isinstance(exc, HTTPError) else getattr(exc, "reason", None) or exc
            log.warning(
                "could not push metrics to the Pushgateway %s (%s); the job's result is unaffected",
                self.gateway,
                reason,
            )


class _Fixed:
    """A collector that hands over metric families built once."""

    def __init__(self, families: list[Any]):
        self._families = families

    def collect(self) -> list[Any]:
        return self._families


def start(gateway: str | None, job: str, model_version: str, shard: int | None = None) -> JobMetrics | None:
    """Start measuring a command; nothing (and no cost) without a Pushgateway."""
    return JobMetrics(gateway, job, model_version, shard) if gateway else None
