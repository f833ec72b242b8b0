"""One output, one writer: the lease on the output, tried with real processes, files and S3."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from batchscore.config import StorageSettings
from batchscore.errors import EXIT_INPUT, EXIT_USAGE
from batchscore.io.layout import lease_path
from batchscore.io.lease import Lease, LeaseRecord, OutputBusyError, plan_holder, run_holder
from batchscore.io.storage import resolve
from helpers import (
    assert_exact,
    binary_model,
    cli,
    multiclass_model,
    plan_file,
    read_inputs,
    read_manifest,
    read_output,
    write_inputs,
    writing_a_part,
)

#: Rows in the racing jobs' input: enough that scoring takes a second or more on a busy machine.
RACE_ROWS_PER_FILE = 8_016


@pytest.fixture(scope="module")
def race_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], pa.Table, dict[str, dict[str, Path]]]:
    """Input files, their table, and two models that score them differently."""
    root = tmp_path_factory.mktemp("race")
    inputs = write_inputs(root / "in", files=6, rows=RACE_ROWS_PER_FILE, row_group_size=4_000, seed=21)
    models = {"logistic": binary_model(root / "logistic"), "boosting": multiclass_model(root / "boosting")}
    return inputs, read_inputs(inputs), models


def _argv(command: str, inputs: list[Path], out: Path | str, model: dict[str, Path], *extra: str) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "batchscore",
        command,
        "--output",
        str(out),
        "--model",
        str(model["model"]),
        "--scaler",
        str(model["scaler"]),
        "--workers",
        "1",
    ]
    for path in inputs:
        args += ["--input", str(path)]
    return args + list(extra)


def _start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen[str], timeout: float = 180) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc)
    return proc.returncode, err


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _wait_for(predicate, timeout: float, what: str) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        time.sleep(0.02)


def _start_writing(argv: list[str], out: Path) -> subprocess.Popen[str]:
    """A run started and caught in the middle of writing a part into ``out``."""
    proc = _start(argv)
    try:
        _wait_for(lambda: writing_a_part(out), 60, "a part being written")
    except BaseException:
        _kill_group(proc)
        raise
    assert proc.poll() is None
    return proc


def _committed_model(out: Path, models: dict[str, dict[str, Path]]) -> str:
    manifest = read_manifest(out)
    uris = {a["uri"] for a in manifest["artifacts"]}
    [name] = [n for n, paths in models.items() if str(paths["model"]) in uris]
    return name


def _lease(out: Path) -> dict:
    return json.loads(Path(lease_path(str(out))).read_text())


@pytest.mark.fault
def test_racing_runs_commit_one_model_whole(race_job, tmp_path: Path) -> None:
    """Two `run --overwrite` jobs with different models on one output, 0-0.2 s apart, 10 times;
    then twice with the second started while the first is writing."""
    inputs, table, models = race_job
    out = tmp_path / "out"
    rng = random.Random(20261125)
    refused = 0
    for trial in range(10):
        names = ["logistic", "boosting"] if trial % 2 == 0 else ["boosting", "logistic"]
        procs = {}
        try:
            for i, name in enumerate(names):
                if i:
                    time.sleep(rng.uniform(0, 0.2))
                procs[name] = _start(_argv("run", inputs, out, models[name], "--overwrite"))
            outcome = {name: _finish(proc) for name, proc in procs.items()}
        finally:
            for proc in procs.values():
                _kill_group(proc)
        winners = [name for name, (rc, _) in outcome.items() if rc == 0]
        assert winners, f"trial {trial}: no run succeeded: {outcome}"
        for name, (rc, err) in outcome.items():
            if rc != 0:
                assert rc == EXIT_USAGE, f"trial {trial}: {name} exited {rc}: {err}"
                assert "is being written by another run: `run` on host" in err and "pid" in err, err
                assert len(err.strip().splitlines()) == 1 or "Traceback" not in err, err
                refused += 1
        committed = _committed_model(out, models)
        if len(winners) == 1:
            assert committed == winners[0]
        assert_exact(read_output(out), table, models[committed])
        assert not [n for n in os.listdir(out) if n.startswith(".")], "temporary files left"
        assert _lease(out)["released"]
    # How often the random starts overlap depends on how busy the machine is; the forced overlap
    # below makes sure the refusal itself is exercised every time.
    print(f"{refused} of 10 racing trials overlapped (the later run refused)")
    for name, other in (("logistic", "boosting"), ("boosting", "logistic")):
        first = _start_writing(_argv("run", inputs, out, models[name], "--overwrite"), out)
        try:
            os.killpg(first.pid, signal.SIGSTOP)  # mid-part, its lease held, while the other one starts
            rc, err = _finish(_start(_argv("run", inputs, out, models[other], "--overwrite")))
            assert rc == EXIT_USAGE and "is being written by another run: `run` on host" in err, err
            os.killpg(first.pid, signal.SIGCONT)
            assert _finish(first)[0] == 0
        finally:
            _kill_group(first)
        assert _committed_model(out, models) == name
        assert_exact(read_output(out), table, models[name])


@pytest.mark.fault
def test_waiting_run_commits_after_the_holder(race_job, tmp_path: Path) -> None:
    """With --lock-timeout the second job waits, then replaces the first's output with its own, whole."""
    inputs, table, models = race_job
    out = tmp_path / "out"
    first = _start_writing(_argv("run", inputs, out, models["boosting"], "--overwrite"), out)
    second = None
    try:
        os.killpg(first.pid, signal.SIGSTOP)  # held (its lease not expired) while the second one starts
        second = _start(_argv("run", inputs, out, models["logistic"], "--overwrite", "--lock-timeout", "120"))
        time.sleep(5)
        assert second.poll() is None, second.communicate()
        held = _lease(out)  # the second run waits: the paused first still holds the lease
        assert held["pid"] == first.pid and not held["released"], held
        os.killpg(first.pid, signal.SIGCONT)
        rc2, err2 = _finish(second)
        rc1, err1 = _finish(first)
    finally:
        for proc in (first, second):
            if proc is not None:
                _kill_group(proc)
    assert (rc1, rc2) == (0, 0), (err1, err2)
    assert _committed_model(out, models) == "logistic"
    assert_exact(read_output(out), table, models["logistic"])


@pytest.mark.fault
def test_retry_after_kill_9_takes_the_lease_at_once(race_job, tmp_path: Path) -> None:
    inputs, table, models = race_job
    out = tmp_path / "out"
    proc = _start_writing(_argv("run", inputs, out, models["boosting"], "--overwrite"), out)
    _kill_group(proc)  # kill -9 of the run and its workers, in the middle of a part
    assert proc.returncode == -signal.SIGKILL, "the run had finished before it was killed"
    dead = _lease(out)
    assert dead["pid"] == proc.pid and not dead["released"] and dead["expires_at"] > time.time() + 60
    started = time.monotonic()
    rc, err = _finish(_start(_argv("run", inputs, out, models["logistic"], "--overwrite")))
    assert rc == 0, err
    assert time.monotonic() - started < 60  # did not wait for the dead run's lease to expire
    assert_exact(read_output(out), table, models["logistic"])


@pytest.mark.fault
def test_paused_run_loses_its_lease_and_publishes_nothing(race_job, tmp_path: Path) -> None:
    """A run paused past its lease (SIGSTOP) is taken over; resumed after the other run committed,
    it stops without touching the committed output."""
    inputs, table, models = race_job
    out = tmp_path / "out"
    paused = _start_writing(_argv("run", inputs, out, models["boosting"], "--overwrite", "--lease-seconds", "3"), out)
    try:
        os.killpg(paused.pid, signal.SIGSTOP)
        assert paused.poll() is None, "the run finished before it was paused"
        held = _lease(out)
        time.sleep(max(0.0, held["expires_at"] - time.time()) + 0.2)
        rc, err = _finish(_start(_argv("run", inputs, out, models["logistic"], "--overwrite")))
        assert rc == 0, err
        committed = {n: (out / n).stat().st_mtime_ns for n in os.listdir(out) if n.startswith("part-")}
        os.killpg(paused.pid, signal.SIGCONT)
        rc, err = _finish(paused, timeout=60)
    finally:
        _kill_group(paused)
    assert rc == EXIT_USAGE and "lost the lease on output" in err and "taken over by another run" in err, err
    assert "Traceback" not in err, err
    assert {n: (out / n).stat().st_mtime_ns for n in os.listdir(out) if n.startswith("part-")} == committed
    assert (out / "_SUCCESS").exists() and _committed_model(out, models) == "logistic"
    assert_exact(read_output(out), table, models["logistic"])


def _job(inputs: list[Path], out: Path, model: dict[str, Path]) -> list[str]:
    args = ["--output", out, "--model", model["model"], "--scaler", model["scaler"], "--workers", "1"]
    for path in inputs:
        args += ["--input", path]
    return [str(a) for a in args]


@pytest.mark.fault
def test_lease_of_another_plan_refuses_every_step(tmp_path: Path, binary_model_paths) -> None:
    inputs = write_inputs(tmp_path / "in", files=2, rows=1_216, row_group_size=400)
    other_model = multiclass_model(tmp_path / "other")
    out = tmp_path / "out"
    ours, theirs = _job(inputs, out, binary_model_paths), _job(inputs, out, other_model)
    result = cli("plan", *ours, "--shards", "2", "--out", plan_file(out))
    assert result.exit_code == 0, result.stderr
    plan_id = json.loads(result.stdout)["plan_id"]
    holder = f"sharded job (plan {plan_id}): `plan` on host"

    result = cli("plan", *theirs, "--shards", "2", "--out", tmp_path / "plan2.json", "--overwrite")
    assert result.exit_code == EXIT_USAGE and holder in result.stderr, result.stderr
    assert not (tmp_path / "plan2.json").exists()
    result = cli("plan", *theirs, "--shards", "2")  # writes nothing, so needs no lease
    assert result.exit_code == 0, result.stderr
    (tmp_path / "theirs.json").write_text(result.stdout)
    refusals = [
        ("run", *theirs, "--plan", tmp_path / "theirs.json", "--shard", "0"),
        ("run", *theirs, "--shard", "1/2"),
        ("commit", *theirs, "--plan", tmp_path / "theirs.json"),
        ("run", *theirs, "--overwrite"),
    ]
    for argv in refusals:
        result = cli(*argv)
        assert result.exit_code == EXIT_USAGE and holder in result.stderr, (argv, result.stderr)
    assert not list(out.glob("part-*"))

    # our own steps join the lease, retries included; commit releases it
    for shard in ("0", "1", "1"):
        result = cli("run", *ours, "--plan", plan_file(out), "--shard", shard)
        assert result.exit_code == 0, result.stderr
    result = cli("plan", *ours, "--shards", "2", "--out", plan_file(out), "--overwrite")  # a retried plan
    assert result.exit_code == 0, result.stderr
    for shard in ("0", "1"):
        assert cli("run", *ours, "--plan", plan_file(out), "--shard", shard).exit_code == 0
    result = cli("commit", *ours, "--plan", plan_file(out))
    assert result.exit_code == 0, result.stderr
    assert _lease(out)["released"]
    assert_exact(read_output(out), read_inputs(inputs), binary_model_paths)
    # released: the other job may now write
    result = cli("run", *theirs, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert_exact(read_output(out), read_inputs(inputs), other_model)


@pytest.mark.fault
def test_commit_refuses_a_part_replaced_after_its_receipt(tmp_path: Path, binary_model_paths) -> None:
    """A zombie attempt of shard 0 finishing late replaces a part the receipt does not describe."""
    inputs = write_inputs(tmp_path / "in", files=2, rows=1_216, row_group_size=400)
    out = tmp_path / "out"
    common = _job(inputs, out, binary_model_paths)
    assert cli("plan", *common, "--shards", "2", "--out", plan_file(out)).exit_code == 0
    assert cli("run", *common, "--plan", plan_file(out), "--shard", "0").exit_code == 0
    shutil.copy(out / "part-00000-00000.parquet", tmp_path / "zombie.parquet")
    for shard in ("0", "1"):
        assert cli("run", *common, "--plan", plan_file(out), "--shard", shard).exit_code == 0
    shutil.copy(tmp_path / "zombie.parquet", out / "part-00000-00000.parquet")
    result = cli("commit", *common, "--plan", plan_file(out))
    assert result.exit_code == EXIT_INPUT, result.stderr
    assert "part-00000-00000.parquet was written by attempt" in result.stderr and "shard 0" in result.stderr
    assert not (out / "_SUCCESS").exists()
    assert cli("run", *common, "--plan", plan_file(out), "--shard", "0").exit_code == 0
    assert cli("commit", *common, "--plan", plan_file(out)).exit_code == 0
    assert_exact(read_output(out), read_inputs(inputs), binary_model_paths)


@pytest.mark.fault
def test_worker_publishes_no_part_after_the_lease_ran_out(tmp_path: Path) -> None:
    """What a worker resumed after a long pause does: it waits for a renewal, then gives up unpublished."""
    import fsspec

    from batchscore.errors import StorageError
    from batchscore.io.lease import Fence
    from batchscore.io.storage import atomic_writer

    fs, path = fsspec.filesystem("file"), str(tmp_path / "part-00000-00000.parquet")
    fence = Fence(grace_seconds=0.3)
    fence.set(time.time() - 1)
    started = time.monotonic()
    with pytest.raises(StorageError, match="ran out before .*part-00000-00000.parquet could be published"):
        with atomic_writer(fs, path, before_publish=lambda: fence.check(path)) as fh:
            fh.write(b"late")
    assert time.monotonic() - started >= 0.3
    fence.set(Fence.LOST)
    with pytest.raises(OutputBusyError, match="lost"):
        with atomic_writer(fs, path, before_publish=lambda: fence.check(path)) as fh:
            fh.write(b"late")
    assert os.listdir(tmp_path) == []
    fence.set(time.time() + 60)
    with atomic_writer(fs, path, before_publish=lambda: fence.check(path)) as fh:
        fh.write(b"in time")
    assert os.listdir(tmp_path) == ["part-00000-00000.parquet"]


def _contend(folder: str, holder: str, barrier, results) -> None:
    lease = Lease(resolve(folder), holder, "p", "run", 60)
    barrier.wait()
    try:
        lease.acquire()
        results.put(holder)
    except OutputBusyError:
        results.put(None)
    barrier.wait()  # a run's lease dies with its process: the winner lives until every contender has tried


@pytest.mark.fault
@pytest.mark.parametrize("start", ["absent", "stale"])
def test_one_of_many_contenders_takes_the_lease(tmp_path: Path, start: str) -> None:
    """Eight processes released at once on a missing (or stale) local lease: exactly one gets it.

    (Not tried on the S3 test server: moto checks If-None-Match and stores the object in two steps.)
    """
    context = multiprocessing.get_context("fork")
    for trial in range(5):
        folder = tmp_path / f"{start}-{trial}"
        folder.mkdir()
        if start == "stale":
            old = LeaseRecord(run_holder(), "p", "run", "elsewhere", 1, None, True, time.time() - 9, time.time() - 1)
            stale = Path(lease_path(str(folder)))
            stale.parent.mkdir(parents=True)
            stale.write_bytes(old.to_bytes())
        barrier, results = context.Barrier(8), context.Queue()
        procs = [context.Process(target=_contend, args=(str(folder), f"run {i}", barrier, results)) for i in range(8)]
        for proc in procs:
            proc.start()
        got = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        winners = [g for g in got if g]
        assert len(winners) == 1, got
        assert json.loads(Path(lease_path(str(folder))).read_text())["holder"] == winners[0]


@pytest.mark.fault
def test_s3_lease_is_exclusive_and_expires(tmp_path: Path, s3, binary_model_paths) -> None:
    fs, bucket, options = s3
    inputs = write_inputs(tmp_path / "in", files=1, rows=1_216, row_group_size=400)
    output = f"s3://{bucket}/out"
    at = resolve(output, StorageSettings(options))
    first = Lease(at, run_holder(), "p", "run", 60).acquire()
    with pytest.raises(OutputBusyError, match="another run: `run` on host"):
        Lease(at, run_holder(), "q", "run", 60).acquire()
    first.release()
    # a crashed run on another host: its lease blocks until it expires, then is taken over
    expires = time.time() + 3
    crashed = LeaseRecord(run_holder(), "p", "run", "node-7", 4242, None, True, time.time() - 30, expires)
    fs.pipe_file(lease_path(f"{bucket}/out"), crashed.to_bytes())
    job = [
        "--input",
        str(inputs[0]),
        "--output",
        output,
        "--model",
        str(binary_model_paths["model"]),
        "--scaler",
        str(binary_model_paths["scaler"]),
        "--storage-option",
        f"endpoint_url={options['endpoint_url']}",
    ]
    result = cli("run", *job)
    assert result.exit_code == EXIT_USAGE and "on host node-7 (pid 4242)" in result.stderr, result.stderr
    assert not fs.exists(f"{bucket}/out/_SUCCESS")
    result = cli("run", *job, "--lock-timeout", "30")
    assert result.exit_code == 0, result.stderr
    assert time.time() >= expires
    assert_exact(read_output(f"{bucket}/out", fs), read_inputs(inputs), binary_model_paths)
    lease = json.loads(fs.cat_file(lease_path(f"{bucket}/out")))
    assert lease["released"] and lease["host"] != "node-7"
    # a sharded job's steps join their plan's lease on S3 too
    plan = Lease(at, plan_holder("abc"), "abc", "plan", 60).acquire()
    Lease(at, plan_holder("abc"), "abc", "shard", 60).acquire().renew()
    with pytest.raises(OutputBusyError, match="sharded job \\(plan abc\\)"):
        Lease(at, plan_holder("xyz"), "xyz", "plan", 60).acquire()
    plan.release()
