"""fsspec helpers shared by every module that touches files: one place knows local vs remote."""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from typing import IO, Any, Iterable, Iterator, Mapping

import fsspec
from fsspec.core import url_to_fs

from .errors import StorageError
from .pool import publish_allowed


def filesystem(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve ``uri`` to its filesystem and the path inside it.

    Storage options only reach remote filesystems: a local path must keep working when a job
    configured for S3 also reads a local model.
    """
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    options = dict(storage_options or {}) if protocol not in ("file", "local") else {}
    try:
        return url_to_fs(uri, **options)
    except (ValueError, ImportError) as exc:
        raise StorageError(f"cannot open storage for {uri}: {exc}") from None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL a user would type for ``path`` on ``fs`` (plain path when local)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(base: str, *names: str) -> str:
    return posixpath.join(base.rstrip("/"), *names)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    with fs.open(path, "rb") as fh:
        return fh.read()


@contextlib.contextmanager
def atomic_writer(fs: fsspec.AbstractFileSystem, path: str, durable: bool = True) -> Iterator[IO[bytes]]:
    """Open ``path`` for writing so that it appears at its final name only when complete.

    Local files go to a hidden temporary name in the same folder and are renamed; object stores
    publish an object only when its upload completes, so a failed write is discarded instead.
    ``durable=False`` skips the local fsync; whoever commits must then call ``make_durable``.
    """
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
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fh = fs.open(path, "wb")
    try:
        yield fh
        _check_publish_allowed(path)
    except BaseException:
        discard = getattr(fh, "discard", None)
        if discard is not None:
            discard()
        raise
    fh.close()


def _check_publish_allowed(path: str) -> None:
    """A worker whose parent has gone never puts a file in place: no run is left to own it."""
    if not publish_allowed():
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
            raise StorageError(f"cannot flush {path} to disk: {exc}") from None


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with atomic_writer(fs, path) as fh:
        fh.write(data)


def remove_if_exists(fs: fsspec.AbstractFileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)
