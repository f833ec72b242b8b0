"""Every stop is bounded: SIGTERM or SIGINT ends the command within ``STOP_DEADLINE_SECONDS``,
whatever its threads are blocked on.

A stop first unwinds as usual: Python raises ``KeyboardInterrupt`` in the main thread, workers get
SIGTERM and ``pool.STOP_GRACE_SECONDS`` to drop their unfinished part, temporary files are removed
and the one ``Error:`` line is written. But Python runs signal handlers only in the main thread and
only between bytecodes, so a main thread blocked in native code (pyarrow opening a FIFO, a thread
pool joining a reader stuck on one, a storage call behind a stalled endpoint, cleanup calls to
that endpoint) would never get there, or not in time. So the C-level handler also writes the
signal number to a pipe (``signal.set_wakeup_fd``) that a watcher thread reads; if the process is
still alive ``STOP_DEADLINE_SECONDS`` after the first stop, the watcher writes the error line (if
the main thread has not), kills every worker, runs the registered clean-ups (local temporary
files) and ends the process with ``os._exit(EXIT_FAILURE)``. Nothing is committed either way:
``_SUCCESS`` is written only after a last check that no stop was asked for (``check``).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import EXIT_FAILURE
from .pool import STOP_GRACE_SECONDS, kill_all_workers

#: How long after the first SIGTERM or SIGINT the process is ended, whatever it is doing: the
#: workers' grace, then as long again for the parent's own clean-up.
STOP_DEADLINE_SECONDS = 2 * STOP_GRACE_SECONDS
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_cleanups: list[Callable[[], None]] = []
_stop = threading.Event()
_state: dict[str, Any] = {"reported": False, "signal": None, "publishing": False}


def requested() -> bool:
    """Whether a stop signal has arrived in this command."""
    return _stop.is_set()


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a stop was asked for: called right before ``_SUCCESS`` is
    written, so a stop that the main thread has not seen yet still commits nothing."""
    if _stop.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def publishing() -> Iterator[None]:
    """Around the write of ``_SUCCESS``: a deadline passing meanwhile cannot say nothing was committed."""
    _state["publishing"] = True
    try:
        yield
    finally:
        _state["publishing"] = False


def note(signum: int) -> None:
    """From the main thread's signal handler: the stop is known before the watcher reads its pipe."""
    _state["signal"] = _state["signal"] or signal.Signals(signum).name
    _stop.set()


def reported() -> None:
    """The command has written its one ``Error:`` line: the watcher must not write another."""
    _state["reported"] = True


def on_hard_stop(cleanup: Callable[[], None]) -> Callable[[], None]:
    """Run ``cleanup`` (quick and local: no storage calls) if the deadline ends the process;
    returns the call that takes it back."""
    _cleanups.append(cleanup)

    def forget() -> None:
        with contextlib.suppress(ValueError):
            _cleanups.remove(cleanup)

    return forget


@contextlib.contextmanager
def bounded(report: Callable[[str], None]) -> Iterator[None]:
    """Bound every stop of the block (see the module docstring); from the main thread only.

    ``report`` writes the error line (it runs on the watcher thread, given at most a second).
    After the block, a stop under way stays bounded until the process ends (exit may still wait on
    threads the stop left blocked); without one the watcher ends and the previous wakeup fd is back.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _stop.clear()
    _state.update(reported=False, signal=None, publishing=False)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    except ValueError:  # pragma: no cover - not the main thread of the main interpreter
        os.close(read_end)
        os.close(write_end)
        yield
        return
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(read_end, done, report), name="batchscore-stop-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        if not _stop.is_set():
            signal.set_wakeup_fd(previous)
            done.set()
            os.write(write_end, b"\0")  # wakes the watcher, which sees ``done`` and ends
            watcher.join(timeout=1)
            os.close(write_end)


def _watch(read_end: int, done: threading.Event, report: Callable[[str], None]) -> None:
    try:
        while True:
            data = os.read(read_end, 64)
            if done.is_set() or not data:
                return
            stops = [b for b in data if b in STOP_SIGNALS]
            if stops:
                break
    finally:
        if done.is_set():
            os.close(read_end)
    _state["signal"] = _state["signal"] or signal.Signals(stops[0]).name
    _stop.set()
    deadline = time.monotonic() + STOP_DEADLINE_SECONDS
    while (left := deadline - time.monotonic()) > 0:
        if select.select([read_end], [], [], left)[0]:
            os.read(read_end, 64)  # later signals: the deadline stands
    _hard_exit(report)


def _hard_exit(report: Callable[[str], None]) -> None:
    """The deadline has passed: say so once, kill the workers, clean up what is local, and go."""
    if not _state["reported"]:
        outcome = (
            "it was writing _SUCCESS, which may or may not have been written"
            if _state["publishing"]
            else "nothing was committed"
        )
        message = (
            f"stopped by {_state['signal']}: the run did not unwind within {STOP_DEADLINE_SECONDS:g} s and was "
            f"ended; {outcome}"
        )
        teller = threading.Thread(target=report, args=(message,), daemon=True)
        teller.start()
        teller.join(timeout=1)
    with contextlib.suppress(Exception):
        kill_all_workers()
    for cleanup in list(_cleanups):
        with contextlib.suppress(Exception):
            cleanup()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(EXIT_FAILURE)
