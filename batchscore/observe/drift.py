"""How far tonight's distributions moved from a reference run's: PSI and Wasserstein distance.

Both are computed from the two runs' reports, never from their rows: PSI on the reference's
histogram edges (plus a bar below and one above them, for values outside the reference's range),
the Wasserstein distance from the two sketches (see profile.py for its accuracy). Classes are
compared by their shares (PSI only).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..logs import event
from .profile import centres, counts_on_edges, dense_sketch

log = logging.getLogger(__name__)

#: Share given to an empty bar so that PSI stays finite (a common choice; at most ~0.001 of PSI
#: per empty bar when both runs leave it empty or nearly so).
PSI_FLOOR = 1e-4


def psi(expected: ArrayLike, actual: ArrayLike) -> float:
    """Population stability index of ``actual`` counts against ``expected`` counts, bar by bar."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.sum() <= 0 or a.sum() <= 0:
        return 0.0
    p = np.maximum(e / e.sum(), PSI_FLOOR)
    q = np.maximum(a / a.sum(), PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def wasserstein(u_values: np.ndarray, u_weights: np.ndarray, v_values: np.ndarray, v_weights: np.ndarray) -> float:
    """First Wasserstein distance between two weighted samples (the area between their CDFs)."""
    points = np.union1d(u_values, v_values)
    if points.size < 2:
        return 0.0

    def cdf(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
        order = np.argsort(values)
        cumulative = np.concatenate([[0.0], np.cumsum(weights[order], dtype=np.float64)]) / weights.sum()
        return cumulative[np.searchsorted(values[order], points[:-1], side="right")]

    return float(np.sum(np.abs(cdf(u_values, u_weights) - cdf(v_values, v_weights)) * np.diff(points)))


def compare_column(current: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, float] | None:
    """PSI on the reference's edges and Wasserstein distance of one numeric column's summaries."""
    if not current.get("count") or not reference.get("count"):
        return None
    mine, theirs = dense_sketch(current["sketch"]), dense_sketch(reference["sketch"])
    edges = reference["histogram"]["edges"]
    value = psi(counts_on_edges(theirs, edges), counts_on_edges(mine, edges))
    u = centres(theirs, reference["min"], reference["max"])
    v = centres(mine, current["min"], current["max"])
    return {"psi": value, "wasserstein": wasserstein(u[0], u[1].astype(float), v[0], v[1].astype(float))}


def compare(
    current: Mapping[str, Any], reference: Mapping[str, Any], warn: float, fail: float | None
) -> dict[str, Any]:
    """Every score and feature column of ``current`` against ``reference`` (both reports)."""
    columns: list[dict[str, Any]] = []
    missing: list[str] = []
    for kind, section, other in (
        ("score", current["scores"]["columns"], reference["scores"]["columns"]),
        ("feature", current["features"], reference["features"]),
    ):
        for name, summary in section.items():
            if name not in other:
                missing.append(name)
                continue
            result = compare_column(summary, other[name])
            if result is not None:
                columns.append({"column": name, "kind": kind, **result})
    mine, theirs = current["scores"].get("classes") or {}, reference["scores"].get("classes") or {}
    if mine and theirs:
        labels = sorted(set(mine) | set(theirs))
        columns.append(
            {
                "column": current["scores"]["class_column"],
                "kind": "classes",
                "wasserstein": None,
                "psi": psi([theirs.get(c, 0) for c in labels], [mine.get(c, 0) for c in labels]),
            }
        )
    largest = max(columns, key=lambda c: c["psi"], default=None)
    return {
        "reference_plan_id": reference.get("plan_id"),
        "warn": warn,
        "fail": fail,
        "columns": columns,
        "not_in_reference": missing,
        "max_psi": largest["psi"] if largest else None,
        "max_psi_column": largest["column"] if largest else None,
        "drifted": [c["column"] for c in columns if c["psi"] > warn],
        "above_fail": [c["column"] for c in columns if fail is not None and c["psi"] > fail],
    }


def describe(drift: Mapping[str, Any], threshold: float) -> str:
    """``age (PSI 0.31), probability (PSI 0.12)``: the columns above ``threshold``, largest first."""
    above = sorted((c for c in drift["columns"] if c["psi"] > threshold), key=lambda c: -c["psi"])
    return ", ".join(f"{c['column']} (PSI {c['psi']:.3f})" for c in above)


def log_drift(drift: Mapping[str, Any], reference: str) -> None:
    fields = event(
        "drift",
        reference=reference,
        max_psi=drift["max_psi"],
        max_psi_column=drift["max_psi_column"],
        drifted=list(drift["drifted"]),
    )
    if drift["drifted"]:
        log.warning(
            "drift against %s: PSI above %s in %s",
            reference,
            drift["warn"],
            describe(drift, drift["warn"]),
            extra=fields,
        )
    else:
        log.info(
            "no drift against %s: largest PSI %.3g (%s)",
            reference,
            drift["max_psi"],
            drift["max_psi_column"],
            extra=fields,
        )
