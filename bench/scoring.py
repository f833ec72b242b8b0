"""Output columns shared by the limit and peer jobs, so they all do the same job.

Every scoring job adds, after the input columns: prediction (class label),
probability (of the positive class), predicted_at (timestamp[us, UTC]) and
model_version, which is what `batchscore run` writes for a binary model.
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

FEATURES = ["age", "tenure", "monthly_charges", "total_charges"]
MODEL_VERSION = "bench"


def load(model_path: str, scaler_path: str, all_cores: bool = False):
    """Load scaler and model; all_cores sets n_jobs=-1 on models that use it (forests)."""
    import joblib

    scaler, model = joblib.load(scaler_path), joblib.load(model_path)
    if all_cores and hasattr(model, "n_jobs"):
        model.n_jobs = -1
    if len(model.classes_) != 2:
        raise SystemExit("the benchmark models are binary classifiers")
    return scaler, model


def predict(scaler, model, features) -> tuple[np.ndarray, np.ndarray]:
    """One predict_proba call; the label is derived from it instead of calling predict too."""
    proba = model.predict_proba(scaler.transform(features))
    return model.classes_[proba.argmax(axis=1)], proba[:, 1]


def add_outputs_arrow(table: pa.Table, labels: np.ndarray, proba: np.ndarray) -> pa.Table:
    n = table.num_rows
    now = pa.scalar(datetime.now(timezone.utc), type=pa.timestamp("us", tz="UTC"))
    table = table.append_column("prediction", pa.array(labels))
    table = table.append_column("probability", pa.array(proba))
    table = table.append_column("predicted_at", pa.repeat(now, n))
    return table.append_column("model_version", pa.repeat(pa.scalar(MODEL_VERSION), n))


def score_pandas(df, scaler, model):
    """Score one pandas partition/batch; an empty frame gives the output schema."""
    import pandas as pd

    out = df.copy()
    if len(df):
        labels, proba = predict(scaler, model, df[FEATURES])
    else:
        labels = np.empty(0, dtype=model.classes_.dtype)
        proba = np.empty(0, dtype=np.float64)
    out["prediction"] = labels
    out["probability"] = proba
    out["predicted_at"] = pd.Series(pd.Timestamp.now(tz="UTC"), index=df.index, dtype="datetime64[us, UTC]")
    out["model_version"] = pd.Series(MODEL_VERSION, index=df.index, dtype="string")
    return out
