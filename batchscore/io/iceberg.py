"""Iceberg outputs: commit a plan's Parquet parts, already written, to an Apache Iceberg table in one
catalog commit, through pyiceberg.

The table lives at the output's location (its data folders as for Delta, see layout.py; its
metadata under ``metadata/``); the catalog is the one named by ``iceberg_catalog``, configured as
pyiceberg reads it, or for a local output with none named an embedded SQL catalog on a SQLite file
in the table's state folder. One ``Transaction`` adds the parts (``add_files``) and, for
``replace``, deletes the table's rows first; the catalog swaps the table's metadata once for both,
so readers see the previous snapshot or the new one. A partitioned table is partitioned by the
identity of the partition column, whose value is in the manifests, not the parts (as Delta keeps it
in its log); its commits are one snapshot, removing the partition's files for ``replace``. An
incremental commit's snapshot points to the record of what the table holds (io/scored.py), in a
file written before the commit. The snapshot's summary carries the manifest's
facts and the plan's application id: a rerun of a committed plan finds it and commits nothing
twice, and of two writers committing at once the catalog's check of the metadata they started
from refuses the second.

``pyiceberg`` is imported here only, when an Iceberg output is used (``batchscore[iceberg]``).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from ..errors import ConfigError, InputDataError, StorageError, param
from .layout import (
    iceberg_catalog_path,
    part_path,
    scored_record_name,
    split_partition,
    table_app_id,
    table_relative,
)
from .scored import Incremental, Scored, next_record, part_number, record_bytes, record_from_bytes
from .storage import Location, write_bytes_atomic
from .tables import table_schema

#: The snapshot summary keys a commit writes: the plan's application id, and the manifest's facts.
APP_ID_KEY = "batchscore.app_id"
FACTS_KEY = "batchscore"
#: An incremental commit's pointer, in its snapshot's summary, to the record it wrote before the
#: commit (io/scored.py): the record file's path relative to the table, and its sha256. Only the
#: pointer is in the summary (the table's metadata keeps every snapshot's summary).
SCORED_KEY = "batchscore.scored"
SCORED_SHA256_KEY = "batchscore.scored_sha256"
#: The table property incremental commits set: a table that has it but no snapshot pointing to a
#: record any more is refused, rather than its files scored twice.
INCREMENTAL_PROPERTY = "batchscore.incremental"
#: How far back ``scored_record`` looks for the last incremental commit among other writers' snapshots.
RECORD_LOOKBACK = 100


def _catalog(where: Location, catalog: str | None) -> Any:
    try:
        from pyiceberg.catalog import load_catalog
    except ImportError:
        raise ConfigError(
            f"{param('output_format')} iceberg needs the pyiceberg package: pip install 'batchscore[iceberg]'"
        ) from None
    if catalog:
        try:
            return load_catalog(catalog)
        except Exception as exc:  # pyiceberg raises ValueError and others for a catalog it cannot find
            raise ConfigError(f"{param('iceberg_catalog')} {catalog}: {exc}") from None
    if "://" in where.uri and not where.uri.startswith("file://"):
        raise ConfigError(
            f"output {where.uri}: an Iceberg table on remote storage needs a catalog; name one with "
            f"{param('iceberg_catalog')} (the embedded SQLite catalog is for local outputs)"
        )
    from pyiceberg.catalog.sql import SqlCatalog

    path = iceberg_catalog_path(where.path)
    os.makedirs(posixpath.dirname(path), exist_ok=True)
    return SqlCatalog("batchscore", uri=f"sqlite:///{path}", warehouse=f"file://{posixpath.dirname(where.path)}")


def identifier(where: Location, table: str | None) -> str:
    """The table's identifier: the one given, else ``batchscore.<output name>``."""
    name = posixpath.basename(where.path.rstrip("/"))
    return table or "batchscore." + "".join(c if c.isalnum() else "_" for c in name)


def _open(where: Location, catalog: str | None, table: str | None) -> tuple[Any, Any | None]:
    """(catalog, the table or None when there is none yet)."""
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    found = _catalog(where, catalog)
    try:
        return found, found.load_table(identifier(where, table))
    except (NoSuchTableError, NoSuchNamespaceError):
        return found, None
    except OSError as exc:
        raise StorageError(f"cannot read Iceberg table {identifier(where, table)}: {exc}") from None


def _holds(
    table: Any,
    relative: str,
    mode: str,
    where: Location,
    incremental: str | None = None,
    partition: str | None = None,
) -> bool:
    """Whether the table's current snapshot holds the rows of the plan writing data folder
    ``relative``: a snapshot in its history names the plan's application id and, for ``replace``,
    every current data file (of the partition) is still that folder's; for an incremental job (``incremental``: its
    scoring key), the record names that folder, with that key, for some input file."""
    from pyiceberg.table.snapshots import ancestors_of

    current = table.current_snapshot()
    if current is None:
        return False
    if incremental is not None:
        try:
            record = _record_of(table, where)
        except ConfigError:  # no record to say so (a full refresh rescores it; anything else is refused)
            return False
        return any(s.folder == relative and s.key == incremental for s in record.values())
    app_id = table_app_id(relative)
    if not any(
        s.summary is not None and s.summary.get(APP_ID_KEY) == app_id for s in ancestors_of(current, table.metadata)
    ):
        return False
    if mode != "replace":
        return True
    if partition:
        files = [f.file_path for f in _partition_files(table, partition)]
    else:
        files = table.inspect.files().column("file_path").to_pylist()
    return bool(files) and all(f"/{relative}/" in f for f in files)


def _partition_files(table: Any, partition: str) -> list[Any]:
    """The current snapshot's data files of partition ``COLUMN=VALUE`` (the table is partitioned by
    COLUMN's identity alone: see ``_check_fits``), from its manifests."""
    if table.current_snapshot() is None:
        return []
    _, value = split_partition(partition)
    return [task.file for task in table.scan().plan_files() if task.file.partition[0] == value]


def committed_snapshot(
    where: Location,
    data_folder: str,
    mode: str,
    catalog: str | None,
    table: str | None,
    incremental: str | None = None,
    partition: str | None = None,
) -> int | None:
    """The current snapshot's id if the table holds the plan writing ``data_folder``, else None."""
    _, found = _open(where, catalog, table)
    relative = table_relative(where.path, data_folder)
    if found is None or not _holds(found, relative, mode, where, incremental, partition):
        return None
    return int(found.current_snapshot().snapshot_id)


def committed_parts(where: Location, data_folder: str, catalog: str | None, table: str | None) -> dict[str, int]:
    """Rows of each part of ``data_folder`` that the table's current snapshot lists, by name."""
    _, found = _open(where, catalog, table)
    if found is None or found.current_snapshot() is None:
        return {}
    files = found.inspect.files()
    root = "/" + table_relative(where.path, data_folder) + "/"
    return {
        path[path.index(root) + len(root) :]: int(rows)
        for path, rows in zip(files.column("file_path").to_pylist(), files.column("record_count").to_pylist())
        if root in path
    }


def check_table(
    where: Location, schema: pa.Schema, catalog: str | None, table: str | None, partition: str | None = None
) -> None:
    """Before anything is scored: the partition column is not an output column, and an Iceberg
    table already there has this job's columns and partitioning."""
    full = table_schema(schema, partition)
    _, found = _open(where, catalog, table)
    if found is not None:
        _check_fits(found, full, partition)


def _check_fits(table: Any, schema: pa.Schema, partition: str | None) -> None:
    """The table must be partitioned by the identity of the job's partition column (or by nothing
    without one), and have the job's columns (``schema``: with the partition column)."""
    from pyiceberg.transforms import IdentityTransform

    spec = table.spec().fields
    columns = [table.schema().find_column_name(f.source_id) for f in spec]
    wanted = [split_partition(partition)[0]] if partition else []
    if columns != wanted or any(not isinstance(f.transform, IdentityTransform) for f in spec):
        raise ConfigError(
            f"Iceberg table {'.'.join(table.name())} is partitioned by "
            f"{', '.join(f'{f.transform}({c})' for f, c in zip(spec, columns)) or 'nothing'}, not "
            f"{wanted or 'nothing'}: give {param('partition')} "
            + ("COLUMN=VALUE with its column" if columns else "only for a partitioned table")
        )
    theirs = [f.name for f in table.schema().fields]
    if sorted(theirs) != sorted(schema.names):
        differ = sorted(
            [f"missing {n}" for n in theirs if n not in schema.names]
            + [f"extra {n}" for n in schema.names if n not in theirs]
        )
        raise InputDataError(
            f"Iceberg table {'.'.join(table.name())} has other columns than this job writes "
            f"({', '.join(differ[:5])}); write to another table"
        )


def commit_iceberg(
    where: Location,
    data_folder: str,
    parts: Sequence[Any],
    schema: pa.Schema | None,
    mode: str,
    facts: Mapping[str, Any],
    catalog: str | None,
    table: str | None,
    incremental: Incremental | None = None,
    opened: Any | None = None,
    partition: str | None = None,
) -> tuple[int, bool]:
    """Add ``parts`` (files of ``data_folder``) to the Iceberg table in one catalog commit, creating
    the table at the output's location if there is none (partitioned by ``partition``'s column);
    ``replace`` deletes every row of the table (of the partition) in that same commit, an
    incremental commit the parts of the files it scores again (see
    ``_commit_incremental``). Returns (snapshot id, whether this call committed). ``opened``: the
    table as loaded already (the metadata the catalog checks this commit against), else it is
    loaded now."""
    from pyiceberg import exceptions
    from pyiceberg.exceptions import TableAlreadyExistsError

    # A lost race: the catalog's check, or (pyiceberg 0.12 on) a retry's check of what the winner added.
    conflicts = tuple(
        getattr(exceptions, n) for n in ("CommitFailedException", "ValidationException") if hasattr(exceptions, n)
    )
    from pyiceberg.expressions import AlwaysTrue

    relative = table_relative(where.path, data_folder)
    name = identifier(where, table)
    found_catalog, found = _open(where, catalog, table) if opened is None else (None, opened)
    if found is None:
        assert found_catalog is not None
        if schema is None:
            raise InputDataError(
                f"nothing to commit to Iceberg table {name}: the run wrote no rows and there is no table"
            )
        namespace = name.rsplit(".", 1)[0]
        found_catalog.create_namespace_if_not_exists(namespace)
        try:  # the table with its partitioning, in one catalog commit
            with found_catalog.create_table_transaction(
                name, schema=table_schema(schema, partition), location=where.uri.rstrip("/")
            ) as created:
                if partition:
                    with created.update_spec() as spec:
                        spec.add_identity(split_partition(partition)[0])
        except TableAlreadyExistsError:  # another writer created it first
            pass
        found = found_catalog.load_table(name)
    if schema is not None:
        _check_fits(found, table_schema(schema, partition), partition)
    if _holds(found, relative, mode, where, incremental.key if incremental is not None else None, partition):
        return int(found.current_snapshot().snapshot_id), False
    commit_id = uuid.uuid4().hex
    properties = {
        APP_ID_KEY: table_app_id(relative),
        FACTS_KEY: json.dumps({**facts, "commit_id": commit_id}, sort_keys=True, default=str),
    }
    files = [part_path(f"{where.uri.rstrip('/')}/{relative}", p.path) for p in parts]
    # Parts carry no statistics for string columns (see sink.py); pyiceberg warns once per column
    # and file that it found none, which says nothing to the job's reader.
    logging.getLogger("pyiceberg.io.pyarrow").setLevel(logging.ERROR)
    if incremental is not None or (partition and mode == "replace"):
        _without_retries(found)  # what they remove was chosen from this snapshot's files
    try:
        with found.transaction() as tx:
            if incremental is not None:
                _commit_incremental(tx, found, where, relative, files, incremental, properties, partition)
            elif partition:  # one snapshot: the partition's files replaced, or the parts appended
                removed = _partition_files(found, partition) if mode == "replace" else []
                _commit_files(tx, found, removed, files, properties, partition)
            else:
                if mode == "replace" and found.current_snapshot() is not None:
                    tx.delete(AlwaysTrue(), snapshot_properties=properties)
                if files:
                    tx.add_files(files, snapshot_properties=properties)
    except conflicts as exc:
        raise ConfigError(
            f"Iceberg table {name}: another writer committed first and this commit conflicts with it ({exc}); "
            f"nothing of this run was committed: run it again"
        ) from None
    except OSError as exc:
        raise StorageError(f"cannot commit to Iceberg table {name}: {exc}") from None
    found = found.refresh()
    return int(found.current_snapshot().snapshot_id), True


# --- incremental runs: what the table holds, recorded in a file the commit's snapshot points to ---


def _record_of(table: Any, where: Location) -> dict[str, Scored]:
    """The record the last incremental snapshot points to ({} for a table no incremental job
    wrote); a table incremental jobs wrote whose recent snapshots point to none is refused."""
    from pyiceberg.table.snapshots import ancestors_of

    current = table.current_snapshot()
    if current is None or INCREMENTAL_PROPERTY not in table.properties:
        return {}
    for _, snapshot in zip(range(RECORD_LOOKBACK), ancestors_of(current, table.metadata)):
        summary = snapshot.summary
        if summary is not None and summary.get(SCORED_KEY):
            return _read_record(table, where, str(summary.get(SCORED_KEY)), str(summary.get(SCORED_SHA256_KEY)))
    raise ConfigError(
        f"Iceberg table {'.'.join(table.name())} was written by incremental jobs but none of its last "
        f"{RECORD_LOOKBACK} snapshots points to a record of what they scored; rescore everything with "
        f"{param('full_refresh')}"
    )


def _read_record(table: Any, where: Location, relative: str, sha256: str) -> dict[str, Scored]:
    """The record file a snapshot points to (one GET), checked against the digest it names."""
    import hashlib

    path = f"{where.path.rstrip('/')}/{relative}"
    try:
        with where.fs.open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        data = None
    except OSError as exc:
        raise StorageError(f"cannot read the incremental record of Iceberg table {where.uri}: {exc}") from None
    if data is None or hashlib.sha256(data).hexdigest() != sha256:
        raise ConfigError(
            f"Iceberg table {'.'.join(table.name())}: the record of what its incremental jobs scored, "
            f"{where.uri.rstrip('/')}/{relative}, is {'missing' if data is None else 'not the one its snapshot names'}; "
            f"rescore everything with {param('full_refresh')}"
        )
    return record_from_bytes(data)


def scored_record(where: Location, catalog: str | None, table: str | None) -> dict[str, Scored]:
    """What the Iceberg table records as scored, by input file URI (see ``_record_of``)."""
    _, found = _open(where, catalog, table)
    return {} if found is None else _record_of(found, where)


def _write_record(where: Location, relative: str, record: Mapping[str, Scored]) -> dict[str, str]:
    """Write the record into the commit's data folder, named by its sha256 (so never changed once
    written); the summary properties that point to it."""
    import hashlib

    data = record_bytes(record)
    sha256 = hashlib.sha256(data).hexdigest()
    name = f"{relative}/{scored_record_name(sha256)}"
    try:
        write_bytes_atomic(where.fs, f"{where.path.rstrip('/')}/{name}", data)
    except OSError as exc:
        raise StorageError(f"cannot write the incremental record of Iceberg table {where.uri}: {exc}") from None
    return {SCORED_KEY: name, SCORED_SHA256_KEY: sha256}


def _without_retries(table: Any) -> None:
    """Commit this table object's next transaction once, never retried onto a newer snapshot:
    pyiceberg (0.12 on) retries a commit that lost a race by rebasing its snapshot onto the
    winner's, which would keep what this commit chose from the snapshot it started from: an
    incremental record that forgets what the winner scored, or a partition's files to replace
    without the winner's (the partition would then hold both jobs' rows). The loser fails instead
    (exit 2, nothing committed). Set on the loaded metadata only (the table's own properties, which
    every writer reads, stay as they are)."""
    properties = {**table.metadata.properties, "commit.retry.num-retries": "0"}
    table.metadata = table.metadata.model_copy(update={"properties": properties})


def _commit_incremental(
    tx: Any,
    table: Any,
    where: Location,
    relative: str,
    files: Sequence[str],
    incremental: Incremental,
    properties: Mapping[str, str],
    partition: str | None = None,
) -> None:
    """One snapshot, in transaction ``tx``: remove every data file holding rows of an input file
    this commit scores again (every data file, for a full refresh; this data folder's own files,
    which it writes again), add ``files``, and point the summary to the new record, written before
    the commit. The catalog commits it only onto the metadata the record was read from."""
    previous = {} if incremental.full_refresh else _record_of(table, where)
    record, stale = next_record(previous, incremental, relative)
    pointer = _write_record(where, relative, record)
    root = where.uri.rstrip("/") + "/"
    removed = []
    if table.current_snapshot() is not None:
        for task in table.scan().plan_files():
            path = str(task.file.file_path)
            folder, _, name = path[len(root) :].rpartition("/") if path.startswith(root) else ("", "", "")
            if incremental.full_refresh or folder == relative or (folder and (folder, part_number(name)) in stale):
                removed.append(task.file)
    _commit_files(tx, table, removed, files, {**properties, **pointer}, partition, {INCREMENTAL_PROPERTY: "true"})


def _commit_files(
    tx: Any,
    table: Any,
    removed: Sequence[Any],
    files: Sequence[str],
    properties: Mapping[str, str],
    partition: str | None,
    table_properties: Mapping[str, str] | None = None,
) -> None:
    """One snapshot, in transaction ``tx``, that removes data files ``removed`` and adds ``files``
    (an ``overwrite``; an ``append`` when it removes none), its summary carrying ``properties``.
    The parts hold no partition column: each added file's partition value is set in the manifest,
    which is where Iceberg readers take an identity partition column missing from a data file."""
    from pyiceberg.table import TableProperties, _parquet_files_to_data_files

    updates = dict(table_properties or {})
    if tx.table_metadata.name_mapping() is None:  # what add_files sets: the parts carry no field ids
        updates[TableProperties.DEFAULT_NAME_MAPPING] = tx.table_metadata.schema().name_mapping.model_dump_json()
    if any(tx.table_metadata.properties.get(k) != v for k, v in updates.items()):
        tx.set_properties(**updates)
    added = list(_parquet_files_to_data_files(table_metadata=tx.table_metadata, file_paths=list(files), io=table.io))
    if partition:
        _, value = split_partition(partition)
        for data_file in added:
            data_file.partition[0] = value  # inferred as unknown: the column is not in the file
    update = tx.update_snapshot(snapshot_properties=dict(properties))
    with update.overwrite() if removed else update.fast_append() as snapshot:
        for data_file in removed:
            snapshot.delete_data_file(data_file)
        for data_file in added:
            snapshot.append_data_file(data_file)
