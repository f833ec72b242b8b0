"""The benchmark's jobs: what each one runs, its label, and which are compared with which.

Every job is a separate process with the repository root as working directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from batchscore.io.layout import receipts_folder

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent  # every job runs with the repository root as working directory
FEATURES = "age,tenure,monthly_charges,total_charges"
MODEL_VERSION = "bench"
MB = 1e6
JOB_LABELS = {
    "naive": "naive (tutorial script)",
    "bs_w1": "batchscore run --workers 1",
    "bs_1core": "batchscore run --workers 1, one core (taskset)",
    "bs": "batchscore run (default workers)",
    "bs_c": "batchscore run --engine compiled (default workers)",
    "start": "start-up: batchscore run on one batch",
    "start_c": "start-up: batchscore run --engine compiled on one batch",
    "compile": "batchscore compile (cold cache)",
    "compute": "compute-only limit",
    "io": "I/O-only limit",
    "imports": "imports only (pyarrow, pandas, sklearn)",
    "seq": "sequential limit (in-process)",
    "dask": "dask map_partitions (threads)",
    "ray": "ray data map_batches",
}
MODEL_JOBS = ["naive", "bs_w1", "bs_1core", "bs", "bs_c", "compute", "seq", "start", "start_c", "compile"]
SHARED_JOBS = ["io", "imports"]  # model-independent, run once per size
LIMIT_JOBS = ["compute", "seq", "io", "imports"]
BATCHSCORE_JOBS = ["bs_w1", "bs_1core", "bs", "bs_c"]
CHECKED_JOBS = ["bs_w1", "bs_1core", "bs", "bs_c", "seq", "dask", "ray"]  # outputs compared with naive's
#: Jobs for the compiled engine, run for the tree models; RandomForest shows what the engine does
#: with a model it does not compile (it scores it with scikit-learn), so it gets no `compile` job.
COMPILED_JOBS = ["bs_c", "start_c", "compile"]
TREE_MODELS = ["hgb", "gb", "rf"]
COMPILED_MODELS = ["hgb", "gb"]
#: Jobs that do not score the whole input: no throughput ratios.
PARTIAL_JOBS = ["start", "start_c", "compile"]
#: Start-up jobs score only the first rows of the input: their wall is spawn to first batch
#: scored, plus the (small) write and commit of that batch.
STARTUP_ROWS = 16_384


@dataclass
class Job:
    key: str
    model: str | None
    cmd: list[str]
    output: Path | None  # removed (untimed) before every run so each round does the same work
    runs: list[dict] = field(default_factory=list)


def rel(path: Path | str) -> str:
    """Paths inside the repository relative to it, so commands in the report stay short."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def batchscore_cmd(arg: str | None) -> list[str]:
    """The console script next to this interpreter, else `python -m batchscore`."""
    if arg:
        return shlex.split(arg)
    script = Path(sys.executable).parent / "batchscore"
    return [str(script)] if script.exists() else [sys.executable, "-m", "batchscore"]


def model_jobs(
    model: str, paths: dict[str, str], data: Path, work: Path, keys: list[str], a: argparse.Namespace, head: Path
) -> list[Job]:
    """The jobs scoring `data` with one model, in the order they alternate; start-up jobs score `head`."""
    py, m, s = sys.executable, rel(paths["model"]), rel(paths["scaler"])
    common = ["--input", rel(data), "--model", m, "--scaler", s]
    options = [
        "--features",
        FEATURES,
        "--model-version",
        MODEL_VERSION,
        "--log-format",
        "json",
        *shlex.split(a.batchscore_args),
    ]
    bs = batchscore_cmd(a.batchscore) + ["run", *common, *options]
    start = batchscore_cmd(a.batchscore) + ["run", "--input", rel(head), "--model", m, "--scaler", s, *options]
    compiled = ["--engine", "compiled", "--compiled-cache", rel(compiled_cache(a))]
    specs = {
        "naive": ([py, "bench/naive.py", *common, "--output"], work / "naive.parquet"),
        "bs_w1": ([*bs, "--workers", "1", "--output"], work / "bs_w1"),
        # --workers 1 reads and writes on threads that use a second core when there is one; this
        # confines the whole process to one core, the baseline for scaling per core.
        "bs_1core": (
            ["taskset", "-c", str(min(os.sched_getaffinity(0))), *bs, "--workers", "1", "--output"],
            work / "bs_1core",
        ),
        "bs": ([*bs, "--output"], work / "bs"),
        "bs_c": ([*bs, *compiled, "--output"], work / "bs_c"),
        "start": ([*start, "--output"], work / "start"),
        "start_c": ([*start, *compiled, "--output"], work / "start_c"),
        "compile": ([*batchscore_cmd(a.batchscore), "compile", m, "--out"], work / "compile-cache"),
        "compute": ([py, "bench/limits.py", "compute", *common], None),
        "seq": ([py, "bench/limits.py", "sequential", *common, "--output"], work / "seq.parquet"),
        "dask": ([py, "bench/peers.py", "dask", *common, "--output"], work / "dask"),
        "ray": ([py, "bench/peers.py", "ray", *common, "--output"], work / "ray"),
    }
    jobs = []
    for key in keys:
        if key == "bs_1core" and not shutil.which("taskset"):
            continue
        if key in COMPILED_JOBS and model not in (COMPILED_MODELS if key == "compile" else TREE_MODELS):
            continue
        cmd, out = specs[key]
        jobs.append(Job(key, model, cmd + ([rel(out)] if out else []), out))
    return jobs


def compiled_cache(a: argparse.Namespace) -> Path:
    """The compiled libraries the timed jobs load (filled, untimed, before they run)."""
    return a.work_dir / "compiled-cache"


def shared_jobs(data: Path, work: Path, keys: list[str]) -> list[Job]:
    """The model-independent limits: I/O only, and the bare cost of the imports."""
    py, out = sys.executable, work / "io.parquet"
    specs = {
        "io": Job("io", None, [py, "bench/limits.py", "io", "--input", rel(data), "--output", rel(out)], out),
        "imports": Job("imports", None, [py, "bench/limits.py", "imports"], None),
    }
    return [specs[k] for k in SHARED_JOBS if k in keys]


def remove(path: Path | None) -> None:
    if path is None:
        return
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def receipt_workers(output: Path | None) -> int | None:
    """How many worker processes batchscore used, from its shard receipt."""
    try:
        receipts = sorted(Path(receipts_folder(str(output))).glob("*.json"))
        return sum(json.loads(p.read_text()).get("workers", 0) for p in receipts) or None
    except (OSError, TypeError, ValueError):
        return None
