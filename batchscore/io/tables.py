"""Table outputs: commit a plan's Parquet parts, already written, to a Delta Lake table in one transaction.

The shards write parts exactly as for a folder output, into the plan's data folder inside the table
(layout.py); ``commit`` then adds them with delta-rs in one commit, which is the only moment readers'
view of the table changes: before it they read the previous version, after it the new one. The
commit carries the manifest's facts (plan id, model, digests, rows) in its commit info, and an
application transaction (``txn``) naming the plan's data folder: a rerun of a committed plan (after
a kill between the commit and the manifest, or a retried commit task) finds it and commits nothing
twice, and of two writers racing to commit the same plan only one wins (delta-rs refuses the other).
``replace`` overwrites the partition's (or the table's) files in that same commit.

``deltalake`` is imported here only, when a table output is committed (``batchscore[delta]``).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ..config import JobConfig
from ..errors import ConfigError, InputDataError, StorageError, param
from .layout import split_partition, table_app_id, table_relative
from .scored import Incremental, Scored, decode_record, encode_record, next_record, part_number
from .storage import Location


@dataclass(frozen=True)
class Target:
    """A table output as a job writes it: where, which format, how (mode, partition), and for
    Iceberg through which catalog under which identifier."""

    where: Location
    format: str
    mode: str = "append"
    partition: str | None = None
    catalog: str | None = None
    identifier: str | None = None
    #: For an incremental job: its scoring key (see ``scoring_key``), when the step knows its plan.
    incremental: str | None = None

    @classmethod
    def of(cls, config: JobConfig, where: Location, artifact_sha256: Sequence[str] | None = None) -> Target:
        """``artifact_sha256``: the plan's artifacts' digests, which an incremental job's key needs."""
        return cls(
            where,
            config.output_format,
            config.table_mode,
            config.partition,
            config.iceberg_catalog,
            config.iceberg_table,
            scoring_key(config, artifact_sha256) if config.incremental and artifact_sha256 is not None else None,
        )


def table_committed(target: Target, data_folder: str) -> int | None:
    """The version (Delta) or snapshot id (Iceberg) of the table holding the rows of the plan
    writing ``data_folder`` already, or None."""
    if target.format == "iceberg":
        from .iceberg import committed_snapshot

        return committed_snapshot(
            target.where,
            data_folder,
            target.mode,
            target.catalog,
            target.identifier,
            target.incremental,
            target.partition,
        )
    return committed_version(target.where, data_folder, target.partition, target.mode, target.incremental)


def table_parts(target: Target, data_folder: str) -> dict[str, int]:
    """Rows of each part of ``data_folder`` that the table lists now, by name."""
    if target.format == "iceberg":
        from . import iceberg

        return iceberg.committed_parts(target.where, data_folder, target.catalog, target.identifier)
    return committed_parts(target.where, data_folder)


def table_check(target: Target, schema: pa.Schema) -> None:
    """Before anything is scored: the table can take the job's columns (see check_table)."""
    if target.format == "iceberg":
        from . import iceberg

        iceberg.check_table(target.where, schema, target.catalog, target.identifier, target.partition)
    else:
        check_table(target.where, schema, target.partition)


def table_commit(
    target: Target,
    data_folder: str,
    parts: Sequence[TablePart],
    schema: pa.Schema | None,
    facts: Mapping[str, Any],
    incremental: Incremental | None = None,
) -> tuple[int, bool]:
    """Add the parts to the table in one commit (see commit_delta, iceberg.commit_iceberg)."""
    if target.format == "iceberg":
        from .iceberg import commit_iceberg

        return commit_iceberg(
            target.where,
            data_folder,
            parts,
            schema,
            target.mode,
            facts,
            target.catalog,
            target.identifier,
            incremental=incremental,
            partition=target.partition,
        )
    return commit_delta(
        target.where, data_folder, parts, schema, target.partition, target.mode, facts, incremental=incremental
    )


def table_record(target: Target) -> dict[str, Scored]:
    """What the table records as scored by its incremental commits, by input file URI (see
    ``scored_record``, iceberg.scored_record)."""
    if target.format == "iceberg":
        from . import iceberg

        return iceberg.scored_record(target.where, target.catalog, target.identifier)
    return scored_record(target.where)


@dataclass(frozen=True)
class TablePart:
    """One data file to add: its path relative to the table, bytes and rows."""

    path: str
    size: int
    rows: int


def _deltalake() -> Any:
    try:
        import deltalake
    except ImportError:
        raise ConfigError(
            f"{param('output_format')} delta needs the deltalake package: pip install 'batchscore[delta]'"
        ) from None
    return deltalake


def delta_storage_options(where: Location) -> dict[str, str]:
    """delta-rs's storage options for a table at ``where``, from the job's fsspec options: the
    endpoint, keys and region it names (credentials not named there come from the environment, as
    for s3fs), plain HTTP where the endpoint is, S3's conditional put for the commit itself, and
    the job's storage timeout and retries."""
    if not where.uri.startswith(("s3://", "s3a://")):
        return {}
    options = dict(where.storage.options)
    client = dict(options.get("client_kwargs") or {})
    found: dict[str, str] = {"conditional_put": "etag"}
    endpoint = options.get("endpoint_url") or client.get("endpoint_url")
    if endpoint:
        found["AWS_ENDPOINT_URL"] = str(endpoint)
        if str(endpoint).startswith("http://"):
            found["AWS_ALLOW_HTTP"] = "true"
    for ours, theirs in (
        ("key", "AWS_ACCESS_KEY_ID"),
        ("secret", "AWS_SECRET_ACCESS_KEY"),
        ("token", "AWS_SESSION_TOKEN"),
    ):
        if options.get(ours):
            found[theirs] = str(options[ours])
    region = client.get("region_name") or options.get("region_name")
    found["AWS_REGION"] = str(region or "us-east-1")
    # batchscore's bounds on every request: a stalled store fails the commit, it does not hang it.
    seconds = max(1, int(where.storage.timeout))
    found["timeout"] = found["connect_timeout"] = f"{seconds}s"
    found["max_retries"] = str(where.storage.retries)
    found["retry_timeout"] = f"{seconds * (where.storage.retries + 1)}s"
    return found


def _one_line(exc: BaseException) -> str:
    """delta-rs's message on one line, without its terminal colours."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m|↳", " ", str(exc)).split())


def _table_uri(where: Location) -> str:
    return where.uri.rstrip("/")


def _open(where: Location) -> Any | None:
    """The Delta table at ``where``, or None when there is none yet."""
    deltalake = _deltalake()
    from deltalake.exceptions import TableNotFoundError

    try:
        return deltalake.DeltaTable(_table_uri(where), storage_options=delta_storage_options(where))
    except TableNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read Delta table {where.uri}: {_one_line(exc)}") from None


def _holds(
    table: Any, relative: str, partition: str | None, mode: str, incremental: tuple[Location, str] | None = None
) -> bool:
    """Whether the table's current version holds the rows of the plan writing data folder
    ``relative``: its application transaction is recorded and, for ``replace``, the partition's
    (or the table's) files are still that folder's, not those of a later replace; for an
    incremental job, the record still names that folder, with the job's scoring key, for some input file."""
    if table.transaction_version(table_app_id(relative)) is None:
        return False
    if incremental is not None:  # (the table's location, the job's scoring key)
        where, key = incremental
        try:
            record = _record_of(table, where) or {}
        except ConfigError:  # no record to say so (a full refresh rescores it; anything else is refused)
            return False
        return any(s.folder == relative and s.key == key for s in record.values())
    if mode != "replace":
        return True
    filters = [(split_partition(partition)[0], "=", split_partition(partition)[1])] if partition else None
    files = table.file_uris(file_pruning_predicate=filters)
    return bool(files) and all(f"/{relative}/" in uri for uri in files)


def committed_version(
    where: Location, data_folder: str, partition: str | None, mode: str, incremental: str | None = None
) -> int | None:
    """The table version's number if the plan writing ``data_folder`` is committed to the table at
    ``where`` already and its rows are still there (see ``_holds``), else None."""
    table = _open(where)
    if table is None or not _holds(
        table, table_relative(where.path, data_folder), partition, mode, (where, incremental) if incremental else None
    ):
        return None
    return int(table.version())


def committed_parts(where: Location, data_folder: str) -> dict[str, int]:
    """Rows of each part of ``data_folder`` that the table's current version lists, by name."""
    table = _open(where)
    if table is None:
        return {}
    root = table_relative(where.path, data_folder) + "/"
    actions = pa.table(table.get_add_actions(flatten=True))
    return {
        path[len(root) :]: int(rows)
        for path, rows in zip(actions["path"].to_pylist(), actions["num_records"].to_pylist())
        if path.startswith(root)
    }


def table_schema(schema: pa.Schema, partition: str | None) -> pa.Schema:
    """The table's schema: the parts' columns, then the partition column (a string whose value a
    Delta table keeps in its log and an Iceberg table in its manifests, never in the parts)."""
    schema = pa.schema(list(schema), metadata=None)
    if partition:
        column, _ = split_partition(partition)
        if column in schema.names:
            raise InputDataError(
                f"{param('partition')} {partition}: the output already has a column {column!r}; leave it out "
                f"with {param('keep')} or partition by another name"
            )
        schema = schema.append(pa.field(column, pa.string()))
    return schema


def check_table(where: Location, schema: pa.Schema, partition: str | None) -> None:
    """Before anything is scored: the partition column is not an output column, and a table
    already at ``where`` has this job's columns, types and partitioning."""
    full = table_schema(schema, partition)
    table = _open(where)
    if table is not None:
        _check_fits(table, where, full, partition)


def _check_fits(table: Any, where: Location, schema: pa.Schema, partition: str | None) -> None:
    """The existing table must have this job's columns, types and partitioning."""
    columns = list(table.metadata().partition_columns)
    wanted = [split_partition(partition)[0]] if partition else []
    if columns != wanted:
        raise ConfigError(
            f"Delta table {where.uri} is partitioned by {columns or 'nothing'}, not "
            f"{wanted or 'nothing'}: give {param('partition')} "
            + ("COLUMN=VALUE with its column" if columns else "only for a partitioned table")
        )
    found = pa.schema(table.schema().to_arrow())
    ours = {f.name: f.type for f in schema}
    theirs = {f.name: f.type for f in found}
    if set(ours) != set(theirs) or any(not ours[n].equals(theirs[n]) for n in ours):
        differ = sorted(
            [f"missing {n}" for n in theirs if n not in ours]
            + [f"extra {n}" for n in ours if n not in theirs]
            + [f"{n} {ours[n]} != {theirs[n]}" for n in ours if n in theirs and not ours[n].equals(theirs[n])]
        )
        raise InputDataError(
            f"Delta table {where.uri} has other columns than this job writes ({', '.join(differ[:5])}); "
            f"write to another table"
        )


def _version_of(table: Any, where: Location, base: int, commit_id: str) -> int:
    """The version this process's commit became: the first after ``base`` whose commit info names
    ``commit_id`` (other writers may have committed before or after it). Each version's commit info
    is read from its log file (delta-rs's ``history`` holds the interpreter while it lists the log)."""
    table.update_incremental()
    for version in range(base + 1, int(table.version()) + 1):
        if commit_id in str((_commit_info(where, version) or {}).get("batchscore", "")):
            return version
    return int(table.version())


def commit_delta(
    where: Location,
    data_folder: str,
    parts: Sequence[TablePart],
    schema: pa.Schema | None,
    partition: str | None,
    mode: str,
    facts: Mapping[str, Any],
    opened: Any | None = None,
    incremental: Incremental | None = None,
) -> tuple[int, bool]:
    """Add ``parts`` (files of ``data_folder``, inside the table) to the Delta table at ``where`` in
    one commit, creating the table if there is none; ``mode`` "replace" removes the partition's (or
    the whole table's) files in the same commit. Returns (version, whether this call committed):
    a plan committed already is not committed again. ``schema`` is the parts' (None when the run
    wrote none: the table's own then). ``opened``: the table as read already (its version is the
    one this commit is checked against by delta-rs's conflict detection), else it is read now."""
    deltalake = _deltalake()
    from deltalake.exceptions import CommitFailedError, DeltaError
    from deltalake.transaction import AddAction, CommitProperties, Transaction, create_table_with_add_actions

    relative = table_relative(where.path, data_folder)
    app_id = table_app_id(relative)
    values: dict[str, str | None] = {}
    if partition:
        column, value = split_partition(partition)
        values = {column: value}
    stamp = int(time.time() * 1000)
    adds = [
        AddAction(
            f"{relative}/{p.path}",
            p.size,
            values,
            stamp,
            True,
            json.dumps({"numRecords": p.rows}),
        )
        for p in parts
    ]
    commit_id = uuid.uuid4().hex
    metadata = {"batchscore": json.dumps({**facts, "commit_id": commit_id}, sort_keys=True, default=str)}
    properties = CommitProperties(
        custom_metadata=metadata,
        app_transactions=[Transaction(app_id, 1, stamp)],
    )
    uri, options = _table_uri(where), delta_storage_options(where)
    partition_by = list(values) or None
    try:
        table = opened if opened is not None else _open(where)
        if schema is not None:
            schema = table_schema(schema, partition)
        elif table is not None:
            schema = pa.schema(table.schema().to_arrow())
        else:
            raise InputDataError(
                f"nothing to commit to Delta table {where.uri}: the run wrote no rows and there is no table"
            )
        if table is None:
            if incremental is not None:
                removes, properties = _with_record(None, where, relative, incremental, properties, stamp)
                adds = [*removes, *adds]
            try:
                create_table_with_add_actions(
                    uri,
                    deltalake.Schema.from_arrow(schema),
                    adds,
                    mode="error",
                    partition_by=partition_by,
                    storage_options=options,
                    commit_properties=properties,
                )
                return 0, True
            except DeltaError as exc:  # another writer created it first: commit to it like any table
                table = _open(where)
                if table is None:
                    raise StorageError(f"cannot create Delta table {where.uri}: {_one_line(exc)}") from None
        _check_fits(table, where, schema, partition)
        if _holds(table, relative, partition, mode, (where, incremental.key) if incremental is not None else None):
            return int(table.version()), False
        if table.transaction_version(app_id) is not None:  # a replace committed before, replaced since
            properties = CommitProperties(
                custom_metadata=metadata,
                app_transactions=[Transaction(app_id, table.transaction_version(app_id) + 1, stamp)],
            )
        if incremental is not None:
            removes, properties = _with_record(table, where, relative, incremental, properties, stamp)
            adds = [*removes, *adds]
        filters = [(column, "=", value)] if partition else None
        base = int(table.version())
        table.create_write_transaction(
            adds,
            mode="overwrite" if mode == "replace" else "append",
            schema=schema,
            partition_by=partition_by,
            partition_filters=filters,
            commit_properties=properties,
        )
        return _version_of(table, where, base, commit_id), True
    except CommitFailedError as exc:
        raise ConfigError(
            f"Delta table {where.uri}: another writer committed first and this commit conflicts with it "
            f"({_one_line(exc)}); nothing of this run was committed: run it again"
        ) from None
    except OSError as exc:
        raise StorageError(f"cannot commit to Delta table {where.uri}: {_one_line(exc)}") from None


# --- incremental runs: what the table holds, recorded in the commit that added it -----------------

#: The commit info key of an incremental commit's record of every input file the table holds rows
#: of: the whole record, compacted (one entry per file, the newest), zlib-compressed JSON in base64.
SCORED_KEY = "batchscore_scored"
#: The application id every incremental commit advances: two incremental commits racing on one
#: table conflict (delta-rs refuses the second), so neither overwrites the other's record.
INCREMENTAL_APP_ID = "batchscore:incremental"
#: How far back ``scored_record`` looks for the last incremental commit among other writers' commits.
RECORD_LOOKBACK = 100


def _commit_info(where: Location, version: int) -> dict[str, Any] | None:
    """The commit info of one version, read from its log file (one GET), or None when the log no
    longer holds it."""
    path = f"{where.path.rstrip('/')}/_delta_log/{version:020d}.json"
    try:
        with where.fs.open(path, "rb") as fh:
            for line in fh:
                action = json.loads(line)
                if "commitInfo" in action:
                    return dict(action["commitInfo"])
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read the log of Delta table {where.uri}: {exc}") from None
    return {}


def _record_of(table: Any, where: Location) -> dict[str, Scored] | None:
    """The record of the table's last incremental commit ({} for a table no incremental job wrote),
    or None when the table has none but an incremental job did write it (its commit has expired
    from the log): its rows could then be scored twice, so the job is refused."""
    if table is None or table.transaction_version(INCREMENTAL_APP_ID) is None:
        return {}
    for version in range(int(table.version()), max(-1, int(table.version()) - RECORD_LOOKBACK), -1):
        info = _commit_info(where, version)
        if info is None:  # expired from the log
            break
        if SCORED_KEY in info:
            return decode_record(str(info[SCORED_KEY]))
    raise ConfigError(
        f"Delta table {where.uri} was written by incremental jobs but its last {RECORD_LOOKBACK} commits hold no "
        f"record of what they scored; rescore everything with {param('full_refresh')}"
    )


def scored_record(where: Location) -> dict[str, Scored]:
    """What the Delta table at ``where`` records as scored, by input file URI (see ``_record_of``)."""
    return _record_of(_open(where), where) or {}


def _incremental_actions(
    table: Any,
    where: Location,
    relative: str,
    scored: Mapping[str, tuple[Mapping[str, Any], int]],
    key: str,
    full_refresh: bool,
    stamp: int,
) -> tuple[list[Any], str, int]:
    """The removes of every part holding rows of a file this commit scores again (every part the
    table lists, for ``full_refresh``), the new record, and the incremental transaction's version."""
    from deltalake.transaction import RemoveAction

    record, stale = next_record(
        {} if full_refresh else (_record_of(table, where) or {}), Incremental(scored, key, full_refresh), relative
    )
    removes = []
    if table is not None:
        actions = pa.table(table.get_add_actions(flatten=True)).to_pylist()
        for action in actions:
            path = str(action["path"])
            folder, _, name = path.rpartition("/")
            if folder == relative:  # this job's own parts, added again by this commit (the same names)
                continue
            if full_refresh or (folder, part_number(name)) in stale:
                values = {k[len("partition.") :]: v for k, v in action.items() if k.startswith("partition.")}
                removes.append(RemoveAction(path, True, stamp, int(action["size_bytes"]), values or None))
    version = (table.transaction_version(INCREMENTAL_APP_ID) if table is not None else None) or 0
    return removes, encode_record(record), version + 1


def _with_record(
    table: Any, where: Location, relative: str, incremental: Incremental, properties: Any, stamp: int
) -> tuple[list[Any], Any]:
    """An incremental commit's removes, and its properties with the new record and the advanced
    incremental transaction added (see ``_incremental_actions``)."""
    from deltalake.transaction import CommitProperties, Transaction

    removes, record, counter = _incremental_actions(
        table, where, relative, incremental.scored, incremental.key, incremental.full_refresh, stamp
    )
    return removes, CommitProperties(
        custom_metadata={**(properties.custom_metadata or {}), SCORED_KEY: record},
        app_transactions=[*(properties.app_transactions or []), Transaction(INCREMENTAL_APP_ID, counter, stamp)],
    )


#: The settings whose values change what a row scores to (beside the artifacts' digests and the
#: batchscore version): a change of any rescores every file of an incremental job.
SCORING_SETTINGS = ("features", "keep", "model_version", "on_invalid", "engine")


def scoring_key(config: JobConfig, artifact_sha256: Sequence[str]) -> str:
    """What an input file's rows depend on besides the file: the artifacts (model, scaler,
    challengers, by sha256), the scoring settings, and the batchscore version."""
    import hashlib

    from .. import __version__

    settings = {name: getattr(config, name) for name in SCORING_SETTINGS}
    text = json.dumps([list(artifact_sha256), settings, __version__], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
