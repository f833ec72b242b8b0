"""Iceberg outputs: commit a plan's Parquet parts, already written, to an Apache Iceberg table in one
catalog commit, through pyiceberg.

The table lives at the output's location (its data folders as for Delta, see layout.py; its
metadata under ``metadata/``); the catalog is the one named by ``iceberg_catalog``, configured as
pyiceberg reads it, or for a local output with none named an embedded SQL catalog on a SQLite file
in the table's state folder. One ``Transaction`` adds the parts (``add_files``) and, for
``replace``, deletes the table's rows first; the catalog swaps the table's metadata once for both,
so readers see the previous snapshot or the new one. The snapshot's summary carries the manifest's
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
from .layout import iceberg_catalog_path, part_path, table_app_id, table_relative
from .storage import Location

#: The snapshot summary keys a commit writes: the plan's application id, and the manifest's facts.
APP_ID_KEY = "batchscore.app_id"
FACTS_KEY = "batchscore"


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


def _holds(table: Any, relative: str, mode: str) -> bool:
    """Whether the table's current snapshot holds the rows of the plan writing data folder
    ``relative``: a snapshot in its history names the plan's application id and, for ``replace``,
    every current data file is still that folder's."""
    from pyiceberg.table.snapshots import ancestors_of

    current = table.current_snapshot()
    if current is None:
        return False
    app_id = table_app_id(relative)
    if not any(
        s.summary is not None and s.summary.get(APP_ID_KEY) == app_id for s in ancestors_of(current, table.metadata)
    ):
        return False
    if mode != "replace":
        return True
    files = table.inspect.files().column("file_path").to_pylist()
    return bool(files) and all(f"/{relative}/" in f for f in files)


def committed_snapshot(
    where: Location, data_folder: str, mode: str, catalog: str | None, table: str | None
) -> int | None:
    """The current snapshot's id if the table holds the plan writing ``data_folder``, else None."""
    _, found = _open(where, catalog, table)
    if found is None or not _holds(found, table_relative(where.path, data_folder), mode):
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


def check_table(where: Location, schema: pa.Schema, catalog: str | None, table: str | None) -> None:
    """An Iceberg table already there has this job's columns."""
    _, found = _open(where, catalog, table)
    if found is not None:
        _check_fits(found, schema)


def _check_fits(table: Any, schema: pa.Schema) -> None:
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
) -> tuple[int, bool]:
    """Add ``parts`` (files of ``data_folder``) to the Iceberg table in one catalog commit, creating
    the table at the output's location if there is none; ``replace`` deletes every row of the table
    in that same commit. Returns (snapshot id, whether this call committed)."""
    from pyiceberg.exceptions import CommitFailedException, TableAlreadyExistsError
    from pyiceberg.expressions import AlwaysTrue

    relative = table_relative(where.path, data_folder)
    name = identifier(where, table)
    found_catalog, found = _open(where, catalog, table)
    if found is None:
        if schema is None:
            raise InputDataError(
                f"nothing to commit to Iceberg table {name}: the run wrote no rows and there is no table"
            )
        namespace = name.rsplit(".", 1)[0]
        found_catalog.create_namespace_if_not_exists(namespace)
        try:
            found = found_catalog.create_table(name, schema=schema, location=where.uri.rstrip("/"))
        except TableAlreadyExistsError:  # another writer created it first
            found = found_catalog.load_table(name)
    if schema is not None:
        _check_fits(found, schema)
    if _holds(found, relative, mode):
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
    try:
        with found.transaction() as tx:
            if mode == "replace" and found.current_snapshot() is not None:
                tx.delete(AlwaysTrue(), snapshot_properties=properties)
            if files:
                tx.add_files(files, snapshot_properties=properties)
    except CommitFailedException as exc:
        raise ConfigError(
            f"Iceberg table {name}: another writer committed first and this commit conflicts with it ({exc}); "
            f"nothing of this run was committed: run it again"
        ) from None
    except OSError as exc:
        raise StorageError(f"cannot commit to Iceberg table {name}: {exc}") from None
    found = found.refresh()
    return int(found.current_snapshot().snapshot_id), True
