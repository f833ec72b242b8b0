"""Run one shard of a plan: check it still matches its plan, score its units, write its receipt."""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from ..config import JobConfig
from ..errors import InputDataError, StorageError, param
from ..io.conditional import PreconditionFailed, create_exclusive, read_tagged, replace_if
from ..io.layout import challenger_folder, challenger_part_name, planned_part_name
from ..io.lease import Lease
from ..io.output_guard import guard_overlap
from ..io.sink import Streamed, json_bytes, receipt_path, rejected_folder, rejected_name, uncommit, write_json
from ..io.source import InputFiles
from ..io.storage import abort_uploads, abort_uploads_after_failure, full_uri, remove_if_exists
from ..logs import event, progress
from ..models.artifacts import ArtifactPolicy, artifact_roles, challenger_roles
from ..models.verification import choose_engine
from ..observe.observers import NONE, Observers
from ..observe.run_report import ProfileSum
from .planning import Plan, check_footer, check_within_input, committed_already, hold, plan_of
from .preflight import check_access
from .preparation import Prepared, now, prepare, schema_dicts, schema_difference, versioned
from .scorer import ScoreTask
from .workers import hand_out_order, score_units

log = logging.getLogger(__name__)
#: Conditional writes a receipt may lose to other plans' writers before the attempt gives up.
CLAIM_TRIES = 5


def run_shard_of(config: JobConfig, index: int, count: int, observers: Observers = NONE) -> dict[str, Any]:
    """Score shard ``index`` of ``count`` without a plan file, planning on the fly."""
    prepared = prepare(config, observers=observers)
    guard_overlap(config, prepared.output, prepared.files.uris)
    the_plan = plan_of(prepared, shards=count)
    with hold(config, the_plan, "shard", release="never", output=prepared.location) as lease:
        check_access(prepared, tidy=False)
        return score_shard(prepared, the_plan, index, lease, observers)


def planned_challenger_roles(config: JobConfig, planned: set[str]) -> list[str]:
    """The artifact roles of the job's challengers that its plan pinned (one that failed when the
    job was planned is not in it, and is not scored)."""
    roles: list[str] = []
    for entry in config.models:
        model_role, scaler_role = challenger_roles(entry.name)
        if model_role in planned:
            roles += [model_role, scaler_role] if entry.scaler else [model_role]
    return roles


def _check_inputs_unchanged(files: InputFiles, the_plan: Plan, shard_files: Sequence[int]) -> None:
    """Refuse input files that are not the ones planned: other row groups, size, mtime, inode, ETag.
    ``files`` are the footers read for ``shard_files``, in order (after the plan's first file)."""
    found = {uri: i for i, uri in enumerate(files.uris)}
    for i in shard_files:
        entry = the_plan.files[i]
        check_footer(files[found[entry["uri"]]], entry)


class _Picked(Sequence[Mapping[str, Any]]):
    """Some of a plan's file entries, each made when read (a shard's 50,000 are not held as dicts)."""

    def __init__(self, files: Sequence[Mapping[str, Any]], indices: Sequence[int]):
        self._files, self._indices = files, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._files[i] for i in self._indices[index]]
        return self._files[self._indices[index]]


def run_shard(
    config: JobConfig,
    the_plan: Plan,
    index: int,
    source: str = "given",
    observers: Observers = NONE,
    keep_model: bool = False,
    concurrent: bool = False,
) -> dict[str, Any]:
    """Score one shard of a plan and write its receipt; a retry rewrites the same parts.

    The plan's first file's footer is read too, so the shard picks the same passthrough columns as
    the plan did; the output schema must then be the planned one. ``keep_model`` keeps the pinned
    model loaded in this process for the next shard; ``concurrent`` is for shards another attempt
    may score at the same time (see ``score_shard``).
    """
    shard = the_plan.shard(index)
    config = replace(config, output=the_plan.output)
    guard_overlap(config, the_plan.output, the_plan.files.uris)
    check_within_input(config, the_plan, source)  # a plan can only narrow the job: its files are the input's
    config = versioned(config, the_plan.artifacts)
    if the_plan.model_version is not None and config.model_version != the_plan.model_version:
        raise InputDataError(
            f"shard {index}: {param('model_version')} {config.model_version!r} differs from the plan's "
            f"{the_plan.model_version!r}; run every shard of a plan with its model version"
        )
    shard_files = sorted({u.file for u in shard.units})
    shard_uris = [the_plan.files.uri(i) for i in shard_files]
    planned_roles = {a["role"] for a in the_plan.artifacts}
    roles = artifact_roles(config.scaler) + planned_challenger_roles(config, planned_roles)
    policy = ArtifactPolicy.of(config).with_plan(the_plan.artifacts, the_plan.plan_id, roles)
    prepared = prepare(
        config,
        input_uris=list(dict.fromkeys([the_plan.files.uri(0)] + shard_uris)),
        policy=policy,
        observers=observers,
        planned=(planned_roles, the_plan.schema),
        keep_model=keep_model,
    )
    _check_inputs_unchanged(prepared.files, the_plan, shard_files)
    schema = schema_dicts(prepared.output_schema)
    if the_plan.schema is not None and schema != list(the_plan.schema):
        raise InputDataError(
            f"shard {index}: output schema differs from the plan ({schema_difference(the_plan.schema, schema)}); "
            f"plan again"
        )
    with hold(config, the_plan, "shard", release="never", output=prepared.location) as lease:
        check_access(prepared, tidy=False)  # other shards may be writing: the folders stay
        return score_shard(prepared, the_plan, index, lease, observers, concurrent)


def score_shard(
    prepared: Prepared,
    the_plan: Plan,
    index: int,
    lease: Lease,
    observers: Observers = NONE,
    concurrent: bool = False,
) -> dict[str, Any]:
    """Score a shard under the output's lease; its parts and receipt name this attempt, and
    ``observers`` hear of each batch as a worker scores it.

    ``concurrent``: another attempt of this shard may be scoring it at the same time (Spark's
    speculative copies, a retry beside a lost attempt that still runs). Each attempt then writes
    parts named for itself (``part-..._ATTEMPT.parquet``), so none replaces another's, and the
    first receipt of this plan written stands: an attempt that finds one (at its start, or when it
    comes to write its own) scores nothing more and returns it. The commit keeps only the parts
    that receipt names and removes the other attempts'.
    """
    config, shard = prepared.config, the_plan.shard(index)
    started, clock = now(), time.perf_counter()
    planned = [a["sha256"] for a in the_plan.artifacts]
    fs, out_path = lease.location.fs, lease.location.path
    if committed_already(config, the_plan, lease.location):  # its parts are the table's: not written again
        from .committing import committed_manifest

        done = committed_manifest(config, the_plan, lease)
        parts = {planned_part_name(p["name"]): p for p in done["parts"]}  # committed as an attempt named them
        held = [parts.get(u.part_name, {"name": u.part_name, "rows": 0}) for u in shard.units]
        listed = [{"name": p["name"], "rows": p["rows"]} for p in held]
        rows_out = sum(p["rows"] for p in listed)
        log.info(f"shard {index}: {the_plan.output} holds its rows already; nothing to score")
        return {
            "plan_id": the_plan.plan_id,
            "shard": index,
            "rows_in": shard.rows,
            "rows_out": rows_out,
            "rows_invalid": shard.rows - rows_out,
            "parts": listed,
            "model_version": config.model_version,
            "seconds": 0.0,
            "engine": {},
            "committed_already": done["table"]["version"],
        }
    if concurrent:
        standing = _standing_receipt(fs, receipt_path(out_path, index), the_plan)
        if standing is not None:
            log.info(f"shard {index}: attempt {standing[0]['attempt']} of this plan scored it already")
            return standing[0]
    else:
        remove_if_exists(fs, receipt_path(out_path, index))
    uncommit(fs, out_path)  # parts are about to change: the output no longer is what was committed
    attempt = uuid.uuid4().hex
    predicted_at = datetime.fromisoformat(the_plan.predicted_at) if the_plan.predicted_at else started
    shard_files = _Picked(the_plan.files, sorted({u.file for u in shard.units}))
    engine = choose_engine(config, prepared.model, shard_files, config.model_version, predicted_at)
    task = ScoreTask(
        model=prepared.model,
        model_version=config.model_version,
        predicted_at=predicted_at,
        files=the_plan.files,
        output=lease.location,
        passthrough=prepared.passthrough,
        output_schema=prepared.output_schema,
        batch_size=config.batch_size,
        on_invalid=config.on_invalid,
        max_invalid_rows=math.floor(config.max_invalid_fraction * the_plan.total_rows),
        storage=config.storage,
        attempt=attempt,
        fence=lease.fence,
        compiled_library=engine.library_path,
        contract=prepared.contract,
        challengers=prepared.challengers,
        challengers_required=config.challengers_required,
        max_batch_bytes=config.max_batch_bytes,
        attempt_names=concurrent,
        challenger_folders=config.challenger_output == "folders",
        challenger_schemas=prepared.challenger_schemas,
    )
    workers = config.worker_count
    log.info(
        f"shard {index}/{the_plan.num_shards}: {shard.rows:,} rows in {len(shard.units)} parts, "
        f"{min(workers, max(1, len(shard.units)))} worker(s)",
        extra=event("shard_start", shard=index, rows=shard.rows),
    )
    # Multipart uploads of this shard's parts that a killed attempt left behind, then any that
    # this attempt leaves if it fails: only this shard's own part names, never anything else.
    # The names are made when asked for: a shard of 100,000 parts does not hold them while it scores.
    units = shard.units
    uploads = {
        out_path: lambda: (task.part_name(u) for u in units),
        rejected_folder(out_path): lambda: (rejected_name(task.part_name(u)) for u in units),
        **{
            challenger_folder(out_path, name): lambda: (challenger_part_name(task.part_name(u)) for u in units)
            for name in task.challenger_schemas
        },
    }
    for folder, names in uploads.items():
        abort_uploads(fs, folder, names())
    profiles = ProfileSum(hand_out_order(shard.units))
    # What each unit's result says, kept as numbers (its part's name is the unit's): a shard of
    # 100,000 units holds no result object, nor profile, per unit.
    counts = {key: array("q", bytes(8 * len(shard.units))) for key in ("rows_in", "rows_out", "rows_invalid")}
    rejected: dict[int, str] = {}
    # In folders: each challenger's rows by unit (its part's name is the unit's), and why any stopped.
    challenger_rows = {name: array("q", bytes(8 * len(shard.units))) for name in task.challenger_schemas}
    challenger_errors: dict[str, str] = {}

    def _keep(index: int, result: Any) -> None:
        profiles.add(index, result.profile)
        for key, column in counts.items():
            column[index] = getattr(result, key)
        if result.rejected_part:
            rejected[index] = result.rejected_part
        for name, rows in result.challenger_rows.items():
            challenger_rows[name][index] = rows
        for name, error in result.challenger_errors.items():
            challenger_errors.setdefault(name, error)

    try:
        with progress(log, shard.rows) as rows:

            def on_batch(count: int, seconds: float) -> None:
                observers.batch_scored(count, seconds)
                rows.advance(count)

            score_units(task, shard.units, workers, on_batch, on_result=_keep)
    except BaseException as exc:
        for folder, names in uploads.items():
            abort_uploads_after_failure(fs, folder, names(), exc)
        raise
    invalid = sum(counts["rows_invalid"])
    if invalid > task.max_invalid_rows:
        raise InputDataError(
            f"{invalid} invalid rows exceed {param('max_invalid_fraction')} {config.max_invalid_fraction} "
            f"of {the_plan.total_rows} input rows"
        )
    rows_out = counts["rows_out"]
    receipt = {
        "plan_id": the_plan.plan_id,
        "attempt": attempt,
        "shard": index,
        "rows_in": sum(counts["rows_in"]),
        "rows_out": sum(rows_out),
        "rows_invalid": invalid,
        "parts": Streamed(
            lambda: ({"name": task.part_name(u), "rows": n} for u, n in zip(units, rows_out)), len(units)
        ),
        "rejected_parts": [rejected[i] for i in sorted(rejected)],
        "artifacts": planned,
        "model_version": config.model_version,
        "schema": schema_dicts(prepared.output_schema),
        "inputs": Streamed(
            lambda: ({"uri": f["uri"], "identity": f["identity"]} for f in shard_files), len(shard_files)
        ),
        "workers": min(workers, max(1, len(shard.units))),
        "engine": engine.to_dict(),
        "challengers": [
            _challenger_entry(c, prepared, challenger_rows, challenger_errors) for c in prepared.challengers
        ],
        "started_at": started.isoformat(),
        "seconds": round(time.perf_counter() - clock, 3),
        "profile": profiles.result(len(units)),
    }
    lease.renew()  # still ours: no other job replaced these parts while we scored
    if concurrent:
        receipt["plan_sha256"] = the_plan.sha256  # this planning's: a rerun of the same plan is another
        return _claim_receipt(fs, receipt_path(out_path, index), receipt, the_plan)
    write_json(fs, receipt_path(out_path, index), receipt, compact=True)  # one part a file: it grows with the input
    return receipt


def _challenger_entry(
    challenger: Any,
    prepared: Prepared,
    rows: Mapping[str, array[int]],
    errors: Mapping[str, str],
) -> dict[str, Any]:
    """What a receipt records of a challenger; in folders also its folder, schema and each part's
    rows (in unit order: its parts are named as the champion's), or why it stopped scoring."""
    entry = challenger.to_dict()
    if prepared.config.challenger_output != "folders":
        return entry
    schema = prepared.challenger_schemas.get(challenger.name)
    entry.update(folder=None, schema=None, columns=[], parts=None)
    if schema is not None:
        entry.update(
            folder=challenger_folder(prepared.location.uri, challenger.name),
            schema=schema_dicts(schema),
            columns=schema.names,
            parts=list(rows[challenger.name]),
        )
    if challenger.name in errors and entry["status"] == "ok":
        entry.update(status="failed", error=errors[challenger.name])
    return entry


def _standing_receipt(fs: Any, path: str, the_plan: Plan) -> tuple[dict[str, Any], str] | None:
    """The receipt at ``path`` and its tag, if an attempt of this very plan wrote it."""
    return _of_plan(read_tagged(fs, path), the_plan)


def _of_plan(found: tuple[bytes, str] | None, the_plan: Plan) -> tuple[dict[str, Any], str] | None:
    """The receipt read, if an attempt of ``the_plan`` wrote it: its id (plans of one job are
    alike) and its sha256 (which each planning has of its own: an earlier run's receipt is stale)."""
    if found is None:
        return None
    try:
        receipt = json.loads(found[0])
    except ValueError:
        return None  # unreadable: replaced like any other plan's
    if not isinstance(receipt, dict):
        return None
    ours = (receipt.get("plan_id"), receipt.get("plan_sha256")) == (the_plan.plan_id, the_plan.sha256)
    return (receipt, found[1]) if ours else None


def _claim_receipt(fs: Any, path: str, receipt: dict[str, Any], the_plan: Plan) -> dict[str, Any]:
    """Write ``receipt`` unless an attempt of this plan wrote one first; the receipt that stands.

    Created only where none is (or replaced only while it is still another plan's or an earlier
    run's, unchanged): of two attempts, exactly one receipt is written, and the other returns it."""
    data = json_bytes(receipt, compact=True)
    for _ in range(CLAIM_TRIES):
        found = read_tagged(fs, path)
        standing = _of_plan(found, the_plan)
        if standing is not None:
            log.info(f"shard {receipt['shard']}: attempt {standing[0]['attempt']} wrote its receipt first")
            return standing[0]
        try:
            if found is None:
                create_exclusive(fs, path, data)
            else:
                replace_if(fs, path, data, found[1])
            return receipt
        except PreconditionFailed:
            continue  # another attempt wrote first: read what it wrote
    raise StorageError(
        f"could not write the receipt {full_uri(fs, path)}: it kept changing while this attempt wrote it"
    )
