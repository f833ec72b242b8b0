"""Everything a job will write or read, checked before it scores, by the function that validate calls too.

``validate`` must never say ok where ``run`` then fails on its configuration or permissions, so
both (and ``plan --out`` and every shard) call :func:`check_access`; ``prepare`` has already read
the model, the scaler and every input footer. In the order a run meets them:

- the state folder beside the output (``<parent>/_batchscore/<name>/``: the lease, manifest, run
  report), the output folder (parts, ``_SUCCESS``), the state folder's ``receipts/`` and, under
  ``--on-invalid quarantine``, its ``rejected/`` folder take writes;
- ``plan --out``'s folder takes writes;
- under ``--engine compiled``, the compiled cache holds the model's library or takes it;
- the drift reference (``--reference``) can be read.

``validate`` first checks the lease too, without taking it (a run takes it, which is the same
check); a run checks the rest while it holds the lease, so no other job writes there meanwhile.
"""

from __future__ import annotations

import posixpath

from ..io.layout import challenger_folder, receipts_folder, rejected_folder, state_folder
from ..io.lease import Lease, run_holder
from ..io.storage import Location, probe_writable
from .preparation import Prepared


def check_lease(prepared: Prepared, holder: str | None = None) -> None:
    """Raise what taking the output's lease now would raise (another job writes there), without
    taking it; ``holder`` is who would take it (a plan joins its own job's lease), by default a run."""
    config = prepared.config
    Lease(prepared.location, holder or run_holder(), "", "check", config.lease_seconds).check_free()


def check_table_output(prepared: Prepared) -> None:
    """A table output can take the job's columns: the partition column is not one of them, and a
    table already there has the same columns, types and partitioning (folder outputs: nothing)."""
    if prepared.config.output_format == "parquet":
        return
    from ..io.tables import Target, table_check

    table_check(Target.of(prepared.config, prepared.location), prepared.output_schema)


def check_access(prepared: Prepared, plan_out: Location | None = None, tidy: bool = True) -> None:
    """Probe every place the job writes and read what it reads beyond the model and inputs.

    ``tidy`` removes the folders the probes had to create; a shard keeps them (its job's other
    shards may be writing there already).
    """
    from ..models.verification import check_engine
    from ..observe.run_report import reference_of

    config = prepared.config
    fs, path = prepared.location.fs, prepared.location.path
    state = f"the state folder of output {prepared.output}"
    folders = [(state_folder(path), state), (path, None), (receipts_folder(path), state)]  # the lease's folder first
    folders += [(rejected_folder(path), state)] if config.on_invalid == "quarantine" else []
    folders += [(challenger_folder(path, name), state) for name in prepared.challenger_schemas]
    for folder, role in folders:
        probe_writable(fs, folder, tidy=tidy, role=role)
    if plan_out:
        folder = posixpath.dirname(plan_out.path.rstrip("/")) or "."
        probe_writable(plan_out.fs, folder, tidy=tidy)
    check_engine(config, prepared.model)
    if config.reference:
        reference_of(config)
