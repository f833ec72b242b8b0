"""The same job on Spark ``local[2]`` beside ``batchscore run`` and the naive script, on the same cores.

Scores the benchmark's generated input (``datagen.py``: one file, 128k-row row groups) with one
model three ways, each as its own process, one after the other:

- ``naive``: the tutorial script (``naive.py``);
- ``run``: ``batchscore run`` with its default workers (one per core);
- ``spark``: ``batchscore spark --master local[2]`` (a JVM driver, a Python worker per task, each
  task one shard of the plan, then batchscore's commit).

For each: the wall time (spawn to exit), the overhead ratio against ``batchscore run`` and the
naive script, and the peak resident memory (VmHWM, the kernel's high-water mark) of the largest
process, of the largest Spark Python worker (``pyspark.daemon`` and the processes it forks: the
workers that score) and of the JVM, sampled every 0.1 s over the whole process tree. The Spark
output is then compared with ``batchscore run``'s, row for row.

    python bench/spark.py --rows 10000000 --repeats 2 --markdown bench/RESULTS.md

``--markdown`` sets the section this script keeps in that file (``bench/run.py`` leaves it there).

Needs the ``spark`` and ``bench`` extras and a Java runtime; data and models go to ``bench/data``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.compute as pc
import pyarrow.dataset as ds

from datagen import ensure_data, ensure_models
from jobs import FEATURES, MB, MODEL_VERSION, ROOT, batchscore_cmd, rel
from measuring import high_water_mark
from reporting import with_section

SAMPLE_S = 0.1


def _kind(proc: psutil.Process) -> str:
    """``jvm``, ``pyworker`` (a Spark Python worker or a process it forked) or ``other``."""
    try:
        line = " ".join(proc.cmdline())
    except psutil.Error:
        return "other"
    if "java" in os.path.basename(proc.cmdline()[0] if proc.cmdline() else ""):
        return "jvm"
    return "pyworker" if "pyspark.daemon" in line or "pyspark.worker" in line else "other"


def measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; its wall time and the memory peaks of its process tree, by kind of process."""
    peaks: dict[str, int] = {"process": 0, "tree": 0, "jvm": 0, "pyworker": 0, "pyworkers_sum": 0}
    counted: set[int] = set()
    stop = threading.Event()

    def sample(root: psutil.Process) -> None:
        known: dict[int, tuple[psutil.Process, str]] = {root.pid: (root, "other")}
        while not stop.is_set():
            try:
                for child in root.children(recursive=True):
                    if known.get(child.pid, (None, "other"))[1] == "other":  # a shell may exec java later
                        known[child.pid] = (child, _kind(child))
            except psutil.Error:
                pass
            tree = workers = 0
            for pid, (proc, kind) in list(known.items()):
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    del known[pid]
                    continue
                peak = max(rss, high_water_mark(pid))
                tree += rss
                peaks["process"] = max(peaks["process"], peak)
                if kind in ("jvm", "pyworker"):
                    peaks[kind] = max(peaks[kind], peak)
                if kind == "pyworker":
                    workers += rss
                    counted.add(pid)
            peaks["tree"], peaks["pyworkers_sum"] = max(peaks["tree"], tree), max(peaks["pyworkers_sum"], workers)
            stop.wait(SAMPLE_S)

    with log.open("w") as out:
        clock = time.perf_counter()
        env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        sampler = threading.Thread(target=sample, args=(psutil.Process(proc.pid),), daemon=True)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - clock
        stop.set()
        sampler.join()
    if rc != 0:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return {
        "wall_s": round(wall, 2),
        **{f"{k}_peak_mb": round(v / MB) for k, v in peaks.items()},
        "pyworkers": len(counted),
    }


def same_scores(a: Path, b: Path) -> int:
    """Rows of two outputs, which must hold the same ids and scores in the same order."""
    columns = ["customer_id", "prediction", "probability"]
    left = ds.dataset(a, format="parquet").to_table(columns=columns)
    right = ds.dataset(b, format="parquet").to_table(columns=columns)
    if left.num_rows != right.num_rows or not all(pc.all(pc.equal(left[c], right[c])).as_py() for c in columns):
        sys.exit(f"{a} and {b} differ")
    return left.num_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--model", default="lr")
    p.add_argument("--cores", type=int, default=2, help="local[N] for Spark, --workers N for batchscore run")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--row-group-size", type=int, default=128 * 1024)
    p.add_argument("--data-dir", type=Path, default=ROOT / "bench" / "data")
    p.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "out" / "spark")
    p.add_argument("--json", type=Path, help="write the figures here too")
    p.add_argument("--markdown", type=Path, help="set this script's section of this report (bench/RESULTS.md)")
    a = p.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    data, _ = ensure_data(a.data_dir, a.rows, 42, a.row_group_size)
    paths = ensure_models(a.data_dir / "models", [a.model], 42, 50_000)[a.model]
    a.work_dir.mkdir(parents=True, exist_ok=True)
    common = ["--input", rel(data), "--model", rel(paths["model"]), "--scaler", rel(paths["scaler"])]
    options = ["--features", FEATURES, "--model-version", MODEL_VERSION, "--overwrite"]
    outputs = {key: a.work_dir / key for key in ("naive", "run", "spark")}
    commands = {
        "naive": [sys.executable, "bench/naive.py", *common, "--output", str(outputs["naive"]) + ".parquet"],
        "run": [*batchscore_cmd(None), "run", *common, *options, "--workers", str(a.cores), "--output"],
        "spark": [*batchscore_cmd(None), "spark", *common, *options, "--master", f"local[{a.cores}]", "--output"],
    }
    commands["run"].append(str(outputs["run"]))
    commands["spark"].append(str(outputs["spark"]))
    rounds: dict[str, list[dict]] = {key: [] for key in commands}
    for r in range(a.repeats):
        for key, cmd in commands.items():
            shutil.rmtree(outputs[key], ignore_errors=True)
            rounds[key].append(measured(cmd, a.work_dir / f"{key}-{r}.log"))
            print(key, rounds[key][-1], file=sys.stderr)
    rows = same_scores(outputs["run"], outputs["spark"])
    result = {
        "rows": a.rows,
        "model": a.model,
        "cores": a.cores,
        "repeats": a.repeats,
        "load_average_at_start": load_at_start,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "command": "python bench/spark.py " + " ".join(sys.argv[1:]),
        "started": started,
        "checked_rows": rows,
        "jobs": {
            key: {
                "wall_s": statistics.median(x["wall_s"] for x in runs),
                "rounds_s": [x["wall_s"] for x in runs],
                **{k: max(x[k] for x in runs) for k in runs[0] if k not in ("wall_s", "rounds_s")},
            }
            for key, runs in rounds.items()
        },
    }
    jobs = result["jobs"]
    result["spark_over_run"] = round(jobs["spark"]["wall_s"] / jobs["run"]["wall_s"], 2)
    result["spark_over_naive"] = round(jobs["spark"]["wall_s"] / jobs["naive"]["wall_s"], 2)
    for key in commands:
        shutil.rmtree(outputs[key], ignore_errors=True)
    Path(str(outputs["naive"]) + ".parquet").unlink(missing_ok=True)
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text)
    if a.markdown:
        previous = a.markdown.read_text() if a.markdown.exists() else ""
        a.markdown.write_text(with_section(previous, "bench/spark.py", section(result)))


LABELS = {
    "naive": "naive (tutorial script)",
    "run": "batchscore run --workers {cores}",
    "spark": "batchscore spark --master local[{cores}]",
}


def section(result: dict) -> str:
    """This script's section of RESULTS.md."""
    jobs, cores = result["jobs"], result["cores"]
    lines = [
        f"## Spark local[{cores}] beside batchscore run and the naive script",
        "",
        f"Generated by `{result['command']}` on {result['started']}: {result['rows']:,} rows, model "
        f"`{result['model']}`, {result['repeats']} round(s) (wall = median, memory = max), load average "
        f"{', '.join(map(str, result['load_average_at_start']))} at start, "
        f"{', '.join(map(str, result['load_average_at_end']))} at end. The Spark output was checked equal "
        f"to batchscore run's, row for row ({result['checked_rows']:,} rows).",
        "",
        "| job | wall s | rounds s | ÷ batchscore run | ÷ naive | largest process MB | largest Spark Python worker MB "
        "| Spark Python workers, summed MB | JVM MB | process tree MB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, job in jobs.items():
        spark = key == "spark"
        lines.append(
            f"| {LABELS[key].format(cores=cores)} | {job['wall_s']:.1f} | {', '.join(f'{w:.1f}' for w in job['rounds_s'])} "
            f"| {job['wall_s'] / jobs['run']['wall_s']:.2f} "
            f"| {job['wall_s'] / jobs['naive']['wall_s']:.2f} | {job['process_peak_mb']:,} "
            f"| {job['pyworker_peak_mb'] if spark else '–'} | {job['pyworkers_sum_peak_mb'] if spark else '–'} "
            f"| {job['jvm_peak_mb'] if spark else '–'} | {job['tree_peak_mb']:,} |"
        )
    lines += [
        "",
        "Memory is the kernel's high-water mark (VmHWM) of each process, sampled every 0.1 s over the "
        "whole process tree; Spark Python workers are `pyspark.daemon` and the processes it forks (the "
        "workers that score, each with the process batchscore forks to score a shard); sums count pages "
        "shared between forked processes once per process, an upper bound. The Spark job "
        "runs the same plan, scorer and commit as `batchscore run`, one shard a core; what it adds is "
        "the JVM driver and its start-up, the Python workers' start-up, and the plan written and read "
        "beside the output.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
