"""Find the input files, read their footers, and stream their rows in row-group batches."""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import stat
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import StorageSettings
from ..errors import InputDataError
from .listing import GLOB_CHARS, list_inputs  # noqa: F401  (where the input's files are found)
from .storage import is_local, resolve, storage_error

FOOTER_THREADS = 16
#: Files a footer thread may have read ahead of the one being taken: what is in flight stays this
#: many per thread, however many files there are (not one pending read, and result, per file).
READ_AHEAD = 4
REMOTE_BLOCK_SIZE = 8 * 1024 * 1024
#: Bytes buffered per column while rows are streamed (``pre_buffer`` off): what a read holds is
#: then about this much per column plus one batch, whatever the row groups' size (pre-buffering
#: holds every column chunk of the row groups read: all of a 3M-row group at once). Measured with
#: bench/big_row_group.py. Remote reads are exact ranges of this size, so they get larger ones.
STREAM_BUFFER = 128 * 1024
REMOTE_STREAM_BUFFER = 1024 * 1024


@dataclass(frozen=True)
class InputFile:
    """One Parquet file and what its footer says, without any of its data."""

    uri: str
    size: int
    row_groups: tuple[int, ...]  # rows in each row group
    schema: pa.Schema
    #: What tells this version of the file from a rewritten one (size, mtime, inode; or ETag, version id).
    identity: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return sum(self.row_groups)


#: Identity fields compared to decide that a file is the one planned. A local file's device number
#: is recorded but not compared: a shared mount may get another one on each machine running a shard.
COMPARED_IDENTITY = ("size", "mtime_ns", "inode", "etag", "version_id")


def _local_identity(stat: os.stat_result) -> dict[str, Any]:
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino, "device": stat.st_dev}


def _remote_identity(opened: Any) -> dict[str, Any]:
    """Size, ETag and (on a versioned bucket) version id of an object as it was opened."""
    details = getattr(opened, "details", None) or {}
    identity = {
        "size": int(opened.size),
        "etag": details.get("ETag", details.get("etag")),
        "version_id": details.get("VersionId"),
    }
    return {key: value for key, value in identity.items() if value is not None}


def check_identity(
    uri: str, expected: Mapping[str, Any] | None, actual: Mapping[str, Any], since: str = "the plan was made"
) -> None:
    """Refuse a file that is no longer the one the plan was made from (rewritten, replaced).

    Only what both sides know is compared: an object's version id, for one, is in a HEAD
    response but not in a listing.
    """
    if not expected:
        return
    changed = [
        f"{key} {expected[key]} -> {actual[key]}"
        for key in COMPARED_IDENTITY
        if key in expected and key in actual and expected[key] != actual[key]
    ]
    if changed:
        raise InputDataError(f"input file {uri} changed since {since} ({', '.join(changed)}); plan again")


class _FailFast:
    """A remote file whose reads, once one has failed, fail at once with the same error.

    pyarrow serializes reads of a Python file but may queue several (one per column chunk); each
    would wait out the storage timeout again, one after another, on an endpoint that has stalled.
    """

    def __init__(self, fh: Any):
        self._fh = fh
        self._error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        if self._error is not None:
            raise self._error
        try:
            return self._fh.read(size)
        except Exception as exc:
            self._error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


@contextlib.contextmanager
def open_parquet(
    uri: str,
    storage: StorageSettings | None = None,
    expected: Mapping[str, Any] | None = None,
    streaming: bool = False,
) -> Iterator[tuple[pq.ParquetFile, dict[str, Any]]]:
    """Open a Parquet file (natively when local, through fsspec when remote) with its identity.

    A missing file or one that is not Parquet is bad input; storage that cannot be reached or read
    (timeout, refused connection, permission) is a storage failure. Both name the file. With
    ``expected``, a file that is not the planned one is bad input too, both when opened and
    (locally) once it has been read. ``streaming`` opens it to read rows in bounded memory
    (``STREAM_BUFFER`` per column, no pre-buffering; remote reads are then exact ranges, not
    read-ahead blocks that columns read in turn would each discard).
    """
    where = resolve(uri, storage)
    fs, path = where.fs, where.path
    with contextlib.ExitStack() as stack:
        try:
            if is_local(fs):
                status = os.stat(path)
                if not stat.S_ISREG(status.st_mode):  # a FIFO put in its place would block the open forever
                    raise InputDataError(f"input {uri} is not a regular file (any more); plan again")
                identity = _local_identity(status)
                source: Any = path
            else:
                fs.invalidate_cache(path)  # another process may have replaced it since we last looked
                source = _FailFast(
                    stack.enter_context(
                        fs.open(
                            path, "rb", block_size=REMOTE_BLOCK_SIZE, cache_type="none" if streaming else "readahead"
                        )
                    )
                )
                identity = _remote_identity(source)
            check_identity(uri, expected, identity)
            buffer = STREAM_BUFFER if is_local(fs) else REMOTE_STREAM_BUFFER
            bounded = {"pre_buffer": False, "buffer_size": buffer} if streaming else {}
            pf = stack.enter_context(pq.ParquetFile(source, **bounded))
        except FileNotFoundError:
            raise InputDataError(f"input file not found: {uri}") from None
        except InputDataError:
            raise
        except Exception as exc:
            raise _read_error(uri, exc) from None
        yield pf, identity
        if is_local(fs):  # s3fs reads with If-Match on the ETag it opened; a local file has no such pin
            try:
                after = _local_identity(os.stat(path))
            except FileNotFoundError:
                raise InputDataError(f"input file {uri} was removed while being read") from None
            check_identity(uri, identity, after, since="it was opened")


def _read_error(uri: str, exc: Exception, where: str = "") -> Exception:
    """Bad Parquet is the input's fault (exit 3); anything storage says is storage's (exit 1)."""
    if type(exc).__name__ == "FileExpired":  # s3fs: the object's ETag changed under an open file
        return InputDataError(f"input file {uri} changed since it was opened{where}; plan again")
    if isinstance(exc, pa.ArrowException) or (type(exc) is OSError and exc.errno is None):  # pyarrow's complaint
        return InputDataError(f"cannot read Parquet file {uri}{where}: {exc}")
    return storage_error(f"cannot read {uri}{where}", exc) or exc


def columns_with_nulls(meta: pq.FileMetaData, columns: Sequence[str]) -> frozenset[str]:
    """Which of ``columns`` hold a null anywhere in the file, by the footer's statistics (a column
    chunk without a null count is taken to hold none: its batches still tell their own nulls)."""
    index = {meta.schema.column(j).path: j for j in range(meta.num_columns)}
    found = set()
    for name in columns:
        j = index.get(name)
        for i in range(meta.num_row_groups if j is not None else 0):
            stats = meta.row_group(i).column(j).statistics
            if stats is not None and stats.has_null_count and stats.null_count > 0:
                found.add(name)
                break
    return frozenset(found)


#: One object per distinct schema: 100,000 files of one schema then hold one schema, not 100,000.
_SCHEMAS: dict[bytes, pa.Schema] = {}


def _shared(schema: pa.Schema) -> pa.Schema:
    key = schema.serialize().to_pybytes()
    if len(_SCHEMAS) > 256:
        _SCHEMAS.clear()
    return _SCHEMAS.setdefault(key, schema)


def read_footer(uri: str, storage: StorageSettings | None = None) -> InputFile:
    """Row groups, schema and identity from the footer alone."""
    with open_parquet(uri, storage) as (pf, identity):
        meta = pf.metadata
        row_groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        schema = _shared(pf.schema_arrow)
    return InputFile(uri=uri, size=identity["size"], row_groups=row_groups, schema=schema, identity=identity)


_T = TypeVar("_T")
_R = TypeVar("_R")


def in_order(fn: Callable[[_T], _R], items: Iterable[_T], threads: int = FOOTER_THREADS) -> Iterator[_R]:
    """``fn`` of each item, in the items' order, computed by ``threads`` threads at most
    ``READ_AHEAD`` items ahead of the one taken: memory stays bounded by the threads, not the
    items (``Executor.map`` makes every item's future at once, and keeps every result until taken).
    The first error raises, in order; once the caller stops, no further item is started."""
    items = iter(items)
    first = list(itertools.islice(items, 2))
    if len(first) < 2 or threads <= 1:
        yield from (fn(item) for item in itertools.chain(first, items))
        return
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        pending: collections.deque[Future[_R]] = collections.deque(pool.submit(fn, item) for item in first)
        for item in itertools.islice(items, threads * READ_AHEAD - len(first)):
            pending.append(pool.submit(fn, item))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(items, 1):
                pending.append(pool.submit(fn, item))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iter_footers(uris: Iterable[str], storage: StorageSettings | None = None) -> Iterator[InputFile]:
    """Footers of many files, in order, fetched concurrently (object stores are latency-bound)."""
    return in_order(lambda uri: read_footer(uri, storage), uris)


#: Identity fields a file table keeps as integers (a local file's), then as strings (an object's).
_IDENTITY_INTS = (("mtime_ns", "q"), ("inode", "Q"), ("device", "Q"))
_IDENTITY_STRS = ("etag", "version_id")


class InputFiles(Sequence[InputFile]):
    """Many files' footers as columns, one compact record each: 100,000 files cost a few
    megabytes (their URIs mostly), not an object and an identity dict each. Indexing makes the
    ``InputFile`` of one file on demand; ``record`` gives the plan's fields without making it."""

    IDENTITY_FIELDS = tuple(name for name, _ in _IDENTITY_INTS) + _IDENTITY_STRS

    __slots__ = ("uris", "_sizes", "_ends", "_rows", "_ints", "_strs", "_has", "_schemas", "_schema_ids", "_schema_of")

    def __init__(self, files: Iterable[InputFile] = ()):
        self.uris: list[str] = []
        self._sizes = array("q")
        self._ends = array("q")  # where each file's row groups end in _rows
        self._rows = array("q")  # rows in each row group, file after file
        self._ints = {name: array(code) for name, code in _IDENTITY_INTS}
        self._strs: dict[str, list[str | None]] = {name: [] for name in _IDENTITY_STRS}
        self._has = array("B")  # which identity fields each file has, one bit each
        self._schemas: list[pa.Schema | None] = []
        self._schema_ids: dict[int, int] = {}
        self._schema_of = array("I")
        for f in files:
            self.append(f)

    def append(self, file: InputFile) -> None:
        self.add(file.uri, file.size, file.row_groups, file.identity, file.schema)

    def add(
        self,
        uri: str,
        size: int,
        row_groups: Iterable[int],
        identity: Mapping[str, Any],
        schema: pa.Schema | None = None,
    ) -> None:
        """One file's record (``identity``: its ``IDENTITY_FIELDS``, any of them missing or None)."""
        has = 0
        for bit, (name, _) in enumerate(_IDENTITY_INTS):
            value = identity.get(name)
            self._ints[name].append(0 if value is None else value)
            has |= (value is not None) << bit
        for bit, name in enumerate(_IDENTITY_STRS, len(_IDENTITY_INTS)):
            value = identity.get(name)
            self._strs[name].append(value)
            has |= (value is not None) << bit
        self._rows.extend(row_groups)
        self.uris.append(uri)
        self._sizes.append(size)
        self._ends.append(len(self._rows))
        self._has.append(has)
        key = id(schema)
        if key not in self._schema_ids:
            self._schema_ids[key] = len(self._schemas)
            self._schemas.append(schema)
        self._schema_of.append(self._schema_ids[key])

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        uri, size, row_groups, identity = self.record(index)
        return InputFile(
            uri,
            size,
            row_groups,
            self._schemas[self._schema_of[index]],
            {"size": size, **{k: v for k, v in identity.items() if v is not None}},
        )

    def row_groups(self, index: int) -> tuple[int, ...]:
        start = self._ends[index - 1] if index > 0 else 0
        return tuple(self._rows[start : self._ends[index]])

    def num_rows(self, index: int) -> int:
        start = self._ends[index - 1] if index > 0 else 0
        return sum(self._rows[start : self._ends[index]])

    def size(self, index: int) -> int:
        return self._sizes[index]

    def identity(self, index: int) -> dict[str, Any]:
        """Every ``IDENTITY_FIELDS`` of a file, None where it has none."""
        if index < 0:
            index += len(self)
        has = self._has[index]
        found: dict[str, Any] = {}
        for bit, (name, _) in enumerate(_IDENTITY_INTS):
            found[name] = self._ints[name][index] if has >> bit & 1 else None
        for name in _IDENTITY_STRS:
            found[name] = self._strs[name][index]
        return found

    def record(self, index: int) -> tuple[str, int, tuple[int, ...], dict[str, Any]]:
        """A file's uri, size, row groups and identity (every field, None where missing)."""
        if index < 0:
            index += len(self)
        return self.uris[index], self._sizes[index], self.row_groups(index), self.identity(index)

    @property
    def total_rows(self) -> int:
        return sum(self._rows)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, InputFiles)
            and len(self) == len(other)
            and all(self.record(i) == other.record(i) for i in range(len(self)))
        )

    __hash__ = None  # type: ignore[assignment]


def read_footers(uris: Iterable[str], storage: StorageSettings | None = None) -> InputFiles:
    """Footers of many files, read concurrently and kept as one compact table."""
    return InputFiles(iter_footers(uris, storage))


#: Rows of the first batch of a file whose footer cannot tell its rows' width (dictionary-encoded
#: text: a short dictionary may stand for long strings): the width is measured on them first.
PROBE_ROWS = 256


def footer_width(meta: pq.FileMetaData, row_groups: Sequence[int], columns: Sequence[str]) -> tuple[float, float]:
    """Bytes a row of ``columns`` takes once decoded, as the footer tells it (the widest of the
    row groups), and the most it can take where the footer cannot tell: a dictionary-encoded text
    value may stand for a long string, but never for one longer than its whole column chunk."""
    wanted, width, ceiling = set(columns), 0.0, 0.0
    for g in row_groups:
        group = meta.row_group(g)
        if not group.num_rows:
            continue
        total, unsure = 0, 0
        for c in range(group.num_columns):
            chunk = group.column(c)
            if chunk.path_in_schema.split(".")[0] not in wanted:
                continue
            total += chunk.total_uncompressed_size
            if chunk.physical_type == "BYTE_ARRAY" and chunk.has_dictionary_page:
                unsure += chunk.total_uncompressed_size
        width = max(width, total / group.num_rows)
        ceiling = max(ceiling, total / group.num_rows + unsure)
    return width, ceiling


def iter_batches(
    uri: str,
    row_groups: Sequence[int],
    columns: Sequence[str],
    batch_size: int,
    storage: StorageSettings | None = None,
    use_threads: bool = True,
    expected: Mapping[str, Any] | None = None,
    on_footer: Callable[[pq.FileMetaData], None] | None = None,
    start: int = 0,
    rows: int | None = None,
    max_bytes: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """Stream only ``columns`` of the given row groups, ``batch_size`` rows at a time, in memory
    bounded by ``batch_size`` and ``STREAM_BUFFER``, not by the row groups' size.

    With ``max_bytes``, a batch also holds no more than that many bytes of decoded columns: its
    rows are cut to the width the footer gives (or, for dictionary-encoded text that may be wider
    than the bound allows, that the first ``PROBE_ROWS`` rows measure); a batch found wider than that is handed on in slices within the
    bound and the reader goes on in smaller batches from the next row (each time at most half as
    many rows). ``start`` and ``rows`` keep only that range of rows (a slice of a row group larger
    than a part; the rows before it are decoded and dropped). With ``expected`` (the identity the
    plan recorded) a file rewritten since is refused; ``on_footer`` is shown the file's footer before
    the first batch.
    """
    if not row_groups:
        return
    stop = start + rows if rows is not None else None
    with open_parquet(uri, storage, expected, streaming=True) as (pf, _):
        if on_footer is not None:
            on_footer(pf.metadata)
        step = batch_size
        if max_bytes is not None:
            width, ceiling = footer_width(pf.metadata, row_groups, columns)
            if width:
                step = max(1, min(step, int(max_bytes // width)))
            if step * ceiling > max_bytes:  # rows may be wider than the footer tells: measure the first
                step = min(step, PROBE_ROWS)
        sizes = [pf.metadata.row_group(g).num_rows for g in row_groups]
        done = start  # the first row (of the row groups' rows) not handed on yet
        try:
            while True:
                # Start at the row group holding row ``done``: a smaller batch size reads on from there.
                skip, position = 0, 0
                while skip < len(sizes) - 1 and position + sizes[skip] <= done:
                    position, skip = position + sizes[skip], skip + 1
                narrower = None
                for batch in pf.iter_batches(
                    batch_size=step, row_groups=list(row_groups[skip:]), columns=list(columns), use_threads=use_threads
                ):
                    first, position = position, position + batch.num_rows
                    if position <= done:
                        continue
                    low = max(done - first, 0)
                    high = batch.num_rows if stop is None else min(stop - first, batch.num_rows)
                    piece = batch if (low, high) == (0, batch.num_rows) else batch.slice(low, high - low)
                    done = first + high
                    if max_bytes is None:
                        yield piece
                    else:
                        pieces = list(_within(piece, max_bytes))
                        yield from pieces
                        fits = min(_rows_within(p, max_bytes) for p in pieces)
                        if step > 1 and fits < step:
                            narrower = max(1, min(fits, step // 2))  # wider rows than the batch size allows
                        elif step < batch_size and fits >= 2 * step and step <= PROBE_ROWS:
                            narrower = min(batch_size, fits)  # the probe measured the rows: read on at full size
                    if stop is not None and done >= stop:
                        return
                    if narrower is not None:
                        break
                if narrower is None:
                    return
                step = narrower
        except Exception as exc:
            raise _read_error(uri, exc, f" (row groups {row_groups[0]}-{row_groups[-1]})") from None


def _within(batch: pa.RecordBatch, max_bytes: int) -> Iterator[pa.RecordBatch]:
    """``batch`` in consecutive slices of at most ``max_bytes`` each (or of one row), in order:
    cut at its average width, and any slice still over the bound (wider rows) cut again."""
    if batch.num_rows <= 1 or batch.nbytes <= max_bytes:
        yield batch
        return
    step = min(_rows_within(batch, max_bytes), (batch.num_rows + 1) // 2)
    for start in range(0, batch.num_rows, step):
        yield from _within(batch.slice(start, step), max_bytes)


def _rows_within(batch: pa.RecordBatch, max_bytes: int) -> int:
    """How many of ``batch``'s rows fit in ``max_bytes`` at its average width (at least one)."""
    if not batch.num_rows:
        return 1
    return max(1, int(max_bytes // max(1.0, batch.nbytes / batch.num_rows)))
