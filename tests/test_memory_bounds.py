"""What a step holds per input file stays small, whatever the number of files.

bench/many_files.py measures the peak memory of each step with 100,000 files; these tests guard
the design that keeps it bounded without timing or measuring a process: footers are read a few
at a time, every file is one compact record, receipts and manifests are written as they are
encoded, and commit never loads the model's libraries.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest

from batchscore.io.sink import Streamed, write_json
from batchscore.io.source import READ_AHEAD, InputFile, InputFiles, in_order
from batchscore.job.planning import PlanFiles, make_plan
from helpers import cli, plan_file, read_manifest, write_inputs

SCHEMA = pa.schema([("x", pa.int64())])


def _files(count: int) -> tuple[list[str], list[InputFile]]:
    uris = [f"/data/day={i % 7}/part-{i:06d}.parquet" for i in range(count)]
    identity = {"size": 1_234, "mtime_ns": 1_764_000_000_123_456_789, "inode": 98_765_432, "device": 2049}
    return uris, [InputFile(uri, 1_234, (7 + i % 3,), SCHEMA, identity) for i, uri in enumerate(uris)]


def test_file_records_are_compact() -> None:
    """A file's record costs a few machine words besides its URI (an InputFile with its identity
    dict costs hundreds of bytes), so 100,000 files are megabytes, not hundreds of them."""
    count = 20_011
    uris, files = _files(count)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        table = InputFiles()
        for f in files:
            table.append(f)
        per_file = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    assert per_file < 120, f"{per_file:.0f} bytes per file record (its URI aside)"
    assert table.uris is not uris and table.uris == uris  # the URIs themselves are shared, not copied
    assert all(a is b for a, b in zip(table.uris, uris))
    assert table[5] == files[5] and table[-1] == files[-1] and len(table) == count
    assert table.total_rows == sum(f.num_rows for f in files)


def test_plan_files_share_the_footers_table() -> None:
    """The plan's files are the table the footers were read into, not a copy of it."""
    _, files = _files(1_003)
    table = InputFiles(files)
    plan = make_plan(table, "/out", [{"role": "model", "uri": "m", "sha256": "0" * 64, "bytes": 1}], shards=3)
    assert plan.files == PlanFiles(table) and plan.files.uris is table.uris
    entry = plan.files[17]
    assert entry == {
        "uri": files[17].uri,
        "size": 1_234,
        "row_groups": list(files[17].row_groups),
        "identity": dict(files[17].identity),
    }
    again = PlanFiles.from_rows(json.loads(plan.encode())["files"], "plan")
    assert again == plan.files and again[17] == entry


def test_records_keep_every_identity_exactly() -> None:
    """Identities of every kind survive the table: large inode and device numbers, a negative
    mtime, an object's ETag and version id, and fields a file lacks."""
    files = [
        InputFile("/a.parquet", 5, (), SCHEMA, {"size": 5, "mtime_ns": -1, "inode": 2**64 - 1, "device": 2**63}),
        InputFile("s3://b/k.parquet", 9, (3, 0, 4), SCHEMA, {"size": 9, "etag": '"abc"', "version_id": "v1"}),
        InputFile("s3://b/j.parquet", 9, (1,), SCHEMA, {"size": 9, "etag": '"def"'}),
    ]
    table = InputFiles(files)
    assert [table[i] for i in range(3)] == files


def test_footers_are_read_a_few_at_a_time() -> None:
    """However many items, at most READ_AHEAD per thread are started ahead of the one taken, in
    order; an error raises in order; once the caller stops, nothing more starts."""
    threads, lock = 4, threading.Lock()
    started, taken, ahead = [0], [0], [0]

    def work(n: int) -> int:
        with lock:
            started[0] += 1
            ahead[0] = max(ahead[0], started[0] - taken[0])
        time.sleep(0.0005 * (n % 3))
        if n == 777:
            raise ValueError("item 777")
        return n * 2

    got = []
    with pytest.raises(ValueError, match="item 777"):
        for value in in_order(work, range(5_003), threads=threads):
            got.append(value)
            with lock:
                taken[0] += 1
    assert got == [n * 2 for n in range(777)]
    assert ahead[0] <= threads * READ_AHEAD + 1
    time.sleep(0.05)
    assert started[0] <= 777 + threads * READ_AHEAD + 1  # nothing started after the error was raised


def test_streamed_json_is_the_json_of_its_items(tmp_path: Path) -> None:
    """A receipt or manifest written item by item is byte for byte what the whole list gives."""
    fs = fsspec.filesystem("file")
    items = [{"name": f"part-{i:05d}-00000.parquet", "rows": i % 11} for i in range(2_347)]
    data = {"parts": Streamed(lambda: iter(items), len(items)), "none": Streamed(lambda: iter(()), 0), "n": 1.5}
    plain = {"parts": items, "none": [], "n": 1.5}
    for compact, dumped in (
        (True, json.dumps(plain, sort_keys=True, separators=(",", ":"))),
        (False, json.dumps(plain, indent=2, sort_keys=True)),
    ):
        write_json(fs, str(tmp_path / "x.json"), data, compact=compact)
        assert (tmp_path / "x.json").read_text() == dumped + "\n"
    assert data["parts"] == items and len(data["parts"]) == len(items) and data["parts"][5] == items[5]


@pytest.mark.slow
def test_commit_loads_no_model_library(tmp_path: Path, binary_model_paths) -> None:
    """Commit checks receipts, footers and artifact digests: it never imports scikit-learn, SciPy
    or pandas (hundreds of megabytes that a step of 100,000 files cannot spare)."""
    inputs = write_inputs(tmp_path / "in", files=4, rows=1_003, row_group_size=400)
    out = tmp_path / "out"
    common = [
        "--output",
        str(out),
        "--model",
        str(binary_model_paths["model"]),
        "--scaler",
        str(binary_model_paths["scaler"]),
        *[x for p in inputs for x in ("--input", str(p))],
    ]
    assert cli("plan", *common, "--shards", "2", "--out", str(plan_file(out))).exit_code == 0
    for shard in range(2):
        assert cli("run", *common, "--plan", str(plan_file(out)), "--shard", str(shard)).exit_code == 0
    probe = (
        "import json, sys\nfrom batchscore.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print(json.dumps([code, sorted(m for m in ('sklearn', 'scipy', 'pandas') if m in sys.modules)]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, "commit", *common, "--plan", str(plan_file(out))],
        capture_output=True,
        text=True,
        timeout=240,
    )
    code, loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert code == 0, result.stderr
    assert loaded == [], f"commit imported {loaded}"
    assert read_manifest(out)["rows"]["in"] == 4 * 1_003
