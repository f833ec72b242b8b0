"""The targets batchscore is held to, as PASS / FAIL / SKIP against measured values."""

from __future__ import annotations

from jobs import BATCHSCORE_JOBS


def goal(name: str, value: float | None, op: str, threshold: float, detail: str = "", ran: bool = True) -> dict:
    """PASS/FAIL against the threshold; SKIP when its jobs were not selected, FAIL when they failed."""
    if value is None:
        status = "FAIL" if ran else "SKIP"
        detail = detail or ("a job it needs failed" if ran else "its jobs were not run")
    else:
        status = (
            "PASS"
            if (value >= threshold if op == ">=" else value <= threshold if op == "<=" else value < threshold)
            else "FAIL"
        )
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
        goal(
            f"LR: batchscore throughput vs naive {at}",
            job("lr", "bs").get("x_naive"),
            ">=",
            3.0,
            ran=ran("lr", "bs", "naive"),
        ),
        goal(
            f"HGB: batchscore throughput vs naive {at}",
            job("hgb", "bs").get("x_naive"),
            ">=",
            2.5,
            ran=ran("hgb", "bs", "naive"),
        ),
        goal(
            f"HGB: batchscore wall / compute-only limit {at}",
            job("hgb", "bs").get("wall_over_compute"),
            "<=",
            1.15,
            ran=ran("hgb", "bs", "compute"),
        ),
        goal(
            f"LR: batchscore wall / sequential limit {at}",
            job("lr", "bs").get("wall_over_seq"),
            "<",
            1.0,
            ran=ran("lr", "bs", "seq"),
        ),
        goal(
            f"HGB: batchscore wall / sequential limit {at}",
            job("hgb", "bs").get("wall_over_seq"),
            "<",
            1.0,
            ran=ran("hgb", "bs", "seq"),
        ),
    ]
    peaks = [
        (j.get("proc_peak_mb"), f"{m}/{k}@{s}")
        for s in results["sizes"]
        for m in results["sizes"][s]["models"]
        for k in BATCHSCORE_JOBS
        if (j := job(m, k, s)).get("proc_peak_mb") is not None
    ]
    worst = max(peaks, default=(None, ""))
    out.append(
        goal(
            "every batchscore process: peak RSS (MB), all sizes and models",
            worst[0],
            "<",
            300.0,
            f"largest: {worst[1]}" if peaks else "",
            ran=any(ran(m, k) for m in cfg["models"] for k in BATCHSCORE_JOBS),
        )
    )
    if big != small:
        flat = [
            (ratio(job(m, k).get("tree_peak_mb"), job(m, k, small).get("tree_peak_mb")), f"{m}/{k}")
            for m in models
            for k in BATCHSCORE_JOBS
        ]
        flat = [f for f in flat if f[0] is not None]
        worst_flat = max(flat, default=(None, ""))
        out.append(
            goal(
                f"batchscore tree peak {int(big):,} / {int(small):,} rows",
                worst_flat[0],
                "<=",
                1.15,
                f"largest: {worst_flat[1]}" if flat else "",
                ran=any(ran(m, k) for m in cfg["models"] for k in BATCHSCORE_JOBS),
            )
        )
    else:
        out.append(
            goal("batchscore tree peak big / small size", None, "<=", 1.15, "needs --sizes with two sizes", ran=False)
        )
    out.append(
        goal(
            f"HGB: batchscore --engine compiled throughput vs naive {at}",
            job("hgb", "bs_c").get("x_naive"),
            ">=",
            6.0,
            ran=ran("hgb", "bs_c", "naive"),
        )
    )
    dask = job("hgb", "dask").get("wall_s")
    out.append(
        goal(
            f"HGB: batchscore --engine compiled throughput vs dask map_partitions {at}",
            ratio(dask, job("hgb", "bs_c").get("wall_s")),
            ">=",
            2.0,
            ran=ran("hgb", "bs_c") and "dask" in cfg.get("peers", []),
        )
    )
    compiled = [
        (f"{m}@{s}", c)
        for s in results["sizes"]
        for m, v in results["sizes"][s]["models"].items()
        for k, c in v.get("checks", {}).items()
        if k == "bs_c"
    ]
    worst_diff = max((c.get("max_probability_diff", float("inf")) for _, c in compiled), default=None)
    flips = sum(c.get("prediction_mismatches", 0) for _, c in compiled)
    out.append(
        goal(
            "--engine compiled: largest probability difference from scikit-learn, all outputs",
            worst_diff,
            "<=",
            1e-12,
            f"{len(compiled)} outputs checked, {flips} class flips" if compiled else "",
            ran=any(ran(m, "bs_c", "naive") for m in cfg["models"]),
        )
    )
    out.append(
        goal(
            "--engine compiled: class flips against scikit-learn, all outputs",
            float(flips) if compiled else None,
            "<=",
            0.0,
            ran=any(ran(m, "bs_c", "naive") for m in cfg["models"]),
        )
    )
    workers = job("rf", "bs").get("info", {}).get("workers") or f"{results['machine']['usable_cores']} cores"
    out.append(
        goal(
            f"RF: default workers ({workers}) vs --workers 1 throughput {at}",
            ratio(job("rf", "bs_w1").get("wall_s"), job("rf", "bs").get("wall_s")),
            ">=",
            1.7,
            ran=ran("rf", "bs", "bs_w1"),
        )
    )
    out.append(
        goal(
            f"RF, supplementary: default workers ({workers}) vs --workers 1 on one core {at}",
            ratio(job("rf", "bs_1core").get("wall_s"), job("rf", "bs").get("wall_s")),
            ">=",
            1.7,
            ran=ran("rf", "bs", "bs_1core"),
        )
    )
    checks = [
        (m, k, c)
        for s in results["sizes"]
        for m, v in results["sizes"][s]["models"].items()
        for k, c in v.get("checks", {}).items()
        if k in BATCHSCORE_JOBS
    ]
    bad = [f"{m}/{k}" for m, k, c in checks if not c.get("ok")]
    out.append(
        goal(
            "batchscore output == naive output (rows, order, predictions, probabilities)",
            None if not checks else float(len(checks) - len(bad)),
            ">=",
            float(len(checks)) or 1.0,
            f"failed: {', '.join(bad)}" if bad else f"{len(checks)} outputs checked" if checks else "",
            ran=any(ran(m, "naive", k) for m in cfg["models"] for k in BATCHSCORE_JOBS),
        )
    )
    return out
