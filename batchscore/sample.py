"""The sample churn job: deterministic data and a scaler + classifier trained on it."""

from __future__ import annotations

import os
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import SAMPLE_ROWS

FEATURES = ("age", "tenure", "monthly_charges", "total_charges")
DATA_FILE = "churn.parquet"
MODEL_DIR = "model"
SAMPLE_ROW_GROUP = 2_500
SEED = 20261124


def churn_table(rows: int, seed: int = SEED, first_id: int = 1) -> pa.Table:
    """Customers with the four churn features, a few passthrough columns and the observed label."""
    rng = np.random.default_rng(seed)
    age = np.clip(rng.normal(45, 14, rows), 18, 90).round(1)
    tenure = rng.integers(0, 73, rows)
    monthly = rng.uniform(20, 120, rows).round(2)
    total = (tenure * monthly * rng.uniform(0.9, 1.1, rows)).round(2)
    logit = 1.2 - 0.06 * tenure + 0.025 * (monthly - 70) - 0.02 * (age - 45)
    churned = rng.random(rows) < 1 / (1 + np.exp(-logit))
    regions = np.array(["north", "south", "east", "west"])
    plans = np.array(["basic", "standard", "premium"])
    signup = np.datetime64(date(2026, 11, 24)) - tenure.astype("timedelta64[D]") * 30
    return pa.table(
        {
            "customer_id": pa.array(np.arange(first_id, first_id + rows, dtype=np.int64)),
            "age": age,
            "tenure": tenure.astype(np.int64),
            "monthly_charges": monthly,
            "total_charges": total,
            "region": pa.array(regions[rng.integers(0, 4, rows)]),
            "plan": pa.array(plans[rng.integers(0, 3, rows)]),
            "signup_date": pa.array(signup.astype("datetime64[D]"), pa.date32()),
            "churned": churned,
        }
    )


def write_sample_data(out_dir: str, rows: int = SAMPLE_ROWS, row_group_size: int = SAMPLE_ROW_GROUP) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, DATA_FILE)
    pq.write_table(churn_table(rows), path, row_group_size=row_group_size, compression="snappy")
    return path


def train_sample_model(data_path: str, model_dir: str) -> tuple[str, str]:
    """Fit StandardScaler on the feature DataFrame (so it knows the names) and a LogisticRegression.

    Both are saved with joblib and, as the pickle-free alternative, with skops (``.skops``).
    """
    import joblib
    import skops.io
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    frame = pq.read_table(data_path, columns=[*FEATURES, "churned"]).to_pandas()
    scaler = StandardScaler().fit(frame[list(FEATURES)])
    model = LogisticRegression(max_iter=1000).fit(scaler.transform(frame[list(FEATURES)]), frame["churned"].astype(int))
    os.makedirs(model_dir, exist_ok=True)
    scaler_path, model_path = os.path.join(model_dir, "scaler.joblib"), os.path.join(model_dir, "model.joblib")
    joblib.dump(scaler, scaler_path)
    joblib.dump(model, model_path)
    skops.io.dump(scaler, skops_path(scaler_path))
    skops.io.dump(model, skops_path(model_path))
    return scaler_path, model_path


def skops_path(joblib_path: str) -> str:
    return os.path.splitext(joblib_path)[0] + ".skops"
