"""The steps of a job put together: validate it, or score it whole and commit in one run."""

from __future__ import annotations

import time
from typing import Any

from .committing import commit
from .config import JobConfig
from .lease import run_holder
from .output_guard import guard_output
from .planning import hold, plan_of
from .preparation import Prepared, now, prepare
from .report import Reporter
from .shard import score_shard
from .storage import filesystem, probe_writable


def validate(config: JobConfig) -> Prepared:
    """Check model, inputs and schemas, and that the output may be written (a probe file is
    written and removed); score nothing."""
    prepared = prepare(config)
    guard_output(config, prepared.output, prepared.files)
    fs, path = filesystem(prepared.output, config.storage_options)
    probe_writable(fs, path)
    return prepared


def run(config: JobConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Score everything as one shard and commit: the terminal user's one command."""
    reporter = reporter or Reporter(quiet=True)
    clock = time.perf_counter()
    prepared = prepare(config)
    guard_output(config, prepared.output, prepared.files)  # a refused run leaves the output untouched
    the_plan = plan_of(prepared, shards=1, predicted_at=now().isoformat())
    with hold(config, the_plan, "run", release="always", holder=run_holder()) as lease:
        guard_output(config, prepared.output, prepared.files)  # again: another job may have just finished
        score_shard(prepared, the_plan, 0, reporter, lease)
        return commit(config, the_plan, reporter, extra={"seconds": round(time.perf_counter() - clock, 3)},
                      lease=lease)
