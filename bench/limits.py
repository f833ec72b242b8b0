"""Lower bounds on wall time, each run as its own process by bench/run.py.

    compute     load the feature columns (untimed), then time scaler.transform +
                one predict_proba on the whole table with all cores.
    io          time reading the whole table with pyarrow and writing it back to Parquet.
    sequential  time read -> scaler -> one predict_proba -> write of the whole table,
                one step after the other in one process (the simplest fast program).
    imports     time importing pyarrow, pandas, scikit-learn and joblib: the start-up
                cost and memory floor every scoring process pays before any work.

Each prints one JSON line with the timed sections in seconds; `timed_s` is the
number the benchmark compares against. Libraries are imported inside each job
so that `imports` measures them from a bare interpreter.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

# What every scoring process imports before doing any work.
LIBRARIES = [
    "pyarrow.parquet",
    "pyarrow.dataset",
    "pandas",
    "joblib",
    "sklearn.preprocessing",
    "sklearn.linear_model",
    "sklearn.ensemble",
]


def compute(a: argparse.Namespace) -> dict:
    import pyarrow.parquet as pq

    from scoring import FEATURES, load

    t0 = time.perf_counter()
    features = pq.read_table(a.input, columns=FEATURES).to_pandas()
    scaler, model = load(a.model, a.scaler, all_cores=True)
    t1 = time.perf_counter()
    scaled = scaler.transform(features)
    t2 = time.perf_counter()
    model.predict_proba(scaled)
    t3 = time.perf_counter()
    return {
        "rows": len(features),
        "untimed_load_s": t1 - t0,
        "transform_s": t2 - t1,
        "predict_proba_s": t3 - t2,
        "timed_s": t3 - t1,
    }


def io(a: argparse.Namespace) -> dict:
    import pyarrow.parquet as pq

    importlib.import_module("pyarrow.dataset")  # else read_table imports it inside the timed section

    t0 = time.perf_counter()
    table = pq.read_table(a.input)
    t1 = time.perf_counter()
    pq.write_table(table, a.output)
    t2 = time.perf_counter()
    return {"rows": table.num_rows, "read_s": t1 - t0, "write_s": t2 - t1, "timed_s": t2 - t0}


def sequential(a: argparse.Namespace) -> dict:
    import pyarrow.parquet as pq

    from scoring import FEATURES, add_outputs_arrow, load, predict

    importlib.import_module("pyarrow.dataset")  # else read_table imports it inside the timed section

    scaler, model = load(a.model, a.scaler, all_cores=True)
    t0 = time.perf_counter()
    table = pq.read_table(a.input)
    t1 = time.perf_counter()
    labels, proba = predict(scaler, model, table.select(FEATURES).to_pandas())
    t2 = time.perf_counter()
    pq.write_table(add_outputs_arrow(table, labels, proba), a.output)
    t3 = time.perf_counter()
    return {"rows": table.num_rows, "read_s": t1 - t0, "score_s": t2 - t1, "write_s": t3 - t2, "timed_s": t3 - t0}


def imports(a: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    for name in LIBRARIES:
        importlib.import_module(name)
    return {"timed_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", choices=["compute", "io", "sequential", "imports"])
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--model")
    p.add_argument("--scaler")
    a = p.parse_args()
    if a.job != "imports" and not a.input:
        p.error("--input is required")
    result = {"compute": compute, "io": io, "sequential": sequential, "imports": imports}[a.job](a)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
