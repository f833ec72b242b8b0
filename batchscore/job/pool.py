"""A small pool of worker processes whose every way out is bounded.

On Linux each worker is a fork of the scoring process (it inherits the libraries and the loaded
model; elsewhere it starts the platform's default way, see ``start_method``), with a pipe of its
own: the parent sends it one item at a time and it answers on the same pipe. No
queue or lock is shared between workers, so a worker killed at any instant cannot leave a lock
held that another process then waits on forever; the parent waits on the pipes and the workers'
exit sentinels together, so a death is seen the moment it happens.

Workers die with their parent (``PR_SET_PDEATHSIG`` on Linux, a watcher thread elsewhere) and
``publish_allowed`` tells a worker's atomic writes not to put a file in place once it is orphaned.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, Literal

from ..io.storage import publish_only_while

#: How long workers get to unwind on SIGTERM (discarding their unfinished part) before SIGKILL.
STOP_GRACE_SECONDS = 5.0
#: How often the portable parent watch looks (where the kernel cannot signal a parent's death).
PARENT_POLL_SECONDS = 0.2

_PR_SET_PDEATHSIG = 1
_parent_pid: int | None = None  # set in a worker: the process that forked it
_report: Callable[[Any], None] | None = None  # set in a worker while it works on an item

#: What a worker's message on its pipe is: the item's result, its exception, or progress on it.
DONE, FAILED, PROGRESS = "done", "failed", "progress"


def report_progress(value: Any) -> None:
    """From a worker's ``work``: hand ``value`` to the parent's ``on_progress`` now, on the worker's
    own pipe, before the item is done. Does nothing outside a worker."""
    if _report is not None:
        _report(value)


class WorkerDied(Exception):
    """A worker process ended without answering (killed, or crashed in native code)."""

    def __init__(self, pid: int, exitcode: int | None):
        self.pid, self.exitcode = pid, exitcode
        how = f"killed by signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
        super().__init__(f"worker process {pid} died ({how})")


def publish_allowed() -> bool:
    """False in a worker whose parent has gone: nothing it wrote may appear at its final name."""
    return _parent_pid is None or os.getppid() == _parent_pid


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies; else watch the parent ourselves."""
    global _parent_pid
    _parent_pid = parent
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent:  # the parent died before the request took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="batchscore-parent-watch", daemon=True).start()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _redeliver_stop(unraisable: Any) -> None:
    """``sys.unraisablehook`` of a worker: a stop that lands in a finalizer (a weakref callback, a
    ``__del__``) would be swallowed there and printed as "Exception ignored". Deliver it again a
    moment later instead (a timer: raised here, it would be swallowed again), so that it reaches
    the unit in hand and unwinds it."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, STOP_REDELIVERY_SECONDS)
        return
    sys.__unraisablehook__(unraisable)


def _handle_stop_signals() -> None:
    """SIGTERM from the parent unwinds the unit in hand (its temporary file is removed on the way
    out); Ctrl-C reaches the whole process group, but only the parent decides what stops. The
    parent's wakeup pipe (see stopping.py) is the parent's alone: a worker's signals stay here."""
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    sys.unraisablehook = _redeliver_stop
    signal.signal(signal.SIGTERM, _interrupt)
    if hasattr(signal, "setitimer"):  # not on Windows
        signal.signal(signal.SIGALRM, _interrupt)  # a stop delivered again (see _redeliver_stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


#: How long after a stop was swallowed by a finalizer it is delivered again.
STOP_REDELIVERY_SECONDS = 0.005
#: Signals held back while a worker is forked, until it has its own handlers for them.
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _worker_main(
    conn: Connection,
    inherited: Sequence[Connection],
    parent: int,
    init: Callable[[], None],
    work: Callable[[Any], Any],
) -> None:
    global _report
    try:
        _handle_stop_signals()
        _die_with_parent(parent)
        publish_only_while(publish_allowed)
        for other in inherited:  # other pipes' ends: the parent's death must read as end-of-file here
            other.close()
        failed: Exception | None = None
        try:
            init()
        except Exception as exc:  # reported as the answer to every item
            failed = exc
        while True:
            try:
                item = conn.recv()
            except EOFError:
                return
            if item is None:
                return
            token, payload = item
            _report = lambda value, token=token: conn.send((token, PROGRESS, value))  # noqa: E731
            try:
                if failed is not None:
                    raise failed
                reply = (token, DONE, work(payload))
            except Exception as exc:
                reply = (token, FAILED, exc)
            finally:
                _report = None
            try:
                conn.send(reply)
            except (BrokenPipeError, EOFError):
                raise
            except Exception as exc:  # an error that cannot be pickled: send its text
                conn.send((token, FAILED, RuntimeError(f"{type(reply[2]).__name__}: {reply[2]} ({exc})")))
    except (KeyboardInterrupt, BrokenPipeError, EOFError):
        os._exit(1)  # told to stop or orphaned: quietly, the parent reports what happened


def start_method() -> Literal["fork"] | None:
    """``fork`` on Linux, where forking a process that has loaded the model is safe and shares
    it for free; elsewhere the platform's default (``spawn`` on macOS and Windows, where a fork
    of a process that has started threads or system frameworks may crash)."""
    return "fork" if sys.platform.startswith("linux") else None


#: Every pool of this process, for ``kill_all_workers``.
_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


def kill_all_workers() -> None:
    """SIGKILL every live worker of this process, without waiting: the last step of a stop whose
    deadline has passed (see stopping.py). Safe from any thread."""
    for pool in list(_pools):
        for process in list(pool._processes):
            if process.pid is not None and process.pid != os.getpid():
                with contextlib.suppress(OSError):
                    os.kill(process.pid, signal.SIGKILL)


class WorkerPool:
    """``workers`` forked processes that each run ``init()`` once, then ``work(item)`` per item."""

    def __init__(self, workers: int, init: Callable[[], None], work: Callable[[Any], Any]):
        context = multiprocessing.get_context(start_method())
        pipes = [context.Pipe(duplex=True) for _ in range(workers)]
        parent = os.getpid()
        self._processes: list[Any] = []
        self._conns: list[Connection] = []
        _pools.add(self)
        try:
            for i, (mine, theirs) in enumerate(pipes):
                inherited = [
                    c for j, pair in enumerate(pipes) for c in pair if c is not theirs and j >= i
                ] + self._conns
                process = context.Process(
                    target=_worker_main,
                    args=(theirs, inherited, parent, init, work),
                    name=f"batchscore-worker-{i}",
                )
                # A stop signal must not reach the child before it can handle it (it would
                # raise inside fork's own hooks): held back here, released by the child.
                held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
                try:
                    process.start()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, held)
                self._processes.append(process)
                self._conns.append(mine)
                theirs.close()
        except BaseException:
            self.stop()
            for pair in pipes:
                for conn in pair:
                    conn.close()
            raise

    def map_unordered(
        self, items: Sequence[Any], order: Sequence[int], on_progress: Callable[[Any], None] | None = None
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, result)`` as each item finishes, handing items out in ``order``; what
        workers pass to ``report_progress`` meanwhile goes to ``on_progress``, as it arrives.

        A worker's exception is raised here; a worker that dies raises ``WorkerDied``.
        """
        queue = list(reversed(order))
        busy: dict[Connection, int] = {}
        by_sentinel = {p.sentinel: (conn, p) for conn, p in zip(self._conns, self._processes)}

        def hand_out(conn: Connection) -> None:
            if queue:
                index = queue.pop()
                try:
                    conn.send((index, items[index]))
                except OSError:
                    raise self._died(conn) from None
                busy[conn] = index

        for conn in self._conns:
            hand_out(conn)
        while busy:
            ready = wait(list(busy) + list(by_sentinel))
            for handle in ready:
                if handle in by_sentinel:
                    conn, _ = by_sentinel[handle]
                    if conn in busy and conn.poll():  # its last answer is read first
                        continue
                    raise self._died(conn)
                conn = handle  # type: ignore[assignment]  # not a sentinel: one of the connections
                if conn not in busy:  # a worker speaks only when asked: this is its end-of-file
                    raise self._died(conn)
                try:
                    index, kind, value = conn.recv()
                except (EOFError, OSError):
                    raise self._died(conn) from None
                if kind == PROGRESS:
                    if on_progress is not None:
                        on_progress(value)
                    continue
                del busy[conn]
                if kind == FAILED:
                    raise value
                hand_out(conn)
                yield index, value

    def _died(self, conn: Connection) -> WorkerDied:
        process = self._processes[self._conns.index(conn)]
        process.join(timeout=1)
        return WorkerDied(process.pid, process.exitcode)

    def close(self) -> None:
        """Let idle workers exit (they are all idle once every item has finished), then stop."""
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        self.stop(grace=STOP_GRACE_SECONDS, terminate=False)

    def stop(self, grace: float = STOP_GRACE_SECONDS, terminate: bool = True) -> None:
        """End every worker within ``grace`` seconds (plus a moment to reap): SIGTERM lets a worker
        discard its unfinished part, SIGKILL ends whatever did not listen."""
        alive = [p for p in self._processes if p.pid is not None and p.exitcode is None]
        if terminate:
            for process in alive:
                _signal(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in alive:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in alive:
            if process.exitcode is None:
                _signal(process, signal.SIGKILL)
                process.join(timeout=max(grace, 1.0))  # only reaping is left: quick
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.stop()


def _signal(process: Any, signum: int) -> None:
    try:
        os.kill(process.pid, signum)
    except ProcessLookupError:
        pass
