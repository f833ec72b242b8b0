"""Correctness: every output is read back and compared with the naive script's."""

from __future__ import annotations

import re
from pathlib import Path

from jobs import BATCHSCORE_JOBS, CHECKED_JOBS, Job


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def read_scores(path: Path):
    """customer_id, prediction, probability of a Parquet file or dataset directory, in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = ["customer_id", "prediction", "probability"]
    if path.is_file():
        return pq.read_table(path, columns=cols)
    files = sorted(
        (
            p
            for p in path.rglob("*.parquet")
            if not any(part.startswith(("_", ".")) for part in p.relative_to(path).parts)
        ),
        key=lambda p: natural_key(str(p.relative_to(path))),
    )
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
