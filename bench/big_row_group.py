"""Peak memory of `batchscore run` on one huge row group, against the same rows in 128k-row groups.

Memory should depend on the settings (``batch_size``, the rows of a part, the workers), not on how
the input was written: a file written as a single row group of millions of rows must not cost
more per process than the same rows in small row groups. This script writes both files (12
float64 features; generated under --dir, never in the repository), scores each with a scaler and
a logistic regression as its own process, and reports the peak resident memory (VmHWM) of the
largest process and of the whole process tree, the wall time, and the parts written.

    python bench/big_row_group.py                       # 3,000,001 rows, data in /tmp/batchscore-big-rg
    python bench/big_row_group.py --rows 1000003 --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from measuring import high_water_mark

FEATURES = [f"f{j:02d}" for j in range(12)]
SMALL_GROUPS = 131_072
CHUNK = 500_000


def write_file(path: Path, rows: int, row_group_size: int, seed: int = 1) -> None:
    """``rows`` rows of 12 float64 features and an id, in row groups of ``row_group_size`` rows."""
    if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows:
        return
    tmp = path.with_suffix(".tmp")
    schema = pa.schema([("id", pa.int64())] + [(name, pa.float64()) for name in FEATURES])
    with pq.ParquetWriter(tmp, schema) as writer:
        if row_group_size >= rows:  # one row group: written in one call
            writer.write_table(_chunk(0, rows, seed, schema), row_group_size=rows)
        else:
            for start in range(0, rows, row_group_size):
                writer.write_table(
                    _chunk(start, min(row_group_size, rows - start), seed, schema), row_group_size=row_group_size
                )
    tmp.rename(path)


def _chunk(start: int, rows: int, seed: int, schema: pa.Schema) -> pa.Table:
    columns = [pa.array(np.arange(start, start + rows, dtype=np.int64))]
    for j in range(len(FEATURES)):
        rng = np.random.default_rng([seed, j])  # the same values whatever the row groups
        values = rng.normal(j, 1.0 + j, start + rows)[start:]
        columns.append(pa.array(values))
    return pa.Table.from_arrays(columns, schema=schema)


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc/<pid>/task/*/children)."""
    found, pending = [], [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except OSError:
                continue
            found += kids
            pending += kids
    return found


def run_measured(cmd: list[str], interval: float) -> dict:
    """Run ``cmd``; the peak (VmHWM) of the main process and of each worker it started, in MB,
    read every ``interval`` seconds while each is alive (the kernel's peak is never lower later)."""
    peaks: dict[int, int] = {}
    stop = threading.Event()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def sample() -> None:
        while not stop.is_set():
            for pid in [proc.pid] + children(proc.pid):
                peaks[pid] = max(peaks.get(pid, 0), high_water_mark(pid))
            stop.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    mb = 1024 * 1024
    workers = sorted((round(v / mb, 1) for pid, v in peaks.items() if pid != proc.pid), reverse=True)
    return {
        "rc": proc.returncode,
        "wall_s": round(time.perf_counter() - started, 2),
        "main_peak_mb": round(peaks.get(proc.pid, 0) / mb, 1),
        "worker_peaks_mb": workers,
        "stderr_tail": err.decode(errors="replace")[-600:] if proc.returncode else "",
    }


def write_model(folder: Path) -> tuple[Path, Path]:
    import joblib
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    x = pd.DataFrame({name: rng.normal(j, 1.0 + j, 5_000) for j, name in enumerate(FEATURES)})
    y = (x.sum(axis=1) + rng.normal(0, 5, len(x)) > x.sum(axis=1).mean()).astype(int)
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(max_iter=500).fit(scaler.transform(x), y)
    joblib.dump(scaler, folder / "scaler.joblib")
    joblib.dump(model, folder / "model.joblib")
    return folder / "model.joblib", folder / "scaler.joblib"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3_000_001)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/batchscore-big-rg"))
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--layouts", default="single,small", help="single (one row group), small (128k-row groups)")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between memory samples")
    a = parser.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    model, scaler = write_model(a.dir / "model")
    results = []
    for layout in a.layouts.split(","):
        group = a.rows if layout == "single" else SMALL_GROUPS
        data = a.dir / f"features_{a.rows}_rg{group}.parquet"
        write_file(data, a.rows, group)
        out = a.dir / f"out-{layout}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "batchscore",
            "run",
            "--log-format",
            "json",
            "--input",
            str(data),
            "--output",
            str(out),
            "--model",
            str(model),
            "--scaler",
            str(scaler),
            "--keep",
            "id",
            "--overwrite",
        ]
        if a.workers:
            cmd += ["--workers", str(a.workers)]
        measured = run_measured(cmd, a.interval)
        parts = sorted(p for p in os.listdir(out) if p.startswith("part-")) if out.exists() else []
        rows = [pq.ParquetFile(out / p).metadata.num_rows for p in parts]
        results.append(
            {
                "layout": layout,
                "rows": a.rows,
                "row_group_rows": group,
                "largest_process_peak_mb": max([measured["main_peak_mb"]] + measured["worker_peaks_mb"]),
                **measured,
                "parts": len(parts),
                "largest_part_rows": max(rows, default=0),
            }
        )
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
