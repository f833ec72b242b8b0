"""Overlap reading, scoring and writing with one thread each side and bounded queues.

pyarrow decodes and encodes Parquet, and scikit-learn's kernels compute, with the GIL released,
so a reader thread and a writer thread keep a core busy while the other stages wait on storage.
Queues hold at most ``depth`` batches, which keeps memory flat.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()
#: How often a side waiting on the other checks that it is still there.
POLL_SECONDS = 0.1
#: How long an abandoned reader gets to see its stop and end; it is a daemon and is otherwise left.
ABANDON_SECONDS = 5.0


class SideGone(RuntimeError):
    """The thread on the other side of a queue ended without saying it was done."""


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put unless the other side has gone away; never blocks forever."""
    while not stop.is_set():
        try:
            q.put(item, timeout=POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue[Any], feeder: threading.Thread, stop: threading.Event | None = None) -> Any:
    """The next item; raises ``SideGone`` once ``feeder`` has ended (or ``stop`` is set) with
    nothing left in ``q``: a side never waits forever for one that is gone."""
    while True:
        try:
            return q.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if not feeder.is_alive() or (stop is not None and stop.is_set()):
                try:
                    return q.get_nowait()
                except queue.Empty:
                    raise SideGone(f"{feeder.name} ended without finishing") from None


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` produced by a background thread up to ``depth`` ahead; errors re-raise here."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not _put(q, item, stop):
                    return
            _put(q, _DONE, stop)
        except BaseException as exc:  # handed to the consumer
            _put(q, _Failure(exc), stop)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="batchscore-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = _get(q, thread)
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=ABANDON_SECONDS)  # a read stuck in storage is left to its timeout


class BackgroundWriter:
    """Calls ``write(item)`` on a background thread; a failure surfaces on the next call or ``close``."""

    def __init__(self, write: Callable[[Any], None], depth: int = 2):
        self._write = write
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._owner = threading.current_thread()
        self._thread = threading.Thread(target=self._consume, name="batchscore-writer", daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        while True:
            try:
                item = _get(self._queue, self._owner, self._stop)
            except SideGone:  # the thread that writes through us is gone, or aborted
                return
            if item is _DONE:
                return
            try:
                self._write(item)
            except BaseException as exc:
                self._error = exc
                self._stop.set()
                return

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, item: Any) -> None:
        self._raise_if_failed()
        if not _put(self._queue, item, self._stop):
            self._raise_if_failed()

    def close(self) -> None:
        """Wait for every queued write; re-raise a write failure."""
        if self._thread.is_alive():
            _put(self._queue, _DONE, self._stop)
            self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop without finishing the queue (the part is being discarded anyway)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.put_nowait(_DONE)
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
            self._thread.join(timeout=0.1)

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
