"""Incremental runs into a Delta table: after each delivery the table holds exactly what a full run
over the inputs as they stand would (row for row, value for value), scoring only what changed."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import deltalake
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from batchscore.errors import EXIT_USAGE, ConfigError
from batchscore.io.storage import resolve
from batchscore.io.tables import SCORED_KEY, Incremental, TablePart, commit_delta, decode_record, scored_record
from batchscore.sample import FEATURES, churn_table
from helpers import assert_exact, cli, save, training_frame

#: Rows per input file: a multiple of 16 (see assert_exact), not a round number.
ROWS = 1_328


def _deliver(inputs: Path, name: str, number: int, seed: int) -> Path:
    """One input file of ROWS rows, its ids its own (``number`` picks them)."""
    path = inputs / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(churn_table(ROWS, seed=seed, first_id=1 + number * ROWS), path, row_group_size=500)
    return path


def _run(inputs: Path, table: str, model: dict[str, Path], *extra: str) -> Any:
    args = ["--input", str(inputs), "--output", table, "--model", str(model["model"]), "--scaler"]
    args += [str(model["scaler"]), "--output-format", "delta", "--incremental", *extra]
    result = cli("run", *args)
    assert result.exit_code == 0, result.stderr
    return result


def _table_rows(table: str) -> pa.Table:
    return deltalake.DeltaTable(table).to_pyarrow_table().sort_by("customer_id")


def _assert_full(table: str, inputs: Path, model: dict[str, Path]) -> None:
    """The table equals a full run over every input file as it stands now."""
    current = pa.concat_tables(pq.read_table(p) for p in sorted(inputs.rglob("*.parquet")))
    assert_exact(_table_rows(table), current.sort_by("customer_id"), model)


def _last_facts(table: str) -> dict[str, Any]:
    return json.loads(deltalake.DeltaTable(table).history(1)[0]["batchscore"])


def _other_model(folder: Path) -> dict[str, Path]:
    frame = training_frame(seed=11)
    scaler = StandardScaler().fit(frame[list(FEATURES)])
    model = LogisticRegression(C=0.05).fit(scaler.transform(frame[list(FEATURES)]), frame["churned"])
    return save(folder, model=model, scaler=scaler)


def test_each_delivery_leaves_the_table_equal_to_a_full_run(tmp_path: Path, binary_model_paths) -> None:
    inputs, table = tmp_path / "in", str(tmp_path / "out" / "scores")
    _deliver(inputs, "dt=2026-11-20/a.parquet", 0, seed=1)
    b = _deliver(inputs, "dt=2026-11-20/b.parquet", 1, seed=2)
    _run(inputs, table, binary_model_paths)
    _assert_full(table, inputs, binary_model_paths)
    assert _last_facts(table)["inputs"] == 2

    # Nothing new: nothing is scored or committed, and the run says so.
    result = _run(inputs, table, binary_model_paths)
    assert "nothing new to score" in result.stdout
    assert deltalake.DeltaTable(table).version() == 0

    # A new date, and a late file for the old date: only those two are scored.
    _deliver(inputs, "dt=2026-11-21/c.parquet", 2, seed=3)
    _deliver(inputs, "dt=2026-11-20/late.parquet", 3, seed=4)
    _run(inputs, table, binary_model_paths)
    _assert_full(table, inputs, binary_model_paths)
    assert _last_facts(table)["inputs"] == 2 and deltalake.DeltaTable(table).version() == 1

    # A re-delivered file with new contents (same ids, other values): its old rows are replaced.
    before = os.stat(b)
    _deliver(inputs, "dt=2026-11-20/b.parquet", 1, seed=22)
    assert os.stat(b).st_mtime_ns != before.st_mtime_ns or os.stat(b).st_size != before.st_size
    _run(inputs, table, binary_model_paths)
    _assert_full(table, inputs, binary_model_paths)
    assert _last_facts(table)["inputs"] == 1
    history = deltalake.DeltaTable(table).history(1)[0]
    assert history["operation"] == "WRITE"

    # Another model: every file is rescored, every old row replaced, in one commit.
    other = _other_model(tmp_path / "model-2")
    _run(inputs, table, other)
    _assert_full(table, inputs, other)
    assert _last_facts(table)["inputs"] == 4
    versions = deltalake.DeltaTable(table).version()

    # The record is compact: one entry per input file, all pointing at the last commit's folder.
    record = decode_record(deltalake.DeltaTable(table).history(1)[0][SCORED_KEY])
    assert sorted(record) == sorted(str(p) for p in inputs.rglob("*.parquet"))
    assert len({s.folder for s in record.values()}) == 1 and len({s.key for s in record.values()}) == 1

    # The previous version (time travel) still holds the first model's rows of every file.
    previous = deltalake.DeltaTable(table, version=versions - 1).to_pyarrow_table().sort_by("customer_id")
    assert previous.num_rows == 4 * ROWS

    # A scoring setting that changes the rows (the model version they carry), the same model bytes
    # and inputs: every file is rescored, its rows replaced, none twice.
    _run(inputs, table, other, "--model-version", "2.0")
    _assert_full(table, inputs, other)
    assert set(_table_rows(table)["model_version"].to_pylist()) == {"2.0"}

    # --full-refresh rescores everything, in one commit, and the table still equals a full run.
    _run(inputs, table, other, "--full-refresh")
    _assert_full(table, inputs, other)
    assert set(_table_rows(table)["model_version"].to_pylist()) == {"unversioned"}


def test_plan_lists_each_file_as_score_skip_or_rescore(tmp_path: Path, binary_model_paths, caplog) -> None:
    inputs, table = tmp_path / "in", str(tmp_path / "out" / "scores")
    _deliver(inputs, "a.parquet", 0, seed=1)
    b = _deliver(inputs, "b.parquet", 1, seed=2)
    _run(inputs, table, binary_model_paths)
    _deliver(inputs, "b.parquet", 1, seed=5)
    _deliver(inputs, "c.parquet", 2, seed=6)
    job = ["--input", str(inputs), "--output", table, "--model", str(binary_model_paths["model"])]
    job += ["--scaler", str(binary_model_paths["scaler"]), "--output-format", "delta", "--incremental"]
    with caplog.at_level("INFO"):
        result = cli("plan", *job)
    assert result.exit_code == 0, result.stderr
    lines = caplog.text
    assert f"skip {inputs / 'a.parquet'}: scored already, unchanged" in lines
    assert f"rescore {b}: the file changed (" in lines
    assert f"score {inputs / 'c.parquet'}: not scored yet" in lines
    planned = json.loads(result.stdout)
    assert [f[0] for f in planned["files"]] == [str(b), str(inputs / "c.parquet")]


def test_incremental_is_refused_where_it_cannot_be_recorded_with_the_data(tmp_path: Path) -> None:
    result = cli(
        "validate", "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--model", "m.joblib",
        "--output-format", "parquet", "--incremental",
    )  # fmt: skip
    assert result.exit_code == EXIT_USAGE
    assert "--incremental needs --output-format delta or iceberg" in result.stderr
    assert "cannot record which files it scored atomically" in result.stderr


class _Requests(logging.Handler):
    """The S3 requests the loopback server answered (its werkzeug request log), as (method, path)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r'"([A-Z]+) (\S+) HTTP', record.getMessage())
        if found:
            self.seen.append((found.group(1), found.group(2)))


def test_on_s3_a_run_with_nothing_new_reads_no_input_file(tmp_path: Path, s3, binary_model_paths) -> None:
    """An incremental run over unchanged S3 input lists the prefix and reads the table's log: not one
    GET or HEAD of an input object (no footer, no data page). A re-delivered object is the only one
    read by the next run."""
    fs, bucket, options = s3
    for i in range(23):
        churn = churn_table(48, seed=i, first_id=1 + i * 48)
        with fs.open(f"{bucket}/in/dt=2026-11-2{i % 3}/f{i:03d}.parquet", "wb") as fh:
            pq.write_table(churn, fh)
    table = f"s3://{bucket}/tables/scores"
    storage = ["--storage-option", f"endpoint_url={options['endpoint_url']}"]
    _run(f"s3://{bucket}/in/", table, binary_model_paths, *storage)
    requests = _Requests()
    server_log = logging.getLogger("werkzeug")
    level = server_log.level
    server_log.addHandler(requests)
    server_log.setLevel(logging.INFO)
    try:
        result = _run(f"s3://{bucket}/in/", table, binary_model_paths, *storage)
        assert "nothing new to score" in result.stdout
        inputs_read = [(m, p) for m, p in requests.seen if p.startswith(f"/{bucket}/in/") and m in ("GET", "HEAD")]
        assert requests.seen and not inputs_read, inputs_read
        assert any(m == "GET" and "list-type=2" in p for m, p in requests.seen), "the prefix is listed"
        requests.seen.clear()
        with fs.open(f"{bucket}/in/dt=2026-11-21/f007.parquet", "wb") as fh:
            pq.write_table(churn_table(48, seed=99, first_id=1 + 7 * 48), fh)
        result = _run(f"s3://{bucket}/in/", table, binary_model_paths, *storage)
        read = {p.split("?")[0] for m, p in requests.seen if p.startswith(f"/{bucket}/in/") and m in ("GET", "HEAD")}
        assert read == {f"/{bucket}/in/dt=2026-11-21/f007.parquet"}, read
    finally:
        server_log.removeHandler(requests)
        server_log.setLevel(level)


def test_incremental_refuses_to_replace_the_table(tmp_path: Path, binary_model_paths) -> None:
    _deliver(tmp_path / "in", "a.parquet", 0, seed=1)
    job = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out" / "t"), "--output-format", "delta"]
    job += ["--model", str(binary_model_paths["model"]), "--scaler", str(binary_model_paths["scaler"])]
    job += ["--incremental", "--table-mode", "replace"]
    result = cli("run", *job)
    assert result.exit_code == EXIT_USAGE and "--table-mode replace would drop the rest" in result.stderr
    assert not (tmp_path / "out" / "t").exists()


def test_a_sharded_incremental_job_commits_what_its_plan_scores(tmp_path: Path, binary_model_paths) -> None:
    """plan --out names only the files to score; its shards and commit hold to it, the other input
    files being the table's already; shards planned on the fly are refused."""
    inputs, table = tmp_path / "in", str(tmp_path / "out" / "scores")
    _deliver(inputs, "a.parquet", 0, seed=1)
    _run(inputs, table, binary_model_paths)
    _deliver(inputs, "b.parquet", 1, seed=2)
    _deliver(inputs, "c.parquet", 2, seed=3)
    job = ["--input", str(inputs), "--output", table, "--model", str(binary_model_paths["model"])]
    job += ["--scaler", str(binary_model_paths["scaler"]), "--output-format", "delta", "--incremental"]
    refused = cli("run", *job, "--shard", "0/2")
    assert refused.exit_code == EXIT_USAGE and "need a plan file" in refused.stderr
    plan = tmp_path / "plan.json"
    assert cli("plan", *job, "--shards", "2", "--out", str(plan)).exit_code == 0
    for shard in range(2):
        result = cli("run", *job, "--plan", str(plan), "--shard", str(shard))
        assert result.exit_code == 0, result.stderr
    result = cli("commit", *job, "--plan", str(plan))
    assert result.exit_code == 0, result.stderr
    _assert_full(table, inputs, binary_model_paths)
    assert _last_facts(table)["inputs"] == 2
    assert "nothing new to score" in _run(inputs, table, binary_model_paths).stdout


def test_two_incremental_commits_from_one_version_one_is_refused(tmp_path: Path, binary_model_paths) -> None:
    """Two incremental commits that read the same table version (writers that bypassed the lease)
    each add another file's rows with a record that lacks the other's: the second is refused
    (exit 2, nothing committed), so no record forgets rows the table holds."""
    inputs, table = tmp_path / "in", str(tmp_path / "out" / "scores")
    _deliver(inputs, "a.parquet", 0, seed=1)
    _run(inputs, table, binary_model_paths)
    [committed] = deltalake.DeltaTable(table).file_uris()
    where = resolve(table)
    first, second = deltalake.DeltaTable(table), deltalake.DeltaTable(table)
    outcomes = []
    for k, opened in enumerate((first, second)):
        folder = Path(table, f"batchscore-run-{k:016d}")
        folder.mkdir()
        (folder / "part-00000-00000.parquet").write_bytes(Path(committed).read_bytes())
        scored = {str(inputs / f"new-{k}.parquet"): ({"size": 1, "mtime_ns": k}, 0)}
        part = TablePart("part-00000-00000.parquet", (folder / "part-00000-00000.parquet").stat().st_size, ROWS)
        try:
            commit_delta(
                where, str(folder), [part], None, None, "append", {"plan_id": str(k)}, opened=opened,
                incremental=Incremental(scored, "k" * 16),
            )  # fmt: skip
            outcomes.append("committed")
        except ConfigError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == "committed" and "another writer committed first" in outcomes[1], outcomes
    dt = deltalake.DeltaTable(table)
    assert dt.version() == 1 and dt.to_pyarrow_table().num_rows == 2 * ROWS
    assert sorted(scored_record(where)) == sorted([str(inputs / "a.parquet"), str(inputs / "new-0.parquet")])
