"""Throughput of a table output (Delta Lake) beside the folder output, on the same input and model.

Writes several files of 12 float64 features (under --dir, never in the repository), scores them
with a scaler and a logistic regression as `batchscore run` (one process each, sequentially), into
a Parquet folder, a new Delta table, as a replace of that table's partition, and a new Iceberg
table (embedded catalog), then times the
`commit` step alone of a sharded job into each (plan and shards done first). Each job is run
--repeats times; the best wall time counts. Needs batchscore[delta] and batchscore[iceberg].

    python bench/table_output.py                       # 2,000,003 rows in 8 files
    python bench/table_output.py --rows 500003 --files 4 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from big_row_group import FEATURES, write_file, write_model


def _batchscore(*args: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "batchscore", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"batchscore {' '.join(args[:1])} failed: {done.stderr[-800:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_003)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/batchscore-table-output"))
    parser.add_argument("--only", default="", help="run only the outputs whose name holds this, e.g. iceberg")
    a = parser.parse_args()
    inputs = a.dir / "in"
    inputs.mkdir(parents=True, exist_ok=True)
    per_file = a.rows // a.files
    for i in range(a.files):
        write_file(inputs / f"part-{i:03d}.parquet", per_file + (a.rows % a.files if i == 0 else 0), 131_072, seed=i)
    model, scaler = write_model(a.dir / "model")
    common = ["--input", str(inputs), "--model", str(model), "--scaler", str(scaler), "--workers", str(a.workers)]
    common += ["--features", ",".join(FEATURES)]
    outputs = a.dir / "out"
    jobs = {
        "folder": ["--output", str(outputs / "folder"), "--overwrite"],
        "delta append (new table)": ["--output", str(outputs / "delta"), "--output-format", "delta"],
        "delta replace partition": [
            "--output",
            str(outputs / "delta-p"),
            "--output-format",
            "delta",
            "--partition",
            "dt=1",
            "--table-mode",
            "replace",
        ],
        "iceberg append (new table)": ["--output", str(outputs / "iceberg"), "--output-format", "iceberg"],
    }
    results = []
    for name, extra in jobs.items():
        if a.only and a.only not in name:
            continue
        runs, commits = [], []
        for _ in range(a.repeats):
            shutil.rmtree(outputs, ignore_errors=True)
            if "replace" in name:  # a partition to replace: the same rows under another model version
                _batchscore("run", *common, *extra[:-2], "--table-mode", "append", "--model-version", "old")
            runs.append(_batchscore("run", *common, *extra))
            # The commit step alone, of a sharded job into a fresh output.
            shutil.rmtree(outputs, ignore_errors=True)
            plan = str(a.dir / "plan.json")
            job = [*common, *[x if x != "replace" else "append" for x in extra]]
            _batchscore("plan", *job, "--shards", str(a.shards), "--out", plan)
            for shard in range(a.shards):
                _batchscore("run", *job, "--plan", plan, "--shard", str(shard))
            commits.append(_batchscore("commit", *job, "--plan", plan))
        best = min(runs)
        results.append(
            {
                "output": name,
                "run_s": round(best, 2),
                "rows_per_s": round(a.rows / best),
                "commit_s": round(min(commits), 2),
            }
        )
        print(json.dumps(results[-1]), flush=True)
    print()
    print(f"| output | `run` wall (s) | rows/s | `commit` of {a.shards} shards (s) |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['output']} | {r['run_s']} | {r['rows_per_s']:,} | {r['commit_s']} |")


if __name__ == "__main__":
    main()
