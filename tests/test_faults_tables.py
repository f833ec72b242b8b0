"""Faults on table outputs: kill -9 of `commit` while it commits to a Delta table, and of a `run`
at a random point; the table stays at its previous version (readers see the old rows or the new,
never both, never neither) and the retry commits exactly once."""

from __future__ import annotations

import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import deltalake
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from helpers import assert_exact, cli, read_inputs, write_inputs
from test_faults_process import RUN_TIMEOUT, _cli, _finish, _start

pytestmark = [
    pytest.mark.fault,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process groups from /proc"),
]

ROWS = 4_816


def _partition(table: Path, dt: str, version: int | None = None) -> pa.Table:
    rows = deltalake.DeltaTable(str(table), version=version).to_pyarrow_table()
    rows = rows.filter(pc.equal(rows["dt"], dt)).drop_columns(["dt", "predicted_at"])
    return rows.sort_by("customer_id")


def _job(root: Path, inputs: str, *extra: str) -> list[str]:
    return [
        "--input",
        str(root / inputs),
        "--output",
        str(root / "out" / "scores"),
        "--model",
        str(root / "model" / "model.joblib"),
        "--scaler",
        str(root / "model" / "scaler.joblib"),
        "--output-format",
        "delta",
        "--workers",
        "2",
        *extra,
    ]


def _kill_when(args: list[str], ready: Callable[[], bool], delay: float = 0.0) -> bool:
    """Start ``args``; SIGKILL it once ``ready()`` (then ``delay`` s more). Whether it was still running."""
    proc = _start(args)
    deadline = time.monotonic() + RUN_TIMEOUT
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    time.sleep(delay)
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    code, stderr = _finish(proc)
    assert code in ((-signal.SIGKILL, 0) if alive else (0,)), stderr
    return alive and code == -signal.SIGKILL


def test_kill_during_commit_leaves_the_previous_version_and_the_retry_commits_once(
    tmp_path: Path, binary_model_paths
) -> None:
    """A replace of partition dt=1 is planned and scored in two shards; its `commit` is killed just
    as the report is written (before the table commit), 20 ms later (inside the table commit), once
    the new version is there (before the manifest), and at a random moment. After each kill the table is
    at version 0 with the old rows or at version 1 with the new, exactly; the retry then leaves
    exactly version 1 with the new rows: one commit, no row twice."""
    root = tmp_path
    shutil.copytree(binary_model_paths["model"].parent, root / "model")
    old = write_inputs(root / "old", files=2, rows=ROWS, row_group_size=1_500)
    new = write_inputs(root / "new", files=3, rows=ROWS, row_group_size=1_300, seed=41)
    table, state = root / "out" / "scores", root / "out" / "_batchscore" / "scores"
    job = _job(root, "new", "--partition", "dt=1", "--table-mode", "replace")
    plan = root / "plan.json"
    for args in (
        ["run", *_job(root, "old", "--partition", "dt=1")],
        ["plan", *job, "--shards", "2", "--out", str(plan)],
        *[["run", *job, "--plan", str(plan), "--shard", str(i)] for i in range(2)],
    ):
        result = cli(*args)  # in this process: only the commit is struck
        assert result.exit_code == 0, result.stderr
    snapshot = root / "snapshot"
    shutil.copytree(root / "out", snapshot)
    commit = _cli("commit", *job, "--plan", str(plan))
    started = time.monotonic()
    code, stderr = _finish(_start(commit))
    assert code == 0, stderr
    seconds = time.monotonic() - started
    before, after = _partition(table, "1", 0), _partition(table, "1")
    assert_exact(before.sort_by("customer_id"), read_inputs(old), binary_model_paths, passthrough=["customer_id"])
    assert_exact(after, read_inputs(new), binary_model_paths, passthrough=["customer_id"])
    log = table / "_delta_log"
    triggers: list[tuple[str, Callable[[], bool], float]] = [
        ("report written", lambda: (state / "report.json").exists(), 0.0),
        ("just after the report", lambda: (state / "report.json").exists(), 0.02),
        ("version 1 written", lambda: (log / "00000000000000000001.json").exists(), 0.0),
    ]
    rng = random.Random(20261202)
    triggers += [("at random", lambda: True, rng.uniform(0.5 * seconds, seconds))]
    struck = []
    for name, ready, delay in triggers:
        shutil.rmtree(root / "out")
        shutil.copytree(snapshot, root / "out")
        if _kill_when(commit, ready, delay):
            struck.append(name)
        version = deltalake.DeltaTable(str(table)).version()
        seen = _partition(table, "1")
        assert (version, seen) in ((0, before), (1, after)) and seen.equals(before if version == 0 else after), name
        code, stderr = _finish(_start(commit))
        assert code == 0, f"{name}: {stderr}"
        dt = deltalake.DeltaTable(str(table))
        assert dt.version() == 1, name
        assert [h["operation"] for h in dt.history()] == ["WRITE", "CREATE TABLE"], name
        assert _partition(table, "1").equals(after), name
    assert len(struck) >= 2, f"most kills must land on a running commit: {struck}"


def test_kill_run_at_random_then_retry_appends_exactly_once(tmp_path: Path, binary_model_paths) -> None:
    """kill -9 of a `run` appending to a table at random points, then the same command: exactly one
    new version with the run's rows, whether the kill came before or after its commit."""
    root = tmp_path
    shutil.copytree(binary_model_paths["model"].parent, root / "model")
    inputs = write_inputs(root / "in", files=3, rows=ROWS, row_group_size=1_200)
    args = _cli("run", *_job(root, "in", "--partition", "dt=7"))
    started = time.monotonic()
    code, stderr = _finish(_start(args))
    assert code == 0, stderr
    seconds = time.monotonic() - started
    table = root / "out" / "scores"
    rng = random.Random(7)
    for trial in range(2):
        shutil.rmtree(root / "out")
        _kill_when(args, lambda: True, rng.uniform(0.3 * seconds, 1.1 * seconds))
        code, stderr = _finish(_start(args))
        assert code == 0, f"trial {trial}: {stderr}"
        dt = deltalake.DeltaTable(str(table))
        assert dt.version() == 0, trial
        assert_exact(_partition(table, "7"), read_inputs(inputs), binary_model_paths, passthrough=["customer_id"])


def test_a_stalled_store_fails_a_table_commit_within_the_storage_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """An S3 endpoint that accepts connections and never answers: delta-rs gets the job's timeout
    and retries, so opening the table fails within (retries + 1) x timeout plus backoff, in one line."""
    import socket
    import threading

    from batchscore.config import StorageSettings
    from batchscore.errors import StorageError
    from batchscore.io.storage import resolve
    from batchscore.io.tables import committed_version

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[object] = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(16)], daemon=True).start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    where = resolve("s3://bucket/scores", StorageSettings({"endpoint_url": endpoint}, timeout=1.5, retries=1))
    started = time.monotonic()
    with pytest.raises(StorageError) as failed:
        committed_version(where, "s3://bucket/scores/batchscore-run-0123456789abcdef", None, "append")
    assert time.monotonic() - started < 10
    assert "\n" not in str(failed.value) and "cannot read Delta table s3://bucket/scores" in str(failed.value)
    server.close()


@pytest.mark.parametrize("partition", [None, "dt=1"])
def test_kill_during_an_iceberg_commit_leaves_the_previous_snapshot(
    tmp_path: Path, binary_model_paths, partition: str | None
) -> None:
    """The same for an Iceberg output replacing its rows (the whole table's, or one partition's
    beside another's): `commit` killed as the report is written, 20 ms later (the whole table's
    replace only), and as the new table metadata file appears (before the catalog points at it); readers see the old rows or the new,
    exactly (the other partition's untouched), and the retry commits once."""
    from pyiceberg.catalog.sql import SqlCatalog

    root = tmp_path
    shutil.copytree(binary_model_paths["model"].parent, root / "model")
    old = write_inputs(root / "old", files=1, rows=ROWS, row_group_size=1_500)
    new = write_inputs(root / "new", files=2, rows=ROWS, row_group_size=1_300, seed=43)
    table, state = root / "out" / "scores", root / "out" / "_batchscore" / "scores"
    where = ["--partition", partition] if partition else []
    iceberg = ["--output-format", "iceberg", *where, "--model-version"]
    job = [*_job(root, "new")[:-4], *iceberg, "new", "--table-mode", "replace"]
    plan = root / "plan.json"
    beside = (
        [["run", *_job(root, "new")[:-4], "--output-format", "iceberg", "--partition", "dt=2"]] if partition else []
    )
    for args in (
        ["run", *_job(root, "old")[:-4], *iceberg, "old"],
        *beside,
        ["plan", *job, "--shards", "2", "--out", str(plan)],
        *[["run", *job, "--plan", str(plan), "--shard", str(i)] for i in range(2)],
    ):
        result = cli(*args)
        assert result.exit_code == 0, result.stderr
    snapshot = root / "snapshot"
    shutil.copytree(root / "out", snapshot)

    def rows() -> tuple[int, pa.Table]:
        catalog = SqlCatalog("batchscore", uri=f"sqlite:///{state}/iceberg-catalog.db", warehouse=f"file://{root}/out")
        scores = catalog.load_table("batchscore.scores")
        read = scores.scan().to_arrow().drop_columns(["predicted_at"])
        if partition:
            assert_exact(
                read.filter(pc.equal(read["dt"], "2")).sort_by("customer_id"),
                read_inputs(new),
                binary_model_paths,
                passthrough=["customer_id"],
            )
            read = read.filter(pc.equal(read["dt"], "1")).drop_columns(["dt"])
        return len(scores.snapshots()), read.sort_by("customer_id")

    commit = _cli("commit", *job, "--plan", str(plan))
    _, before = rows()
    assert set(before["model_version"].to_pylist()) == {"old"} and before.num_rows == ROWS
    metadata = table / "metadata"
    written = len(list(metadata.glob("*.metadata.json")))
    triggers: list[tuple[str, Callable[[], bool], float]] = [
        ("report written", lambda: (state / "report.json").exists(), 0.0),
        ("just after the report", lambda: (state / "report.json").exists(), 0.02),
        ("new metadata written", lambda: len(list(metadata.glob("*.metadata.json"))) > written, 0.0),
    ][:: 2 if partition else 1]  # a partition's replace: before and inside the commit (time)
    assert_exact(before, read_inputs(old), binary_model_paths, passthrough=["customer_id"])
    struck = []
    for name, ready, delay in triggers:
        shutil.rmtree(root / "out")
        shutil.copytree(snapshot, root / "out")
        if _kill_when(commit, ready, delay):
            struck.append(name)
        count, seen = rows()
        if not seen.equals(before):  # then the new rows, exactly: never some of each
            assert_exact(seen, read_inputs(new), binary_model_paths, passthrough=["customer_id"])
        code, stderr = _finish(_start(commit))
        assert code == 0, f"{name}: {stderr}"
        count, seen = rows()
        # The first job's snapshot, then the whole table's delete and append, or the other
        # partition's append and the partition's one overwrite: once.
        assert count == 3, name
        assert_exact(seen, read_inputs(new), binary_model_paths, passthrough=["customer_id"])
    assert len(struck) >= 2, f"most kills must land on a running commit: {struck}"


def _delivering(root: Path, model_paths: dict[str, Path]) -> Callable[[str, int, int], None]:
    """The job's model copied under ``root``, and ``deliver(name, number, seed)``: input file
    ``name`` written (again) in ``root/in``, ``ROWS`` churn rows from id ``1 + number * ROWS``."""
    import pyarrow.parquet as pq

    from batchscore.sample import churn_table

    shutil.copytree(model_paths["model"].parent, root / "model")
    (root / "in").mkdir()

    def deliver(name: str, number: int, seed: int) -> None:
        table = churn_table(ROWS, seed=seed, first_id=1 + number * ROWS)
        pq.write_table(table, root / "in" / name, row_group_size=1_500)

    return deliver


def test_kill_during_an_incremental_commit_then_the_next_run_scores_exactly_what_was_missing(
    tmp_path: Path, binary_model_paths
) -> None:
    """An incremental `run` that scores a new file and a re-delivered one is killed as its report
    appears (before the table commit), 20 ms later (inside it), and once the new version is there.
    The table is then at version 0 with the old rows or version 1 with the new, exactly; the next
    incremental run scores exactly what was missing: version 1 holds every file once, as a full run
    over the inputs as they stand would, and a run after that finds nothing new."""
    root = tmp_path
    deliver = _delivering(root, binary_model_paths)
    deliver("a.parquet", 0, 1)
    deliver("b.parquet", 1, 2)
    job = _job(root, "in", "--incremental")
    result = cli("run", *job)
    assert result.exit_code == 0, result.stderr
    table, state = root / "out" / "scores", root / "out" / "_batchscore" / "scores"
    before = deltalake.DeltaTable(str(table)).to_pyarrow_table().drop_columns(["predicted_at"]).sort_by("customer_id")
    deliver("b.parquet", 1, 22)  # re-delivered with other values
    deliver("c.parquet", 2, 3)  # new
    inputs = sorted((root / "in").glob("*.parquet"))
    (state / "report.json").unlink()
    snapshot = root / "snapshot"
    shutil.copytree(root / "out", snapshot)
    args = _cli("run", *job)
    log = table / "_delta_log"
    triggers: list[tuple[str, Callable[[], bool], float]] = [
        ("report written", lambda: (state / "report.json").exists(), 0.0),
        ("just after the report", lambda: (state / "report.json").exists(), 0.02),
        ("version 1 written", lambda: (log / "00000000000000000001.json").exists(), 0.0),
    ]
    struck = []
    for name, ready, delay in triggers:
        shutil.rmtree(root / "out")
        shutil.copytree(snapshot, root / "out")
        if _kill_when(args, ready, delay):
            struck.append(name)
        dt = deltalake.DeltaTable(str(table))
        if dt.version() == 0:
            assert dt.to_pyarrow_table().drop_columns(["predicted_at"]).sort_by("customer_id").equals(before), name
        else:
            assert dt.version() == 1, name
        result = cli("run", *job)  # the next run, in this process
        assert result.exit_code == 0, f"{name}: {result.stderr}"
        dt = deltalake.DeltaTable(str(table))
        assert dt.version() == 1, name
        assert_exact(dt.to_pyarrow_table().sort_by("customer_id"), read_inputs(inputs), binary_model_paths)
        again = cli("run", *job)
        assert again.exit_code == 0 and "nothing new to score" in again.stdout, name
    assert len(struck) >= 2, f"most kills must land on a running run: {struck}"


def test_kill_during_an_incremental_iceberg_commit_then_the_next_run_scores_exactly_what_was_missing(
    tmp_path: Path, binary_model_paths
) -> None:
    """The same for an Iceberg output: an incremental `run` scoring a new file and a re-delivered
    one is killed as its record file appears (written before the commit, after the report), as
    the new table metadata file appears (before the catalog points at it), and once committed,
    before its manifest. The table is then at its first snapshot with the old rows or at a second with the new,
    exactly; the next run scores exactly what was missing (two snapshots in all, the table equal to
    a full run over the inputs as they stand) and a run after that finds nothing new."""
    from pyiceberg.catalog.sql import SqlCatalog

    root = tmp_path
    deliver = _delivering(root, binary_model_paths)
    deliver("a.parquet", 0, 1)
    deliver("b.parquet", 1, 2)
    job = [*_job(root, "in")[:-4], "--output-format", "iceberg", "--workers", "2", "--incremental"]
    result = cli("run", *job)
    assert result.exit_code == 0, result.stderr
    table, state = root / "out" / "scores", root / "out" / "_batchscore" / "scores"

    def read() -> tuple[int, pa.Table]:
        catalog = SqlCatalog("batchscore", uri=f"sqlite:///{state}/iceberg-catalog.db")
        scores = catalog.load_table("batchscore.scores")
        return len(scores.snapshots()), scores.scan().to_arrow().sort_by("customer_id")

    _, before = read()
    before = before.drop_columns(["predicted_at"])
    deliver("b.parquet", 1, 22)  # re-delivered with other values
    deliver("c.parquet", 2, 3)  # new
    inputs = sorted((root / "in").glob("*.parquet"))
    (state / "report.json").unlink()
    (state / "manifest.json").unlink()
    snapshot = root / "snapshot"
    shutil.copytree(root / "out", snapshot)
    metadata = table / "metadata"
    written = len(list(metadata.glob("*.metadata.json")))
    args = _cli("run", *job)
    triggers: list[tuple[str, Callable[[], bool], float]] = [
        ("record written", lambda: len(list(table.glob("batchscore-run-*/_batchscore-scored-*"))) > 1, 0.0),
        ("new metadata written", lambda: len(list(metadata.glob("*.metadata.json"))) > written, 0.0),
        ("committed, before the manifest", lambda: (state / "manifest.json").exists(), 0.0),
    ]
    struck, outcomes = [], set()
    for name, ready, delay in triggers:
        shutil.rmtree(root / "out")
        shutil.copytree(snapshot, root / "out")
        if _kill_when(args, ready, delay):
            struck.append(name)
        count, seen = read()
        outcomes.add(count)
        if count == 1:
            assert seen.drop_columns(["predicted_at"]).equals(before), name
        else:
            assert count == 2, name
            assert_exact(seen, read_inputs(inputs), binary_model_paths)
        result = cli("run", *job)  # the next run, in this process
        assert result.exit_code == 0, f"{name}: {result.stderr}"
        count, seen = read()
        assert count == 2, name
        assert_exact(seen, read_inputs(inputs), binary_model_paths)
        again = cli("run", *job)
        assert again.exit_code == 0 and "nothing new to score" in again.stdout, name
    assert len(struck) >= 2, f"most kills must land on a running run: {struck}"
    assert outcomes == {1, 2}, f"kills before the commit and after it: {outcomes}"
