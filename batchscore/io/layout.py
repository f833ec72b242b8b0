"""Where an output's files and its job's state live: every path name comes from here.

An output folder holds only what readers should read: the Parquet parts and, once committed, an
empty ``_SUCCESS``. Polars refuses a folder holding any other non-empty file (in subfolders too),
and DuckDB's ``**/*.parquet`` descends into every subfolder, so the job's state and the rejected
rows live in a sibling folder whose name starts with ``_`` (which pyarrow, pandas, Spark and
Hive-style partition discovery skip)::

    <parent>/<name>/                          the output
        part-FFFFF-RRRRR.parquet              predictions, in input order by name
                                              (part-FFFFF-RRRRR_ATTEMPT.parquet where two attempts
                                              of a shard may run at once: Spark)
        _SUCCESS                              empty, written last by commit
    <parent>/_batchscore/<name>/              the job's state
        manifest.json                         written by commit, just before _SUCCESS
        report.json                           the run report (rows, distributions, drift)
        held.json                             the plan and settings of a commit held for drift
        plan.json                             where the DAG (and the docs) put a shared plan
        lease.json                            which job may write the output now (see lease.py)
        iceberg-catalog.db                    an Iceberg output's embedded catalog (SQLite), when none is named
        receipts/shard-IIIII.json             what each shard wrote
        rejected/part-FFFFF-RRRRR.parquet.rejected   invalid rows (``--on-invalid quarantine``):
                                              Parquet that no ``*.parquet`` glob picks up
        challengers/<NAME>/part-FFFFF-RRRRR.parquet.challenger   a challenger's own rows
                                              (``challenger_output: folders``): a part for each of
                                              the output's, committed by the output's _SUCCESS;
                                              Parquet that no ``*.parquet`` glob picks up either

A table output (``output_format: delta``) is a table path ``<parent>/<table>``. Its state folder is
the same ``<parent>/_batchscore/<table>/``: one lease, plan, receipts and report per table, outside
it (table readers read only the table's log). Each plan's shards write their parts, named as in a
folder output, into a data folder of their own inside the table, in the partition's Hive-style
folder when the job writes one, where Delta's own writers put them (and VACUUM, which skips ``_``
and ``.`` names, still removes them once replaced)::

    <parent>/<table>/
        _delta_log/                           the table's commits (written by delta-rs)
        [<column>=<value>/]batchscore-run-<plan id>/part-FFFFF-RRRRR.parquet
        [<column>=<value>/]batchscore-run-<plan id>/_batchscore-scored-<sha256>.zlib
                                              an incremental Iceberg commit's record (iceberg.py)

The data folder is named by the plan id (a content hash), so every step of a sharded job finds it
without sharing a file, and a new plan never writes over files that a committed version lists.
``state_folder`` of a data folder is its table's. A folder output may not be named like a data
folder, and a table's own name may not hold ``=`` (Hive-style readers would take it for a
partition).

An output needs a parent for its state: a bucket root (``s3://bucket``) or the filesystem root is
refused. Only the standard library is imported here: the DAG factory uses these names too.
"""

from __future__ import annotations

import posixpath
import re

from ..config import PARTITION_PATTERN
from ..errors import ConfigError

STATE_ROOT = "_batchscore"
SUCCESS_FILE = "_SUCCESS"
MANIFEST_FILE = "manifest.json"
#: The run report: rows, score and feature distributions, drift (beside the manifest).
REPORT_FILE = "report.json"
PLAN_FILE = "plan.json"
#: What a commit held for drift was committing (its plan and settings), for ``commit --accept-drift``.
HELD_FILE = "held.json"
LEASE_FILE = "lease.json"
#: The embedded Iceberg catalog of a local Iceberg output with no catalog named (SQLite).
ICEBERG_CATALOG_FILE = "iceberg-catalog.db"
RECEIPTS_DIR = "receipts"
REJECTED_DIR = "rejected"
#: Where each challenger's own folder lives under ``challenger_output: folders`` (in the state
#: folder: readers of the output, or of its parent, never pick them up).
CHALLENGERS_DIR = "challengers"
#: Appended to the output's part name to name a challenger's part (``*.parquet`` globs skip it).
CHALLENGER_SUFFIX = ".challenger"
#: Appended to a rejected part's name so that ``*.parquet`` globs (DuckDB, Polars) never match it.
REJECTED_SUFFIX = ".rejected"
#: Fewest digits of the file and row group numbers in a part's name.
PART_NUMBER_DIGITS = 5
#: Hex digits of the attempt a part's name may carry (``part-FFFFF-RRRRR_ATTEMPT.parquet``: see
#: ``attempt_part_name``).
ATTEMPT_DIGITS = 32
_PART = (
    rf"part-\d{{{PART_NUMBER_DIGITS},}}-\d{{{PART_NUMBER_DIGITS},}}(-\d{{{PART_NUMBER_DIGITS},}})?"  # the last number: a slice
    rf"(_[0-9a-f]{{{ATTEMPT_DIGITS}}})?\.parquet"  # the attempt that wrote it, when two may run at once
)
PART_PATTERN = re.compile(f"^{_PART}$")
REJECTED_PATTERN = re.compile(f"^{_PART}{re.escape(REJECTED_SUFFIX)}$")
#: The name of a plan's data folder inside a table output (followed by the plan id).
TABLE_DATA_PREFIX = "batchscore-run-"
TABLE_DATA_PATTERN = re.compile(rf"^{re.escape(TABLE_DATA_PREFIX)}[0-9a-f]{{16}}$")


def _split(output: str) -> tuple[str, str, str]:
    """(``scheme://`` or "", parent path, name) of an output URI or path."""
    scheme, sep, path = output.partition("://")
    if not sep:
        scheme, path = "", output
    if scheme in ("", "file", "local") and path:
        path = posixpath.normpath(path)  # data/. and out/../data name the folder data
    path = path.rstrip("/")
    return (scheme + sep), posixpath.dirname(path), posixpath.basename(path)


def check_output(output: str, table: bool = False) -> None:
    """Refuse an output that has no parent folder to keep its state in, and names that read as
    something else: a folder named like a table's data folder, a table named like a partition."""
    prefix, parent, name = _split(output)
    if name in ("", ".", "..") or (prefix and not parent):
        raise ConfigError(
            f"output {output} is a bucket or filesystem root; write to a folder inside it "
            f"(the job keeps its state beside the output, in <parent>/{STATE_ROOT}/<output name>/)"
        )
    if not table and TABLE_DATA_PATTERN.match(name):
        raise ConfigError(f"output {output}: a folder output may not be named like a table's data folder")
    if table and "=" in name:
        raise ConfigError(f"output {output}: a table's name may not hold '=' (readers take it for a partition)")


def _table_of(output: str) -> str:
    """The table of a table's data folder (see above), or ``output`` itself."""
    prefix, parent, name = _split(output)
    if not TABLE_DATA_PATTERN.match(name):
        return output
    if "=" in posixpath.basename(parent):
        parent = posixpath.dirname(parent)
    return prefix + parent


def state_folder(output: str) -> str:
    """``<parent>/_batchscore/<name>`` for output ``<parent>/<name>``, in the output's own spelling;
    for a table's data folder, its table's."""
    output = _table_of(output)
    check_output(output)
    prefix, parent, name = _split(output)
    return prefix + posixpath.join(parent, STATE_ROOT, name)


def split_partition(partition: str) -> tuple[str, str]:
    """(column, value) of ``COLUMN=VALUE``."""
    found = PARTITION_PATTERN.match(partition)
    if not found:
        raise ConfigError(f"partition {partition!r} is not COLUMN=VALUE")
    return found.group(1), found.group(2)


def table_data_folder(table: str, partition: str | None, plan_id: str) -> str:
    """Where a plan's shards write their parts inside table ``table``: a folder of their own, in
    the partition's Hive-style folder when the job writes one."""
    check_output(table, table=True)
    parts = [table.rstrip("/")]
    if partition:
        column, value = split_partition(partition)
        parts.append(f"{column}={value}")
    return posixpath.join(*parts, TABLE_DATA_PREFIX + plan_id)


def table_relative(table: str, path: str) -> str:
    """``path`` (inside ``table``, in the same spelling) relative to the table's root."""
    root = table.rstrip("/") + "/"
    if not path.startswith(root):
        raise ValueError(f"{path} is not inside table {table}")
    return path[len(root) :]


def table_app_id(data_folder_relative: str) -> str:
    """The application id a table commit records for one plan's data folder: a rerun of a committed
    plan finds it in the table and commits nothing twice."""
    return f"batchscore:{data_folder_relative}"


#: An incremental Iceberg commit's record of the input files the table holds (io/scored.py), in the
#: commit's data folder, named by its content: written once before the commit, never changed.
SCORED_RECORD_PREFIX = "_batchscore-scored-"
SCORED_RECORD_PATTERN = re.compile(rf"^{re.escape(SCORED_RECORD_PREFIX)}[0-9a-f]{{32}}\.zlib$")


def scored_record_name(sha256: str) -> str:
    return f"{SCORED_RECORD_PREFIX}{sha256[:32]}.zlib"


def part_name(file: int, row_group: int, slice: int | None = None, digits: int = PART_NUMBER_DIGITS) -> str:
    """``part-FILE-ROWGROUP.parquet``, or ``part-FILE-ROWGROUP-SLICE.parquet`` for a slice of a row
    group; every number with ``digits`` digits, so that names sort in input order."""
    tail = f"-{slice:0{digits}d}" if slice is not None else ""
    return f"part-{file:0{digits}d}-{row_group:0{digits}d}{tail}.parquet"


def attempt_part_name(name: str, attempt: str) -> str:
    """``part-FFFFF-RRRRR[-SSSSS]_ATTEMPT.parquet``: a part named for the attempt that writes it, for
    shards two attempts may score at once (Spark's speculative copies). The attempt follows every
    number, so names still sort in input order, and no attempt ever replaces another's part."""
    if len(attempt) != ATTEMPT_DIGITS or not name.endswith(".parquet"):
        raise ValueError(f"not a part name and an attempt: {name!r}, {attempt!r}")
    return f"{name[: -len('.parquet')]}_{attempt}.parquet"


def planned_part_name(name: str) -> str:
    """The plan's name of a part (``attempt_part_name`` undone): the name itself for a part an
    attempt did not name for itself."""
    stem, _, attempt = name[: -len(".parquet")].rpartition("_")
    return f"{stem}.parquet" if stem and len(attempt) == ATTEMPT_DIGITS and name.endswith(".parquet") else name


def part_path(output: str, name: str) -> str:
    return posixpath.join(output.rstrip("/"), name)


def success_path(output: str) -> str:
    return posixpath.join(output.rstrip("/"), SUCCESS_FILE)


def manifest_path(output: str) -> str:
    return posixpath.join(state_folder(output), MANIFEST_FILE)


def report_path(output: str) -> str:
    return posixpath.join(state_folder(output), REPORT_FILE)


def held_path(output: str) -> str:
    return posixpath.join(state_folder(output), HELD_FILE)


def plan_path(output: str) -> str:
    """Where a shared plan goes by default (``plan --out``, the DAG)."""
    return posixpath.join(state_folder(output), PLAN_FILE)


def lease_path(output: str) -> str:
    return posixpath.join(state_folder(output), LEASE_FILE)


def iceberg_catalog_path(output: str) -> str:
    return posixpath.join(state_folder(output), ICEBERG_CATALOG_FILE)


def receipts_folder(output: str) -> str:
    return posixpath.join(state_folder(output), RECEIPTS_DIR)


def receipt_name(shard: int) -> str:
    return f"shard-{shard:05d}.json"


def receipt_path(output: str, shard: int) -> str:
    return posixpath.join(receipts_folder(output), receipt_name(shard))


def rejected_folder(output: str) -> str:
    return posixpath.join(state_folder(output), REJECTED_DIR)


def rejected_name(part_name: str) -> str:
    return part_name + REJECTED_SUFFIX


def rejected_path(output: str, part_name: str) -> str:
    """Where the invalid rows of part ``part_name`` go (not a ``*.parquet`` name: see above)."""
    return posixpath.join(rejected_folder(output), rejected_name(part_name))


def challengers_folder(output: str) -> str:
    """Where the challengers' own folders of an output live (``challenger_output: folders``)."""
    return posixpath.join(state_folder(output), CHALLENGERS_DIR)


def challenger_folder(output: str, name: str) -> str:
    """Challenger ``name``'s own folder of parts, named and ordered as the output's."""
    return posixpath.join(challengers_folder(output), name)


def challenger_part_name(part_name: str) -> str:
    """A challenger's part beside the output's part ``part_name``: the same rows of the input."""
    return part_name + CHALLENGER_SUFFIX


def challenger_part_path(output: str, name: str, part_name: str) -> str:
    """Where challenger ``name`` writes its rows of the output's part ``part_name``."""
    return posixpath.join(challenger_folder(output, name), challenger_part_name(part_name))
