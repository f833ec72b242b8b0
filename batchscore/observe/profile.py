"""Mergeable profiles of the columns a job reads and writes: what the run report is made of.

Workers profile every batch they score, shards write the sum with their receipts and ``commit``
adds the shards' up, so the profile must add up exactly however the rows were split. It does so
because nothing in it depends on the data seen so far:

* counts, nulls, NaNs, infinities, minimum, maximum and sum are kept exactly;
* values are counted in buckets of one grid fixed once and for all (the sketch): each power of
  two is cut into 128 equal buckets, for magnitudes from 2^-32 to 2^64 (smaller ones share the
  bucket at zero, larger ones the outermost buckets). A bucket is found from the float's bits
  with one shift, and since every batch, shard and run uses the same grid, sketches add up
  exactly and any two runs can be compared bucket for bucket.

What follows from the sketch: a quantile is placed within its bucket by linear interpolation,
so it is off by less than 1/128 (0.8%) of its value; histograms are drawn on edges picked from
the grid, so their counts are exact; a Wasserstein distance takes each bucket's rows at its
centre, so it is off by less than 1/256 of the two columns' mean absolute values added.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

#: Bits of the mantissa that pick a bucket within a power of two: 2**7 = 128 buckets.
MANTISSA_BITS = 7
MIN_EXPONENT = -32
MAX_EXPONENT = 64
SCHEME = f"log2/{2**MANTISSA_BITS} from 2^{MIN_EXPONENT} to 2^{MAX_EXPONENT}"
_SHIFT = 52 - MANTISSA_BITS
_BASE = (1023 + MIN_EXPONENT) << MANTISSA_BITS
#: Buckets of each sign; the dense sketch is [negatives..., zero, positives...].
_MAGNITUDES = (MAX_EXPONENT - MIN_EXPONENT) << MANTISSA_BITS
ZERO = _MAGNITUDES
SKETCH_LENGTH = 2 * _MAGNITUDES + 1
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
#: Values from which on, and below which, a value's bits alone give its bucket.
_INSIDE_GRID = (2.0**MIN_EXPONENT, 2.0**MAX_EXPONENT)
#: Bars of a histogram in the report (before its edges are moved onto the grid).
HISTOGRAM_BINS = 20


def bucket_index(values: np.ndarray, non_negative: bool | None = None, offset: int = 0) -> np.ndarray:
    """The sketch bucket of each finite value, less ``offset``: bucket ``i`` holds
    ``lower_bound(i) <= v < lower_bound(i + 1)``. ``non_negative`` (when the caller knows the
    minimum) saves the passes that negative values need."""
    x = np.ascontiguousarray(values, dtype=np.float64)
    negative = None if non_negative or (non_negative is None and not (x < 0).any()) else x < 0
    if negative is None:
        index = x.view(np.int64) >> _SHIFT  # the exponent and the top mantissa bits: the bucket of x
    else:  # negative buckets are closed at the top: the next float towards zero (its bits less one) decides
        bits = np.abs(x).view(np.int64)
        bits -= negative
        index = np.right_shift(bits, _SHIFT, out=bits)
    np.clip(index, _BASE - 1, _BASE + _MAGNITUDES - 1, out=index)  # tiny values: _BASE - 1, the bucket at zero
    if negative is None:
        index += ZERO + 1 - _BASE - offset
        return index
    index -= _BASE - 1
    np.negative(index, out=index, where=negative)
    index += ZERO - offset
    return index


def _magnitude_bound(m: np.ndarray) -> np.ndarray:
    return ((np.asarray(m, dtype=np.int64) + _BASE) << _SHIFT).view(np.float64)


def lower_bound(index: np.ndarray | Sequence[int]) -> np.ndarray:
    """The smallest value of each bucket (a float exactly on the grid)."""
    i = np.asarray(index, dtype=np.int64)
    above = _magnitude_bound(np.maximum(i - ZERO - 1, 0))
    below = -_magnitude_bound(np.maximum(ZERO - i, 0))
    return np.where(i > ZERO, above, np.where(i < ZERO, below, -(2.0**MIN_EXPONENT)))


class ColumnProfile:
    """One numeric column's exact counts and extremes, and its sketch (dense while accumulating)."""

    __slots__ = ("count", "nulls", "nan", "inf", "total", "minimum", "maximum", "sketch")

    def __init__(self) -> None:
        self.count = self.nulls = self.nan = self.inf = 0
        self.total = 0.0
        self.minimum = self.maximum = None  # type: float | None
        self.sketch = np.zeros(SKETCH_LENGTH, dtype=np.int64)

    def add(self, values: np.ndarray, nulls: int = 0) -> None:
        """Count a batch's values; ``nulls`` of them were nulls (NaN by now in a float matrix)."""
        x = np.asarray(values)
        self.nulls += nulls
        if not x.size:
            return
        low, high = float(x.min()), float(x.max())
        if not (math.isfinite(low) and math.isfinite(high)):  # a NaN or an infinity among them
            finite = np.isfinite(x)
            nan = int(np.isnan(x).sum())
            self.nan += nan - nulls
            self.inf += int(x.size - finite.sum()) - nan
            x = x[finite]
            if not x.size:
                return
            low, high = float(x.min()), float(x.max())
        self.minimum = low if self.minimum is None else min(self.minimum, low)
        self.maximum = high if self.maximum is None else max(self.maximum, high)
        self.count += int(x.size)
        self.total += float(x.sum(dtype=np.float64))
        # Only the buckets from the minimum's to the maximum's are counted (and added).
        first, last = (int(i) for i in bucket_index(np.array([low, high])))
        if _INSIDE_GRID[0] <= low and high < _INSIDE_GRID[1]:  # positive, no clipping: the bits are the bucket
            index = np.ascontiguousarray(x, dtype=np.float64).view(np.int64) >> _SHIFT
            index -= first - ZERO - 1 + _BASE
        else:
            index = bucket_index(x, low >= 0, first)
        self.sketch[first : last + 1] += np.bincount(index, minlength=last - first + 1)

    def merge(self, other: ColumnProfile) -> None:
        self.count += other.count
        self.nulls += other.nulls
        self.nan += other.nan
        self.inf += other.inf
        self.total += other.total
        for value in (other.minimum, other.maximum):
            if value is not None:
                self.minimum = value if self.minimum is None else min(self.minimum, value)
                self.maximum = value if self.maximum is None else max(self.maximum, value)
        self.sketch += other.sketch

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "nulls": self.nulls,
            "nan": self.nan,
            "inf": self.inf,
            "sum": self.total,
            "min": self.minimum,
            "max": self.maximum,
            "sketch": sparse_sketch(self.sketch),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ColumnProfile:
        profile = cls()
        profile.count, profile.nulls = int(data["count"]), int(data["nulls"])
        profile.nan, profile.inf, profile.total = int(data["nan"]), int(data["inf"]), float(data["sum"])
        profile.minimum, profile.maximum = data["min"], data["max"]
        profile.sketch = dense_sketch(data["sketch"])
        return profile


def sparse_sketch(dense: np.ndarray) -> dict[str, Any]:
    """JSON for a sketch: its non-empty buckets as one line of ``index:count`` words."""
    used = np.flatnonzero(dense)
    return {"scheme": SCHEME, "buckets": " ".join(f"{i}:{c}" for i, c in zip(used.tolist(), dense[used].tolist()))}


def dense_sketch(sketch: Mapping[str, Any]) -> np.ndarray:
    """A stored sketch as a dense array; refuses one made on another grid."""
    if sketch.get("scheme") != SCHEME:
        raise ValueError(f"sketch on grid {sketch.get('scheme')!r}, not {SCHEME!r}")
    dense = np.zeros(SKETCH_LENGTH, dtype=np.int64)
    words = sketch["buckets"].split()
    if words:
        pairs = np.array([w.split(":") for w in words], dtype=np.int64)
        dense[pairs[:, 0]] = pairs[:, 1]
    return dense


class UnitProfile:
    """What one unit (or shard, or job) saw: its features as read, its outputs as written."""

    def __init__(self, features: Sequence[str] = (), scores: Sequence[str] = (), class_column: str | None = None):
        self.features = {name: ColumnProfile() for name in features}
        self.scores = {name: ColumnProfile() for name in scores}
        self.class_column = class_column
        self.classes: Counter[str] = Counter()
        self.agreement: dict[str, Any] = {}  # challenger name -> agreement.Agreement
        self.challenger_errors: dict[str, str] = {}  # challenger name -> why it stopped scoring

    def add_features(self, batch: pa.RecordBatch, matrix: np.ndarray, rows: int) -> None:
        """Every row read, valid or not (its nulls, NaNs and infinities are counted apart)."""
        for j, (name, column) in enumerate(self.features.items()):
            column.add(matrix[:rows, j], batch.column(name).null_count)

    def add_scores(self, scored: pa.RecordBatch) -> None:
        """The rows written: their probabilities or predicted values, and their classes."""
        for name, column in self.scores.items():
            column.add(scored.column(name).to_numpy(zero_copy_only=False))
        if self.class_column is not None and scored.num_rows:
            self.classes.update(count_labels(scored.column(self.class_column)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": {n: c.to_dict() for n, c in self.features.items()},
            "scores": {n: c.to_dict() for n, c in self.scores.items()},
            "class_column": self.class_column,
            "classes": dict(sorted(self.classes.items())),
            "agreement": {n: a.to_dict() for n, a in self.agreement.items()},
            "challenger_errors": dict(self.challenger_errors),
        }


def count_labels(column: pa.Array) -> dict[str, int]:
    """How often each label occurs, by its text; booleans and small integers without hashing."""
    import pyarrow.compute as pc

    if pa.types.is_boolean(column.type):
        true = pc.sum(column).as_py() or 0
        return {"True": true, "False": len(column) - column.null_count - true}
    if pa.types.is_integer(column.type) and not column.null_count:
        labels = column.to_numpy()
        low = int(labels.min())
        if int(labels.max()) - low < 1 << 16:
            counts = np.bincount(labels - low)
            return {str(low + int(i)): int(counts[i]) for i in np.flatnonzero(counts)}
    return {str(item["values"]): item["counts"] for item in pc.value_counts(column).to_pylist()}


def merge_profiles(profiles: Iterable[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """The exact sum of stored unit/shard profiles; None if any is missing."""
    from .agreement import Agreement

    merged: UnitProfile | None = None
    for data in profiles:
        if data is None:
            return None
        if merged is None:
            merged = UnitProfile()
        merged.class_column = merged.class_column or data.get("class_column")  # an empty shard knows none
        for section in ("features", "scores"):
            into = getattr(merged, section)
            for name, column in data[section].items():
                into.setdefault(name, ColumnProfile()).merge(ColumnProfile.from_dict(column))
        merged.classes.update(data.get("classes") or {})
        for name, agreement in (data.get("agreement") or {}).items():
            merged.agreement.setdefault(name, Agreement()).merge(Agreement.from_dict(agreement))
        for name, error in (data.get("challenger_errors") or {}).items():
            merged.challenger_errors.setdefault(name, error)  # the first in the fixed order of adding up
    return merged.to_dict() if merged is not None else None


def score_columns(schema: pa.Schema, is_classifier: bool) -> tuple[list[str], str | None]:
    """The output columns profiled as numbers (probabilities, a regressor's prediction) and the
    column of predicted classes, if any."""
    from ..models.challengers import SEPARATOR
    from ..models.engine import PREDICTION, PROBABILITY

    # The champion's columns: a challenger's (``probability__NAME``) are compared in its agreement.
    numeric = [f.name for f in schema if f.name.startswith(PROBABILITY) and SEPARATOR not in f.name]
    if not is_classifier:
        numeric.insert(0, PREDICTION)
    return numeric, PREDICTION if is_classifier else None


# --- summaries for the report ---------------------------------------------------------------


def histogram_edges(minimum: float, maximum: float, bins: int = HISTOGRAM_BINS) -> list[float]:
    """About ``bins`` equal-width bars from ``minimum`` to ``maximum``, each edge moved down onto
    the grid so that the bars' counts are exact sums of buckets."""
    targets = np.linspace(minimum, maximum, bins + 1) if maximum > minimum else np.array([minimum])
    index = bucket_index(targets)
    edges = np.unique(np.append(index, bucket_index(np.array([maximum]))[0] + 1))
    return lower_bound(edges).tolist()


def counts_on_edges(sketch: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Rows below ``edges[0]``, in each ``[edges[i], edges[i+1])``, and from ``edges[-1]`` up.

    Exact for edges on the grid (as every report's are); another edge splits no bucket but
    counts the bucket that holds it on its right.
    """
    cumulative = np.concatenate([[0], np.cumsum(sketch)])
    cuts = bucket_index(np.asarray(edges, dtype=np.float64))
    inside = cumulative[cuts]
    return np.diff(np.concatenate([[0], inside, [cumulative[-1]]]))


def quantile(sketch: np.ndarray, q: float, minimum: float, maximum: float) -> float:
    """The ``q`` quantile, interpolated within its bucket and kept within the exact extremes."""
    cumulative = np.cumsum(sketch)
    total = cumulative[-1]
    target = q * total
    i = int(np.searchsorted(cumulative, target, side="left"))
    i = min(i, sketch.size - 1)
    before = cumulative[i - 1] if i else 0
    low, high = lower_bound([i, i + 1])
    if i == ZERO:
        low, high = 0.0, 0.0
    inside = sketch[i]
    fraction = (target - before) / inside if inside else 0.0
    value = float(low + (high - low) * fraction)
    return min(max(value, minimum), maximum)


def centres(sketch: np.ndarray, minimum: float, maximum: float) -> tuple[np.ndarray, np.ndarray]:
    """Each non-empty bucket's centre (within the exact extremes) and its count."""
    used = np.flatnonzero(sketch)
    low, high = lower_bound(used), lower_bound(used + 1)
    middle = np.where(used == ZERO, 0.0, (low + high) / 2)
    return np.clip(middle, minimum, maximum), sketch[used]


def summarize(column: Mapping[str, Any]) -> dict[str, Any]:
    """A stored column profile as the report shows it: counts, extremes, mean, quantiles, histogram."""
    profile = ColumnProfile.from_dict(column)
    summary: dict[str, Any] = {
        "count": profile.count,
        "nulls": profile.nulls,
        "nan": profile.nan,
        "inf": profile.inf,
        "min": profile.minimum,
        "max": profile.maximum,
        "mean": profile.total / profile.count if profile.count else None,
    }
    if profile.count:
        low, high = float(profile.minimum), float(profile.maximum)  # type: ignore[arg-type]  # set once a row is counted
        summary["quantiles"] = {f"p{round(q * 100):02d}": quantile(profile.sketch, q, low, high) for q in QUANTILES}
        edges = histogram_edges(low, high)
        summary["histogram"] = {"edges": edges, "counts": counts_on_edges(profile.sketch, edges)[1:-1].tolist()}
    else:
        summary["quantiles"], summary["histogram"] = {}, {"edges": [], "counts": []}
    summary["sketch"] = column["sketch"]
    return summary
