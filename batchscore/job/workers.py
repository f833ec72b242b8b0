"""Score a shard's units in worker processes, one core each, and leave nothing behind on failure.

The process-wide settings a run needs (a frozen collector, the start method) last as long as the
run and are put back afterwards, so a library caller's process is as it was.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from ..errors import StorageError, param
from ..io.sink import TEMP_PATTERN, part_path, rejected_folder, rejected_name, rejected_path
from ..io.storage import is_local, make_durable
from ..models.challengers import single_threaded_parts
from ..models.compiled import predictor
from ..models.engine import Predictor
from . import stopping
from .planning import Unit
from .pool import WorkerDied, WorkerPool
from .scorer import ChallengerScoring, ScoreTask, UnitResult, score_unit

#: How long jemalloc keeps freed pages for reuse: long enough that each batch reuses the last
#: one's pages (returning them at once costs page faults), short enough that memory stays flat.
JEMALLOC_DECAY_MS = 1000


def use_lean_memory_pool() -> None:
    """Prefer jemalloc with a short decay: the resident size of a long stream of batches stays
    flat instead of the allocator holding on to pages it has used once.

    Called in each worker only (a process of our own), never in the caller's: pyarrow's wheels
    default to mimalloc, and which pool a library caller's process uses is its own choice."""
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow build without jemalloc: keep its default
        return
    pa.set_memory_pool(pool)
    pa.jemalloc_set_decay_ms(JEMALLOC_DECAY_MS)


_WORKER: tuple[ScoreTask, Predictor, ChallengerScoring | None] | None = None


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
    use_lean_memory_pool()
    for part in (task.model.estimator, task.model.scaler, *single_threaded_parts(task.challengers)):
        single_threaded(part)
    champion = predictor(task.model, task.model_version, task.predicted_at, task.compiled_library)
    _WORKER = (task, champion, ChallengerScoring(task, champion) if task.challengers else None)


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
    task, champion, challengers = _WORKER
    return score_unit(task, champion, unit, challengers)


def score_units(
    task: ScoreTask,
    units: Sequence[Unit],
    workers: int,
    on_batch: Callable[[int, float], None] | None = None,
    on_result: Callable[[int, UnitResult], UnitResult | None] | None = None,
) -> list[UnitResult | None]:
    """Score every unit in ``workers`` worker processes (one core each); results in unit order.

    ``on_batch`` hears of every batch as it is scored (its rows, and the seconds the worker took to
    score it), not only of whole units, so a run that fails still tells what it did; ``on_result``
    sees each unit's index and result as it arrives, and what it returns is kept (e.g. without its
    profile; None keeps nothing).

    Scoring always happens in workers, one or many: each starts as a fork of this process, so the
    imported libraries and the loaded model cost nothing to share, a worker's memory is only what
    it touches itself, and one code path serves every worker count. However the run fails or is
    interrupted, every worker is gone within a bounded time and none of this run's temporary
    parts is left behind.
    """
    if not units:
        return []
    with _frozen_collector():
        return _score_in_workers(task, units, workers, on_batch, on_result)


@contextlib.contextmanager
def _frozen_collector() -> Iterator[None]:
    """Python's recipe for fork without exec, for the length of a run: everything alive now
    (libraries, the model) lives as long as the run, so take it out of the collector's reach.
    Forked workers then never write to, and so never copy, those pages, and no collection walks
    them again, exit included. Afterwards the collector is given them back, unless the caller had
    frozen objects of its own (they stay as the caller left them)."""
    already = gc.get_freeze_count()
    gc.freeze()
    try:
        yield
    finally:
        if not already:
            gc.unfreeze()


def hand_out_order(units: Sequence[Unit]) -> list[int]:
    """The order units are handed to workers: largest first, so the units still running at the
    end are the small ones and workers finish nearly together (results are put back in unit order)."""
    return sorted(range(len(units)), key=lambda i: -units[i].rows)


def _score_in_workers(
    task: ScoreTask,
    units: Sequence[Unit],
    workers: int,
    on_batch: Callable[[int, float], None] | None,
    on_result: Callable[[int, UnitResult], UnitResult | None] | None = None,
) -> list[UnitResult | None]:
    def on_progress(progress: tuple[int, float]) -> None:  # a worker's (rows, scoring seconds) of one batch
        if on_batch is not None:
            on_batch(*progress)

    results: dict[int, UnitResult] = {}
    fs, base = task.output.fs, task.output.path
    order = hand_out_order(units)
    pool = WorkerPool(max(1, min(workers, len(units))), functools.partial(_init_worker, task), _worker_score)
    flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchscore-flush")
    forget_cleanup = stopping.on_hard_stop(functools.partial(remove_temporary_parts, fs, base, units, task))
    try:
        flushes: collections.deque[Future[None]] = collections.deque()
        for index, result in pool.map_unordered(units, order, on_progress):
            kept = on_result(index, result) if on_result is not None else result
            if kept is not None:  # a caller that keeps what it needs itself keeps no result per unit here
                results[index] = kept
            # Written back while the other units score, so commit's flush finds little left.
            flushes.append(flusher.submit(make_durable, fs, _written_paths(base, result)))
            while flushes and flushes[0].done():  # done ones are let go: 100,000 units, not 100,000 futures
                flushes.popleft().result()
        pool.close()
        for flush in flushes:
            flush.result()
    except BaseException as exc:
        try:
            pool.stop()
        except KeyboardInterrupt:  # asked again while stopping: no more grace
            pool.stop(grace=0)
        flusher.shutdown(wait=False, cancel_futures=True)
        remove_temporary_parts(fs, base, units, task)
        if isinstance(exc, WorkerDied):
            raise StorageError(
                f"{exc} while scoring, perhaps for lack of memory; nothing was committed; "
                f"try fewer {param('workers')} or a smaller {param('batch_size')}"
            ) from None
        raise
    finally:
        forget_cleanup()
    flusher.shutdown(wait=True)
    return [results.get(i) for i in range(len(units))]  # None where ``on_result`` kept nothing


def _written_paths(base: str, result: UnitResult) -> list[str]:
    paths = [part_path(base, result.part)]
    if result.rejected_part:
        paths.append(rejected_path(base, result.rejected_part))
    return paths


def remove_temporary_parts(fs: Any, base: str, units: Sequence[Unit], task: ScoreTask) -> None:
    """Remove the temporary files that stopped workers left for these units' parts.

    Only these units' names: other shards may be writing their own parts in the same folder.
    Best effort, as the run is failing anyway; ``commit`` removes whatever is left.
    """
    if not is_local(fs):
        return  # object stores publish nothing until an upload completes
    prefixes = tuple(f".{name}.tmp-" for u in units for name in (task.part_name(u), rejected_name(task.part_name(u))))
    for folder in (base, rejected_folder(base)):
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                if name.startswith(prefixes) and TEMP_PATTERN.match(name):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(folder, name))
