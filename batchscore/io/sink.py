"""The output dataset's files: parts written atomically, shard receipts, manifest, ``_SUCCESS``.

Where each lives is layout.py's to say: the output folder holds only the parts and ``_SUCCESS``,
the rest lives in the state folder beside it. Part names (``part-FFFFF-RRRRR.parquet``) put the
parts in input order (file and first row group, with more digits when an output needs them, all
alike).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import posixpath
import re
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .layout import (  # noqa: F401  (re-exported: the paths every module uses)
    PART_PATTERN,
    REJECTED_PATTERN,
    REJECTED_SUFFIX,
    SCORED_RECORD_PATTERN,
    SUCCESS_FILE,
    held_path,
    manifest_path,
    part_path,
    receipt_path,
    receipts_folder,
    rejected_folder,
    rejected_name,
    rejected_path,
    report_path,
    state_folder,
    success_path,
)
from .storage import atomic_writer, full_uri, remove_if_exists, translated

REJECT_REASON = "reject_reason"
TEMP_PATTERN = re.compile(r"^\.part-.*\.tmp-[0-9a-f]+$")
#: What else batchscore writes into an output folder: the marker, and the hidden probe of ``validate``.
PROBE_PATTERN = re.compile(r"^\.batchscore-probe-[0-9a-f]+$")
SUCCESS_TEMP_PATTERN = re.compile(r"^\." + re.escape(SUCCESS_FILE) + r"\.tmp-[0-9a-f]+$")
#: What a killed write of an incremental Iceberg commit's record leaves (see ``SCORED_RECORD_PATTERN``).
SCORED_TEMP_PATTERN = re.compile(r"^\." + SCORED_RECORD_PATTERN.pattern[1:-1] + r"\.tmp-[0-9a-f]+$")

#: Parquet settings for parts: snappy is read everywhere and cheap to write; dictionary encoding
#: only pays for repetitive (string-like) columns, not for model outputs.
COMPRESSION = "snappy"
#: Parquet key-value metadata naming the attempt that wrote a part; commit checks it against the
#: receipt, so a part replaced by another writer after its receipt is never committed.
ATTEMPT_KEY = "batchscore.attempt"


def _is_string_like(dtype: pa.DataType) -> bool:
    checks = (
        pa.types.is_string,
        pa.types.is_large_string,
        pa.types.is_binary,
        pa.types.is_large_binary,
        pa.types.is_dictionary,
    )
    return any(check(dtype) for check in checks)


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if _is_string_like(f.type)]


def _statistics_columns(schema: pa.Schema) -> list[str]:
    """Min/max statistics where readers prune with them (numbers, dates, times); string statistics
    cost a fifth of the write time and are rarely used for pruning."""
    return [f.name for f in schema if not _is_string_like(f.type) and not pa.types.is_nested(f.type)]


@contextlib.contextmanager
def part_writer(
    fs: fsspec.AbstractFileSystem,
    path: str,
    schema: pa.Schema,
    attempt: str = "",
    before_publish: Callable[[], None] | None = None,
) -> Iterator[pq.ParquetWriter]:
    """A streaming Parquet writer whose file becomes visible at ``path`` only when complete.

    Parts are flushed to disk later (``make_durable``), so the worker writing them never waits.
    The footer names the writing ``attempt``.
    """
    if attempt:
        schema = schema.with_metadata({**(schema.metadata or {}), ATTEMPT_KEY: attempt})
    with atomic_writer(fs, path, durable=False, before_publish=before_publish) as sink:
        writer = pq.ParquetWriter(
            sink,
            schema,
            compression=COMPRESSION,
            use_dictionary=_dictionary_columns(schema),
            write_statistics=_statistics_columns(schema),
        )
        try:
            yield writer
        finally:
            writer.close()


class Streamed(list):
    """A JSON array made item by item by ``make()`` each time it is read, never held as a list:
    ``write_json`` writes it as it goes, so a receipt or manifest of 100,000 parts is never
    100,000 dicts (nor one 20 MB string). Reading it (iterating, indexing) makes the items again."""

    def __init__(self, make: Callable[[], Iterator[Any]], length: int):
        super().__init__()
        self._make, self._length = make, length

    def __iter__(self) -> Iterator[Any]:
        return iter(self._make())

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: Any) -> Any:
        return list(self._make())[index]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, list) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"Streamed({self._length} items)"


#: Bytes of JSON gathered before each write.
WRITE_CHUNK = 1 << 16


def _encoder(compact: bool) -> json.JSONEncoder:
    return (
        json.JSONEncoder(sort_keys=True, separators=(",", ":"))
        if compact
        else json.JSONEncoder(indent=2, sort_keys=True)
    )


def json_bytes(data: Any, compact: bool = False) -> bytes:
    """What ``write_json`` writes, as bytes (for a conditional write, which sends them at once)."""
    return ("".join(_encoder(compact).iterencode(data)) + "\n").encode()


def write_json(fs: fsspec.AbstractFileSystem, path: str, data: Any, compact: bool = False) -> None:
    """Indented for people, or ``compact`` (one line) for files that grow with the input; written
    as it is encoded (``Streamed`` arrays item by item), never as one string."""
    encoder = _encoder(compact)
    with atomic_writer(fs, path) as fh:
        pending: list[str] = []
        size = 0
        for chunk in itertools.chain(
            encoder.iterencode(data), ["\n"]
        ):  # not one-shot: the Python encoder, which iterates
            pending.append(chunk)
            size += len(chunk)
            if size >= WRITE_CHUNK:
                fh.write("".join(pending).encode())
                pending, size = [], 0
        fh.write("".join(pending).encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with translated("read", full_uri(fs, path), passthrough=(FileNotFoundError,)), fs.open(path, "rb") as fh:
        data = fh.read()
    return json.loads(data)


def listing(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """Names directly inside ``folder``; empty when it does not exist.

    Listings are never served from cache: other processes (workers, other shards) write here.
    """
    fs.invalidate_cache(folder)
    try:
        with translated("list", full_uri(fs, folder), passthrough=(FileNotFoundError,)):
            return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False))
    except FileNotFoundError:
        return []


def sizes(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, int]:
    """Bytes of each file directly inside ``folder``, by name, from one listing."""
    fs.invalidate_cache(folder)
    with translated("list", full_uri(fs, folder)):
        found = fs.ls(folder, detail=True)
    return {posixpath.basename(f["name"].rstrip("/")): int(f.get("size") or 0) for f in found}


def owned_name(relative: str) -> bool:
    """Whether batchscore writes files under this name (relative to an output folder): its parts,
    their temporary files, ``_SUCCESS``, the probe, and in a table's data folder an incremental
    Iceberg commit's record; all at the top level, none in subfolders."""
    return relative == SUCCESS_FILE or any(
        p.match(relative)
        for p in (
            PART_PATTERN,
            TEMP_PATTERN,
            PROBE_PATTERN,
            SUCCESS_TEMP_PATTERN,
            SCORED_RECORD_PATTERN,
            SCORED_TEMP_PATTERN,
        )
    )


def iter_own_files(fs: fsspec.AbstractFileSystem, output: str) -> Iterator[tuple[str, str]]:
    """(kind, path) of every data or temp file this tool may have left in ``output`` and in its
    rejected rows' folder."""
    for name in listing(fs, output):
        # Parts, and what killed attempts or probes left; never a record a table's snapshot may point to.
        if owned_name(name) and name != SUCCESS_FILE and not SCORED_RECORD_PATTERN.match(name):
            yield "part", part_path(output, name)
    folder = rejected_folder(output)
    for name in listing(fs, folder):
        if REJECTED_PATTERN.match(name) or TEMP_PATTERN.match(name):
            yield "rejected", posixpath.join(folder, name)


def uncommit(fs: fsspec.AbstractFileSystem, output: str) -> None:
    """Make an existing output stop looking finished before anything in it changes."""
    remove_if_exists(fs, success_path(output))
    remove_if_exists(fs, manifest_path(output))
    remove_if_exists(fs, report_path(output))
    remove_if_exists(fs, held_path(output))
