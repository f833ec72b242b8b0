"""Table outputs (output_format: delta): one table version per job, exact rows for every reader,
append and replace of a partition, a rerun that commits nothing twice, local and S3 (moto)."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import deltalake
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from batchscore.errors import EXIT_INPUT, EXIT_USAGE, ConfigError
from batchscore.io.storage import resolve
from batchscore.io.tables import TablePart, commit_delta, delta_storage_options
from helpers import assert_exact, cli, read_inputs, read_manifest, write_inputs

#: Rows per input file: a multiple of 16 (see assert_exact), not a round number.
ROWS = 1_328


def _job(inputs: Path, table: str, model: dict[str, Path], *extra: str) -> list[str]:
    return [
        "--input",
        str(inputs),
        "--output",
        table,
        "--model",
        str(model["model"]),
        "--scaler",
        str(model["scaler"]),
        "--output-format",
        "delta",
        "--workers",
        "2",
        *extra,
    ]


def _run(inputs: Path, table: str, model: dict[str, Path], *extra: str) -> Any:
    result = cli("run", *_job(inputs, table, model, *extra))
    assert result.exit_code == 0, result.stderr
    return result


def _rows(table: pa.Table, dt: str | None = None) -> pa.Table:
    """The rows of partition ``dt`` (all without), in id order, without the partition column."""
    if dt is not None:
        table = table.filter(pc.equal(table["dt"], dt))
    if "dt" in table.column_names:
        table = table.drop_columns(["dt"])
    return table.sort_by("customer_id")


def _history(table: str, **options: Any) -> list[dict[str, Any]]:
    return deltalake.DeltaTable(table, **options).history()


def test_sharded_job_is_one_version_and_every_reader_reads_exactly_its_rows(tmp_path: Path, binary_model_paths) -> None:
    import polars as pl

    first = write_inputs(tmp_path / "a", files=2, rows=ROWS, row_group_size=500)
    second = write_inputs(tmp_path / "b", files=3, rows=ROWS, row_group_size=400, seed=31)
    table = str(tmp_path / "out" / "scores")
    _run(tmp_path / "a", table, binary_model_paths, "--partition", "dt=2026-11-23")
    # The second date as a sharded job: plan, three shards, commit.
    job = _job(tmp_path / "b", table, binary_model_paths, "--partition", "dt=2026-11-24")
    plan = tmp_path / "plan.json"
    assert cli("plan", *job, "--shards", "3", "--out", str(plan)).exit_code == 0
    for shard in range(3):
        result = cli("run", *job, "--plan", str(plan), "--shard", str(shard))
        assert result.exit_code == 0, result.stderr
        assert deltalake.DeltaTable(table).version() == 0, "a shard commits nothing"
    result = cli("commit", *job, "--plan", str(plan))
    assert result.exit_code == 0, result.stderr
    assert "delta version 1" in result.stdout

    dt = deltalake.DeltaTable(table)
    assert dt.version() == 1 and dt.metadata().partition_columns == ["dt"]
    assert [h["operation"] for h in dt.history()] == ["WRITE", "CREATE TABLE"]
    facts = json.loads(dt.history(1)[0]["batchscore"])
    manifest = read_manifest(table)
    assert facts["plan_id"] == manifest["plan_id"] and facts["rows"] == manifest["rows"]
    assert facts["rows"]["out"] == 3 * ROWS and facts["parts"] == len(manifest["parts"])
    assert [a["sha256"] for a in facts["artifacts"]] == [a["sha256"] for a in manifest["artifacts"]]
    assert manifest["table"] == {
        "format": "delta",
        "uri": table,
        "version": 1,
        "mode": "append",
        "partition": "dt=2026-11-24",
        "data_folder": f"dt=2026-11-24/batchscore-run-{facts['content_id']}",
    }
    # The state folder is beside the table, as for a folder output; nothing of it inside.
    assert (tmp_path / "out" / "_batchscore" / "scores" / "manifest.json").exists()
    assert not list(Path(table).rglob("*.json*")) or all("_delta_log" in str(p) for p in Path(table).rglob("*.json"))

    readers = {
        "deltalake": dt.to_pyarrow_table(),
        "polars": pl.read_delta(table).to_arrow(),
        # A reader that knows only the table's file list (as a warehouse's external table does).
        "file list": ds.dataset(
            dt.file_uris(), format="parquet", partitioning="hive", partition_base_dir=table
        ).to_table(),
    }
    schema = readers["deltalake"].schema
    for name, read in readers.items():
        # Polars reads strings as views, the file list reader the partition as a dictionary.
        read = read.select(schema.names).cast(schema)
        assert read.num_rows == 5 * ROWS, name
        assert_exact(_rows(read, "2026-11-23"), read_inputs(first), binary_model_paths)
        assert_exact(_rows(read, "2026-11-24"), read_inputs(second), binary_model_paths)
    before = deltalake.DeltaTable(table, version=0).to_pyarrow_table()
    assert_exact(_rows(before), read_inputs(first), binary_model_paths)
    # A rerun of the committed job scores and commits nothing: no version, no row twice.
    result = cli("run", *job)
    assert result.exit_code == 0, result.stderr
    assert deltalake.DeltaTable(table).version() == 1
    # So does a backfill of it, sharded otherwise, after a later job (its manifest) on the table.
    _run(tmp_path / "a", table, binary_model_paths, "--partition", "dt=2026-11-25")
    later = read_manifest(table)
    assert cli("plan", *job, "--shards", "2", "--out", str(plan)).exit_code == 0
    for shard in range(2):
        result = cli("run", *job, "--plan", str(plan), "--shard", str(shard))
        assert result.exit_code == 0, result.stderr
    result = cli("commit", *job, "--plan", str(plan))
    assert result.exit_code == 0 and "delta version 2" in result.stdout, result.stderr  # the current one holds them
    assert "scored 3,984 of 3,984 rows" in result.stdout
    assert deltalake.DeltaTable(table).version() == 2 and read_manifest(table) == later


def test_replace_a_partition_swaps_exactly_its_rows_in_one_version(tmp_path: Path, binary_model_paths) -> None:
    old = write_inputs(tmp_path / "old", files=2, rows=ROWS, row_group_size=600)
    other = write_inputs(tmp_path / "other", files=1, rows=ROWS, seed=17)
    new = write_inputs(tmp_path / "new", files=1, rows=1_616, row_group_size=700, seed=99)
    table = str(tmp_path / "scores")
    _run(tmp_path / "old", table, binary_model_paths, "--partition", "dt=1")
    _run(tmp_path / "other", table, binary_model_paths, "--partition", "dt=2")
    _run(tmp_path / "new", table, binary_model_paths, "--partition", "dt=1", "--table-mode", "replace")
    dt = deltalake.DeltaTable(table)
    assert dt.version() == 2
    rows = dt.to_pyarrow_table()
    assert rows.num_rows == 1_616 + ROWS
    assert_exact(_rows(rows, "1"), read_inputs(new), binary_model_paths)
    assert_exact(_rows(rows, "2"), read_inputs(other), binary_model_paths)
    assert_exact(
        _rows(deltalake.DeltaTable(table, version=1).to_pyarrow_table(), "1"), read_inputs(old), binary_model_paths
    )
    # A rerun of the same replace commits nothing; going back to the old input replaces again.
    _run(tmp_path / "new", table, binary_model_paths, "--partition", "dt=1", "--table-mode", "replace")
    assert deltalake.DeltaTable(table).version() == 2
    _run(tmp_path / "old", table, binary_model_paths, "--partition", "dt=1", "--table-mode", "replace")
    dt = deltalake.DeltaTable(table)
    assert dt.version() == 3
    assert_exact(_rows(dt.to_pyarrow_table(), "1"), read_inputs(old), binary_model_paths)
    assert _rows(dt.to_pyarrow_table(), "2").num_rows == ROWS
    # Replace without a partition replaces the whole table.
    _run(tmp_path / "new", str(tmp_path / "whole"), binary_model_paths)
    _run(tmp_path / "other", str(tmp_path / "whole"), binary_model_paths, "--table-mode", "replace")
    assert_exact(
        _rows(deltalake.DeltaTable(str(tmp_path / "whole")).to_pyarrow_table()), read_inputs(other), binary_model_paths
    )


def test_table_settings_are_refused_before_anything_is_written(tmp_path: Path, binary_model_paths) -> None:
    write_inputs(tmp_path / "in", files=1, rows=ROWS)
    table = str(tmp_path / "scores")
    # A partition or a mode on a folder output; a malformed partition; a table named like a partition.
    for args, words in (
        (["--output-format", "parquet", "--partition", "dt=1"], "applies to a table output"),
        (["--output-format", "parquet", "--table-mode", "replace"], "applies to a table output"),
        (["--partition", "dt"], "COLUMN=VALUE"),
        (["--partition", "dt=../x"], "COLUMN=VALUE"),
        (["--partition", "dt=2026-11-24T00:00+00:00"], "COLUMN=VALUE"),
    ):
        result = cli("run", *_job(tmp_path / "in", table, binary_model_paths), *args)
        assert result.exit_code == EXIT_USAGE and words in result.stderr, (args, result.stderr)
    result = cli("run", *_job(tmp_path / "in", str(tmp_path / "dt=1"), binary_model_paths))
    assert result.exit_code == EXIT_USAGE and "may not hold '='" in result.stderr, result.stderr
    assert not (tmp_path / "scores").exists() and not (tmp_path / "dt=1").exists()
    # A partition column that is an output column; a table partitioned otherwise; other columns.
    result = cli("run", *_job(tmp_path / "in", table, binary_model_paths, "--partition", "region=eu"))
    assert result.exit_code == EXIT_INPUT and "already has a column 'region'" in result.stderr, result.stderr
    assert not (tmp_path / "scores").exists()
    _run(tmp_path / "in", table, binary_model_paths, "--partition", "dt=1")
    for extra, code, words in (
        ([], EXIT_USAGE, "partitioned by ['dt'], not nothing"),
        (["--partition", "day=1"], EXIT_USAGE, "partitioned by ['dt'], not ['day']"),
        (["--partition", "dt=2", "--keep", "customer_id"], EXIT_INPUT, "other columns than this job writes"),
    ):
        for command in ("validate", "run"):
            result = cli(command, *_job(tmp_path / "in", table, binary_model_paths, *extra))
            assert result.exit_code == code and words in result.stderr, (extra, result.stderr)
    assert deltalake.DeltaTable(table).version() == 0
    assert sorted(p.name for p in Path(table).iterdir()) == ["_delta_log", "dt=1"]


def _racer(args: tuple[str, str, str, int, Any]) -> str:
    """Commit one data folder's file to the table, after the others are ready too."""
    table, folder, name, rows, barrier = args
    where = resolve(table)
    opened = deltalake.DeltaTable(table)  # both read the same version before either commits
    barrier.wait(10)
    try:
        version, new = commit_delta(
            where,
            f"{where.path}/{folder}",
            [TablePart(name, Path(where.path, folder, name).stat().st_size, rows)],
            None,
            "dt=1",
            "replace",
            {"plan_id": folder},
            opened=opened,
        )
        return f"committed {version} {new}"
    except ConfigError as exc:
        return f"refused: {exc}"


@pytest.mark.timeout(120)
def test_racing_commits_one_wins_the_other_is_refused_never_both(tmp_path: Path, binary_model_paths) -> None:
    """Two writers that bypass the lease (another host whose lease expired) commit at once: delta-rs's
    optimistic concurrency lets one commit and refuses the other, for the same plan (its
    application transaction) and for two replaces of one partition."""
    write_inputs(tmp_path / "in", files=1, rows=ROWS)
    table = str(tmp_path / "scores")
    _run(tmp_path / "in", table, binary_model_paths, "--partition", "dt=1")
    base = deltalake.DeltaTable(table)
    [committed] = base.file_uris()
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(2) as pool:
        for trial in range(3):
            outcomes = _race(table, committed, trial, manager, pool)
            version = deltalake.DeltaTable(table).version() - 1
            landed = [o for o in outcomes if o.endswith("True")]
            assert landed == [f"committed {version + 1} True"], outcomes
            loser = next(o for o in outcomes if o not in landed)
            assert loser.startswith("refused: Delta table") and "another writer committed first" in loser, outcomes
            assert deltalake.DeltaTable(table).to_pyarrow_table().num_rows == ROWS


def _race(table: str, committed: str, trial: int, manager: Any, pool: Any) -> list[str]:
    """Two commits at once: of one data folder (trial 0: the same plan twice), else of two
    data folders replacing partition dt=1."""
    folders = [f"dt=1/batchscore-run-{trial:08d}{k:08d}" for k in range(2)]
    for folder in folders:
        Path(table, folder).mkdir(parents=True)
        Path(table, folder, "part-00000-00000.parquet").write_bytes(Path(committed).read_bytes())
    barrier = manager.Barrier(2)
    work = [(table, folders[0 if trial == 0 else k], "part-00000-00000.parquet", ROWS, barrier) for k in range(2)]
    return pool.map(_racer, work, chunksize=1)


def test_s3_table_with_the_jobs_storage_options(tmp_path: Path, s3, binary_model_paths) -> None:
    fs, bucket, options = s3
    inputs = write_inputs(tmp_path / "in", files=2, rows=ROWS, row_group_size=500)
    table = f"s3://{bucket}/tables/scores"
    storage = ["--storage-option", f"endpoint_url={options['endpoint_url']}"]
    _run(tmp_path / "in", table, binary_model_paths, "--partition", "dt=2026-11-24", *storage)
    result = cli("run", *_job(tmp_path / "in", table, binary_model_paths, "--partition", "dt=2026-11-24", *storage))
    assert result.exit_code == 0 and "version 0" in result.stdout, result.stderr
    where = resolve(table, resolve(table).storage.__class__(options))
    dt = deltalake.DeltaTable(table, storage_options=delta_storage_options(where))
    assert dt.version() == 0
    assert_exact(_rows(dt.to_pyarrow_table()), read_inputs(inputs), binary_model_paths)
    assert fs.exists(f"{bucket}/tables/_batchscore/scores/manifest.json")
    assert not [p for p in fs.find(f"{bucket}/tables/scores") if p.rsplit("/", 1)[-1].startswith(".")]


def test_drift_holds_a_table_commit_and_accepting_it_commits_to_the_table(tmp_path: Path, binary_model_paths) -> None:
    """A job held for drift adds no table version; `commit OUTPUT --accept-drift` then commits it
    to the table, with the partition and mode it was run with, from the output alone."""
    import pyarrow.parquet as pq

    reference = write_inputs(tmp_path / "ref", files=1, rows=ROWS)
    shifted = write_inputs(tmp_path / "new", files=1, rows=ROWS, seed=5)
    table = pq.read_table(shifted[0])
    pq.write_table(
        table.set_column(table.schema.get_field_index("age"), "age", pc.multiply(table["age"], 3.0)), shifted[0]
    )
    folder = str(tmp_path / "reference-output")
    result = cli("run", *_job(tmp_path / "ref", folder, binary_model_paths)[:8], "--workers", "1")
    assert result.exit_code == 0, result.stderr
    scores = str(tmp_path / "scores")
    _run(tmp_path / "ref", scores, binary_model_paths, "--partition", "dt=1")
    drift = ["--reference", folder, "--drift-fail", "0.2", "--partition", "dt=2", "--table-mode", "replace"]
    result = cli("run", *_job(tmp_path / "new", scores, binary_model_paths, *drift))
    assert result.exit_code == 5 and "not committed (no new table version)" in result.stderr, result.stderr
    assert deltalake.DeltaTable(scores).version() == 0
    result = cli("commit", scores, "--accept-drift")
    assert result.exit_code == 0 and "delta version 1" in result.stdout, result.stderr
    rows = deltalake.DeltaTable(scores).to_pyarrow_table()
    assert_exact(_rows(rows, "1"), read_inputs(reference), binary_model_paths)
    assert_exact(_rows(rows, "2"), read_inputs(shifted), binary_model_paths)


def test_iceberg_table_append_replace_readers_and_reruns(tmp_path: Path, binary_model_paths) -> None:
    """An Iceberg output in the embedded SQLite catalog: each job one snapshot, a rerun none;
    pyiceberg scans, a file-list dataset and the previous snapshot read exactly the committed rows;
    replace swaps the whole table in one commit."""
    from pyiceberg.catalog.sql import SqlCatalog

    first = write_inputs(tmp_path / "a", files=2, rows=ROWS, row_group_size=500)
    second = write_inputs(tmp_path / "b", files=1, rows=1_616, seed=23)
    table = str(tmp_path / "out" / "scores")
    iceberg = ["--output-format", "iceberg"]

    def job(inputs: str, version: str, *extra: str) -> list[str]:
        return [*_job(tmp_path / inputs, table, binary_model_paths)[:8], *iceberg, "--model-version", version, *extra]

    for args in (job("a", "a"), job("a", "a"), job("b", "b")):
        result = cli("run", *args)
        assert result.exit_code == 0, result.stderr
        assert "iceberg snapshot" in result.stdout and "statistics" not in result.stderr
    catalog = SqlCatalog(
        "batchscore",
        uri=f"sqlite:///{tmp_path}/out/_batchscore/scores/iceberg-catalog.db",
        warehouse=f"file://{tmp_path}",
    )
    scores = catalog.load_table("batchscore.scores")
    snapshots = [s for s in scores.snapshots()]
    assert len(snapshots) == 2, "a rerun adds no snapshot"
    facts = json.loads(snapshots[-1].summary["batchscore"])
    assert facts["rows"]["out"] == 1_616 and facts["model_version"] == "b"
    assert read_manifest(table)["table"]["version"] == snapshots[-1].snapshot_id

    def by_version(rows: pa.Table, version: str) -> pa.Table:
        return rows.filter(pc.equal(rows["model_version"], version)).sort_by("customer_id")

    files = scores.inspect.files().column("file_path").to_pylist()
    readers = {"pyiceberg": scores.scan().to_arrow(), "file list": ds.dataset(files, format="parquet").to_table()}
    for name, rows in readers.items():
        rows = rows.cast(readers["file list"].schema)
        assert rows.num_rows == 2 * ROWS + 1_616, name
        assert_exact(by_version(rows, "a"), read_inputs(first), binary_model_paths)
        assert_exact(by_version(rows, "b"), read_inputs(second), binary_model_paths)
    before = scores.scan(snapshot_id=snapshots[0].snapshot_id).to_arrow()
    assert_exact(by_version(before, "a"), read_inputs(first), binary_model_paths)
    assert before.num_rows == 2 * ROWS
    result = cli("run", *job("b", "c", "--table-mode", "replace"))
    assert result.exit_code == 0, result.stderr
    rows = catalog.load_table("batchscore.scores").scan().to_arrow()
    assert rows.num_rows == 1_616 and set(rows["model_version"].to_pylist()) == {"c"}
    assert_exact(rows.sort_by("customer_id"), read_inputs(second), binary_model_paths)
    result = cli("run", *job("b", "c", "--partition", "dt=1"))
    assert result.exit_code == EXIT_USAGE and "is partitioned by nothing, not ['dt']" in result.stderr, result.stderr


def test_iceberg_partitions_replace_and_append_exactly_their_rows(tmp_path: Path, binary_model_paths) -> None:
    """A partitioned Iceberg table (identity of dt, its values in the manifests, not the parts):
    replace swaps exactly one partition's rows in one snapshot, append adds to one; pyiceberg (a
    filtered scan too), a Hive-style file-list dataset and the previous snapshot read exactly the
    committed rows; a rerun commits nothing; another partitioning is refused before scoring."""
    from pyiceberg.catalog.sql import SqlCatalog

    old = write_inputs(tmp_path / "old", files=2, rows=ROWS, row_group_size=600)
    other = write_inputs(tmp_path / "other", files=1, rows=ROWS, seed=17)
    new = write_inputs(tmp_path / "new", files=1, rows=1_616, row_group_size=700, seed=99)
    table = str(tmp_path / "out" / "scores")

    def run(inputs: str, *extra: str) -> Any:
        args = [*_job(tmp_path / inputs, table, binary_model_paths)[:8], "--output-format", "iceberg", *extra]
        return cli("run", *args)

    def scores() -> Any:
        uri = f"sqlite:///{tmp_path}/out/_batchscore/scores/iceberg-catalog.db"
        return SqlCatalog("batchscore", uri=uri).load_table("batchscore.scores")

    for inputs, extra in (("old", ["dt=1"]), ("other", ["dt=2"]), ("new", ["dt=1", "--table-mode", "replace"])):
        result = run(inputs, "--partition", *extra)
        assert result.exit_code == 0, result.stderr
    current = scores()
    assert [str(f.transform) for f in current.spec().fields] == ["identity"]
    snapshots = current.snapshots()
    assert len(snapshots) == 3 and current.current_snapshot().summary.operation.value == "overwrite"
    files = current.inspect.files().column("file_path").to_pylist()
    readers = {
        "pyiceberg": current.scan().to_arrow(),
        "file list": ds.dataset(files, format="parquet", partitioning="hive", partition_base_dir=table).to_table(),
    }
    for name, rows in readers.items():
        rows = rows.cast(readers["pyiceberg"].schema)
        assert rows.num_rows == 1_616 + ROWS, name
        assert_exact(_rows(rows, "1"), read_inputs(new), binary_model_paths)
        assert_exact(_rows(rows, "2"), read_inputs(other), binary_model_paths)
    assert_exact(_rows(current.scan(row_filter="dt == '1'").to_arrow()), read_inputs(new), binary_model_paths)
    before = current.scan(snapshot_id=snapshots[1].snapshot_id).to_arrow()
    assert_exact(_rows(before, "1"), read_inputs(old), binary_model_paths)
    assert _rows(before, "2").num_rows == ROWS

    # A rerun of the replace commits nothing; going back to the old input replaces again.
    assert run("new", "--partition", "dt=1", "--table-mode", "replace").exit_code == 0
    assert len(scores().snapshots()) == 3
    assert run("old", "--partition", "dt=1", "--table-mode", "replace").exit_code == 0
    rows = scores().scan().to_arrow()
    assert_exact(_rows(rows, "1"), read_inputs(old), binary_model_paths)
    # Append adds to its partition only.
    assert run("new", "--partition", "dt=2", "--model-version", "appended").exit_code == 0
    rows = _rows(scores().scan().to_arrow(), "2")
    appended = pc.equal(rows["model_version"], "appended")
    assert_exact(rows.filter(appended), read_inputs(new), binary_model_paths)
    assert_exact(rows.filter(pc.invert(appended)), read_inputs(other), binary_model_paths)
    assert _rows(scores().scan().to_arrow(), "1").num_rows == 2 * ROWS and len(scores().snapshots()) == 5

    # Another partitioning, or none, is refused before anything is scored; so is a partition
    # column that is also an output column.
    for extra, code, says in (
        ([], EXIT_USAGE, "is partitioned by identity(dt), not nothing"),
        (["--partition", "day=1"], EXIT_USAGE, "not ['day']"),
        (["--partition", "customer_id=1"], EXIT_INPUT, "the output already has a column 'customer_id'"),
    ):
        result = run("new", *extra)
        assert result.exit_code == code and says in result.stderr, result.stderr
    assert len(scores().snapshots()) == 5


def test_two_replaces_of_one_iceberg_partition_from_one_snapshot_one_is_refused(
    tmp_path: Path, binary_model_paths
) -> None:
    """Two replaces of one partition that loaded the same metadata (writers that bypassed the
    lease): the second is refused (exit 2, nothing committed) rather than rebased onto the first,
    which would leave both jobs' rows in the partition."""
    from pyiceberg.catalog.sql import SqlCatalog

    from batchscore.io.iceberg import commit_iceberg

    write_inputs(tmp_path / "in", files=1, rows=ROWS)
    table = str(tmp_path / "out" / "scores")
    args = [*_job(tmp_path / "in", table, binary_model_paths)[:8], "--output-format", "iceberg", "--partition", "dt=1"]
    assert cli("run", *args).exit_code == 0
    catalog = SqlCatalog("batchscore", uri=f"sqlite:///{tmp_path}/out/_batchscore/scores/iceberg-catalog.db")
    [committed] = catalog.load_table("batchscore.scores").inspect.files().column("file_path").to_pylist()
    first, second = catalog.load_table("batchscore.scores"), catalog.load_table("batchscore.scores")
    outcomes = []
    for k, opened in enumerate((first, second)):
        folder = Path(table, "dt=1", f"batchscore-run-{k:016d}")
        folder.mkdir(parents=True)
        (folder / "part-00000-00000.parquet").write_bytes(Path(committed.removeprefix("file://")).read_bytes())
        part = TablePart("part-00000-00000.parquet", (folder / "part-00000-00000.parquet").stat().st_size, ROWS)
        try:
            commit_iceberg(
                resolve(table), str(folder), [part], None, "replace", {"plan_id": str(k)}, None, None,
                opened=opened, partition="dt=1",
            )  # fmt: skip
            outcomes.append("committed")
        except ConfigError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == "committed" and "another writer committed first" in outcomes[1], outcomes
    files = catalog.load_table("batchscore.scores").inspect.files().column("file_path").to_pylist()
    assert len(files) == 1 and "/dt=1/batchscore-run-0000000000000000/" in files[0], files
