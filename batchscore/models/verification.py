"""Which engine a job (or shard) scores with, decided on every run by scoring its own rows twice.

Before any row is scored with a compiled library, rows from every input file the shard reads are
scored with it and with scikit-learn: every probability must agree within ``TOLERANCE`` and every
predicted class must be the same (regression values: within ``TOLERANCE`` relative to the value,
or absolute below 1). Where the model handles missing values, copies of those rows with a NaN in
each feature in turn are checked too, so the learned missing-value directions are compared, not
assumed. ``auto`` falls back to scikit-learn when anything disagrees or cannot be built;
``compiled`` stops with a model error instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from ..config import StorageSettings
from ..errors import ConfigError, ModelError, param
from ..io.source import columns_with_nulls, in_order, open_parquet
from ..io.validation import invalid_mask
from ..logs import event
from . import compiled
from .artifacts import LoadedModel
from .engine import ROW_ALIGNMENT, Predictor

log = logging.getLogger(__name__)

#: Largest difference allowed between the engines: absolute for probabilities, relative to
#: max(1, |value|) for regression values.
TOLERANCE = 1e-12
#: Rows checked per input file, spread evenly over its first non-empty row group.
ROWS_PER_FILE = 256
#: Of those, how many are checked again with a NaN feature (models that handle missing values).
NAN_ROWS_PER_FILE = 64
#: Rows decoded at a time while the sample is taken.
SAMPLE_BATCH_ROWS = 8_192


@dataclass
class EngineChoice:
    """The engine a shard used and the evidence for it; recorded in its receipt and the manifest."""

    requested: str
    used: str
    reason: str = ""  # why scikit-learn scored although the compiled engine was asked for
    library_path: str | None = None
    library: dict[str, Any] = field(default_factory=dict)
    checked_rows: int = 0
    nan_rows: int = 0
    largest_difference: float | None = None
    class_mismatches: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"requested": self.requested, "used": self.used}
        if self.library:  # verification ran
            record.update(
                tolerance=TOLERANCE,
                checked_rows=self.checked_rows,
                nan_rows=self.nan_rows,
                largest_difference=self.largest_difference,
                class_mismatches=self.class_mismatches,
                verify_seconds=round(self.seconds, 3),
                **self.library,
            )
        if self.reason:
            record["reason"] = self.reason
        return record

    def describe(self) -> str:
        if self.requested == "sklearn":
            return "engine: scikit-learn"
        if self.used == "compiled":
            return (
                f"engine: compiled ({self.library.get('library')}); verified on {self.checked_rows:,} rows "
                f"({self.nan_rows:,} with NaN): largest difference {self.largest_difference:.3g} <= {TOLERANCE:g}, "
                f"classes identical"
            )
        return f"engine: scikit-learn although {self.requested} was asked for: {self.reason}"


@dataclass
class Agreement:
    rows: int = 0
    nan_rows: int = 0
    largest: float = 0.0
    class_mismatches: int = 0
    first_problem: str = ""

    @property
    def passed(self) -> bool:
        return self.largest <= TOLERANCE and self.class_mismatches == 0


def check_engine(config: Any, model: LoadedModel) -> None:
    """Raise what ``choose_engine`` would raise before scoring for the job's configuration: the
    compiled engine without its libraries, or a compiled cache it cannot use (``auto`` falls back
    to scikit-learn instead, so it never fails here)."""
    if config.engine != "compiled":
        return
    missing = compiled.missing_dependency()
    if missing:
        raise ConfigError(f"{param('engine')} compiled: {missing}")
    if compiled.unsupported_reason(model) is None:
        compiled.check_cache(model, config.compiled_cache)


def choose_engine(
    config: Any,
    model: LoadedModel,
    files: Sequence[Mapping[str, Any]],
    model_version: str,
    predicted_at: datetime,
) -> EngineChoice:
    """The engine to score ``files`` (plan entries) with, per ``config.engine``; see the module doc."""
    requested = config.engine
    if requested == "sklearn":
        return EngineChoice(requested, "sklearn")
    check_engine(config, model)
    missing = compiled.missing_dependency()
    reason = missing or compiled.unsupported_reason(model)
    if reason:
        return _fallback(requested, reason)
    try:
        library = compiled.obtain(model, config.compiled_cache, config.storage)
    except ModelError as exc:
        if requested == "compiled":
            raise
        return _fallback(requested, str(exc))
    started = time.perf_counter()
    reference = Predictor(model, model_version, predicted_at)
    candidate = compiled.CompiledPredictor(model, model_version, predicted_at, library.path)
    agreement = compare_on_files(reference, candidate, files, config.storage)
    choice = EngineChoice(
        requested,
        "compiled",
        library_path=library.path,
        library=library.to_dict(),
        checked_rows=agreement.rows,
        nan_rows=agreement.nan_rows,
        largest_difference=agreement.largest,
        class_mismatches=agreement.class_mismatches,
        seconds=time.perf_counter() - started,
    )
    if agreement.passed:
        log.info(choice.describe(), extra=event("engine", **choice.to_dict()))
        return choice
    problem = (
        f"the compiled library {library.path} disagrees with scikit-learn on the job's rows: "
        f"{agreement.first_problem} (tolerance {TOLERANCE:g}, {agreement.rows:,} rows checked)"
    )
    if requested == "compiled":
        raise ModelError(f"{problem}; nothing was scored (use {param('engine')} auto to fall back to scikit-learn)")
    choice.used, choice.library_path, choice.reason = "sklearn", None, problem
    log.warning(choice.describe(), extra=event("engine", **choice.to_dict()))
    return choice


def _fallback(requested: str, reason: str) -> EngineChoice:
    choice = EngineChoice(requested, "sklearn", reason=reason)
    log.warning(choice.describe(), extra=event("engine", **choice.to_dict()))
    return choice


def compare_on_files(
    reference: Predictor,
    candidate: Predictor,
    files: Sequence[Mapping[str, Any]],
    storage: StorageSettings,
) -> Agreement:
    """Score a sample of every file with both predictors and measure how far apart they are."""
    handles_nan = type(reference.model.final_estimator).__name__.startswith("HistGradientBoosting")

    def sample(entry: Mapping[str, Any]) -> tuple[str, list[np.ndarray]]:
        return entry["uri"], _samples(reference, entry, storage, handles_nan)

    samples = list(in_order(sample, files))
    from threadpoolctl import threadpool_limits

    agreement = Agreement()
    with threadpool_limits(1):  # this process forks workers next: no native thread pool may be running
        for uri, (rows, *with_nan) in samples:
            agreement.rows += _compare(reference, candidate, _aligned(rows), len(rows), uri, agreement)
            for nan_rows in with_nan:
                # Rows scikit-learn refuses (a scaler or pipeline step that refuses NaN) never reach the trees.
                accepted = _compare(reference, candidate, _aligned(nan_rows), len(nan_rows), uri, agreement)
                agreement.rows += accepted
                agreement.nan_rows += accepted
    return agreement


def _samples(
    predictor: Predictor, entry: Mapping[str, Any], storage: StorageSettings, handles_nan: bool
) -> list[np.ndarray]:
    """Rows of the file's first non-empty row group as the scorer builds them (invalid rows
    zeroed, as the scorer scores them), then, for a model that handles missing values, copies of
    some of them with a NaN in one feature each, every feature in turn."""
    features = predictor.model.features
    groups = list(entry["row_groups"])
    index = next((i for i, rows in enumerate(groups) if rows), None)
    if index is None:
        return [np.zeros((0, len(features)))]
    wanted = np.unique(np.linspace(0, groups[index] - 1, min(ROWS_PER_FILE, groups[index])).astype(np.intp))
    taken, start = [], 0
    with open_parquet(entry["uri"], storage, expected=entry.get("identity"), streaming=True) as (pf, _):
        nulls = set(columns_with_nulls(pf.metadata, features))
        # Batch by batch, keeping only the wanted rows: this process forks the workers next, and
        # they would inherit whatever a whole row group had grown its heap to.
        for part in pf.iter_batches(SAMPLE_BATCH_ROWS, row_groups=[index], columns=list(features), use_threads=False):
            nulls.update(name for name in features if part.column(name).null_count)
            here = wanted[(wanted >= start) & (wanted < start + part.num_rows)] - start
            if here.size:
                taken.append(part.take(pa.array(here)))
            start += part.num_rows
    batch = pa.Table.from_batches(taken).combine_chunks().to_batches()[0]
    sampled = predictor.feature_matrix(batch, frozenset(nulls))[: batch.num_rows]
    bad = invalid_mask(sampled)
    if bad is not None:
        sampled[bad] = 0.0
    if not handles_nan or sampled.dtype.kind != "f":
        return [sampled]
    copies = sampled[:NAN_ROWS_PER_FILE].copy()
    copies[np.arange(len(copies)), np.arange(len(copies)) % copies.shape[1]] = np.nan
    return [sampled, copies]


def _aligned(rows: np.ndarray) -> np.ndarray:
    """Rows in a zero-padded, column-major matrix, as ``Predictor.feature_matrix`` builds them."""
    n = len(rows)
    matrix = np.zeros((n + (-n) % ROW_ALIGNMENT, rows.shape[1]), dtype=rows.dtype, order="F")
    matrix[:n] = rows
    return matrix


def _compare(
    reference: Predictor, candidate: Predictor, matrix: np.ndarray, rows: int, uri: str, agreement: Agreement
) -> int:
    """Add how far the candidate's columns are from the reference's on these rows to ``agreement``;
    the rows compared (those scikit-learn accepts: both engines must refuse the same rows)."""
    if not rows:
        return 0
    scored = reference.score(matrix, rows)
    try:
        answer = candidate.score(matrix, rows)
    except Exception as exc:  # a library built for another model may not even have its shape
        agreement.largest = np.inf
        agreement.first_problem = agreement.first_problem or f"{uri}: {type(exc).__name__}: {exc}"
        return 0
    refused = scored.refused if scored.refused is not None else np.zeros(rows, dtype=bool)
    if not np.array_equal(refused, answer.refused if answer.refused is not None else np.zeros(rows, dtype=bool)):
        agreement.largest = np.inf
        agreement.first_problem = agreement.first_problem or f"{uri}: the engines refuse different rows"
        return 0
    if scored.columns is None or answer.columns is None:
        return 0
    kept = pa.array(~refused)
    expected = [column.filter(kept) for column in scored.columns]
    got = [column.filter(kept) for column in answer.columns]
    model = reference.model
    for position, f in enumerate(reference.fields[: len(reference.fields) - 2]):  # predicted_at, model_version
        want, have = expected[position], got[position]
        if model.is_classifier and position == 0:
            differ = [i for i, (a, b) in enumerate(zip(want.to_pylist(), have.to_pylist())) if a != b]
            agreement.class_mismatches += len(differ)
            if differ and not agreement.first_problem:
                agreement.first_problem = (
                    f"{uri}: checked row {differ[0]} is class {have[differ[0]]} compiled "
                    f"but {want[differ[0]]} with scikit-learn"
                )
            continue
        a, b = want.to_numpy(zero_copy_only=False), have.to_numpy(zero_copy_only=False)
        scale = 1.0 if model.is_classifier else np.maximum(1.0, np.abs(a))
        with np.errstate(invalid="ignore"):
            diff = np.where(np.isnan(a) & np.isnan(b), 0.0, np.abs(a - b) / scale)
        diff = np.where(np.isnan(diff), np.inf, diff)
        worst = int(np.argmax(diff)) if diff.size else 0
        if diff.size and diff[worst] > agreement.largest:
            agreement.largest = float(diff[worst])
            if diff[worst] > TOLERANCE:
                agreement.first_problem = (
                    f"{uri}: checked row {worst}, {f.name} is {b[worst]!r} compiled but {a[worst]!r} with scikit-learn"
                )
    return len(expected[0])


def engine_manifest(receipts: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The manifest's ``engine`` entry: what every shard used and the verification it passed.

    Receipts written before engines were recorded were all scored with scikit-learn.
    """
    records = [r.get("engine") or {"requested": "sklearn", "used": "sklearn"} for _, r in sorted(receipts.items())]
    used = sorted({r["used"] for r in records})
    summary: dict[str, Any] = {"requested": records[0]["requested"], "used": used[0] if len(used) == 1 else used}
    checked = [r for r in records if "checked_rows" in r]
    if checked:
        differences = [r["largest_difference"] for r in checked if r.get("largest_difference") is not None]
        summary.update(
            tolerance=TOLERANCE,
            checked_rows=sum(r["checked_rows"] for r in checked),
            nan_rows=sum(r["nan_rows"] for r in checked),
            largest_difference=max(differences) if differences else None,
            class_mismatches=sum(r["class_mismatches"] for r in checked),
        )
        libraries = sorted(
            {r["library_sha256"] for r in checked if r.get("library_sha256") and r["used"] == "compiled"}
        )
        if libraries:
            summary["library_sha256"] = libraries[0] if len(libraries) == 1 else libraries
    reasons = sorted({r["reason"] for r in records if r.get("reason")})
    if reasons:
        summary["reasons"] = reasons
    summary["shards"] = records
    return summary
