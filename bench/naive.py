"""The naive batch-inference baseline, as commonly written in tutorials.

`BatchInference` below is reproduced as-is (only reformatted): it reads the
input in 10k-row batches but keeps every scored batch as a pandas DataFrame,
concatenates them all and writes one Parquet file at the end, and calls the
model twice per batch (predict, then predict_proba). Only the small CLI is
added so the benchmark can run it as a separate process.

    python bench/naive.py --input IN.parquet --output OUT.parquet \
        --model model.joblib --scaler scaler.joblib [--batch-size 10000]
"""

# ruff: noqa: I001  (the tutorial's imports are kept as written)

import argparse
import json

import pandas as pd, joblib
from datetime import datetime
import pyarrow.parquet as pq


class BatchInference:
    def __init__(self, model_path, scaler_path):
        self.model = joblib.load(model_path); self.scaler = joblib.load(scaler_path)

    def run_batch(self, input_path, output_path, batch_size=10000):
        reader = pq.ParquetFile(input_path)
        results = []
        for batch in reader.iter_batches(batch_size=batch_size):
            df = batch.to_pandas()
            feature_columns = ["age", "tenure", "monthly_charges", "total_charges"]
            features = df[feature_columns]
            features_scaled = self.scaler.transform(features)
            predictions = self.model.predict(features_scaled)
            probabilities = self.model.predict_proba(features_scaled)[:, 1]
            df["prediction"] = predictions
            df["probability"] = probabilities
            df["predicted_at"] = datetime.now()
            results.append(df)
        final_df = pd.concat(results, ignore_index=True)
        final_df.to_parquet(output_path, index=False)
        return len(final_df)


def main() -> None:
    p = argparse.ArgumentParser(description="Naive tutorial-style batch inference.")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--scaler", required=True)
    p.add_argument("--batch-size", type=int, default=10000)
    a = p.parse_args()
    rows = BatchInference(a.model, a.scaler).run_batch(a.input, a.output, a.batch_size)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
