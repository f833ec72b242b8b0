"""The run report: what a committed output holds, how its scores and features are distributed,
and how far they moved from a reference run's. Written by ``commit`` beside the manifest.

Shards profile the rows they score (profile.py) and write the profile with their receipt;
``commit`` adds the receipts' profiles up exactly, so the report's counts are the manifest's.
With ``--drift-fail`` a drifted output is held: its parts and report are written, ``_SUCCESS``
is not, until ``commit --accept-drift`` accepts exactly the attempts that were reviewed.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from ..errors import ConfigError, DriftError, InputDataError, param
from ..io.sink import SUCCESS_FILE, read_json, report_path, write_json
from ..io.storage import Location, join, resolve
from . import drift as drifts
from .agreement import challengers_section
from .profile import SCHEME, UnitProfile, merge_profiles, summarize

log = logging.getLogger(__name__)

REPORT_FORMAT = 1
ACCURACY = (
    f"counts, nulls, min, max and mean are exact; histograms count values exactly on edges of a fixed grid "
    f"({SCHEME}); quantiles are within 0.8% of their value; Wasserstein distances within 1/256 of the "
    f"two columns' mean absolute values added"
)


def shard_profile(results: Any) -> dict[str, Any] | None:
    """A shard's profile: the exact sum of its units' (empty for a shard without units)."""
    return merge_profiles(r.profile for r in results) if results else UnitProfile().to_dict()


class ProfileSum:
    """A shard's profile summed as its units finish, in the order they were handed out (``order``,
    as ``workers.hand_out_order`` gives it; default: unit order): a fixed order, so the sum is the
    same on every attempt, and the one units finish in but for the few still running, so only
    those that finish ahead of one still running wait. A shard of 100,000 units never holds
    100,000 profiles at once (waiting in unit order would, as units are handed out largest first)."""

    FOLD = 256

    def __init__(self, order: Sequence[int] | None = None) -> None:
        self._position: Any = None  # unit index -> its place in the order
        if order is not None:
            self._position = array("q", bytes(8 * len(order)))
            for place, unit in enumerate(order):
                self._position[unit] = place
        self._waiting: dict[int, Mapping[str, Any]] = {}  # finished ahead of their turn
        self._next = 0
        self._pending: list[Mapping[str, Any]] = []
        self._total: dict[str, Any] | None = None
        self._missing = False

    def add(self, index: int, profile: Mapping[str, Any] | None) -> None:
        if profile is None:
            self._missing = True
            return
        self._waiting[index if self._position is None else self._position[index]] = profile
        while self._next in self._waiting:
            self._pending.append(self._waiting.pop(self._next))
            self._next += 1
        if len(self._pending) >= self.FOLD:
            self._fold()

    def _fold(self) -> None:
        if self._pending:
            self._total = merge_profiles([*([self._total] if self._total is not None else []), *self._pending])
            self._pending = []

    def result(self, units: int) -> dict[str, Any] | None:
        if self._missing:
            return None
        self._fold()
        return self._total if units and self._total is not None else UnitProfile().to_dict()


def _invalid_reasons(features: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """Rows with each problem, e.g. ``{"age is null": 3}`` (a row may have several)."""
    words = (("nulls", "is null"), ("nan", "is NaN"), ("inf", "is infinite"))
    return {f"{name} {text}": column[key] for name, column in features.items() for key, text in words if column[key]}


def build_report(
    plan_id: str, output: str, receipts: Mapping[int, Mapping[str, Any]], manifest: Mapping[str, Any]
) -> dict[str, Any]:
    """The report of the receipts about to be committed (their profiles merged exactly)."""
    profile = merge_profiles(r.get("profile") for _, r in sorted(receipts.items()))
    rows = manifest["rows"]
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "output": output,
        "plan_id": plan_id,
        "model_version": manifest.get("model_version"),
        "predicted_at": manifest.get("predicted_at"),
        "created_at": datetime.now(timezone.utc).isoformat(),
        "attempts": {str(i): r.get("attempt") for i, r in sorted(receipts.items())},
        "rows": {"read": rows["in"], "scored": rows["out"], "invalid": rows["invalid"]},
        "scores": {"class_column": None, "classes": {}, "columns": {}},
        "features": {},
        "drift": None,
        "held": False,
        "accuracy": ACCURACY,
    }
    report["challengers"] = challengers_section((r for _, r in sorted(receipts.items())), profile)
    if profile is None:  # a receipt written without a profile: counts only
        report["profiled"] = False
        return report
    report["profiled"] = True
    report["rows"]["invalid_by_reason"] = _invalid_reasons(profile["features"])
    report["scores"] = {
        "class_column": profile["class_column"],
        "classes": profile["classes"],
        "columns": {name: summarize(column) for name, column in profile["scores"].items()},
    }
    report["features"] = {name: summarize(column) for name, column in profile["features"].items()}
    return report


def read_report(where: Location) -> dict[str, Any]:
    """An output's report, with ``committed`` telling whether its ``_SUCCESS`` is there."""
    output, fs, path = where.uri, where.fs, where.path.rstrip("/")
    try:
        report = read_json(fs, report_path(path))
    except FileNotFoundError:
        raise ConfigError(
            f"no run report for {output} (not an output committed by batchscore, or being rewritten)"
        ) from None
    except ValueError as exc:
        raise InputDataError(f"run report of {output} is not valid JSON: {exc}") from None
    report["committed"] = fs.exists(join(path, SUCCESS_FILE))
    return report


def _reference(where: Location) -> dict[str, Any] | None:
    """The reference's report if it is a committed, profiled output; else None (and a warning)."""
    uri = where.uri
    try:
        report = read_report(where)
    except ConfigError as exc:
        log.warning("drift not checked: %s", exc)
        return None
    if not report.get("committed") or not report.get("profiled"):
        log.warning(
            "drift not checked: reference %s is %s",
            uri,
            "not committed (no _SUCCESS)" if not report.get("committed") else "a report without profiles",
        )
        return None
    return report


def reference_of(config: Any) -> tuple[str, dict[str, Any] | None]:
    """The drift reference as a URI and its report; the report is None (with a warning) when the
    reference is no committed, profiled output. A reference that cannot be read raises."""
    reference = resolve(config.reference, config.storage)
    return reference.uri, _reference(reference)


def _accepting(fs: Any, path: str, report: Mapping[str, Any]) -> dict[str, Any]:
    """The held report being accepted: it must describe exactly the attempts about to be committed."""
    try:
        held = read_json(fs, report_path(path))
    except (FileNotFoundError, ValueError):
        held = None
    if not held or not held.get("held"):
        raise ConfigError(
            f"{param('accept_drift')}: {report['output']} has no report held for drift; nothing to accept"
        )
    if held.get("plan_id") != report["plan_id"] or held.get("attempts") != report["attempts"]:
        raise ConfigError(
            f"{param('accept_drift')}: the held report of {report['output']} describes other shard attempts than the ones "
            f"now in place; commit without {param('accept_drift')} to check drift again"
        )
    return held


def publish(config: Any, fs: Any, path: str, report: dict[str, Any], accept_drift: bool = False) -> dict[str, Any]:
    """Check drift, write the report beside the manifest, and raise ``DriftError`` (after writing
    it, held) when a column's PSI is above ``drift_fail``: the caller then writes no ``_SUCCESS``."""
    if accept_drift:
        held = _accepting(fs, path, report)
        report["drift"] = {**held["drift"], "accepted_at": datetime.now(timezone.utc).isoformat()}
    elif config.reference and report.get("profiled"):
        reference, found = reference_of(config)
        if found is not None:
            report["drift"] = {
                "reference": reference,
                **drifts.compare(report, found, config.drift_warn, config.drift_fail),
            }
            drifts.log_drift(report["drift"], reference)
    drift = report["drift"]
    report["held"] = bool(drift and drift["above_fail"] and not accept_drift)
    write_json(fs, report_path(path), report)
    if report["held"]:
        raise DriftError(
            f"drift above {param('drift_fail')} {config.drift_fail} against {drift['reference']}: "
            f"{drifts.describe(drift, config.drift_fail)}; {report['output']} is not committed "
            f"({'no new table version' if config.output_format != 'parquet' else 'no _SUCCESS'}); "
            f"review `batchscore report {report['output']}`, then run commit again with {param('accept_drift')}"
        )
    return report


def without_sketches(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report as people read it: the sketches (for machines comparing runs) left out."""

    def strip(columns: Mapping[str, Any]) -> dict[str, Any]:
        return {name: {k: v for k, v in column.items() if k != "sketch"} for name, column in columns.items()}

    shown = dict(report)
    shown["scores"] = {**report["scores"], "columns": strip(report["scores"]["columns"])}
    shown["features"] = strip(report["features"])
    return shown
