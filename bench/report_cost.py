"""What the run report costs: scoring throughput with profiles on and off, same data, same process.

Scores one plan's units in this process (as one worker does) with ``ScoreTask(profile=True)`` and
``profile=False`` in turns, so a busy machine slows both alike, and prints rows per CPU second of
each and the difference: CPU time, because on a shared machine wall time measures the neighbours.
The best of the rounds counts, as for every timing in bench/. The goal is a difference under 5%.

    python bench/report_cost.py --rows 1048576 --rounds 5
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_048_576)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from batchscore.config import build_config
    from batchscore.job.planning import plan_of
    from batchscore.job.preparation import now, prepare
    from batchscore.job.scorer import ScoreTask, score_unit
    from batchscore.job.workers import single_threaded, use_lean_memory_pool
    from batchscore.models.engine import Predictor
    from batchscore.sample import churn_table, train_sample_model

    work = Path(tempfile.mkdtemp(prefix="batchscore-report-cost-"))
    try:
        data = work / "churn.parquet"
        pq.write_table(churn_table(args.rows), data, row_group_size=131_072)
        scaler, model = train_sample_model(str(data), str(work / "model"))
        config = build_config(None, input=(str(data),), output=str(work / "out"), model=model, scaler=scaler)
        prepared = prepare(config)
        the_plan = plan_of(prepared, shards=1)
        (work / "out").mkdir()
        base = ScoreTask(
            model=prepared.model,
            model_version="bench",
            predicted_at=now(),
            files=the_plan.files,
            output=prepared.location,
            passthrough=prepared.passthrough,
            output_schema=prepared.output_schema,
            batch_size=config.batch_size,
            on_invalid="fail",
            max_invalid_rows=0,
            storage=config.storage,
        )
        units = the_plan.shard(0).units
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)  # as in a worker (see workers._init_worker)
        use_lean_memory_pool()
        single_threaded(prepared.model.estimator)
        predictor = Predictor(prepared.model, "bench", now())
        best = {True: float("inf"), False: float("inf")}
        for _ in range(args.rounds):
            for profile in (False, True):
                task = replace(base, profile=profile)
                clock = time.process_time()
                for unit in units:
                    score_unit(task, predictor, unit)
                best[profile] = min(best[profile], time.process_time() - clock)
        off, on = args.rows / best[False], args.rows / best[True]
        print(
            f"rows {args.rows:,}, best of {args.rounds}: profiles off {off:,.0f} rows/CPU s, "
            f"on {on:,.0f} rows/CPU s, cost {(off - on) / off:.1%}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
