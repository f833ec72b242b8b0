"""Memory and plan size of a sharded job over many tiny input files.

Makes N tiny Parquet files (a few rows each, cut from ``sample_data/churn.parquet``) in a temporary
folder, then runs ``batchscore plan``, every ``run --plan P --shard I`` and ``commit --plan P`` as
separate processes, and reports each step's peak resident memory (the largest process of the step,
workers included: ``ru_maxrss`` of the step's process tree), its time, and the plan's size.

    python bench/many_files.py --files 20000,100000 --shards 2

Needs nothing beyond batchscore itself; runs locally, writes only under ``--tmp`` (default: a
fresh temporary folder, removed afterwards unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"

#: Measures one command: runs it, then prints the largest resident set of it and its descendants.
_MEASURE = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc, file=sys.stderr)\n"
)


def make_inputs(folder: Path, count: int, rows: int) -> None:
    """``count`` files of ``rows`` rows each (varying a little), one row group each."""
    table = pq.read_table(SAMPLE / "churn.parquet")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        start = (i * rows) % max(1, table.num_rows - rows - 3)
        pq.write_table(table.slice(start, rows + i % 3), folder / f"f-{i:06d}.parquet")


def measured(argv: list[str], log: Path) -> tuple[float, float]:
    """(peak RSS in MB of the command's largest process, seconds); exits if the command fails."""
    clock = time.perf_counter()
    with log.open("a") as out:
        proc = subprocess.run([sys.executable, "-c", _MEASURE, *argv], stdout=out, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - clock
    last = proc.stderr.strip().splitlines()[-1]
    kb, rc = (int(x) for x in last.split())
    if rc != 0:
        sys.exit(f"failed ({rc}): {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return kb / 1024, seconds


def bench(count: int, shards: int, rows: int, tmp: Path) -> dict[str, object]:
    inputs, out = tmp / f"in-{count}", tmp / f"out-{count}" / "scores"
    clock = time.perf_counter()
    if not inputs.exists():
        make_inputs(inputs, count, rows)
    made = time.perf_counter() - clock
    plan = tmp / f"out-{count}" / "_batchscore" / "scores" / "plan.json"
    common = [
        "--input",
        str(inputs),
        "--output",
        str(out),
        "--model",
        str(SAMPLE / "model" / "model.joblib"),
        "--scaler",
        str(SAMPLE / "model" / "scaler.joblib"),
        "--overwrite",
    ]
    cli = [sys.executable, "-m", "batchscore"]
    log = tmp / f"log-{count}.txt"
    steps: dict[str, tuple[float, float]] = {}
    steps["plan"] = measured([*cli, "plan", *common, "--shards", str(shards), "--out", str(plan)], log)
    for i in range(shards):
        steps[f"shard {i}"] = measured([*cli, "run", *common, "--plan", str(plan), "--shard", str(i)], log)
    steps["commit"] = measured([*cli, "commit", *common, "--plan", str(plan)], log)
    state = plan.parent
    receipts = sorted((state / "receipts").glob("*.json")) if (state / "receipts").exists() else []
    return {
        "files": count,
        "shards": shards,
        "make_inputs_s": round(made, 1),
        "plan_bytes": plan.stat().st_size,
        "receipt_bytes": sum(p.stat().st_size for p in receipts),
        "manifest_bytes": (state / "manifest.json").stat().st_size if (state / "manifest.json").exists() else None,
        "steps": {name: {"peak_rss_mb": round(mb, 1), "seconds": round(s, 1)} for name, (mb, s) in steps.items()},
        "largest_process_mb": round(max(mb for mb, _ in steps.values()), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", default="20000", help="comma-separated file counts [20000]")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--rows", type=int, default=5, help="rows per file (plus 0-2) [5]")
    parser.add_argument("--tmp", type=Path, help="work folder (kept); default: a temporary one, removed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    tmp = args.tmp or Path(tempfile.mkdtemp(prefix="bs-many-"))
    tmp.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for count in (int(n) for n in args.files.split(",")):
            result = bench(count, args.shards, args.rows, tmp)
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        if not args.tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
