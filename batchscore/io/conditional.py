"""Conditional writes, the primitives the output lease is built on.

A lease is only as good as the atomicity of its writes: create-if-absent and replace-if-unchanged.
Locally these are a hard link into place and a check-and-rename under ``flock``; on S3 they are
PUTs with ``If-None-Match: *`` and ``If-Match: <ETag>``.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from typing import Any

import fsspec

from ..errors import StorageError
from .storage import S3_PROTOCOLS, full_uri, is_local, write_bytes_atomic


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (create) or changed since it was read (replace)."""


def _content_tag(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool(set(S3_PROTOCOLS) & set(protocols))


def _require_conditional(fs: fsspec.AbstractFileSystem, path: str) -> None:
    if not is_local(fs) and not _is_s3(fs):
        raise StorageError(f"cannot write {full_uri(fs, path)} exclusively: only local and S3 outputs support it")


def _s3_call(fs: Any, method: str, **kwargs: Any) -> Any:
    """One S3 request through s3fs's client, reading the body of a GET; botocore validates the
    parameters, so a client too old for conditional writes fails instead of writing blindly."""
    from fsspec.asyn import sync

    async def call() -> Any:
        await fs.set_session()
        client = await fs.get_s3(kwargs.get("Bucket"))
        response = await getattr(client, method)(**kwargs)
        if "Body" in response and method == "get_object":
            async with response["Body"] as body:
                response["Body"] = await body.read()
        return response

    return sync(fs.loop, call)


def _s3_error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _s3_put(fs: Any, path: str, data: bytes, **condition: str) -> str:
    bucket, key, _ = fs.split_path(path)
    extra = dict(getattr(fs, "s3_additional_kwargs", None) or {})
    try:
        response = _s3_call(fs, "put_object", Bucket=bucket, Key=key, Body=data, **extra, **condition)
    except Exception as exc:
        lost = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
        if _s3_error_code(exc) in lost + (("NoSuchKey", "404") if "IfMatch" in condition else ()):
            raise PreconditionFailed(full_uri(fs, path)) from None
        raise OSError(f"{full_uri(fs, path)}: {exc}") from None
    fs.invalidate_cache(path)
    return str(response["ETag"])


def read_tagged(fs: fsspec.AbstractFileSystem, path: str) -> tuple[bytes, str] | None:
    """The content of ``path`` and a tag that changes with every write to it; None when absent."""
    _require_conditional(fs, path)
    if is_local(fs):
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        return data, _content_tag(data)
    bucket, key, _ = fs.split_path(path)
    try:
        response = _s3_call(fs, "get_object", Bucket=bucket, Key=key)
    except Exception as exc:
        if _s3_error_code(exc) in ("NoSuchKey", "404"):
            return None
        raise OSError(f"{full_uri(fs, path)}: {exc}") from None
    return response["Body"], str(response["ETag"])


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> str:
    """Write ``path`` only if nothing is there (atomically, whole content at once); return its tag.

    Locally the complete file is linked into place, which fails if the name exists; on S3 a PUT
    with ``If-None-Match: *``.
    """
    _require_conditional(fs, path)
    if not is_local(fs):
        return _s3_put(fs, path, data, IfNoneMatch="*")
    folder, name = posixpath.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
    except FileExistsError:
        raise PreconditionFailed(path) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return _content_tag(data)


def replace_if(fs: fsspec.AbstractFileSystem, path: str, data: bytes, tag: str) -> str:
    """Replace ``path`` with ``data`` only if it still carries ``tag``; return the new tag.

    On S3 a PUT with ``If-Match: <ETag>``. Locally the check and the rename happen under an
    exclusive ``flock`` of the file being replaced; a writer that locked a file already renamed
    away sees the path now names another inode and starts over.
    """
    _require_conditional(fs, path)
    if not is_local(fs):
        return _s3_put(fs, path, data, IfMatch=tag)
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise PreconditionFailed(path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    continue  # replaced while we waited for the lock: look again
            except FileNotFoundError:
                raise PreconditionFailed(path) from None
            with os.fdopen(os.dup(fd), "rb") as fh:
                if _content_tag(fh.read()) != tag:
                    raise PreconditionFailed(path)
            write_bytes_atomic(fs, path, data)
            return _content_tag(data)
        finally:
            os.close(fd)
