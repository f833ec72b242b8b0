"""Score plan units: read a unit's row groups, check values, predict, write its part.

A unit is the smallest piece of work with its own output file, so units can run in any order
and in any process, and the output is identical whichever way they are spread.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from .engine import Predictor
from .errors import InputDataError, StorageError
from .model import LoadedModel
from .pipeline import BackgroundWriter, prefetch
from .plan import Unit
from .pool import WorkerDied, WorkerPool, report_progress
from .profile import UnitProfile, score_columns
from .sink import REJECT_REASON, REJECTED_DIR, TEMP_PATTERN, part_path, part_writer, rejected_path
from .source import columns_with_nulls, iter_batches
from .storage import filesystem, is_local, join, make_durable
from .validate import invalid_mask, invalid_reasons


@dataclass
class ScoreTask:
    """Everything a process needs to score units; sent once to each worker."""

    model: LoadedModel
    model_version: str
    predicted_at: datetime
    files: Sequence[Mapping[str, Any]]  # plan file entries: uri, size, row_groups
    output: str  # full URI of the output dataset
    passthrough: tuple[str, ...]
    output_schema: pa.Schema
    batch_size: int
    on_invalid: str
    max_invalid_rows: int
    storage_options: Mapping[str, Any]
    attempt: str = ""  # named in every part's footer, checked by commit against the receipt
    fence: Any = None  # lease.Fence: no part is published once the output's lease may have run out
    profile: bool = True  # profile features and scores for the run report (off only to measure its cost)

    @property
    def read_columns(self) -> list[str]:
        """Passthrough columns, then features not among them; nothing else is read."""
        return list(self.passthrough) + [f for f in self.model.features if f not in self.passthrough]

    def open_part(self, fs: Any, path: str, schema: pa.Schema) -> Any:
        """A part writer that names this attempt and publishes only under the lease."""
        fence = self.fence
        check = (lambda: fence.check(path)) if fence is not None else None
        return part_writer(fs, path, schema, self.attempt, check)

    @property
    def rejected_schema(self) -> pa.Schema:
        return pa.schema([self.output_schema.field(c) for c in self.passthrough] + [pa.field(REJECT_REASON, pa.string())])


@dataclass
class UnitResult:
    part: str
    rows_in: int
    rows_out: int
    rows_invalid: int
    rejected_part: str | None
    seconds: float
    profile: dict[str, Any] | None = None


def _first_row(file: Mapping[str, Any], unit: Unit) -> int:
    return sum(file["row_groups"][: unit.row_groups[0]]) if unit.row_groups else 0


class _UnitScorer:
    """One unit's pass over its batches, with the invalid-row policy applied."""

    def __init__(self, task: ScoreTask, predictor: Predictor, unit: Unit):
        self.task, self.predictor, self.unit = task, predictor, unit
        self.file = task.files[unit.file]
        self.invalid = 0
        self.rejected_writer: Any = None

    def _handle_invalid(self, batch: pa.RecordBatch, bad: np.ndarray, offset: int, stack: contextlib.ExitStack) -> None:
        rows = np.flatnonzero(bad)
        uri = self.file["uri"]
        first = invalid_reasons(batch, self.task.model.features, rows[:1])[0]
        if self.task.on_invalid == "fail":
            raise InputDataError(
                f"{uri}: row {offset + int(rows[0])} has an invalid feature value ({first}); "
                f"--on-invalid fail stops at the first null/NaN/inf feature (use skip or quarantine to set rows aside)"
            )
        self.invalid += rows.size
        if self.invalid > self.task.max_invalid_rows:
            raise InputDataError(
                f"{uri}: more invalid rows than --max-invalid-fraction allows "
                f"({self.task.max_invalid_rows} in all); e.g. row {offset + int(rows[0])}: {first}"
            )
        if self.task.on_invalid == "quarantine":
            if self.rejected_writer is None:
                fs, base = filesystem(self.task.output, self.task.storage_options)
                path = rejected_path(base, self.unit.part_name)
                self.rejected_writer = stack.enter_context(self.task.open_part(fs, path, self.task.rejected_schema))
            picked = batch.select(list(self.task.passthrough)).filter(pa.array(bad))
            reasons = pa.array(invalid_reasons(batch, self.task.model.features, rows), pa.string())
            self.rejected_writer.write_batch(
                pa.RecordBatch.from_arrays(list(picked.columns) + [reasons], schema=self.task.rejected_schema)
            )

    def run(self) -> UnitResult:
        task, predictor = self.task, self.predictor
        started = time.perf_counter()
        rows_in = rows_out = 0
        offset = _first_row(self.file, self.unit)
        fs, base = filesystem(task.output, task.storage_options)
        profile = UnitProfile(task.model.features, *score_columns(task.output_schema, task.model.is_classifier)) \
            if task.profile else None
        with contextlib.ExitStack() as stack:
            parquet = stack.enter_context(task.open_part(fs, part_path(base, self.unit.part_name), task.output_schema))
            writer = stack.enter_context(BackgroundWriter(parquet.write_batch))
            file_nulls: frozenset[str] = frozenset()

            def footer(meta: Any) -> None:
                nonlocal file_nulls
                file_nulls = columns_with_nulls(meta, task.model.features)

            batches = prefetch(iter_batches(
                self.file["uri"], self.unit.row_groups, task.read_columns, task.batch_size, task.storage_options,
                expected=self.file["identity"], on_footer=footer,
            ))
            for batch in batches:
                n = batch.num_rows
                matrix = predictor.feature_matrix(batch, file_nulls)
                if profile is not None:
                    profile.add_features(batch, matrix, n)
                bad = invalid_mask(matrix[:n])
                if bad is not None:
                    self._handle_invalid(batch, bad, offset, stack)
                    matrix[:n][bad] = 0.0  # scored like any row, then dropped: neighbours stay put
                if n:
                    columns = [batch.column(c) for c in task.passthrough] + predictor.predict(matrix, n)
                    scored = pa.RecordBatch.from_arrays(columns, schema=task.output_schema)
                    if bad is not None:
                        scored = scored.filter(pa.array(~bad))
                    if scored.num_rows:
                        writer.write(scored)
                        if profile is not None:
                            profile.add_scores(scored)
                    rows_out += scored.num_rows
                rows_in += n
                offset += n
                report_progress(n)
        return UnitResult(
            part=self.unit.part_name,
            rows_in=rows_in,
            rows_out=rows_out,
            rows_invalid=self.invalid,
            rejected_part=self.unit.part_name if self.rejected_writer is not None else None,
            seconds=time.perf_counter() - started,
            profile=profile.to_dict() if profile is not None else None,
        )


def score_unit(task: ScoreTask, predictor: Predictor, unit: Unit) -> UnitResult:
    try:
        return _UnitScorer(task, predictor, unit).run()
    except OSError as exc:  # reads raise InputDataError, so this is the part's write (disk full...)
        raise StorageError(f"cannot write part {join(task.output, unit.part_name)}: {exc.strerror or exc}") from None


#: How long jemalloc keeps freed pages for reuse: long enough that each batch reuses the last
#: one's pages (returning them at once costs page faults), short enough that memory stays flat.
JEMALLOC_DECAY_MS = 1000


def use_lean_memory_pool() -> None:
    """Prefer jemalloc with a short decay: the resident size of a long stream of batches stays
    flat instead of the allocator holding on to pages it has used once."""
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow build without jemalloc: keep its default
        return
    pa.set_memory_pool(pool)
    pa.jemalloc_set_decay_ms(JEMALLOC_DECAY_MS)


# --- worker processes -------------------------------------------------------------------------

_WORKER: tuple[ScoreTask, Predictor] | None = None


def _init_worker(task: ScoreTask) -> None:
    """One compute thread per worker, so N workers use N cores, not N x cores.

    One thread also keeps a forked worker safe: GNU OpenMP's thread pool does not survive a fork
    (a parent that ever ran a parallel region would deadlock its children's), but a single
    thread runs parallel regions inline without it.
    """
    global _WORKER
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    pa.set_cpu_count(1)
    for part in (task.model.estimator, task.model.scaler):
        single_threaded(part)
    _WORKER = (task, Predictor(task.model, task.model_version, task.predicted_at))


def single_threaded(estimator: Any) -> None:
    """Set every ``n_jobs`` of an estimator (and of its steps) to 1: a forest saved with
    ``n_jobs=-1`` would otherwise start a thread per core in each worker. Its predictions are
    then the model's own single-threaded ones (threads add up trees' votes in whatever order
    they finish)."""
    get_params = getattr(estimator, "get_params", None)
    if get_params is None:
        return
    try:
        names = [name for name in get_params(deep=True) if name == "n_jobs" or name.endswith("__n_jobs")]
        if names:
            estimator.set_params(**{name: 1 for name in names})
    except Exception:  # an estimator whose parameters cannot be set back: leave it as it is
        pass


def _worker_score(unit: Unit) -> UnitResult:
    """Score one unit in a worker (``_init_worker`` has run there)."""
    assert _WORKER is not None
    return score_unit(*_WORKER, unit)


def score_units(
    task: ScoreTask, units: Sequence[Unit], workers: int, on_rows: Callable[[int], None] | None = None
) -> list[UnitResult]:
    """Score every unit in ``workers`` worker processes (one core each); results in unit order.

    ``on_rows`` hears of every batch as its rows are scored, not only of whole units.

    Scoring always happens in workers, one or many: each starts as a fork of this process, so the
    imported libraries and the loaded model cost nothing to share, a worker's memory is only what
    it touches itself, and one code path serves every worker count. However the run fails or is
    interrupted, every worker is gone within a bounded time and none of this run's temporary
    parts is left behind.
    """
    use_lean_memory_pool()
    if not units:
        return []
    # Python's recipe for fork without exec: everything alive now (libraries, the model) lives as
    # long as the run, so take it out of the collector's reach. Workers then never write to, and
    # so never copy, those pages, and no collection walks them again, exit included.
    gc.freeze()
    results: dict[int, UnitResult] = {}
    fs, base = filesystem(task.output, task.storage_options)
    # Largest first, so the units still running at the end are the small ones and workers
    # finish nearly together; results are put back in unit order.
    order = sorted(range(len(units)), key=lambda i: -units[i].rows)
    pool = WorkerPool(max(1, min(workers, len(units))), functools.partial(_init_worker, task), _worker_score)
    flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchscore-flush")
    try:
        flushes: list[Future[None]] = []
        for index, result in pool.map_unordered(units, order, on_rows):
            results[index] = result
            # Written back while the other units score, so commit's flush finds little left.
            flushes.append(flusher.submit(make_durable, fs, _written_paths(base, result)))
        pool.close()
        for flush in flushes:
            flush.result()
    except BaseException as exc:
        try:
            pool.stop()
        except KeyboardInterrupt:  # asked again while stopping: no more grace
            pool.stop(grace=0)
        flusher.shutdown(wait=False, cancel_futures=True)
        remove_temporary_parts(fs, base, units)
        if isinstance(exc, WorkerDied):
            raise StorageError(
                f"{exc} while scoring, perhaps for lack of memory; nothing was committed; "
                f"try fewer --workers or a smaller --batch-size"
            ) from None
        raise
    flusher.shutdown(wait=True)
    return [results[i] for i in range(len(units))]


def _written_paths(base: str, result: UnitResult) -> list[str]:
    paths = [part_path(base, result.part)]
    if result.rejected_part:
        paths.append(rejected_path(base, result.rejected_part))
    return paths


def remove_temporary_parts(fs: Any, base: str, units: Sequence[Unit]) -> None:
    """Remove the temporary files that stopped workers left for these units' parts.

    Only these units' names: other shards may be writing their own parts in the same folder.
    Best effort, as the run is failing anyway; ``commit`` removes whatever is left.
    """
    if not is_local(fs):
        return  # object stores publish nothing until an upload completes
    prefixes = tuple(f".{u.part_name}.tmp-" for u in units)
    for folder in (base, join(base, REJECTED_DIR)):
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                if name.startswith(prefixes) and TEMP_PATTERN.match(name):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(folder, name))
