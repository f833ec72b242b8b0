"""Overlap reading, scoring and writing with one thread each side and bounded queues.

pyarrow decodes and encodes Parquet, and scikit-learn's kernels compute, with the GIL released,
so a reader thread and a writer thread keep a core busy while the other stages wait on storage.
Queues hold at most ``depth`` batches, which keeps memory flat.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _put(q: "queue.Queue[Any]", item: Any, stop: threading.Event) -> bool:
    """Put unless the other side has gone away; never blocks forever."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` produced by a background thread up to ``depth`` ahead; errors re-raise here."""
    q: "queue.Queue[Any]" = queue.Queue(maxsize=depth)
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
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


class BackgroundWriter:
    """Calls ``write(item)`` on a background thread; a failure surfaces on the next call or ``close``."""

    def __init__(self, write: Callable[[Any], None], depth: int = 2):
        self._write = write
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._consume, name="batchscore-writer", daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        while True:
            item = self._queue.get()
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

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
