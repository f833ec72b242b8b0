"""fsspec helpers shared by every module that touches files: one place knows local vs remote."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.registry import get_filesystem_class

from ..config import StorageSettings
from ..errors import BatchscoreError, ConfigError, StorageError, StorageUnreachableError

#: Backoff between throttled attempts: a random wait up to BASE x 2^n s (n = throttled answers so far), at most MAX.
THROTTLE_BACKOFF_BASE = 0.25
THROTTLE_BACKOFF_MAX = 20.0
#: HTTP statuses that mean "slow down": 503 (S3's SlowDown, ServiceUnavailable) and 429 (Too Many Requests).
THROTTLE_STATUSES = (429, 503)
S3_PROTOCOLS = ("s3", "s3a")


def _bounded_s3_options(storage: StorageSettings) -> dict[str, Any]:
    """s3fs options whose every request is bounded in time and attempts, by ``storage``'s bounds.

    Each attempt waits at most ``timeout`` s to connect and ``timeout`` s for each read of the
    answer. botocore's own retrying is cut to one attempt and s3fs's to one pass, so that only
    ``RetryPolicy`` decides, and nothing multiplies: a stalled endpoint fails a call after at most
    ``(retries + 1) * timeout + 2**retries - 1`` s (33 s with the defaults, measured 31 s), while a
    store that answers "slow down" is retried, apart, for up to ``storage_throttle_seconds``. A job
    then fails at once; only workers stopped mid-upload still try to abort their multipart upload
    (one more bounded call, in parallel), so a stalled store ends a job within about 70 s. A
    refused connection fails within the backoff alone (about 1-3 s). When the user set botocore's
    ``retries`` in ``config_kwargs``, botocore retries as told and no policy is added.

    The retry bounds are options too (``retry_bounds``): filesystems with other bounds are other
    instances in fsspec's cache, never one instance whose policy a later job replaced.
    """
    options = dict(storage.options)
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("connect_timeout", storage.timeout)
    config.setdefault("read_timeout", storage.timeout)
    bounds = None
    if "retries" not in config:
        config["retries"] = {"total_max_attempts": 1, "mode": "standard"}
        bounds = (storage.retries, storage.throttle_seconds)
    return {**options, "config_kwargs": config, "retry_bounds": bounds}


class RetryPolicy:
    """Which failed S3 requests are tried again, and after how long: a botocore ``needs-retry``
    handler, registered first on each client, whose answer is the only one that counts.

    Throttling (HTTP 429 or 503, or an error code botocore classifies as throttling: SlowDown,
    RequestLimitExceeded, ...) is the store asking for less traffic, not a fault: it is retried
    with exponential backoff and full jitter, as S3 asks, for up to ``throttle_seconds`` per
    request, and does not use up ``retries``. Everything else botocore's standard mode retries
    (timeouts, refused connections, 500/502/504) gets ``retries`` retries with its jittered
    backoff, so a stalled endpoint still fails a call within the stall bound.
    """

    def __init__(self, retries: int, throttle_seconds: float):
        from botocore.retries import standard

        self.retries, self.throttle_seconds = retries, throttle_seconds
        self._adapter = standard.RetryEventAdapter()
        self._conditions = standard.StandardRetryConditions(max_attempts=retries + 1)
        self._backoff = standard.ExponentialBackoff()
        self._throttled = standard.ThrottledRetryableChecker()

    def is_throttled(self, context: Any) -> bool:
        status = getattr(context.http_response, "status_code", None)
        return status in THROTTLE_STATUSES or self._throttled.is_retryable(context)

    def __call__(self, **kwargs: Any) -> float | bool | None:
        context = self._adapter.create_retry_context(**kwargs)
        state = kwargs["request_dict"]["context"].setdefault("batchscore_retry", {"throttled": 0, "since": None})
        if context.http_response is not None and self.is_throttled(context):
            now = time.monotonic()
            state["since"] = state["since"] or now
            delay = random.uniform(0, min(THROTTLE_BACKOFF_MAX, THROTTLE_BACKOFF_BASE * 2 ** state["throttled"]))
            if now + delay - state["since"] > self.throttle_seconds:
                return False  # throttled past the budget: the answer goes back as the error
            state["throttled"] += 1
            return delay
        context.attempt_number = kwargs["attempts"] - state["throttled"]  # throttled attempts do not count
        if self._conditions.is_retryable(context):
            return self._backoff.delay_amount(context)
        return False


def _s3_class() -> type[Any]:
    """s3fs's filesystem, with ``RetryPolicy`` put first on every client it creates."""
    global _BOUNDED_S3
    if _BOUNDED_S3 is None:
        import s3fs

        class BoundedS3FileSystem(s3fs.S3FileSystem):
            def __init__(self, *args: Any, retry_bounds: tuple[int, float] | None = None, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.retry_policy = RetryPolicy(*retry_bounds) if retry_bounds is not None else None
                self.retries = 1  # RetryPolicy retries each request; s3fs repeating them would multiply the bound

            async def set_session(self, refresh: bool = False, kwargs: dict[str, Any] = {}) -> Any:  # noqa: B006
                client = await super().set_session(refresh=refresh, kwargs=kwargs)
                if self.retry_policy is not None:
                    client.meta.events.register_first(
                        "needs-retry.s3", self.retry_policy, unique_id="batchscore-retry-policy"
                    )
                return client

        BoundedS3FileSystem.__module__ = __name__
        BoundedS3FileSystem.__qualname__ = "BoundedS3FileSystem"
        _BOUNDED_S3 = BoundedS3FileSystem
    return _BOUNDED_S3


_BOUNDED_S3: type | None = None


def filesystem(uri: str, storage: StorageSettings | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve ``uri`` to its filesystem and the path inside it (``resolve`` gives a ``Location``).

    fsspec keeps one instance per set of options and per process, so this is cheap after the first
    time, and a forked worker gets its own (an s3fs client must not cross a fork). Storage options
    only reach remote filesystems: a local path must keep working when a job configured for S3 also
    reads a local model. Every S3 filesystem is bounded (see ``_bounded_s3_options``), and so is
    every file opened on it, pyarrow's reads included.
    """
    storage = storage or StorageSettings()
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    try:
        if protocol not in S3_PROTOCOLS:
            return url_to_fs(uri, **(dict(storage.options) if protocol not in ("file", "local") else {}))
        cls = _s3_class()
        fs = cls(**{**cls._get_kwargs_from_urls(uri), **_bounded_s3_options(storage)})
    except (ValueError, ImportError) as exc:
        raise StorageError(f"cannot open storage for {uri}: {exc}") from None
    return fs, fs._strip_protocol(uri)


@dataclasses.dataclass(frozen=True)
class Location:
    """A place the job reads or writes: ``uri`` as a user would type it, the filesystem that
    holds it (``fs``) and the path inside that filesystem (``path``), resolved once by ``resolve``
    from a URI and the job's storage settings, then handed on.

    ``fs`` is the filesystem of the process that asks: a worker forked (or spawned) after the
    location was resolved gets its own from fsspec's cache, never the parent's s3fs client.
    """

    uri: str
    path: str
    storage: StorageSettings = dataclasses.field(repr=False)
    _fs: fsspec.AbstractFileSystem = dataclasses.field(repr=False, compare=False)
    _pid: int = dataclasses.field(repr=False, compare=False)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._pid == os.getpid():
            return self._fs
        return filesystem(self.uri, self.storage)[0]

    def __reduce__(self) -> tuple[Any, ...]:
        """Sent to another process as what it is resolved from: a filesystem does not travel."""
        return resolve, (self.uri, self.storage)


def resolve(uri: str, storage: StorageSettings | None = None) -> Location:
    """The ``Location`` of ``uri``, with its filesystem opened by ``storage``'s options and bounds."""
    fs, path = filesystem(uri, storage)
    return Location(full_uri(fs, path), path, storage or StorageSettings(), fs, os.getpid())


def failure_cause(exc: BaseException) -> str | None:
    """The cause of a storage failure in a few words, or ``None`` when ``exc`` is not one.

    Disk full, read-only or forbidden storage, a missing bucket, a refused connection and a
    timeout are conditions of the storage, not bugs: they deserve one line, not a traceback.
    """
    import botocore.exceptions as boto

    throttled = _throttled_answer(exc)
    if throttled:
        return f"storage throttled the request (slow down: {throttled}) past storage_throttle_seconds"
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    if isinstance(exc, (boto.ConnectTimeoutError, boto.ReadTimeoutError, asyncio.TimeoutError, TimeoutError)) or (
        type(exc).__name__ == "FSTimeoutError"
    ):
        return f"storage did not answer in time ({str(exc) or 'timed out'})"
    if isinstance(exc, boto.EndpointConnectionError):
        return f"cannot connect to storage ({exc})"
    if isinstance(exc, (boto.BotoCoreError, boto.ClientError)):
        return str(exc)
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return f"storage connection failed ({exc})"
    except ImportError:  # pragma: no cover - s3fs depends on it
        pass
    if isinstance(exc, OSError):  # s3fs's translations: PermissionError("Access Denied"), missing bucket...
        return str(exc) or type(exc).__name__
    return None


def _throttled_answer(exc: BaseException | None) -> str | None:
    """The store's "slow down" answer (code: message) behind ``exc`` (s3fs raises it as an
    ``OSError`` caused by botocore's ``ClientError``), or ``None``."""
    import botocore.exceptions as boto

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, boto.ClientError):
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = error.get("Code", "")
            throttling = RetryPolicy(0, 0)._throttled._throttled_error_codes  # type: ignore[attr-defined]  # botocore's, private
            if status in THROTTLE_STATUSES or code in throttling:
                return f"{code or status}: {error.get('Message', '')}".rstrip(": ")
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def endpoint_unreachable(exc: BaseException) -> bool:
    """True when no further call to the same storage can be expected to succeed soon."""
    import botocore.exceptions as boto

    if isinstance(exc, StorageUnreachableError):  # a class survives the trip from a worker process
        return True
    return isinstance(exc, (boto.ConnectionError, boto.HTTPClientError, asyncio.TimeoutError, TimeoutError)) or (
        type(exc).__name__ == "FSTimeoutError"
    )


@contextlib.contextmanager
def translated(action: str, target: str, passthrough: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Re-raise a storage failure inside the block as one ``StorageError``: "cannot ACTION TARGET: cause".

    ``passthrough`` names exceptions the caller handles itself (e.g. a file that may be missing).
    """
    handled: tuple[type[BaseException], ...] = (BatchscoreError, *passthrough)
    try:
        yield
    except handled:
        raise
    except Exception as exc:
        error = storage_error(f"cannot {action} {target}", exc)
        if error is None:
            raise
        raise error from exc


def storage_error(doing: str, exc: BaseException) -> StorageError | None:
    """``StorageError("DOING: cause")`` for a storage failure, else ``None``; unreachable storage
    gets the subclass that tells clean-up not to wait on it."""
    cause = failure_cause(exc)
    if cause is None:
        return None
    error = StorageUnreachableError if endpoint_unreachable(exc) else StorageError
    return error(f"{doing}: {cause}")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL a user would type for ``path`` on ``fs`` (plain path when local)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def location(uri: str) -> str:
    """Where ``uri`` really is, so that two spellings of one place compare equal.

    Local paths are made absolute with ``.``, ``..`` and symlinks resolved (an existing symlinked
    prefix is resolved even when the rest does not exist yet); remote paths become
    ``protocol://bucket/key`` with duplicate and trailing slashes dropped (``s3a://`` is ``s3://``).
    No filesystem is opened for a remote path: a job may list many thousands of files.
    """
    protocol = split_protocol(uri)[0] or "file"
    try:
        cls = get_filesystem_class(protocol)
    except (ValueError, ImportError) as exc:
        raise StorageError(f"cannot open storage for {uri}: {exc}") from None
    path = cls._strip_protocol(uri)
    if protocol in ("file", "local"):
        return "file://" + os.path.realpath(path)
    canonical = cls.protocol[0] if isinstance(cls.protocol, tuple) else cls.protocol
    return f"{canonical}://" + re.sub("/+", "/", path).strip("/")


def overlapping(a: str, b: str) -> bool:
    """Whether two locations are equal or one lies inside the other (``data`` and ``data2`` do not)."""
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def join(base: str, *names: str) -> str:
    return posixpath.join(base.rstrip("/"), *names)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    with translated("read", full_uri(fs, path), passthrough=(FileNotFoundError, IsADirectoryError)):
        with fs.open(path, "rb") as fh:
            return fh.read()


@contextlib.contextmanager
def atomic_writer(
    fs: fsspec.AbstractFileSystem, path: str, durable: bool = True, before_publish: Callable[[], None] | None = None
) -> Iterator[IO[bytes]]:
    """Open ``path`` for writing so that it appears at its final name only when complete.

    Local files go to a hidden temporary name in the same folder and are renamed; object stores
    publish an object only when its upload completes, so a failed write is discarded instead
    (aborting its multipart upload). ``durable=False`` skips the local fsync; whoever commits
    must then call ``make_durable``. A storage failure, raised by this or by writes to the file,
    becomes one ``StorageError`` naming ``path``; nothing is left at a name a retry trips on.
    ``before_publish`` runs last before the file appears; raising there discards it.
    """
    with translated("write", full_uri(fs, path)):
        if is_local(fs):
            folder, name = posixpath.split(path)
            fs.makedirs(folder, exist_ok=True)
            tmp = posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
            try:
                with open(tmp, "wb") as fh:
                    yield fh
                    if durable:
                        fh.flush()
                        os.fsync(fh.fileno())
                _check_publish_allowed(path)
                if before_publish is not None:
                    before_publish()
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return
        fh = fs.open(path, "wb")
        try:
            yield fh
            _check_publish_allowed(path)
            if before_publish is not None:
                before_publish()
        except BaseException as exc:
            _discard(fh, exc)
            raise
        try:
            fh.close()
        except BaseException as exc:
            _discard(fh, exc)
            raise


def _discard(fh: Any, exc: BaseException) -> None:
    """Abort an unfinished upload, best effort: when the endpoint is unreachable the abort could
    only wait out its own timeout, so it is left to the clean-up at the start of the next run."""
    discard = getattr(fh, "discard", None)
    if discard is not None and not endpoint_unreachable(exc):
        with contextlib.suppress(Exception):
            discard()
    fh.closed = True  # never completed later, when the garbage collector would close it


#: Asked before a file is put at its final name. A worker process sets it (``job.pool``) so that a
#: worker whose parent has gone never puts a file in place: no run is left to own it.
_publish_allowed: Callable[[], bool] = lambda: True  # noqa: E731


def publish_only_while(allowed: Callable[[], bool]) -> None:
    """Make every atomic write of this process ask ``allowed()`` before putting its file in place."""
    global _publish_allowed
    _publish_allowed = allowed


def _check_publish_allowed(path: str) -> None:
    if not _publish_allowed():
        raise StorageError(f"not writing {path}: the process that started this worker has exited")


def make_durable(fs: fsspec.AbstractFileSystem, paths: Iterable[str]) -> None:
    """Flush local files (and their folders) to disk before a marker claims they are complete.

    Workers never wait for this: the scoring process flushes each part on a background thread
    once it is finished, and commit flushes every part again (cheap by then) before ``_SUCCESS``.
    """
    if not is_local(fs):
        return  # an object store's completed upload is already durable
    paths = list(paths)
    for path in paths + sorted({posixpath.dirname(p) for p in paths}):
        try:
            fd = os.open(path, os.O_RDONLY)  # a folder too: its entries (the renames) must persist
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            doing = f"cannot flush {path} to disk"
            raise storage_error(doing, exc) or StorageError(f"{doing}: {exc}") from None


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with atomic_writer(fs, path) as fh:
        fh.write(data)


def remove_if_exists(fs: fsspec.AbstractFileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError), translated("remove", full_uri(fs, path), (FileNotFoundError,)):
        fs.rm_file(path)


def abort_uploads(fs: fsspec.AbstractFileSystem, folder: str, names: Iterable[str] | None = None) -> int:
    """Abort incomplete multipart uploads of objects under ``folder`` (only of ``names``, paths
    relative to it, when given); returns how many. They hold storage, invisible, until aborted, and a run
    killed mid-upload leaves them behind. Nothing outside ``folder`` is ever touched; local
    storage has no such uploads.
    """
    if is_local(fs):
        return 0
    bucket, _, prefix = fs._strip_protocol(folder).rstrip("/").partition("/")
    prefix = prefix + "/" if prefix else ""
    wanted = {prefix + n for n in names} if names is not None else None
    aborted = 0
    markers: dict[str, str] = {}
    with translated("clean up incomplete uploads under", full_uri(fs, folder)):
        while True:
            try:
                page = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers)
            except FileNotFoundError:  # no bucket, no uploads: writing will say what is wrong
                return aborted
            for upload in page.get("Uploads", []):
                key = upload["Key"]
                if not key.startswith(prefix) or (wanted is not None and key not in wanted):
                    continue
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"])
                aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}


def probe_writable(fs: fsspec.AbstractFileSystem, folder: str, tidy: bool = True, role: str | None = None) -> None:
    """Prove ``folder`` takes writes by writing and removing a hidden probe file there.

    With ``tidy``, a folder the probe had to create is removed again, so checking leaves nothing
    behind; without, it stays (for a job about to write there, whose other shards may be writing
    there already). A file standing where a folder must be is a usage error naming it. ``role``
    says what the folder is to whom, in the message (e.g. "the state folder of output X").
    """
    target = full_uri(fs, folder) + (f" ({role})" if role else "")
    probe = join(folder, f".batchscore-probe-{uuid.uuid4().hex}")
    with translated("write to", target):
        if is_local(fs):
            blocked = folder
            while blocked and not os.path.lexists(blocked):
                blocked = posixpath.dirname(blocked)
            if blocked and not os.path.isdir(blocked):
                raise ConfigError(
                    f"cannot write to {target}: {full_uri(fs, blocked)} is a file where a folder should be"
                )
            missing = []
            parent = folder
            while parent and not os.path.isdir(parent):
                missing.append(parent)
                parent = posixpath.dirname(parent)
            try:
                os.makedirs(folder, exist_ok=True)
                with open(probe, "wb") as fh:
                    fh.write(b"probe")
                os.remove(probe)
            finally:
                for created in missing if tidy else []:  # innermost first
                    with contextlib.suppress(OSError):
                        os.rmdir(created)
        else:
            fs.pipe_file(probe, b"probe")
            fs.rm_file(probe)


def abort_uploads_after_failure(
    fs: fsspec.AbstractFileSystem, folder: str, names: Iterable[str], exc: BaseException
) -> None:
    """After a failed run, abort what its workers left uploading; best effort, and skipped when
    the endpoint is unreachable (the next run's start does it then)."""
    if is_local(fs) or endpoint_unreachable(exc):
        return
    with contextlib.suppress(Exception):
        abort_uploads(fs, folder, names)
