"""Deterministic churn data and the small models the benchmark scores with.

The table is written one row group at a time so generating 10M rows needs only
one row group in memory. The models are trained on a separate small sample;
the scored table has no label column, like a real scoring input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FEATURES = ["age", "tenure", "monthly_charges", "total_charges"]
REGIONS = ["north", "south", "east", "west", "central"]
PLANS = ["basic", "standard", "premium", "family", "business"]
EPOCH_DAY_2024_01_01 = 19723  # days since 1970-01-01

SCHEMA = pa.schema(
    [
        ("customer_id", pa.int64()),
        ("age", pa.float64()),
        ("tenure", pa.int64()),
        ("monthly_charges", pa.float64()),
        ("total_charges", pa.float64()),
        ("region", pa.string()),
        ("plan", pa.string()),
        ("signup_date", pa.date32()),
        ("is_active", pa.bool_()),
        ("score_bucket", pa.int32()),
    ]
)


def make_chunk(start: int, rows: int, seed: int) -> pa.Table:
    """Rows [start, start+rows); seeded by (seed, start) so any chunk is reproducible."""
    rng = np.random.default_rng([seed, start])
    tenure = rng.integers(0, 73, rows, dtype=np.int64)
    monthly = np.round(rng.uniform(18.0, 120.0, rows), 2)
    total = np.round(tenure * monthly * rng.uniform(0.9, 1.1, rows), 2)
    signup = (EPOCH_DAY_2024_01_01 - tenure * 30 - rng.integers(0, 30, rows)).astype(np.int32)
    arrays = [
        pa.array(np.arange(start, start + rows, dtype=np.int64) + 1_000_000),
        pa.array(np.round(rng.normal(45.0, 14.0, rows).clip(18, 95), 1)),
        pa.array(tenure),
        pa.array(monthly),
        pa.array(total),
        pa.array(REGIONS).take(pa.array(rng.integers(0, len(REGIONS), rows))),
        pa.array(PLANS).take(pa.array(rng.integers(0, len(PLANS), rows))),
        pa.array(signup, type=pa.date32()),
        pa.array(rng.random(rows) < 0.8),
        pa.array(rng.integers(0, 10, rows, dtype=np.int32)),
    ]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def churn_label(table: pa.Table, seed: int) -> np.ndarray:
    """A noisy, partly non-linear churn rule, so tree models have something to learn."""
    age = table["age"].to_numpy()
    tenure = table["tenure"].to_numpy()
    monthly = table["monthly_charges"].to_numpy()
    logit = -0.8 - 0.06 * tenure + 0.025 * monthly - 0.015 * (age - 45) + 1.2 * (tenure < 6) * (monthly > 80)
    rng = np.random.default_rng([seed, 7])
    return (rng.random(len(age)) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)


def data_path(data_dir: Path, rows: int, seed: int, row_group_size: int) -> Path:
    return data_dir / f"churn_{rows}_s{seed}_rg{row_group_size}.parquet"


def ensure_data(data_dir: Path, rows: int, seed: int, row_group_size: int) -> tuple[Path, dict]:
    """Write the table unless a complete one with the same parameters exists."""
    path = data_path(data_dir, rows, seed, row_group_size)
    if path.exists():
        try:
            if pq.ParquetFile(path).metadata.num_rows == rows:
                return path, {"generated": False, "seconds": 0.0}
        except (OSError, ValueError) as exc:  # e.g. truncated by an interrupted run
            print(f"regenerating {path}: {exc}", file=sys.stderr)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    t0 = time.perf_counter()
    with pq.ParquetWriter(tmp, SCHEMA) as writer:
        for start in range(0, rows, row_group_size):
            writer.write_table(make_chunk(start, min(row_group_size, rows - start), seed))
    tmp.rename(path)
    return path, {"generated": True, "seconds": round(time.perf_counter() - t0, 3)}


def build_model(name: str, seed: int):
    """The model kinds: cheap linear, threaded boosting, classic boosting, single-threaded forest."""
    from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    if name == "lr":
        return LogisticRegression(max_iter=1000)
    if name == "hgb":
        return HistGradientBoostingClassifier(random_state=seed)
    if name == "gb":
        return GradientBoostingClassifier(random_state=seed)  # 100 trees of depth 3, one core
    if name == "rf":
        # n_jobs=None is saved with the model: predict runs on one core, as it
        # would for a model trained with defaults.
        return RandomForestClassifier(n_estimators=50, max_depth=10, random_state=seed)
    raise ValueError(f"unknown model {name!r}")


def ensure_models(model_dir: Path, names: list[str], seed: int, train_rows: int) -> dict[str, dict[str, str]]:
    """Fit scaler + model per name on a labelled sample; reuse files that already exist."""
    import joblib
    from sklearn.preprocessing import StandardScaler

    paths: dict[str, dict[str, str]] = {}
    sample = None
    for name in names:
        out = model_dir / f"{name}_s{seed}_n{train_rows}"
        scaler_path, model_path = out / "scaler.joblib", out / "model.joblib"
        if not (scaler_path.exists() and model_path.exists()):
            if sample is None:
                table = make_chunk(0, train_rows, seed + 1)
                x = table.select(FEATURES).to_pandas()
                y = churn_label(table, seed + 1)
                scaler = StandardScaler().fit(x)  # fitted on a DataFrame: keeps feature names
                sample = (scaler, scaler.transform(x), y)
            scaler, xs, y = sample
            out.mkdir(parents=True, exist_ok=True)
            model = build_model(name, seed).fit(xs, y)
            joblib.dump(scaler, scaler_path)
            joblib.dump(model, model_path)
        paths[name] = {"scaler": str(scaler_path), "model": str(model_path)}
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", type=Path, default=Path(__file__).parent / "data")
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--row-group-size", type=int, default=128 * 1024)
    p.add_argument("--models", default="lr,hgb,gb,rf")
    p.add_argument("--train-rows", type=int, default=50_000)
    a = p.parse_args()
    path, info = ensure_data(a.data_dir, a.rows, a.seed, a.row_group_size)
    models = ensure_models(a.data_dir / "models", a.models.split(","), a.seed, a.train_rows)
    print(json.dumps({"input": str(path), **info, "models": models}))


if __name__ == "__main__":
    main()
