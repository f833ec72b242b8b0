"""The record of an incremental table: which input files its rows come from, how each was scored,
and which parts hold its rows.

Both table formats keep it with the data, written in the same commit (Delta in the commit's info,
Iceberg in a content-addressed file the snapshot's summary points to: tables.py, iceberg.py); this
module is what they share: the record's shape, its compact encoding, and how a commit updates it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Scored:
    """What the table holds of one input file: its identity when scored, the scoring key (model,
    scaler, scoring settings, batchscore version), and its parts: data folder and file number."""

    identity: Mapping[str, Any]
    key: str
    folder: str
    number: int


@dataclass(frozen=True)
class Incremental:
    """What an incremental commit records: each input file it scored (URI: identity, file number
    in the plan), the scoring key, and whether it replaces every row of the table."""

    scored: Mapping[str, tuple[Mapping[str, Any], int]]
    key: str
    full_refresh: bool = False


def record_bytes(files: Mapping[str, Scored]) -> bytes:
    """The record, compacted: keys and folders stored once, then one short list per file; zlib JSON."""
    import zlib

    keys = sorted({s.key for s in files.values()})
    index = {k: i for i, k in enumerate(keys)}
    folders = sorted({s.folder for s in files.values()})
    where = {f: i for i, f in enumerate(folders)}
    data = {
        "format": 1,
        "keys": keys,
        "folders": folders,
        "files": {u: [dict(s.identity), index[s.key], where[s.folder], s.number] for u, s in sorted(files.items())},
    }
    raw = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return zlib.compress(raw, 6)


def record_from_bytes(data: bytes) -> dict[str, Scored]:
    import zlib

    found = json.loads(zlib.decompress(data))
    keys, folders = found["keys"], found["folders"]
    return {u: Scored(i, keys[k], folders[f], int(n)) for u, (i, k, f, n) in found["files"].items()}


def encode_record(files: Mapping[str, Scored]) -> str:
    """The record as text (base64), for a commit info."""
    import base64

    return base64.b64encode(record_bytes(files)).decode()


def decode_record(text: str) -> dict[str, Scored]:
    import base64

    return record_from_bytes(base64.b64decode(text))


def part_number(name: str) -> int:
    """The input file number of a part named ``part-FILE-ROWGROUP[-SLICE].parquet`` (layout.py)."""
    return int(name.rsplit("/", 1)[-1].split("-")[1])


def next_record(
    record: Mapping[str, Scored], incremental: Incremental, relative: str
) -> tuple[dict[str, Scored], set[tuple[str, int]]]:
    """The record after a commit of data folder ``relative`` that scores ``incremental.scored``
    (from nothing, for a full refresh), and the (data folder, file number) of every part holding
    rows of a file it scores again: the parts the same commit removes."""
    updated = {} if incremental.full_refresh else dict(record)
    stale = {(updated[uri].folder, updated[uri].number) for uri in incremental.scored if uri in updated}
    for uri, (identity, number) in incremental.scored.items():
        updated[uri] = Scored(identity, incremental.key, relative, number)
    return updated, stale
