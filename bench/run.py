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
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import psutil

from batchscore.layout import receipts_folder

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent  # every job runs with the repository root as working directory
FEATURES = "age,tenure,monthly_charges,total_charges"
MODEL_VERSION = "bench"
MB = 1e6
LIBRARIES = ["batchscore", "pyarrow", "pandas", "numpy", "scikit-learn", "scipy", "joblib",
             "threadpoolctl", "psutil", "dask", "ray"]
JOB_LABELS = {
    "naive": "naive (tutorial script)",
    "bs_w1": "batchscore run --workers 1",
    "bs_1core": "batchscore run --workers 1, one core (taskset)",
    "bs": "batchscore run (default workers)",
    "compute": "compute-only limit",
    "io": "I/O-only limit",
    "imports": "imports only (pyarrow, pandas, sklearn)",
    "seq": "sequential limit (in-process)",
    "dask": "dask map_partitions (threads)",
    "ray": "ray data map_batches",
}
MODEL_JOBS = ["naive", "bs_w1", "bs_1core", "bs", "compute", "seq"]
SHARED_JOBS = ["io", "imports"]  # model-independent, run once per size
LIMIT_JOBS = ["compute", "seq", "io", "imports"]
BATCHSCORE_JOBS = ["bs_w1", "bs_1core", "bs"]
CHECKED_JOBS = ["bs_w1", "bs_1core", "bs", "seq", "dask", "ray"]  # outputs compared with naive's


# --------------------------------------------------------------------------- measuring


@dataclass
class Peaks:
    """Memory high-water marks of one process tree, in bytes."""

    tree: int = 0
    tree_pss: int = 0
    process: int = 0
    process_cmd: str = ""
    processes: int = 0
    samples: int = 0


#: How often the sampler lists descendants (reads all of /proc, ~2.5 ms) and sums PSS (the
#: kernel walks each process's page tables, ~5 ms per process): rarely enough that on a 2-core
#: machine the sampler does not slow a job of several processes more than a single process.
RESCAN_S, PSS_S = 0.25, 1.0


def _sample(root_pid: int, stop: threading.Event, peaks: Peaks, interval: float) -> None:
    """Sum RSS over the tree every `interval`; rescan for new descendants every RESCAN_S and sum
    PSS every PSS_S.

    Reading RSS and the kernel's peak (VmHWM) costs ~0.1 ms per process, so it runs often. PSS
    splits shared pages between the processes mapping them, so its sum does not double-count
    forked workers.
    """
    known: dict[int, psutil.Process] = {}
    commands: dict[int, str] = {}
    try:
        known[root_pid] = psutil.Process(root_pid)
    except psutil.NoSuchProcess:
        return
    next_rescan = next_pss = 0.0
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_rescan:
            try:
                for child in known[root_pid].children(recursive=True):
                    known.setdefault(child.pid, child)
            except (psutil.NoSuchProcess, KeyError):
                pass
            next_rescan = now + RESCAN_S
        if now >= next_pss:
            peaks.tree_pss = max(peaks.tree_pss, _pss_sum(known.values()))
            next_pss = now + PSS_S
        total, alive = 0, 0
        for pid, proc in list(known.items()):
            try:
                rss = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                del known[pid]
                continue
            total += rss
            alive += 1
            peak = max(rss, _high_water_mark(pid))
            if peak > peaks.process:
                peaks.process = peak
                if pid not in commands:
                    try:
                        commands[pid] = " ".join(proc.cmdline()[:4])[:120]
                    except psutil.Error:
                        commands[pid] = "?"
                peaks.process_cmd = commands[pid]
        peaks.tree = max(peaks.tree, total)
        peaks.processes = max(peaks.processes, alive)
        peaks.samples += 1
        stop.wait(interval)


def _high_water_mark(pid: int) -> int:
    """The kernel's peak RSS of this process since its exec (VmHWM), so peaks between samples count.

    Unlike wait4's ru_maxrss, it does not inherit the peak of the process that forked it.
    """
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _pss_sum(procs) -> int:
    total = 0
    for proc in procs:
        try:
            total += proc.memory_full_info().pss
        except (psutil.Error, AttributeError):  # gone, or no smaps on this platform
            pass
    return total


def measure(cmd: list[str], log_stem: Path, env: dict[str, str], interval: float) -> dict:
    """Run cmd to completion; return wall time, exit code, memory peaks and its stdout JSON."""
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    peaks, stop = Peaks(), threading.Event()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        sampler = threading.Thread(target=_sample, args=(proc.pid, stop, peaks, interval), daemon=True)
        sampler.start()
        # wait4 for the CPU times; its ru_maxrss is not used: at exec, Linux carries the
        # forking process's peak into the child's, so it would report this harness's memory.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        sampler.join()
    return {
        "cmd": shlex.join(cmd).replace(f"{ROOT}/", ""),
        "rc": proc.returncode,
        "wall_s": round(wall, 4),
        "tree_peak_mb": round(peaks.tree / MB, 1),
        "tree_pss_peak_mb": round(peaks.tree_pss / MB, 1),
        "proc_peak_mb": round(peaks.process / MB, 1),
        "proc_peak_cmd": peaks.process_cmd,
        "max_processes": peaks.processes,
        "samples": peaks.samples,
        "user_cpu_s": round(usage.ru_utime, 2),
        "sys_cpu_s": round(usage.ru_stime, 2),
        "stdout_json": last_json_line(out_path),
        "stderr_tail": err_path.read_text(errors="replace")[-600:] if proc.returncode else "",
        "log": rel(out_path),
    }


def last_json_line(path: Path) -> dict | None:
    """The last stdout line that parses as a JSON object (limits and peers print one)."""
    for line in reversed(path.read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                found = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(found.get("seconds"), (int, float)):  # batchscore's own timing of its run
                found.setdefault("timed_s", found["seconds"])
            return found
    return None


# --------------------------------------------------------------------------- jobs


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


def model_jobs(model: str, paths: dict[str, str], data: Path, work: Path, keys: list[str],
               a: argparse.Namespace) -> list[Job]:
    """The jobs scoring `data` with one model, in the order they alternate."""
    py, m, s = sys.executable, rel(paths["model"]), rel(paths["scaler"])
    common = ["--input", rel(data), "--model", m, "--scaler", s]
    bs = batchscore_cmd(a.batchscore) + ["run", *common, "--features", FEATURES,
                                         "--model-version", MODEL_VERSION, "--log-format", "json",
                                         *shlex.split(a.batchscore_args)]
    specs = {
        "naive": ([py, "bench/naive.py", *common, "--output"], work / "naive.parquet"),
        "bs_w1": ([*bs, "--workers", "1", "--output"], work / "bs_w1"),
        # --workers 1 reads and writes on threads that use a second core when there is one; this
        # confines the whole process to one core, the baseline for scaling per core.
        "bs_1core": (["taskset", "-c", str(min(os.sched_getaffinity(0))), *bs, "--workers", "1", "--output"],
                     work / "bs_1core"),
        "bs": ([*bs, "--output"], work / "bs"),
        "compute": ([py, "bench/limits.py", "compute", *common], None),
        "seq": ([py, "bench/limits.py", "sequential", *common, "--output"], work / "seq.parquet"),
        "dask": ([py, "bench/peers.py", "dask", *common, "--output"], work / "dask"),
        "ray": ([py, "bench/peers.py", "ray", *common, "--output"], work / "ray"),
    }
    jobs = []
    for key in keys:
        if key == "bs_1core" and not shutil.which("taskset"):
            continue
        cmd, out = specs[key]
        jobs.append(Job(key, model, cmd + ([rel(out)] if out else []), out))
    return jobs


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


def run_group(jobs: list[Job], repeats: int, logs: Path, env: dict[str, str], interval: float, tag: str) -> None:
    """Run the jobs in turn, `repeats` rounds (ABC ABC ...), printing one line per run."""
    for r in range(1, repeats + 1):
        for job in jobs:
            remove(job.output)
            if job.output is not None:
                job.output.parent.mkdir(parents=True, exist_ok=True)
            res = measure(job.cmd, logs / f"{job.key}-r{r}", env, interval)
            if job.key in BATCHSCORE_JOBS and res["stdout_json"] is not None:
                res["stdout_json"]["workers"] = receipt_workers(job.output)
            job.runs.append(res)
            timed = (res["stdout_json"] or {}).get("timed_s")
            print(f"  [{tag} r{r}] {job.key:<8} rc={res['rc']} wall={res['wall_s']:8.2f}s"
                  f"{f' timed={timed:.2f}s' if timed is not None else ''}"
                  f" tree={res['tree_peak_mb']:8.1f}MB pss={res['tree_pss_peak_mb']:8.1f}MB"
                  f" proc={res['proc_peak_mb']:7.1f}MB"
                  f" procs={res['max_processes']}", flush=True)
            if res["rc"]:
                print(f"    FAILED, see {res['log']} / .err:\n    {res['stderr_tail'][-300:]}", flush=True)


def receipt_workers(output: Path | None) -> int | None:
    """How many worker processes batchscore used, from its shard receipt."""
    try:
        receipts = sorted(Path(receipts_folder(str(output))).glob("*.json"))
        return sum(json.loads(p.read_text()).get("workers", 0) for p in receipts) or None
    except (OSError, TypeError, ValueError):
        return None


def summarize(job: Job, rows: int) -> dict:
    """Median times over rounds, maximum memory over rounds."""
    ok = [r for r in job.runs if r["rc"] == 0]
    summary: dict = {"job": job.key, "label": JOB_LABELS[job.key], "model": job.model, "cmd": job.runs[0]["cmd"],
                     "ok": len(ok) == len(job.runs), "rounds": len(job.runs), "runs": job.runs}
    if not ok:
        return summary
    wall = statistics.median(r["wall_s"] for r in ok)
    summary.update(
        wall_s=round(wall, 4),
        rows_per_s=round(rows / wall),
        cpu_s=round(statistics.median(r["user_cpu_s"] + r["sys_cpu_s"] for r in ok), 2),
        tree_peak_mb=max(r["tree_peak_mb"] for r in ok),
        tree_pss_peak_mb=max(r["tree_pss_peak_mb"] for r in ok),
        proc_peak_mb=max(r["proc_peak_mb"] for r in ok),
        max_processes=max(r["max_processes"] for r in ok),
    )
    timings = [r["stdout_json"] for r in ok if r["stdout_json"]]
    keys = [k for k, v in (timings[0] if timings else {}).items() if k.endswith("_s") and isinstance(v, (int, float))]
    summary["timed"] = {k: round(statistics.median(t[k] for t in timings if k in t), 4) for k in keys}
    summary["info"] = {k: timings[-1][k] for k in ("workers", "parts", "partitions")
                       if timings and timings[-1].get(k) is not None}
    return summary


def add_ratios(jobs: dict[str, dict]) -> None:
    """Throughput vs naive, wall vs compute-only and sequential limits (their timed sections)."""
    naive = jobs.get("naive", {}).get("wall_s")
    compute = jobs.get("compute", {}).get("timed", {}).get("timed_s")
    seq = jobs.get("seq", {}).get("timed", {}).get("timed_s")
    for key, s in jobs.items():
        if "wall_s" not in s:
            continue
        s["x_naive"] = round(naive / s["wall_s"], 3) if naive else None
        if key not in LIMIT_JOBS:
            s["wall_over_compute"] = round(s["wall_s"] / compute, 3) if compute else None
            s["wall_over_seq"] = round(s["wall_s"] / seq, 3) if seq else None


# --------------------------------------------------------------------------- correctness


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def read_scores(path: Path):
    """customer_id, prediction, probability of a Parquet file or dataset directory, in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = ["customer_id", "prediction", "probability"]
    if path.is_file():
        return pq.read_table(path, columns=cols)
    files = sorted((p for p in path.rglob("*.parquet")
                    if not any(part.startswith(("_", ".")) for part in p.relative_to(path).parts)),
                   key=lambda p: natural_key(str(p.relative_to(path))))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {path}")
    return pa.concat_tables([pq.read_table(f, columns=cols) for f in files])


def compare(reference: Path, candidate: Path, require_order: bool) -> dict:
    """Same rows, same labels, same probabilities (to 1e-9) as the naive output."""
    import numpy as np

    try:
        ref, got = read_scores(reference), read_scores(candidate)
    except (OSError, ValueError, KeyError) as exc:  # a missing or unreadable output is a failed check, not a crash
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    result: dict = {"rows_ref": ref.num_rows, "rows": got.num_rows}
    if ref.num_rows != got.num_rows:
        return {**result, "ok": False, "error": "row counts differ"}
    ids_ref, ids = ref["customer_id"].to_numpy(), got["customer_id"].to_numpy()
    result["order_preserved"] = bool(np.array_equal(ids_ref, ids))
    if not result["order_preserved"]:  # engines that reorder rows: align on the unique id
        ref = ref.take(np.argsort(ids_ref, kind="stable"))
        got = got.take(np.argsort(ids, kind="stable"))
        if not np.array_equal(ref["customer_id"].to_numpy(), got["customer_id"].to_numpy()):
            return {**result, "ok": False, "error": "customer_id sets differ"}
    p_ref = ref["prediction"].to_numpy(zero_copy_only=False)
    p = got["prediction"].to_numpy(zero_copy_only=False)
    if p_ref.dtype.kind in "iub" and p.dtype.kind in "iub":
        mismatches = int(np.count_nonzero(p_ref != p))
    else:
        mismatches = int(np.count_nonzero(p_ref.astype(str) != p.astype(str)))
    diff = float(np.max(np.abs(ref["probability"].to_numpy() - got["probability"].to_numpy()), initial=0.0))
    result.update(prediction_mismatches=mismatches, max_probability_diff=diff)
    result["ok"] = mismatches == 0 and diff <= 1e-9 and (result["order_preserved"] or not require_order)
    return result


def verify(jobs: list[Job]) -> dict[str, dict]:
    by_key = {j.key: j for j in jobs}
    naive = by_key.get("naive")
    if naive is None or naive.output is None or not naive.output.exists():
        return {}
    checks = {}
    for key in CHECKED_JOBS:
        job = by_key.get(key)
        if job and job.output is not None and job.runs and job.runs[-1]["rc"] == 0:
            checks[key] = compare(naive.output, job.output, require_order=key in BATCHSCORE_JOBS)
    return checks


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


def prepare_data(a: argparse.Namespace, rows: int, env: dict[str, str]) -> dict:
    """Generate (or reuse) the table and models in a subprocess, keeping this process small."""
    cmd = [sys.executable, str(BENCH / "datagen.py"), "--data-dir", str(a.data_dir), "--rows", str(rows),
           "--seed", str(a.seed), "--row-group-size", str(a.row_group_size), "--models", ",".join(a.models),
           "--train-rows", str(a.train_rows)]
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


# --------------------------------------------------------------------------- goals


def goal(name: str, value: float | None, op: str, threshold: float, detail: str = "", ran: bool = True) -> dict:
    """PASS/FAIL against the threshold; SKIP when its jobs were not selected, FAIL when they failed."""
    if value is None:
        status = "FAIL" if ran else "SKIP"
        detail = detail or ("a job it needs failed" if ran else "its jobs were not run")
    else:
        status = "PASS" if (value >= threshold if op == ">=" else value <= threshold if op == "<=" else value < threshold) else "FAIL"
    return {"goal": name, "value": value, "op": op, "threshold": threshold, "status": status, "detail": detail}


def evaluate_goals(results: dict) -> list[dict]:
    """The targets batchscore is held to, evaluated at the largest size run."""
    sizes = sorted(int(s) for s in results["sizes"])
    big, small = str(sizes[-1]), str(sizes[0])
    models = results["sizes"][big]["models"]
    cfg = results["config"]

    def ran(model: str, *keys: str) -> bool:
        return model in cfg["models"] and all(k in cfg["jobs"] for k in keys)

    def job(model: str, key: str, size: str = big) -> dict:
        return results["sizes"][size]["models"].get(model, {}).get("jobs", {}).get(key, {})

    def ratio(num: float | None, den: float | None) -> float | None:
        return round(num / den, 3) if num and den else None

    at = f"at {int(big):,} rows"
    out = [
        goal(f"LR: batchscore throughput vs naive {at}", job("lr", "bs").get("x_naive"), ">=", 3.0,
             ran=ran("lr", "bs", "naive")),
        goal(f"HGB: batchscore throughput vs naive {at}", job("hgb", "bs").get("x_naive"), ">=", 2.5,
             ran=ran("hgb", "bs", "naive")),
        goal(f"HGB: batchscore wall / compute-only limit {at}", job("hgb", "bs").get("wall_over_compute"), "<=", 1.15,
             ran=ran("hgb", "bs", "compute")),
        goal(f"LR: batchscore wall / sequential limit {at}", job("lr", "bs").get("wall_over_seq"), "<", 1.0,
             ran=ran("lr", "bs", "seq")),
        goal(f"HGB: batchscore wall / sequential limit {at}", job("hgb", "bs").get("wall_over_seq"), "<", 1.0,
             ran=ran("hgb", "bs", "seq")),
    ]
    peaks = [(j.get("proc_peak_mb"), f"{m}/{k}@{s}") for s in results["sizes"] for m in results["sizes"][s]["models"]
             for k in BATCHSCORE_JOBS if (j := job(m, k, s)).get("proc_peak_mb") is not None]
    worst = max(peaks, default=(None, ""))
    out.append(goal("every batchscore process: peak RSS (MB), all sizes and models", worst[0], "<", 300.0,
                    f"largest: {worst[1]}" if peaks else "", ran=any(ran(m, k) for m in cfg["models"] for k in BATCHSCORE_JOBS)))
    if big != small:
        flat = [(ratio(job(m, k).get("tree_peak_mb"), job(m, k, small).get("tree_peak_mb")), f"{m}/{k}")
                for m in models for k in BATCHSCORE_JOBS]
        flat = [f for f in flat if f[0] is not None]
        worst_flat = max(flat, default=(None, ""))
        out.append(goal(f"batchscore tree peak {int(big):,} / {int(small):,} rows", worst_flat[0], "<=", 1.15,
                        f"largest: {worst_flat[1]}" if flat else "",
                        ran=any(ran(m, k) for m in cfg["models"] for k in BATCHSCORE_JOBS)))
    else:
        out.append(goal("batchscore tree peak big / small size", None, "<=", 1.15, "needs --sizes with two sizes",
                        ran=False))
    workers = job("rf", "bs").get("info", {}).get("workers") or f"{results['machine']['usable_cores']} cores"
    out.append(goal(f"RF: default workers ({workers}) vs --workers 1 throughput {at}",
                    ratio(job("rf", "bs_w1").get("wall_s"), job("rf", "bs").get("wall_s")), ">=", 1.7,
                    ran=ran("rf", "bs", "bs_w1")))
    out.append(goal(f"RF, supplementary: default workers ({workers}) vs --workers 1 on one core {at}",
                    ratio(job("rf", "bs_1core").get("wall_s"), job("rf", "bs").get("wall_s")), ">=", 1.7,
                    ran=ran("rf", "bs", "bs_1core")))
    checks = [(m, k, c) for s in results["sizes"] for m, v in results["sizes"][s]["models"].items()
              for k, c in v.get("checks", {}).items() if k in BATCHSCORE_JOBS]
    bad = [f"{m}/{k}" for m, k, c in checks if not c.get("ok")]
    out.append(goal("batchscore output == naive output (rows, order, predictions, probabilities)",
                    None if not checks else float(len(checks) - len(bad)), ">=", float(len(checks)) or 1.0,
                    f"failed: {', '.join(bad)}" if bad else f"{len(checks)} outputs checked" if checks else "",
                    ran=any(ran(m, "naive", k) for m in cfg["models"] for k in BATCHSCORE_JOBS)))
    return out


# --------------------------------------------------------------------------- report


def fmt(v, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def markdown(results: dict) -> str:
    """RESULTS.md: machine, goals, per-size tables, memory flatness, correctness."""
    m, cfg = results["machine"], results["config"]
    lines = ["# batchscore benchmark results", "",
             f"Generated by `{cfg['command']}` on {results['started']}.", "", "## Machine", "",
             "| | |", "|---|---|",
             f"| CPU | {m['cpu_model']} |",
             f"| cores | {m['usable_cores']} usable, {m['logical_cores']} logical, {m['physical_cores']} physical |",
             f"| memory | {m['memory_gb']} GB ({m['available_memory_gb_at_start']} GB available at start) |",
             (f"| load average at start / end | {', '.join(map(str, m['load_average_at_start']))} / "
             f"{', '.join(map(str, m.get('load_average_at_end', [])))} |"),
             f"| OS | {m['os']} |", f"| Python | {m['python']} |"]
    lines += [f"| {lib} | {v} |" for lib, v in m["libraries"].items() if v]
    if results.get("threadpools"):
        pools = ", ".join(f"{p['internal_api']} {p.get('version') or ''} ({p['num_threads']} threads)".replace("  ", " ")
                          for p in results["threadpools"])
        lines.append(f"| native thread pools | {pools} |")
    lines += ["", "## Goals", "", "| goal | measured | target | result |", "|---|---|---|---|"]
    for g in results["goals"]:
        detail = f" ({g['detail']})" if g["detail"] else ""
        lines.append(f"| {g['goal']}{detail} | {fmt(g['value'], '.3g')} | {g['op']} {g['threshold']:g} | **{g['status']}** |")
    lines += ["", "## Setup", "",
              (f"- Input: one Parquet file per size, {cfg['row_group_size']:,}-row row groups, 10 columns "
              "(4 float/int features, `customer_id`, 5 passthrough columns), seed "
              f"{cfg['seed']}; models trained on {cfg['train_rows']:,} separate rows."),
              ("- Models: `lr` LogisticRegression, `hgb` HistGradientBoostingClassifier (defaults), "
              "`rf` RandomForestClassifier (50 trees, depth 10, saved with n_jobs=None), each after a StandardScaler."),
              f"- Rounds: {cfg['repeats']} per job, jobs of one model alternating; wall = median, memory = max over rounds.",
              ("- wall: spawn to exit of the whole process (imports, model load, read, score, write); "
              "rows/s = rows / wall."),
              ("- Limits: compute-only = scaler.transform + one predict_proba on the whole table, features "
              "already in memory, all cores; sequential = read, score, write the whole table one step after "
              "the other in one process; I/O-only = read + write the table. Their in-process timed section "
              "(`total`) is the number compared against; their process wall is shown too."),
              ("- ×naive = naive wall / job wall (= throughput ratio). ÷compute and ÷seq = job wall / the timed "
              "section of the compute-only and sequential limits."),
              ("- CPU s: user + system CPU time of the process and its descendants (more than wall × cores "
              "means busy-waiting or contention)."),
              ("- tree peak: max over time of the summed RSS of the process and all its descendants (shared pages "
              "are counted once per process, so this is an upper bound); max proc: the largest single process "
              "(kernel high-water mark). tree PSS: the same sum with proportional set size, sampled every "
              f"{PSS_S:g} s, which shares pages between processes instead of counting them in each. "
              "MB = 10^6 bytes."), ""]
    for size in sorted(results["sizes"], key=int):
        block = results["sizes"][size]
        data = block["data"]
        lines += [f"## {int(size):,} rows", "",
                  f"Input {data['input_bytes'] / MB:,.0f} MB on disk.", ""]
        io, imp = block.get("shared", {}).get("io", {}), block.get("shared", {}).get("imports", {})
        if "wall_s" in io:
            t = io.get("timed", {})
            lines += [(f"- I/O-only limit: read {fmt(t.get('read_s'))} s + write {fmt(t.get('write_s'))} s "
                      f"(process wall {fmt(io['wall_s'])} s, peak RSS {fmt(io['proc_peak_mb'], '.0f')} MB).")]
        if "wall_s" in imp:
            lines += [(f"- Importing pyarrow, pandas, scikit-learn, joblib: {fmt(imp.get('timed', {}).get('timed_s'))} s "
                      f"(process wall {fmt(imp['wall_s'])} s, peak RSS {fmt(imp['proc_peak_mb'], '.0f')} MB): "
                      "the floor under every scoring process.")]
        lines.append("")
        for model, mblock in block["models"].items():
            lines += [f"### {model}", "",
                      ("| job | wall s | rows/s | ×naive | ÷compute | ÷seq | CPU s | tree peak MB | tree PSS MB | max proc MB "
                      "| procs | in-process timings s |"),
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
            for s in mblock["jobs"].values():
                if "wall_s" not in s:
                    lines.append(f"| {s['label']} | failed | | | | | | | | | | |")
                    continue
                timed = ", ".join([f"{'total' if k == 'timed_s' else k.removesuffix('_s')} {v:.2f}"
                                   for k, v in s.get("timed", {}).items()]
                                  + [f"{k} {v}" for k, v in s.get("info", {}).items()])
                lines.append(f"| {s['label']} | {s['wall_s']:.2f} | {s['rows_per_s']:,} | {fmt(s.get('x_naive'))} | "
                             f"{fmt(s.get('wall_over_compute'))} | {fmt(s.get('wall_over_seq'))} | {fmt(s.get('cpu_s'), '.1f')} | "
                             f"{s['tree_peak_mb']:,.0f} | {fmt(s.get('tree_pss_peak_mb'), ',.0f')} | "
                             f"{s['proc_peak_mb']:,.0f} | {s['max_processes']} | {timed} |")
            lines.append("")
    sizes = sorted(results["sizes"], key=int)
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        lines += ["## Memory vs input size", "",
                  f"Tree peak RSS (MB) per job; ratio = {int(hi):,} rows / {int(lo):,} rows.", "",
                  "| model | job | " + " | ".join(f"{int(s):,}" for s in sizes) + " | ratio |",
                  "|---|---|" + "---:|" * (len(sizes) + 1)]
        for model in results["sizes"][hi]["models"]:
            for key in results["sizes"][hi]["models"][model]["jobs"]:
                vals = [results["sizes"][s]["models"].get(model, {}).get("jobs", {}).get(key, {}).get("tree_peak_mb")
                        for s in sizes]
                r = vals[-1] / vals[0] if vals[0] and vals[-1] else None
                lines.append(f"| {model} | {JOB_LABELS[key]} | " + " | ".join(fmt(v, ',.0f') for v in vals)
                             + f" | {fmt(r)} |")
        lines.append("")
    lines += ["## Correctness", "", ("Each output is read back and compared with the naive output "
              "(row count, `prediction` exactly, `probability` to 1e-9; batchscore must also keep input order)."), "",
              "| rows | model | job | ok | rows | order kept | prediction mismatches | max prob diff |",
              "|---:|---|---|---|---:|---|---:|---:|"]
    for size in sorted(results["sizes"], key=int):
        for model, mblock in results["sizes"][size]["models"].items():
            for key, c in mblock.get("checks", {}).items():
                lines.append(f"| {int(size):,} | {model} | {JOB_LABELS[key]} | {'yes' if c.get('ok') else 'NO'} | "
                             f"{fmt(c.get('rows'), ',')} | {c.get('order_preserved', '–')} | "
                             f"{c.get('prediction_mismatches', c.get('error', '–'))} | {fmt(c.get('max_probability_diff'), '.1e')} |")
    lines += ["", "Commands (last size):", "", "```"]
    last = results["sizes"][sizes[-1]]
    for mblock in last["models"].values():
        for s in mblock["jobs"].values():
            lines.append(s["cmd"])
    for s in last.get("shared", {}).values():
        lines.append(s["cmd"])
    lines += ["```", ""]
    return "\n".join(lines)


def print_summary(results: dict) -> None:
    for size in sorted(results["sizes"], key=int):
        print(f"\n== {int(size):,} rows ==")
        for key, s in results["sizes"][size].get("shared", {}).items():
            timed = ", ".join(f"{k} {v:.2f}s" for k, v in s.get("timed", {}).items())
            print(f"  {'-':<4} {key:<8} wall {fmt(s.get('wall_s')):>8}s  proc {fmt(s.get('proc_peak_mb'), ',.0f')}MB  {timed}")
        for model, mblock in results["sizes"][size]["models"].items():
            for s in mblock["jobs"].values():
                if "wall_s" not in s:
                    print(f"  {model:<4} {s['job']:<8} FAILED")
                    continue
                print(f"  {model:<4} {s['job']:<8} wall {s['wall_s']:8.2f}s  {s['rows_per_s']:>11,} rows/s"
                      f"  x naive {fmt(s.get('x_naive')):>6}  /compute {fmt(s.get('wall_over_compute')):>6}"
                      f"  /seq {fmt(s.get('wall_over_seq')):>6}  tree {s['tree_peak_mb']:8,.0f}MB"
                      f"  pss {fmt(s.get('tree_pss_peak_mb'), ',.0f'):>6}MB"
                      f"  proc {s['proc_peak_mb']:6,.0f}MB")
            for key, c in mblock.get("checks", {}).items():
                print(f"  {model:<4} check {key:<6} {'ok' if c.get('ok') else 'MISMATCH'} {c}")
    print("\n== goals ==")
    for g in results["goals"]:
        print(f"  {g['status']:<4}  {g['goal']}: {fmt(g['value'], '.3g')} (target {g['op']} {g['threshold']:g})"
              f"{'  ' + g['detail'] if g['detail'] else ''}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000, help="rows to score (default 10M)")
    p.add_argument("--sizes", help="comma-separated row counts, e.g. 1000000,10000000 (overrides --rows)")
    p.add_argument("--models", default="lr,hgb,rf", help="subset of lr,hgb,rf")
    p.add_argument("--jobs", default=",".join(MODEL_JOBS + SHARED_JOBS),
                   help=f"subset of {','.join(MODEL_JOBS + SHARED_JOBS)} (default: all)")
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
    unknown = set(a.jobs) - set(MODEL_JOBS + SHARED_JOBS) | set(a.models) - {"lr", "hgb", "rf"}
    if unknown:
        p.error(f"unknown job or model: {', '.join(sorted(unknown))}")
    a.size_list = [int(s) for s in a.sizes.split(",")] if a.sizes else [a.rows]
    return a


def run_size(a: argparse.Namespace, rows: int, env: dict[str, str], peers: list[str]) -> tuple[dict, list]:
    """Prepare data for one size and run every group of jobs on it."""
    info = prepare_data(a, rows, env)
    data = Path(info["input"])
    print(f"\n== {rows:,} rows: {data} ({'generated in ' + str(info['seconds']) + ' s' if info['generated'] else 'reused'})",
          flush=True)
    pools = warm_up(info["models"], data, env)
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
        jobs = model_jobs(model, info["models"][model], data, work / model, keys, a)
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
        sys.path.insert(0, str(BENCH))
        from peers import (
            available,  # cheap: only checks that the engines are importable
        )

        peers = available() if a.peers else []
        results = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine(),
                   "config": {"command": shlex.join(["python", "bench/run.py", *(argv or sys.argv[1:])]),
                              "sizes": a.size_list, "models": a.models, "jobs": a.jobs, "peers": peers,
                              "repeats": a.repeats, "row_group_size": a.row_group_size, "seed": a.seed,
                              "train_rows": a.train_rows, "batchscore": shlex.join(batchscore_cmd(a.batchscore)),
                              "batchscore_args": a.batchscore_args, "sample_interval_s": a.interval},
                   "sizes": {}}
        load = os.getloadavg()[0]
        if load > 0.5:
            print(f"warning: 1-minute load average is {load:.2f}; other work on this machine skews timings "
                  "(threaded predictors suffer most)")
        if os.environ.get("PYTHONDONTWRITEBYTECODE"):
            print("note: PYTHONDONTWRITEBYTECODE is set here; it is removed for the benchmark's processes")
        print(f"machine: {results['machine']['cpu_model']}, {results['machine']['usable_cores']} cores, "
              f"{results['machine']['memory_gb']} GB; peers: {', '.join(peers) or 'none'}", flush=True)
        for rows in sorted(a.size_list):
            results["sizes"][str(rows)], results["threadpools"] = run_size(a, rows, env, peers)
        results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        results["goals"] = evaluate_goals(results)
        print_summary(results)
        a.json = a.json or BENCH / "out" / "results.json"
    for path, text in ((a.json, lambda: json.dumps(results, indent=2)), (a.markdown, lambda: markdown(results))):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text())
            print(f"wrote {path}")
    return 1 if any(g["status"] == "FAIL" for g in results["goals"]) else 0


if __name__ == "__main__":
    sys.exit(main())
