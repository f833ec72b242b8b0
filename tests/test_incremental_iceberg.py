"""Incremental runs into an Iceberg table (embedded SQLite catalog): after each delivery the table
holds exactly what a full run over the inputs as they stand would, each commit one snapshot whose
summary points to the record it wrote, and nothing new commits nothing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.errors import EXIT_USAGE, ConfigError
from batchscore.io.iceberg import SCORED_KEY, SCORED_SHA256_KEY, commit_iceberg, scored_record
from batchscore.io.scored import Incremental, record_from_bytes
from batchscore.io.storage import resolve
from batchscore.io.tables import TablePart
from helpers import assert_exact, cli
from test_incremental import ROWS, _deliver, _other_model


def _run(inputs: Path, table: str, model: dict[str, Path], *extra: str) -> Any:
    args = ["--input", str(inputs), "--output", table, "--model", str(model["model"]), "--scaler"]
    args += [str(model["scaler"]), "--output-format", "iceberg", "--incremental", *extra]
    result = cli("run", *args)
    assert result.exit_code == 0, result.stderr
    return result


def _table(table: str) -> Any:
    from pyiceberg.catalog.sql import SqlCatalog

    parent, name = os.path.split(table)
    catalog = SqlCatalog("batchscore", uri=f"sqlite:///{parent}/_batchscore/{name}/iceberg-catalog.db")
    return catalog.load_table(f"batchscore.{name}")


def _rows(table: str, snapshot: int | None = None) -> pa.Table:
    return _table(table).scan(snapshot_id=snapshot).to_arrow().sort_by("customer_id")


def _assert_full(table: str, inputs: Path, model: dict[str, Path]) -> None:
    """The table equals a full run over every input file as it stands now."""
    current = pa.concat_tables(pq.read_table(p) for p in sorted(inputs.rglob("*.parquet")))
    assert_exact(_rows(table), current.sort_by("customer_id"), model)


def _summary(table: str) -> dict[str, str]:
    return dict(_table(table).current_snapshot().summary.additional_properties)


def test_each_delivery_leaves_the_iceberg_table_equal_to_a_full_run(tmp_path: Path, binary_model_paths) -> None:
    inputs, table = tmp_path / "in", str(tmp_path / "out" / "scores")
    _deliver(inputs, "dt=2026-11-20/a.parquet", 0, seed=1)
    b = _deliver(inputs, "dt=2026-11-20/b.parquet", 1, seed=2)
    _run(inputs, table, binary_model_paths)
    _assert_full(table, inputs, binary_model_paths)
    assert len(_table(table).snapshots()) == 1 and json.loads(_summary(table)["batchscore"])["inputs"] == 2

    # Nothing new: nothing is scored or committed (no empty snapshot), and the run says so.
    result = _run(inputs, table, binary_model_paths)
    assert "nothing new to score" in result.stdout
    assert len(_table(table).snapshots()) == 1

    # A new date, and a late file for the old date: only those two are scored.
    _deliver(inputs, "dt=2026-11-21/c.parquet", 2, seed=3)
    _deliver(inputs, "dt=2026-11-20/late.parquet", 3, seed=4)
    _run(inputs, table, binary_model_paths)
    _assert_full(table, inputs, binary_model_paths)
    assert len(_table(table).snapshots()) == 2 and json.loads(_summary(table)["batchscore"])["inputs"] == 2

    # A re-delivered file with new contents: its old rows are replaced in the same snapshot.
    _deliver(inputs, "dt=2026-11-20/b.parquet", 1, seed=22)
    _run(inputs, table, binary_model_paths)
    _assert_full(table, inputs, binary_model_paths)
    summary = _table(table).current_snapshot().summary
    assert summary.operation.value == "overwrite" and summary["deleted-records"] == summary["added-records"] == str(
        ROWS
    )
    assert len(_table(table).snapshots()) == 3 and json.loads(summary["batchscore"])["inputs"] == 1

    # Another model: every file is rescored, every old row replaced, in one snapshot.
    other = _other_model(tmp_path / "model-2")
    _run(inputs, table, other)
    _assert_full(table, inputs, other)
    snapshots = _table(table).snapshots()
    assert len(snapshots) == 4 and json.loads(_summary(table)["batchscore"])["inputs"] == 4

    # The summary points to the record (path and sha256), which is one compact entry per input
    # file; no summary holds the record itself, so the metadata does not grow with it.
    summary = _summary(table)
    record_file = Path(table, summary[SCORED_KEY])
    data = record_file.read_bytes()
    assert hashlib.sha256(data).hexdigest() == summary[SCORED_SHA256_KEY]
    record = record_from_bytes(data)
    assert sorted(record) == sorted(str(p) for p in inputs.rglob("*.parquet"))
    assert len({s.folder for s in record.values()}) == 1 and len({s.key for s in record.values()}) == 1
    assert all(len(json.dumps(dict(s.summary.additional_properties))) < 2_000 for s in snapshots)

    # The previous snapshot still holds the first model's rows of every file, the record it
    # pointed to unchanged.
    previous = _rows(table, snapshots[-2].snapshot_id)
    assert previous.num_rows == 4 * ROWS

    # A setting that changes the rows, the same model bytes and inputs (the same data folder):
    # every file rescored, none twice.
    _run(inputs, table, other, "--model-version", "2.0")
    _assert_full(table, inputs, other)
    assert set(_rows(table)["model_version"].to_pylist()) == {"2.0"}

    # --full-refresh rescores everything, in one snapshot, and the table still equals a full run.
    os.remove(b)  # a file no longer listed: its rows stay until a full refresh drops them
    _run(inputs, table, other, "--full-refresh")
    _assert_full(table, inputs, other)
    assert set(_rows(table)["model_version"].to_pylist()) == {"unversioned"}
    assert _rows(table).num_rows == 3 * ROWS


def test_two_incremental_iceberg_commits_from_one_snapshot_one_is_refused(tmp_path: Path, binary_model_paths) -> None:
    """Two incremental commits that loaded the same metadata (writers that bypassed the lease),
    each adding another file's rows with a record that lacks the other's: the catalog refuses the
    second (exit 2, nothing committed), so no record forgets rows the table holds."""
    inputs, table = tmp_path / "in", str(tmp_path / "out" / "scores")
    _deliver(inputs, "a.parquet", 0, seed=1)
    _run(inputs, table, binary_model_paths)
    [committed] = _table(table).inspect.files().column("file_path").to_pylist()
    where = resolve(table)
    first, second = _table(table), _table(table)
    outcomes = []
    for k, opened in enumerate((first, second)):
        folder = Path(table, f"batchscore-run-{k:016d}")
        folder.mkdir()
        (folder / "part-00000-00000.parquet").write_bytes(Path(committed.removeprefix("file://")).read_bytes())
        scored = {str(inputs / f"new-{k}.parquet"): ({"size": 1, "mtime_ns": k}, 0)}
        part = TablePart("part-00000-00000.parquet", (folder / "part-00000-00000.parquet").stat().st_size, ROWS)
        try:
            commit_iceberg(
                where, str(folder), [part], None, "append", {"plan_id": str(k)}, None, None,
                incremental=Incremental(scored, "k" * 16), opened=opened,
            )  # fmt: skip
            outcomes.append("committed")
        except ConfigError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == "committed" and "another writer committed first" in outcomes[1], outcomes
    assert len(_table(table).snapshots()) == 2 and _rows(table).num_rows == 2 * ROWS
    assert "commit.retry.num-retries" not in _table(table).properties, "the table's own settings are left alone"
    assert sorted(scored_record(where, None, None)) == sorted(
        [str(inputs / "a.parquet"), str(inputs / "new-0.parquet")]
    )


@pytest.mark.fault
@pytest.mark.parametrize("damage", ["removed", "rewritten"])
def test_a_lost_or_altered_record_is_refused_and_a_full_refresh_rescores(
    tmp_path: Path, binary_model_paths, damage: str
) -> None:
    """The file the current snapshot points to, gone or not the bytes its sha256 names: an
    incremental run exits 2 naming it and --full-refresh (nothing committed, the snapshot kept);
    --full-refresh then rescores every file, the table equal to a full run."""
    inputs, table = tmp_path / "in", str(tmp_path / "out" / "scores")
    _deliver(inputs, "a.parquet", 0, seed=1)
    _run(inputs, table, binary_model_paths)
    _deliver(inputs, "b.parquet", 1, seed=2)
    record = Path(table, _summary(table)[SCORED_KEY])
    if damage == "removed":
        record.unlink()
    else:
        record.write_bytes(record.read_bytes()[:-1] + b"\0")
    args = ["--input", str(inputs), "--output", table, "--model", str(binary_model_paths["model"]), "--scaler"]
    args += [str(binary_model_paths["scaler"]), "--output-format", "iceberg", "--incremental"]
    result = cli("run", *args)
    assert result.exit_code == EXIT_USAGE and str(record) in result.stderr and "--full-refresh" in result.stderr
    assert len(_table(table).snapshots()) == 1
    _run(inputs, table, binary_model_paths, "--full-refresh")
    _assert_full(table, inputs, binary_model_paths)
    assert "nothing new to score" in _run(inputs, table, binary_model_paths).stdout


def test_on_s3_through_a_named_catalog(tmp_path: Path, s3, binary_model_paths, monkeypatch: pytest.MonkeyPatch) -> None:
    """An Iceberg table on S3 through a named SQL catalog: a new file and a re-delivered one after
    a first run are all the second run scores, the record written beside the parts on S3 and read
    back by the next run, which finds nothing new."""
    fs, bucket, options = s3
    catalog = {
        "TYPE": "sql",
        "URI": f"sqlite:///{tmp_path}/catalog.db",
        "WAREHOUSE": f"s3://{bucket}/warehouse",
        "S3__ENDPOINT": options["endpoint_url"],
        "S3__ACCESS_KEY_ID": "testing",
        "S3__SECRET_ACCESS_KEY": "testing",
        "S3__REGION": "us-east-1",
    }
    for key, value in catalog.items():
        monkeypatch.setenv(f"PYICEBERG_CATALOG__LAKE__{key}", value)
    from pyiceberg.utils.config import Config

    monkeypatch.setattr("pyiceberg.catalog._ENV_CONFIG", Config())  # pyiceberg reads its variables once, on import

    def deliver(name: str, number: int, seed: int) -> None:
        local = _deliver(tmp_path / "staged", name, number, seed)
        fs.put(str(local), f"{bucket}/in/{name}")

    deliver("a.parquet", 0, 1)
    deliver("b.parquet", 1, 2)
    table = f"s3://{bucket}/tables/scores"
    extra = ["--storage-option", f"endpoint_url={options['endpoint_url']}", "--iceberg-catalog", "lake"]
    _run(f"s3://{bucket}/in/", table, binary_model_paths, *extra)
    deliver("b.parquet", 1, 22)
    deliver("c.parquet", 2, 3)
    _run(f"s3://{bucket}/in/", table, binary_model_paths, *extra)
    from pyiceberg.catalog import load_catalog

    scores = load_catalog("lake").load_table("batchscore.scores")
    assert len(scores.snapshots()) == 2
    pointer = dict(scores.current_snapshot().summary.additional_properties)[SCORED_KEY]
    assert fs.exists(f"{bucket}/tables/scores/{pointer}")
    current = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "staged").glob("*.parquet")))
    assert_exact(scores.scan().to_arrow().sort_by("customer_id"), current.sort_by("customer_id"), binary_model_paths)
    assert "nothing new to score" in _run(f"s3://{bucket}/in/", table, binary_model_paths, *extra).stdout
