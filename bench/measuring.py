"""Measuring a job: run it as a process while a sampler follows the memory of its whole
process tree, then reduce the rounds to medians (time) and maxima (memory)."""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from jobs import BATCHSCORE_JOBS, JOB_LABELS, LIMIT_JOBS, MB, PARTIAL_JOBS, ROOT, Job, receipt_workers, rel, remove


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
            peak = max(rss, high_water_mark(pid))
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


def high_water_mark(pid: int) -> int:
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
            print(
                f"  [{tag} r{r}] {job.key:<8} rc={res['rc']} wall={res['wall_s']:8.2f}s"
                f"{f' timed={timed:.2f}s' if timed is not None else ''}"
                f" tree={res['tree_peak_mb']:8.1f}MB pss={res['tree_pss_peak_mb']:8.1f}MB"
                f" proc={res['proc_peak_mb']:7.1f}MB"
                f" procs={res['max_processes']}",
                flush=True,
            )
            if res["rc"]:
                print(f"    FAILED, see {res['log']} / .err:\n    {res['stderr_tail'][-300:]}", flush=True)


def summarize(job: Job, rows: int) -> dict:
    """Median times over rounds, maximum memory over rounds."""
    ok = [r for r in job.runs if r["rc"] == 0]
    summary: dict = {
        "job": job.key,
        "label": JOB_LABELS[job.key],
        "model": job.model,
        "cmd": job.runs[0]["cmd"],
        "ok": len(ok) == len(job.runs),
        "rounds": len(job.runs),
        "runs": job.runs,
    }
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
    summary["info"] = {
        k: timings[-1][k] for k in ("workers", "parts", "partitions") if timings and timings[-1].get(k) is not None
    }
    return summary


def add_ratios(jobs: dict[str, dict]) -> None:
    """Throughput vs naive, wall vs compute-only and sequential limits (their timed sections)."""
    naive = jobs.get("naive", {}).get("wall_s")
    compute = jobs.get("compute", {}).get("timed", {}).get("timed_s")
    seq = jobs.get("seq", {}).get("timed", {}).get("timed_s")
    for key, s in jobs.items():
        if "wall_s" not in s or key in PARTIAL_JOBS:
            continue
        s["x_naive"] = round(naive / s["wall_s"], 3) if naive else None
        if key not in LIMIT_JOBS:
            s["wall_over_compute"] = round(s["wall_s"] / compute, 3) if compute else None
            s["wall_over_seq"] = round(s["wall_s"] / seq, 3) if seq else None
