"""How far a challenger agrees with the champion, kept in bounded memory and added up exactly
however the rows were split into batches, units and shards (like profile.py's profiles).

Compared are the rows both models scored (the champion's output rows where the challenger gave a
value). What is kept, and how exact each measure is:

* class agreement rate: exact (counts);
* |Δ score| mean and max: exact (sum, count, maximum); its p95 from the fixed-grid sketch of
  profile.py: within 0.8% of its value (differences below 2^-32 count as 0);
* PSI between the champion's and the challenger's score distributions (two scores of one kind):
  both counted exactly on the grid, PSI on 20 bars of the champion's range (edges on the grid, as
  the drift report's, each bar's share floored at 1e-4 as there);
* Spearman rank correlation and the overlap of the top 1% of rows by score: from a sample of at
  most ``SAMPLE_ROWS`` rows, picked by a hash of each row's place in the input (file, row), the
  same rows whatever the split. Exact when the job compares at most ``SAMPLE_ROWS`` rows;
  beyond, an estimate (Spearman's standard error about (1 - rho^2) / sqrt(SAMPLE_ROWS)).

A "score" is a binary classifier's probability or a regressor's prediction: differences are
taken only between two scores of one kind, classes only between two classifiers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .drift import psi
from .metrics import AGREEMENT_MEASURES
from .profile import ColumnProfile, counts_on_edges, histogram_edges, quantile

#: Rows of the bounded sample Spearman and the top-1% overlap are computed from.
SAMPLE_ROWS = 20_000
#: The share of rows, by score, whose overlap is reported.
TOP_SHARE = 0.01
#: Rows of a file: a row's key mixes its file's index above these bits.
_ROW_BITS = 40
MEASURES = AGREEMENT_MEASURES
ACCURACY = (
    "class agreement, |Δ| mean and max exact; |Δ| p95 within 0.8% of its value; PSI exact on 20 bars of the "
    f"champion's range; Spearman and top-1% overlap exact up to {SAMPLE_ROWS:,} compared rows, else from a "
    f"sample of {SAMPLE_ROWS:,} rows picked by a hash of their place in the input"
)


def row_keys(file_index: int, first_row: int, rows: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit key of each row (its file and row within the file): splitmix64."""
    with np.errstate(over="ignore"):
        x = (np.uint64(file_index) << np.uint64(_ROW_BITS)) + np.uint64(first_row) + rows.astype(np.uint64)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class Agreement:
    """One challenger against the champion over some rows: exact counts, sketches and the sample."""

    def __init__(self) -> None:
        self.rows = 0  # rows both scored
        self.classes = self.same = 0  # rows whose classes were compared, and agreed
        self.delta = ColumnProfile()  # |champion score - challenger score|
        self.champion = ColumnProfile()
        self.challenger = ColumnProfile()
        self.keys = np.zeros(0, dtype=np.uint64)
        self.a = np.zeros(0)
        self.b = np.zeros(0)

    def add(
        self,
        keys: np.ndarray,
        classes: tuple[np.ndarray, np.ndarray] | None,
        scores: tuple[np.ndarray, np.ndarray] | None,
        delta: bool,
    ) -> None:
        """Count rows both models scored: their keys, classes (champion, challenger) and scores."""
        self.rows += int(keys.size)
        if classes is not None:
            mine, theirs = (np.asarray(c) for c in classes)
            if mine.dtype != theirs.dtype:
                mine, theirs = mine.astype(str), theirs.astype(str)
            self.classes += int(mine.size)
            self.same += int(np.count_nonzero(mine == theirs))
        if scores is not None:
            a, b = (np.asarray(s, dtype=np.float64) for s in scores)
            self.champion.add(a)
            self.challenger.add(b)
            if delta:
                self.delta.add(np.abs(a - b))
            self._sample(keys, a, b)

    def _sample(self, keys: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
        """Keep the ``SAMPLE_ROWS`` rows of smallest key: the same rows however they arrive."""
        if self.keys.size >= SAMPLE_ROWS:
            below = keys < self.keys.max()
            keys, a, b = keys[below], a[below], b[below]
        if not keys.size:
            return
        self.keys = np.concatenate([self.keys, keys])
        self.a, self.b = np.concatenate([self.a, a]), np.concatenate([self.b, b])
        if self.keys.size > SAMPLE_ROWS:
            keep = np.argpartition(self.keys, SAMPLE_ROWS - 1)[:SAMPLE_ROWS]
            self.keys, self.a, self.b = self.keys[keep], self.a[keep], self.b[keep]

    def merge(self, other: Agreement) -> None:
        self.rows += other.rows
        self.classes += other.classes
        self.same += other.same
        self.delta.merge(other.delta)
        self.champion.merge(other.champion)
        self.challenger.merge(other.challenger)
        self._sample(other.keys, other.a, other.b)

    def to_dict(self) -> dict[str, Any]:
        order = np.argsort(self.keys, kind="stable")  # one text for one sample, however it was gathered
        return {
            "rows": self.rows,
            "classes": self.classes,
            "same": self.same,
            "delta": self.delta.to_dict(),
            "champion": self.champion.to_dict(),
            "challenger": self.challenger.to_dict(),
            "sample": {
                "keys": self.keys[order].tolist(),
                "champion": self.a[order].tolist(),
                "challenger": self.b[order].tolist(),
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Agreement:
        found = cls()
        found.rows, found.classes, found.same = int(data["rows"]), int(data["classes"]), int(data["same"])
        found.delta = ColumnProfile.from_dict(data["delta"])
        found.champion = ColumnProfile.from_dict(data["champion"])
        found.challenger = ColumnProfile.from_dict(data["challenger"])
        sample = data["sample"]
        found.keys = np.asarray(sample["keys"], dtype=np.uint64)
        found.a = np.asarray(sample["champion"], dtype=np.float64)
        found.b = np.asarray(sample["challenger"], dtype=np.float64)
        return found

    def summary(self) -> dict[str, Any]:
        """The measures as the report shows them (None where they do not apply or no row was compared)."""
        result: dict[str, Any] = {"rows_compared": self.rows, **dict.fromkeys(MEASURES)}
        if self.classes:
            result["class_agreement"] = self.same / self.classes
        d = self.delta
        if d.count:
            result["abs_delta_mean"] = d.total / d.count
            result["abs_delta_max"] = d.maximum
            result["abs_delta_p95"] = quantile(d.sketch, 0.95, float(d.minimum), float(d.maximum))  # type: ignore[arg-type]
        if d.count and self.champion.count and self.challenger.count:  # two scores of one kind
            low, high = float(self.champion.minimum), float(self.champion.maximum)  # type: ignore[arg-type]
            edges = histogram_edges(low, high)
            result["psi"] = psi(
                counts_on_edges(self.champion.sketch, edges), counts_on_edges(self.challenger.sketch, edges)
            )
        result["sample_rows"] = int(self.keys.size)
        result["sampled"] = int(self.keys.size) < self.champion.count
        if self.keys.size >= 2:
            result["spearman"] = spearman(self.a, self.b)
            result["top1_overlap"] = top_overlap(self.a, self.b, self.keys)
        return result


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation (ties at their mean rank, as SciPy's); None if a side is constant."""
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties at their mean rank (SciPy's ``rankdata``)."""
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    starts = np.concatenate([[0], np.flatnonzero(ordered[1:] != ordered[:-1]) + 1])
    ends = np.append(starts[1:], x.size)
    result = np.empty(x.size)
    result[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return result


def top_rows(scores: np.ndarray, keys: np.ndarray, count: int) -> np.ndarray:
    """The keys of the ``count`` highest scores (ties broken by key, so the set is one set)."""
    order = np.lexsort((keys, -scores))
    return keys[order[:count]]


def top_overlap(a: np.ndarray, b: np.ndarray, keys: np.ndarray, share: float = TOP_SHARE) -> float:
    """The share of the champion's top ``share`` of rows that is in the challenger's top ``share``."""
    count = max(1, math.ceil(share * a.size))
    return float(np.intersect1d(top_rows(a, keys, count), top_rows(b, keys, count)).size / count)


def merge_agreements(items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The exact sum of stored agreements of one challenger."""
    total = Agreement()
    for item in items:
        total.merge(Agreement.from_dict(item))
    return total.to_dict()


def challengers_section(
    receipts: Iterable[Mapping[str, Any]], profile: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """Each challenger as the run report and the manifest show it: whether it scored every shard
    (``ok``) or failed (``error``: the first reason, by shard), and its agreement with the champion."""
    found: dict[str, dict[str, Any]] = {}
    for receipt in receipts:
        for entry in receipt.get("challengers") or ():
            # A challenger in its own folder: its parts are the manifest's, not the report's.
            shown = {k: v for k, v in entry.items() if k not in ("parts", "schema")}
            seen = found.setdefault(entry["name"], {**shown, "failed_shards": []})
            if not seen.get("artifacts") and entry.get("artifacts"):  # what it scored with, where it loaded
                seen["artifacts"] = entry["artifacts"]
            if entry["status"] != "ok":
                seen["failed_shards"].append(receipt.get("shard"))
                if seen["status"] == "ok" or seen.get("error") is None:
                    seen["status"], seen["error"] = "failed", entry["error"]
    errors = (profile or {}).get("challenger_errors") or {}
    agreements = (profile or {}).get("agreement") or {}
    for name, entry in found.items():
        if name in errors:  # raised while scoring: its columns are null from that batch on
            entry["status"], entry["error"] = "failed", entry.get("error") or errors[name]
        entry["agreement"] = Agreement.from_dict(agreements[name]).summary() if name in agreements else None
        entry["accuracy"] = ACCURACY
    return list(found.values())
