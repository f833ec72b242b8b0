"""Process faults: kill -9 of a run, a worker or a shard at random points, then retry; a full disk.

Each trial runs the real CLI in its own session (process group), so "no orphan survives" is
checked as "the group has no live member". Every wait is bounded: a hang fails the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pytest

from batchscore.job.pipeline import ABANDON_SECONDS, BackgroundWriter, prefetch
from helpers import (
    assert_exact,
    binary_model,
    plan_file,
    read_inputs,
    read_manifest,
    read_output,
    receipt_file,
    write_inputs,
)

pytestmark = [
    pytest.mark.fault,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process groups from /proc"),
]

#: Compared between a faulted-then-retried output and a clean one (predicted_at is the run's time).
COMPARED = lambda table: table.drop_columns(["predicted_at"])  # noqa: E731
RUN_TIMEOUT = 60
GONE_WITHIN = 5.0


def _cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "batchscore", *map(str, args)]


def _start(args: Sequence[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _processes() -> Iterator[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process, from /proc."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    state, ppid, pgid = fh.read().rsplit(")", 1)[1].split()[:3]
            except OSError:
                continue
            yield int(entry), state, int(ppid), int(pgid)


def _cmdline(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return None


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    return [pid for pid, state, _, group in _processes() if group == pgid and state != "Z"]


def _workers(pid: int) -> list[int]:
    """Forks of ``pid`` (same command line): its workers, not a tool it briefly runs. Polled
    often, so it reads the kernel's list of children rather than all of /proc."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            children = [int(c) for c in fh.read().split()]
    except OSError:
        return []
    command = _cmdline(pid)
    return [child for child in children if command is not None and _cmdline(child) == command]


def _assert_group_gone(pgid: int) -> None:
    deadline = time.monotonic() + GONE_WITHIN
    while (members := _group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert members == [], f"processes of run {pgid} outlived it: {members}"
    finally:
        for pid in members:
            with_kill(pid)


def with_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    """``pid`` exists and has not exited (a zombie has)."""
    return any(p == pid and state != "Z" for p, state, _, _ in _processes())


#: How often a trial whose strike came too late (the run or its worker had finished) is repeated
#: with half the delay: every trial must strike a running process, or the test fails.
ATTEMPTS = 4


def _wait_for_workers(proc: subprocess.Popen[str]) -> list[int]:
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (workers := _workers(proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    return workers


def _strike(proc: subprocess.Popen[str], delay: float, phase: str, signum: int = signal.SIGKILL) -> list[int] | None:
    """Send ``signum`` to the run ``delay`` s into ``phase`` ("scoring": once its workers are up;
    "anywhere": from its start). Returns its workers alive at that moment, or None when the strike
    came too late (the run had ended; in "scoring", its workers had)."""
    if phase == "scoring":
        _wait_for_workers(proc)
    time.sleep(delay)
    workers = [w for w in _workers(proc.pid) if _alive(w)]
    if proc.poll() is not None or (phase == "scoring" and not workers):
        return None
    proc.send_signal(signum)
    return workers


def _finish(proc: subprocess.Popen[str], timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
    """Wait for a run (a hang fails the test), then check its whole group is gone."""
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"run {proc.args} did not exit within {timeout} s")
    _assert_group_gone(proc.pid)
    return proc.returncode, stderr


def _run_ok(args: Sequence[str]) -> None:
    code, stderr = _finish(_start(args))
    assert code == 0, stderr


def _temporaries(output: Path) -> list[str]:
    return [str(p) for p in output.rglob("*") if ".tmp-" in p.name]


def _assert_committed_like(output: Path, clean: pa.Table) -> None:
    """The committed output has exactly the clean run's rows, in parts that the receipts list."""
    assert (output / "_SUCCESS").exists()
    manifest = read_manifest(output)
    receipts = [json.loads(p.read_text()) for p in sorted(receipt_file(output, 0).parent.glob("shard-*.json"))]
    listed = [p["name"] for r in receipts for p in r["parts"]]
    on_disk = sorted(p.name for p in output.iterdir() if p.name.startswith("part-"))
    assert [p["name"] for p in manifest["parts"]] == listed == on_disk
    assert _temporaries(output) == []
    assert COMPARED(read_output(output)).equals(COMPARED(clean))


class Job:
    """One input (several files, several parts) and its clean output, made once per module."""

    def __init__(self, root: Path):
        self.root = root
        self.inputs = write_inputs(root / "in", files=6, rows=24_016, row_group_size=6_000, seed=11)
        self.model = binary_model(root / "model")
        started = time.monotonic()
        proc = _start(self.run_args(root / "clean"))
        seen: list[float] = []
        while proc.poll() is None:
            if _workers(proc.pid):
                seen.append(time.monotonic())
            time.sleep(0.01)
        code, stderr = _finish(proc)
        assert code == 0, stderr
        self.seconds = time.monotonic() - started
        #: When the workers started, and how long they were alive: kills aim at that window.
        self.startup_seconds = seen[0] - started if seen else 0.0
        self.scoring_seconds = seen[-1] - seen[0] if seen else 0.1
        self.clean = read_output(root / "clean")
        self.bytes = sum(p.stat().st_size for p in (root / "clean").rglob("*") if p.is_file())
        assert_exact(self.clean, read_inputs(self.inputs), self.model)

    def options(self, output: Path) -> list[str]:
        return [
            "--input",
            str(self.root / "in"),
            "--output",
            str(output),
            "--model",
            str(self.model["model"]),
            "--scaler",
            str(self.model["scaler"]),
            "--workers",
            "2",
            "--batch-size",
            "2048",
        ]

    def run_args(self, output: Path, *extra: str) -> list[str]:
        return _cli("run", *self.options(output), *extra)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    return Job(tmp_path_factory.mktemp("faults"))


def _kill_at_random_point(
    args: Sequence[str], rng: random.Random, job: Job, phase: str
) -> tuple[subprocess.Popen[str], list[int]]:
    """Start ``args`` and SIGKILL it at a random moment: in "scoring", while its workers score; in
    "anywhere", mostly while workers score or the run commits (a few during start-up). A strike
    that comes too late is tried again earlier; returns the killed run and its workers then."""
    delay = (
        rng.uniform(0.0, job.scoring_seconds * 0.7)
        if phase == "scoring"
        else rng.uniform(job.startup_seconds * 0.8, job.seconds)
    )
    for _ in range(ATTEMPTS):
        proc = _start(args)
        workers = _strike(proc, delay, phase)
        code, stderr = _finish(proc)  # the group (the workers) must be gone within seconds
        if workers is not None:
            assert code == -signal.SIGKILL, f"the run was alive when struck but exited {code}: {stderr}"
            return proc, workers
        delay /= 2
    pytest.fail(f"{ATTEMPTS} kills in {phase} all came after the run had finished: {args}")


#: Where each trial's kill lands: two of three while the workers score, the rest anywhere.
PHASES = ["scoring", "scoring", "anywhere"]


def test_kill_parent_then_retry(job: Job, tmp_path: Path) -> None:
    """kill -9 of `run` at a random point, every one landing on a running run (most while its
    workers score): its workers die with it and write nothing more; the same command then commits
    exactly the clean output."""
    rng = random.Random(20261125)
    mid_scoring = 0
    for trial in range(12):
        out = tmp_path / f"out-{trial}"
        phase = PHASES[trial % 3]
        _, workers = _kill_at_random_point(job.run_args(out, "--overwrite"), rng, job, phase)
        mid_scoring += bool(workers)
        assert not [w for w in workers if _alive(w)], f"trial {trial}: workers outlived the run: {workers}"
        if out.exists():
            before = sorted(os.listdir(out))
            time.sleep(0.3)
            assert sorted(os.listdir(out)) == before, f"trial {trial}: files appeared after the run was killed"
        _run_ok(job.run_args(out, "--overwrite"))
        _assert_committed_like(out, job.clean)
    assert mid_scoring >= 8, f"only {mid_scoring} of 12 kills landed while workers scored"


def test_kill_worker_fails_promptly_then_retry(job: Job, tmp_path: Path) -> None:
    """kill -9 of one worker: the run exits 1 at once with one clear error line, leaves no
    temporary file, and a retry commits exactly the clean output."""
    rng = random.Random(7)
    finished_first = 0
    for trial in range(10):
        out = tmp_path / f"out-{trial}"
        delay = rng.uniform(0.0, job.scoring_seconds * 0.7)
        for _ in range(ATTEMPTS):
            proc = _start(job.run_args(out, "--overwrite"))
            _wait_for_workers(proc)
            time.sleep(delay)
            alive = [w for w in _workers(proc.pid) if _alive(w)]
            victim = rng.choice(alive) if alive else None
            if victim is not None:
                killed_at = time.monotonic()
                with_kill(victim)
            code, stderr = _finish(proc)
            if victim is not None and code != 0:
                break
            # The workers, or the one killed, had finished their last unit (nothing was lost): strike earlier.
            assert code == 0, stderr
            _assert_committed_like(out, job.clean)
            finished_first += 1
            delay /= 2
        assert victim is not None and code != 0, f"trial {trial}: no kill of a worker landed in {ATTEMPTS} tries"
        assert time.monotonic() - killed_at < 15, "the run took too long to notice its dead worker"
        assert code == 1, stderr
        lines = stderr.strip().splitlines()
        # The error names the very worker killed: the fault landed on a live worker mid-run.
        assert lines[-1].startswith(f"Error: worker process {victim} died (killed by signal 9)"), stderr
        assert "Traceback" not in stderr, stderr
        assert not (out / "_SUCCESS").exists()
        assert _temporaries(out) == []
        _run_ok(job.run_args(out, "--overwrite"))
        _assert_committed_like(out, job.clean)
    print(f"{finished_first} worker kills came after the worker's last unit and were struck again earlier")


def test_sigterm_stops_every_worker_and_leaves_no_temporary(job: Job, tmp_path: Path) -> None:
    """SIGTERM (a scheduler stopping the task) at a random point while workers score: exit 1 at
    once, workers gone, no temporary file and no _SUCCESS."""
    rng = random.Random(3)
    for trial in range(4):
        out = tmp_path / f"out-{trial}"
        delay = rng.uniform(0.0, job.scoring_seconds * 0.7)
        for _ in range(ATTEMPTS):
            proc = _start(job.run_args(out, "--overwrite"))
            workers = _strike(proc, delay, "scoring", signal.SIGTERM)
            code, stderr = _finish(proc, timeout=15 if workers else RUN_TIMEOUT)
            if workers:
                break
            delay /= 2  # its workers had finished already: strike earlier
        assert workers, f"trial {trial}: no SIGTERM reached the run while its workers scored in {ATTEMPTS} tries"
        assert code == 1 and stderr.strip().splitlines()[-1].startswith("Error: interrupted"), stderr
        assert not [w for w in workers if _alive(w)], f"workers outlived the run: {workers}"
        assert not (out / "_SUCCESS").exists()
        assert _temporaries(out) == []


def test_kill_shard_then_retry_and_commit(job: Job, tmp_path: Path) -> None:
    """kill -9 of `run --plan P --shard I` at a random point; the same shard again, the other
    shard, then `commit`: exactly the clean output, every part listed by a receipt."""
    rng = random.Random(99)
    for trial in range(8):
        out = tmp_path / f"out-{trial}"
        plan = plan_file(out)
        _run_ok(_cli("plan", *job.options(out), "--shards", "2", "--out", plan))
        shard = rng.randrange(2)
        args = _cli("run", *job.options(out), "--plan", plan, "--shard", str(shard))
        other = _start(_cli("run", *job.options(out), "--plan", plan, "--shard", str(1 - shard)))
        # the shards run side by side, as a scheduler would run them; the kill lands on a running shard
        _, workers = _kill_at_random_point(args, rng, job, PHASES[trial % 3])
        assert not [w for w in workers if _alive(w)], f"trial {trial}: workers outlived the shard: {workers}"
        code, stderr = _finish(other)
        assert code == 0, stderr
        _run_ok(args)
        _run_ok(_cli("commit", *job.options(out), "--plan", plan))
        _assert_committed_like(out, job.clean)


# --- workers and their parent ---------------------------------------------------------------

ORPHAN_SCRIPT = """
import os, sys, time
import batchscore.job.pool as pool
from batchscore.io.storage import atomic_writer, filesystem
if sys.argv[1] == "portable":  # after the imports: the standard library reads sys.platform as it loads
    sys.platform = "portable"  # take the path for systems without PR_SET_PDEATHSIG: a watch thread
pool.PARENT_POLL_SECONDS = float(sys.argv[2])
target = sys.argv[3]

def work(item):
    fs, path = filesystem(target)
    with atomic_writer(fs, path) as fh:
        fh.write(b"x")
        time.sleep(float(sys.argv[4]))  # the parent is killed meanwhile
    return item

workers = pool.WorkerPool(1, lambda: None, work)
print(workers._processes[0].pid, flush=True)
list(workers.map_unordered([1], [0]))
"""


@pytest.mark.parametrize(
    "how, poll, write", [("kernel", "0.2", "30"), ("portable", "0.2", "30"), ("portable", "60", "1")]
)
def test_worker_dies_with_its_parent_and_publishes_nothing(tmp_path: Path, how: str, poll: str, write: str) -> None:
    """kill -9 of a worker's parent mid-write: the worker ends at once (kernel signal or watch
    thread), and never renames its file into place, even when its watch would look too late."""
    target = tmp_path / "part-00000-00000.parquet"
    proc = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT, how, poll, str(target), write],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        worker = int(proc.stdout.readline())  # type: ignore[union-attr]  # stdout=PIPE
        deadline = time.monotonic() + 30
        while not _temporaries(tmp_path):  # strike mid-write: the worker's temporary file is there
            assert proc.poll() is None and time.monotonic() < deadline, "the worker never started its write"
            time.sleep(0.01)
        assert _alive(worker) and proc.poll() is None
        with_kill(proc.pid)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        if poll == "60":  # the watch is asleep: the worker finishes its write and must not publish it
            deadline = time.monotonic() + 15
            while _temporaries(tmp_path) and time.monotonic() < deadline:  # the write ends, unpublished
                time.sleep(0.05)
            assert _temporaries(tmp_path) == [], "the worker did not reach the end of its write"
            with_kill(worker)
        else:  # killed mid-write: its temporary file is left, never renamed
            assert _temporaries(tmp_path)
        _assert_group_gone(proc.pid)
        assert not target.exists(), "an orphaned worker put its file in place"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


FINALIZER_SCRIPT = """
import os, signal, weakref
from batchscore.job import pool
pool._handle_stop_signals()

class Unit:
    pass

def finalizer(_):
    os.kill(os.getpid(), signal.SIGTERM)  # the stop arrives while a weakref callback runs
    for _ in range(1000):
        pass

unit = Unit()
ref = weakref.ref(unit, finalizer)
try:
    del unit
    for _ in range(10 ** 7):
        pass
    print("the stop was lost", flush=True)
except KeyboardInterrupt:
    print("unwound", flush=True)
"""


def test_stop_landing_in_a_finalizer_still_unwinds_the_worker() -> None:
    """The parent's SIGTERM may arrive while a worker runs a weakref callback or __del__, where
    Python swallows exceptions and prints "Exception ignored" with a traceback: the worker must
    still unwind its unit, and print nothing."""
    done = subprocess.run([sys.executable, "-c", FINALIZER_SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "unwound", (done.stdout, done.stderr)
    assert done.stderr == ""


# --- threads whose other side is gone -------------------------------------------------------


def test_abandoned_reader_does_not_hold_up_its_consumer() -> None:
    """A consumer that stops early waits a bounded time for a reader stuck in a slow read."""

    def slow() -> Iterator[int]:
        yield 1
        time.sleep(30)  # a read that hangs in storage
        yield 2

    started = time.monotonic()
    for item in prefetch(slow()):
        assert item == 1
        break
    assert time.monotonic() - started < ABANDON_SECONDS + 2


def test_writer_thread_ends_when_its_owner_is_gone() -> None:
    """A background writer whose owning thread ended without close or abort does not wait forever."""
    holder: list[BackgroundWriter] = []
    owner = threading.Thread(target=lambda: holder.append(BackgroundWriter(lambda item: None)))
    owner.start()
    owner.join()
    holder[0]._thread.join(timeout=5)
    assert not holder[0]._thread.is_alive()


# --- a full disk ------------------------------------------------------------------------------


def _mount_small_disk(folder: Path, size: int, image: Path) -> str | None:
    """Mount a ``size``-byte filesystem at ``folder``: tmpfs, else ext4 on a loop device.
    Returns why neither worked, or None."""
    folder.mkdir(parents=True, exist_ok=True)
    tmpfs = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True, timeout=30
    )
    if tmpfs.returncode == 0:
        return None
    with open(image, "wb") as fh:
        fh.truncate(max(size, 2 << 20))
    steps = [["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], ["mount", "-o", "loop", str(image), str(folder)]]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=30)
        except FileNotFoundError as exc:
            return f"tmpfs: {tmpfs.stderr.strip()}; loop device: {exc}"
        if done.returncode != 0:
            return f"tmpfs: {tmpfs.stderr.strip()}; loop device: {done.stderr.strip()}"
    return None


def test_full_disk_never_hangs_and_leaves_nothing(job: Job, tmp_path: Path) -> None:
    """The output on a small disk that fills at varied points: every run exits non-zero promptly
    with an error line, and leaves no _SUCCESS, no temporary file and no process behind."""
    mount = Path(tempfile.mkdtemp(prefix="batchscore-full-"))
    why = _mount_small_disk(mount, 1 << 20, tmp_path / "probe.img")
    if why is not None:
        shutil.rmtree(mount, ignore_errors=True)
        print(f"skipping the full-disk test: cannot mount a small filesystem ({why})")
        pytest.skip(f"cannot mount a small filesystem: {why}")
    subprocess.run(["umount", str(mount)], check=True, timeout=30)
    try:
        rng = random.Random(5)
        for trial in range(20):
            size = int(job.bytes * (0.03 + 0.9 * trial / 20)) + rng.randrange(4096)
            assert _mount_small_disk(mount, size, tmp_path / f"disk-{trial}.img") is None
            try:
                out = mount / "out"
                code, stderr = _finish(_start(job.run_args(out)))
                assert code != 0, f"trial {trial} ({size} bytes): the run claims success on a full disk"
                last = stderr.strip().splitlines()[-1]
                assert last.startswith("Error:"), stderr
                if "cannot write part" in last:  # a worker's full disk is one line, no traceback
                    assert "Traceback" not in stderr and str(out) in last, stderr
                assert not (out / "_SUCCESS").exists()
                assert _temporaries(out) == [], f"trial {trial} ({size} bytes)"
            finally:
                subprocess.run(["umount", "-l", str(mount)], timeout=30)
    finally:
        shutil.rmtree(mount, ignore_errors=True)
