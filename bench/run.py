"""Benchmark `batchscore run` against a naive script, engine peers and hard limits.

    python bench/run.py --rows 10000000 --json bench/out/results.json --markdown bench/RESULTS.md
    python bench/run.py --sizes 1000000,10000000 ...      # also shows memory flatness

Every job is a separate process timed from spawn to exit (imports included)
while a sampler sums the RSS of the process and all its descendants. Jobs of
one model alternate (A B C A B C ...) for --repeats rounds; times are medians,
memory peaks are maxima over the rounds. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness's modules, also when imported

from checks import verify  # noqa: E402
from goals import evaluate_goals  # noqa: E402
from jobs import (  # noqa: E402
    BENCH,
    COMPILED_MODELS,
    MODEL_JOBS,
    SHARED_JOBS,
    STARTUP_ROWS,
    batchscore_cmd,
    compiled_cache,
    model_jobs,
    remove,
    shared_jobs,
)
from measuring import add_ratios, run_group, summarize  # noqa: E402
from reporting import kept_sections, markdown, print_summary  # noqa: E402

LIBRARIES = [
    "batchscore",
    "pyarrow",
    "pandas",
    "numpy",
    "scikit-learn",
    "scipy",
    "joblib",
    "threadpoolctl",
    "psutil",
    "dask",
    "ray",
]


# --------------------------------------------------------------------------- setup


def child_env() -> dict[str, str]:
    """Children may write bytecode caches: without them every process re-compiles its
    imports (5x slower imports here), which would dominate small runs."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


WARMUP = """
import importlib, json, pkgutil, sys
import joblib, numpy as np, pandas, pyarrow.dataset, pyarrow.parquet
for scaler, model in zip(sys.argv[1::2], sys.argv[2::2]):
    x = pandas.DataFrame(np.ones((4, 4)), columns=["age", "tenure", "monthly_charges", "total_charges"])
    joblib.load(model).predict_proba(joblib.load(scaler).transform(x))
names = ["dask.dataframe", "ray.data", "batchscore"]
try:
    names += [i.name for i in pkgutil.walk_packages(importlib.import_module("batchscore").__path__, "batchscore.")]
except Exception:
    pass
for name in names:
    if not name.endswith("__main__"):  # importing it would run the CLI
        try:
            importlib.import_module(name)
        except Exception:
            pass
from threadpoolctl import threadpool_info
print(json.dumps([{k: p.get(k) for k in ("internal_api", "num_threads", "version")} for p in threadpool_info()]))
"""


def warm_up(models: dict[str, dict[str, str]], data: Path, env: dict[str, str]) -> list:
    """Untimed: fill bytecode caches for everything the jobs import, and the page cache for the input."""
    with open(data, "rb") as f:
        while f.read(16 << 20):
            pass
    args = [p for m in models.values() for p in (m["scaler"], m["model"])]
    done = subprocess.run([sys.executable, "-c", WARMUP, *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        print(f"warning: warm-up failed:\n{done.stderr[-800:]}", file=sys.stderr)
        return []
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_head(data: Path) -> Path:
    """The first rows of the input, for the start-up jobs (one batch: spawn to first batch scored)."""
    import pyarrow.parquet as pq

    head = data.with_name(f"head{STARTUP_ROWS}_{data.name}")
    if not head.exists():
        pq.write_table(pq.ParquetFile(data).read_row_group(0).slice(0, STARTUP_ROWS), head)
    return head


def precompile(a: argparse.Namespace, models: dict[str, dict[str, str]], env: dict[str, str]) -> None:
    """Untimed: compile the libraries the compiled-engine jobs load (the `compile` job times it)."""
    if not any(k in a.jobs for k in ("bs_c", "start_c")):
        return
    for model in COMPILED_MODELS:
        if model in models:
            cmd = [*batchscore_cmd(a.batchscore), "compile", models[model]["model"], "--out", str(compiled_cache(a))]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                print(f"warning: compiling {model} failed:\n{done.stderr[-800:]}", file=sys.stderr)


def prepare_data(a: argparse.Namespace, rows: int, env: dict[str, str]) -> dict:
    """Generate (or reuse) the table and models in a subprocess, keeping this process small."""
    cmd = [
        sys.executable,
        str(BENCH / "datagen.py"),
        "--data-dir",
        str(a.data_dir),
        "--rows",
        str(rows),
        "--seed",
        str(a.seed),
        "--row-group-size",
        str(a.row_group_size),
        "--models",
        ",".join(a.models),
        "--train-rows",
        str(a.train_rows),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"data generation failed:\n{done.stderr}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    info["input_bytes"] = Path(info["input"]).stat().st_size
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    vm = psutil.virtual_memory()
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(vm.total / 1e9, 1),
        "available_memory_gb_at_start": round(vm.available / 1e9, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "libraries": {lib: version(lib) for lib in LIBRARIES},
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000, help="rows to score (default 10M)")
    p.add_argument("--sizes", help="comma-separated row counts, e.g. 1000000,10000000 (overrides --rows)")
    p.add_argument("--models", default="lr,hgb,gb,rf", help="subset of lr,hgb,gb,rf")
    p.add_argument(
        "--jobs",
        default=",".join(MODEL_JOBS + SHARED_JOBS),
        help=f"subset of {','.join(MODEL_JOBS + SHARED_JOBS)} (default: all)",
    )
    p.add_argument("--peers", action="store_true", help="also run dask / ray jobs when importable")
    p.add_argument("--repeats", type=int, default=2, help="rounds per job; medians are reported")
    p.add_argument("--row-group-size", type=int, default=128 * 1024)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-rows", type=int, default=50_000)
    p.add_argument("--data-dir", type=Path, default=BENCH / "data")
    p.add_argument("--work-dir", type=Path, default=BENCH / "out", help="job outputs and logs")
    p.add_argument("--keep-outputs", action="store_true", help="keep the scored outputs after checking them")
    p.add_argument("--batchscore", help="command to run batchscore (default: the console script of this Python)")
    p.add_argument("--batchscore-args", default="", help="extra flags for both `batchscore run` jobs")
    p.add_argument("--interval", type=float, default=0.05, help="RSS sampling interval, seconds")
    p.add_argument("--json", type=Path, help="results file [default: bench/out/results.json]")
    p.add_argument("--markdown", type=Path, help="write the Markdown report here")
    p.add_argument("--from-json", type=Path, help="only re-render --markdown from an earlier --json file")
    a = p.parse_args(argv)
    a.models = [m for m in a.models.split(",") if m]
    a.jobs = [j for j in a.jobs.split(",") if j]
    unknown = set(a.jobs) - set(MODEL_JOBS + SHARED_JOBS) | set(a.models) - {"lr", "hgb", "gb", "rf"}
    if unknown:
        p.error(f"unknown job or model: {', '.join(sorted(unknown))}")
    a.size_list = [int(s) for s in a.sizes.split(",")] if a.sizes else [a.rows]
    return a


def run_size(a: argparse.Namespace, rows: int, env: dict[str, str], peers: list[str]) -> tuple[dict, list]:
    """Prepare data for one size and run every group of jobs on it."""
    info = prepare_data(a, rows, env)
    data = Path(info["input"])
    print(
        f"\n== {rows:,} rows: {data} ({'generated in ' + str(info['seconds']) + ' s' if info['generated'] else 'reused'})",
        flush=True,
    )
    pools = warm_up(info["models"], data, env)
    head = write_head(data)
    precompile(a, info["models"], env)
    work, logs = a.work_dir / "work" / str(rows), a.work_dir / "logs" / str(rows)
    block: dict = {"data": {k: v for k, v in info.items() if k != "models"}, "models": {}, "shared": {}}
    shared = shared_jobs(data, work / "shared", a.jobs)
    if shared:
        run_group(shared, a.repeats, logs / "shared", env, a.interval, f"{rows:,} shared")
        block["shared"] = {j.key: summarize(j, rows) for j in shared}
        for j in shared:
            remove(j.output)
    keys = [k for k in MODEL_JOBS if k in a.jobs] + peers
    for model in a.models:
        jobs = model_jobs(model, info["models"][model], data, work / model, keys, a, head)
        run_group(jobs, a.repeats, logs / model, env, a.interval, f"{rows:,} {model}")
        summaries = {j.key: summarize(j, rows) for j in jobs}
        add_ratios(summaries)
        block["models"][model] = {"model_files": info["models"][model], "jobs": summaries, "checks": verify(jobs)}
        if not a.keep_outputs:
            for j in jobs:
                remove(j.output)
    return block, pools


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.from_json:
        results = json.loads(a.from_json.read_text())
    else:
        env = child_env()
        from peers import ENGINES, available  # cheap: only checks that the engines are importable

        peers = available() if a.peers else []
        missing = [engine for engine in ENGINES if a.peers and engine not in peers]
        if missing:
            print(f"warning: --peers: {', '.join(missing)} not importable, left out (`make bench` installs them)")
        results = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "machine": machine(),
            "config": {
                "command": shlex.join(["python", "bench/run.py", *(argv or sys.argv[1:])]),
                "sizes": a.size_list,
                "models": a.models,
                "jobs": a.jobs,
                "peers": peers,
                "repeats": a.repeats,
                "row_group_size": a.row_group_size,
                "seed": a.seed,
                "train_rows": a.train_rows,
                "batchscore": shlex.join(batchscore_cmd(a.batchscore)),
                "batchscore_args": a.batchscore_args,
                "sample_interval_s": a.interval,
            },
            "sizes": {},
        }
        load = os.getloadavg()[0]
        if load > 0.5:
            print(
                f"warning: 1-minute load average is {load:.2f}; other work on this machine skews timings "
                "(threaded predictors suffer most)"
            )
        if os.environ.get("PYTHONDONTWRITEBYTECODE"):
            print("note: PYTHONDONTWRITEBYTECODE is set here; it is removed for the benchmark's processes")
        print(
            f"machine: {results['machine']['cpu_model']}, {results['machine']['usable_cores']} cores, "
            f"{results['machine']['memory_gb']} GB; peers: {', '.join(peers) or 'none'}",
            flush=True,
        )
        for rows in sorted(a.size_list):
            results["sizes"][str(rows)], results["threadpools"] = run_size(a, rows, env, peers)
        results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        results["goals"] = evaluate_goals(results)
        print_summary(results)
        a.json = a.json or BENCH / "out" / "results.json"

    def report() -> str:  # the sections other scripts keep there (bench/spark.py) stay
        return markdown(results) + kept_sections(a.markdown.read_text() if a.markdown.exists() else "")

    for path, text in ((a.json, lambda: json.dumps(results, indent=2)), (a.markdown, report)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text())
            print(f"wrote {path}")
    return 1 if any(g["status"] == "FAIL" for g in results["goals"]) else 0


if __name__ == "__main__":
    sys.exit(main())
