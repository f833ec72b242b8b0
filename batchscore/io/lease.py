"""One output, one writer: a lease on the output folder that one job holds while it writes.

The lease is ``lease.json`` in the output's state folder (see layout.py), on local disk and S3
alike. It is taken with an exclusive create (a link into place locally, ``If-None-Match: *`` on S3)
and changed only by a conditional replace (``If-Match`` on S3, a ``flock`` of the file locally), so
two jobs can never both believe they hold it. A ``run`` holds it under a fresh random name for its
whole duration; a sharded job holds it under its plan id from ``plan --out`` to ``commit``, so its
shards (and their retries) join it while any other job is refused, naming the holder.

A lease ends when its holder releases it, when it expires (``lease_seconds`` after its last renewal:
how long a crashed holder blocks the output), or at once when it belongs to a ``run`` on this host
whose process is gone (so a retry after ``kill -9`` need not wait). While it scores, a holder renews
the lease every third of ``lease_seconds``; one that finds it taken stops before it commits, and
its workers publish no part once the lease may have run out (see ``Fence``).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

from ..config import DEFAULT_LEASE_SECONDS, DEFAULT_LOCK_TIMEOUT
from ..errors import ConfigError, StorageError, param
from .conditional import PreconditionFailed, create_exclusive, read_tagged, replace_if
from .layout import lease_path
from .storage import Location, full_uri, storage_error

#: The share of ``lease_seconds`` a holder keeps in hand against clock skew between hosts: its
#: workers stop publishing parts this long before the lease's recorded expiry.
SKEW_MARGIN = 0.25


class OutputBusyError(ConfigError):
    """Another job holds (or has taken over) the lease on the output."""


def run_holder() -> str:
    """A name no other ``run`` will ever share."""
    return f"run {secrets.token_hex(8)}"


def plan_holder(plan_id: str) -> str:
    """The name every step of one sharded job shares, so its shards and retries may join."""
    return f"plan {plan_id}"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def _process_state(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process, from /proc; None where there is none."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, started: str | None) -> bool:
    """Whether ``pid`` still is the process that took the lease (not a zombie, not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    state = _process_state(pid)
    if state is None:
        return True  # no /proc: trust kill(0)
    return state[0] != "Z" and (started is None or state[1] == started)


@dataclass(frozen=True)
class LeaseRecord:
    """What ``lease.json`` holds; ``expires_at`` and ``acquired_at`` are POSIX seconds."""

    holder: str
    plan_id: str
    command: str
    host: str
    pid: int
    pid_started: str | None
    bound_to_process: bool  # a run's lease dies with its process; a sharded job's outlives each step
    acquired_at: float
    expires_at: float
    released: bool = False

    def to_bytes(self) -> bytes:
        data = asdict(self)
        data["acquired"], data["expires"] = _iso(self.acquired_at), _iso(self.expires_at)
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord | None:
        """None for content that is not a lease (it then protects nothing and may be replaced)."""
        try:
            raw = json.loads(data)
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        except (ValueError, TypeError, KeyError):
            return None

    def stale(self, now: float) -> bool:
        if self.released or now >= self.expires_at:
            return True
        if self.bound_to_process and self.host == socket.gethostname():
            return not _process_alive(self.pid, self.pid_started)
        return False

    def describe(self) -> str:
        job = f"sharded job (plan {self.plan_id})" if self.holder.startswith("plan ") else "another run"
        return (
            f"{job}: `{self.command}` on host {self.host} (pid {self.pid}) since {_iso(self.acquired_at)}, "
            f"held until {_iso(self.expires_at)} unless renewed"
        )


class Fence:
    """The time until which the lease is surely ours, shared with forked worker processes.

    Workers check it before publishing each part: a process paused past its lease (and its
    workers with it) never publishes over the output of the job that took the lease meanwhile.
    """

    LOST = -1.0

    def __init__(self, grace_seconds: float):
        self._until = multiprocessing.RawValue("d", 0.0)
        self.grace_seconds = grace_seconds

    @property
    def until(self) -> float:
        return float(self._until.value)

    def set(self, until: float) -> None:
        self._until.value = until

    def check(self, what: str) -> None:
        """Return once ``what`` may be published; raise if the lease is gone or not renewed in time."""
        give_up = time.monotonic() + self.grace_seconds
        while time.time() >= self.until:
            if self.until == self.LOST:
                raise OutputBusyError(f"the lease on the output was lost; not publishing {what}")
            if time.monotonic() >= give_up:
                raise StorageError(
                    f"the lease on the output ran out before {what} could be published; not publishing it"
                )
            time.sleep(0.05)


class Lease:
    """The lease on one output, as one process sees it: acquire, renew, release."""

    def __init__(
        self, location: Location, holder: str, plan_id: str, command: str, seconds: float = DEFAULT_LEASE_SECONDS
    ):
        self.location, self.output = location, location.uri  # the output's
        self.holder, self.plan_id, self.command, self.seconds = holder, plan_id, command, seconds
        self.fs = location.fs
        self.path = lease_path(location.path)
        self.uri = full_uri(self.fs, self.path)
        self.fence = Fence(grace_seconds=seconds / 3)
        self.lost: BaseException | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._interruptible = False
        self._previous_handler: Any = None

    # --- one conditional step each ------------------------------------------------------------

    def _record(self, now: float, current: LeaseRecord | None) -> LeaseRecord:
        """Our lease as of ``now``; joining our own job's lease keeps when it was first taken."""
        mine = current if current is not None and current.holder == self.holder and not current.released else None
        state = _process_state(os.getpid())
        return LeaseRecord(
            holder=self.holder,
            plan_id=self.plan_id,
            command=self.command,
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_started=state[1] if state else None,
            bound_to_process=self.holder.startswith("run "),
            acquired_at=mine.acquired_at if mine is not None else now,
            expires_at=max(now + self.seconds, mine.expires_at if mine is not None else 0.0),
        )

    def _read(self) -> tuple[LeaseRecord | None, str] | None:
        try:
            found = read_tagged(self.fs, self.path)
        except NotADirectoryError:
            raise self._not_a_folder() from None
        except OSError as exc:
            raise _storage_failure(f"cannot read the lease {self.uri} on output {self.output}", exc) from None
        return None if found is None else (LeaseRecord.from_bytes(found[0]), found[1])

    def _replace(self, record: LeaseRecord, tag: str) -> None:
        try:
            replace_if(self.fs, self.path, record.to_bytes(), tag)
        except OSError as exc:
            raise _storage_failure(f"cannot write the lease {self.uri} on output {self.output}", exc) from None

    def _not_a_folder(self) -> ConfigError:
        return ConfigError(
            f"cannot keep the lease {self.uri} of output {self.output}: a file stands where its folder should be"
        )

    def _wrote(self, record: LeaseRecord) -> None:
        self.fence.set(record.expires_at - SKEW_MARGIN * self.seconds)

    def acquire(self, wait_seconds: float = DEFAULT_LOCK_TIMEOUT) -> Lease:
        """Take the lease, join our own job's, or take over a stale one; wait at most ``wait_seconds``."""
        give_up = time.monotonic() + wait_seconds
        while True:
            found, now = self._read(), time.time()
            try:
                if found is None:
                    record = self._record(now, None)
                    create_exclusive(self.fs, self.path, record.to_bytes())
                    return self._took(record)
                current, tag = found
                if current is None or current.holder == self.holder or current.stale(now):
                    record = self._record(now, current)
                    replace_if(self.fs, self.path, record.to_bytes(), tag)
                    return self._took(record)
            except PreconditionFailed:
                continue  # another job wrote it between our read and our write: look again
            except (NotADirectoryError, FileExistsError):
                raise self._not_a_folder() from None
            except OSError as exc:
                raise _storage_failure(f"cannot take the lease {self.uri} on output {self.output}", exc) from None
            if time.monotonic() >= give_up:
                raise self._busy(current)
            time.sleep(min(1.0, max(0.05, give_up - time.monotonic())))

    def _busy(self, current: LeaseRecord) -> OutputBusyError:
        return OutputBusyError(
            f"output {self.output} is being written by {current.describe()}; "
            f"wait for it, or pass {param('lock_timeout')} SECONDS to wait here"
        )

    def check_free(self) -> None:
        """Raise what ``acquire`` would raise now, without taking the lease: another job's live
        lease, a file where the state folder should be, or a lease that cannot be read."""
        found = self._read()
        current = found[0] if found else None
        if current is not None and current.holder != self.holder and not current.stale(time.time()):
            raise self._busy(current)

    def _took(self, record: LeaseRecord) -> Lease:
        self._wrote(record)
        return self

    def renew(self) -> None:
        """Extend our lease; raise ``OutputBusyError`` if another job holds it now."""
        while True:
            current, tag = self._read() or (None, "")
            if current is None or current.holder != self.holder or current.released:
                self.fence.set(Fence.LOST)
                taker = (
                    "it was removed"
                    if current is None
                    else "it was released"
                    if current.holder == self.holder
                    else f"taken over by {current.describe()}"
                )
                raise OutputBusyError(f"lost the lease on output {self.output} ({taker}); stopped before committing")
            record = self._record(time.time(), current)
            try:
                self._replace(record, tag)
            except PreconditionFailed:
                continue  # a shard of the same job renewed it meanwhile
            self._wrote(record)
            return

    def release(self) -> None:
        """Mark the lease released, if it is still ours; the file stays (S3 has no conditional delete)."""
        while True:
            found = self._read()
            if found is None or found[0] is None or found[0].holder != self.holder or found[0].released:
                return
            record = replace(found[0], released=True, expires_at=time.time())
            try:
                self._replace(record, found[1])
                return
            except PreconditionFailed:
                continue

    def check(self) -> None:
        """Raise what the heartbeat found, if it lost the lease."""
        if self.lost is not None:
            raise self.lost

    # --- heartbeat ----------------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """Renew every third of the lease; on loss, interrupt the main thread (when it holds us)."""
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGUSR1, self._on_lost_signal)
            self._previous_handler = signal.SIG_DFL if previous is None else previous
            self._interruptible = True
        self._beat = threading.Thread(target=self._heartbeat, name="batchscore-lease", daemon=True)
        self._beat.start()

    def stop_heartbeat(self) -> None:
        self._interruptible = False
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self._previous_handler is not None:
            signal.signal(signal.SIGUSR1, self._previous_handler)
            self._previous_handler = None

    def _heartbeat(self) -> None:
        interval = self.seconds / 3
        wait = interval
        while not self._stop.wait(wait):
            try:
                self.renew()
                wait = interval
            except OutputBusyError as exc:
                return self._lose(exc)
            except Exception as exc:  # storage trouble: keep trying while the lease lasts
                if time.time() >= self.fence.until:
                    return self._lose(
                        StorageError(
                            f"could not renew the lease on output {self.output} before it ran out ({exc}); "
                            f"stopped before committing"
                        )
                    )
                wait = min(interval, 1.0)

    def _lose(self, exc: BaseException) -> None:
        self.lost = exc
        self.fence.set(Fence.LOST)
        if self._interruptible:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)  # type: ignore[arg-type]  # started: has an ident

    def _on_lost_signal(self, signum: int, frame: Any) -> None:
        if self._interruptible and self.lost is not None:
            self._interruptible = False
            raise self.lost


@contextlib.contextmanager
def held(
    output: Location,
    holder: str,
    plan_id: str,
    command: str,
    *,
    seconds: float = DEFAULT_LEASE_SECONDS,
    wait_seconds: float = DEFAULT_LOCK_TIMEOUT,
    release: str = "always",
) -> Iterator[Lease]:
    """Hold the lease around a block, renewed in the background.

    ``release``: "always" on the way out (a run), "on_success" (a commit: a failed one leaves the
    job's lease to its retry), or "never" (a plan or a shard: the job goes on after them).
    """
    lease = Lease(output, holder, plan_id, command, seconds).acquire(wait_seconds)
    lease.start_heartbeat()
    succeeded = False
    try:
        yield lease
        succeeded = True
    finally:
        lease.stop_heartbeat()
        if lease.lost is None and (release == "always" or (release == "on_success" and succeeded)):
            try:
                lease.release()
            except Exception:
                if succeeded:
                    raise
                # else the job's own error matters more, and the lease expires anyway


def _storage_failure(doing: str, exc: OSError) -> StorageError:
    """One line naming the lease and the cause, worded like every other storage failure."""
    return storage_error(doing, exc) or StorageError(f"{doing}: {exc}")
