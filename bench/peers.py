"""The same scoring job written with general-purpose engines, at their local defaults.

    dask  dd.read_parquet (a partition per row group) -> map_partitions(score) -> to_parquet,
          threaded scheduler
    ray   ray.data.read_parquet -> map_batches(score, batch_format="pandas") -> write_parquet

Both read the same input, use the same features and write the same output columns
as the other jobs (input columns, prediction, probability, predicted_at,
model_version) to a Parquet dataset directory. Run by bench/run.py only when
the engine is importable.

    python bench/peers.py dask|ray --input IN --output OUT_DIR --model M --scaler S
"""

from __future__ import annotations

import argparse
import importlib.util
import json

from scoring import load, score_pandas

ENGINES = {"dask": "dask.dataframe", "ray": "ray.data"}


def available() -> list[str]:
    """Engines importable in this interpreter (checked without importing them)."""
    ok = []
    for name, module in ENGINES.items():
        try:
            if importlib.util.find_spec(module) is not None:
                ok.append(name)
        except ModuleNotFoundError:
            pass
    return ok


def run_dask(a: argparse.Namespace) -> int:
    import dask
    import dask.dataframe as dd

    scaler, model = load(a.model, a.scaler)
    # One partition per row group: with the defaults a single-file input is one
    # partition (the whole table in one DataFrame) and nothing runs in parallel.
    ddf = dd.read_parquet(a.input, split_row_groups=True)
    meta = score_pandas(ddf._meta, scaler, model)
    out = ddf.map_partitions(score_pandas, scaler, model, meta=meta)
    with dask.config.set(scheduler="threads"):
        out.to_parquet(a.output, write_index=False)
    return ddf.npartitions


def run_ray(a: argparse.Namespace) -> int | None:
    import ray
    import ray.data

    scaler, model = load(a.model, a.scaler)
    ray.init()  # local cluster, default resources
    try:
        ds = ray.data.read_parquet(a.input)
        ds = ds.map_batches(lambda df: score_pandas(df, scaler, model), batch_format="pandas")
        ds.write_parquet(a.output)
    finally:
        ray.shutdown()
    return None  # Ray sizes its blocks itself


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", choices=sorted(ENGINES))
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--scaler", required=True)
    a = p.parse_args()
    parts = {"dask": run_dask, "ray": run_ray}[a.engine](a)
    print(json.dumps({"engine": a.engine, **({"partitions": parts} if parts else {})}))


if __name__ == "__main__":
    main()
