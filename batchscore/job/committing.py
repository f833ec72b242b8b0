"""Commit a job: check every shard's receipt against the plan, drop stray files, write the manifest.

Receipts must add up to the plan (rows, parts, artifacts), agree on the output schema and model
version, and every part must still be the one its receipt names; only then are the manifest and
``_SUCCESS`` written, under the output's lease.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import platform
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from importlib.metadata import version
from typing import Any

import pyarrow as pa

from ..config import JobConfig
from ..errors import DriftError, InputDataError, ModelError, param
from ..io.layout import (
    attempt_part_name,
    challenger_folder,
    challenger_part_name,
    challengers_folder,
    receipt_name,
    table_relative,
)
from ..io.lease import Lease
from ..io.output_guard import guard_overlap, refuse_foreign
from ..io.sink import (
    ATTEMPT_KEY,
    Streamed,
    held_path,
    iter_own_files,
    listing,
    manifest_path,
    part_path,
    read_json,
    receipt_path,
    receipts_folder,
    rejected_name,
    rejected_path,
    sizes,
    state_folder,
    success_path,
    write_json,
)
from ..io.source import in_order, open_parquet
from ..io.storage import (
    Location,
    full_uri,
    join,
    make_durable,
    remove_if_exists,
    resolve,
    translated,
    write_bytes_atomic,
)
from ..io.tables import Incremental, TablePart, Target, scoring_key, table_commit, table_committed, table_parts
from ..logs import event
from ..models.verification import engine_manifest
from ..observe.run_report import build_report, publish
from . import stopping
from .planning import Plan, hold, record_held
from .preparation import now, schema_difference

log = logging.getLogger(__name__)


def _check_part_attempts(
    config: JobConfig,
    output: str,
    receipts: dict[int, dict[str, Any]],
    parts: Callable[[], Iterator[tuple[int, str, int]]],
) -> None:
    """Every listed part must still be the one its receipt describes: written by that shard's
    attempt (named in the footer), with its row count. A part another writer replaced after the
    receipt (a paused or zombie attempt) is refused by name rather than committed. ``parts`` gives
    each (shard, part name, rows); the footers are read a few at a time, never all at once."""
    expected = itertools.chain(
        ((i, part_path(output, name), rows, receipts[i].get("attempt")) for i, name, rows in parts()),
        (
            (i, rejected_path(output, name), None, r.get("attempt"))
            for i, r in sorted(receipts.items())
            for name in r["rejected_parts"]
        ),
    )
    _check_footers(config, output, expected)


def _check_footers(config: JobConfig, output: str, expected: Iterable[tuple[int, str, int | None, str | None]]) -> None:
    """Refuse, naming the first, parts not written by their shard's attempt or with other rows:
    (shard, part URI, rows or None, attempt) of each."""

    def problem(item: tuple[int, str, int | None, str | None]) -> str | None:
        index, uri, rows, attempt = item
        with open_parquet(uri, config.storage) as (pf, _):
            found = (pf.metadata.metadata or {}).get(ATTEMPT_KEY.encode(), b"").decode()
            if found != attempt:
                return f"{uri} was written by attempt {found or 'unknown'}, not shard {index}'s attempt {attempt}"
            if rows is not None and pf.metadata.num_rows != rows:
                return f"{uri} holds {pf.metadata.num_rows} rows, not the {rows} in shard {index}'s receipt"
        return None

    first, count = None, 0
    for found in in_order(problem, expected):
        if found:
            first, count = first or found, count + 1
    if first:
        raise InputDataError(
            f"cannot commit {output}: {first}"
            + (f" (and {count - 1} more)" if count > 1 else "")
            + "; run that shard again"
        )


def _part_rows(receipt: dict[str, Any], names: Sequence[str]) -> tuple[array[int], bool] | str:
    """The rows of each of a receipt's parts, which must be ``names`` in order, each either as
    planned or (every one) named for the receipt's attempt; and whether they are so named. Else
    what is wrong."""
    parts = receipt.get("parts", [])
    listed = [p.get("name") if isinstance(p, dict) else p for p in parts]
    tagged = listed != list(names)
    if tagged and not _named_for(listed, names, receipt.get("attempt")):
        return f"parts {_few(listed)} != planned {_few(names)}"
    try:
        return array("q", (p["rows"] for p in parts)), tagged
    except (KeyError, TypeError, OverflowError):
        return "parts without their row counts"


def _named_for(listed: Sequence[Any], names: Sequence[str], attempt: Any) -> bool:
    """Whether ``listed`` are the planned ``names`` with ``attempt`` in each (see attempt_part_name)."""
    try:
        return len(listed) == len(names) and all(
            found == attempt_part_name(name, attempt) for found, name in zip(listed, names)
        )
    except (TypeError, ValueError):
        return False


def _few(names: Sequence[Any]) -> str:
    """A list of part names in a message: all of a few, or the first of many and how many."""
    return str(list(names)) if len(names) <= 6 else f"[{', '.join(map(str, names[:3]))}, ... {len(names)} in all]"


def _versions() -> dict[str, str]:
    """Library versions for the manifest, without importing scikit-learn just to ask."""
    return {
        "batchscore": version("batchscore"),
        "scikit-learn": version("scikit-learn"),
        "pyarrow": pa.__version__,
        "python": platform.python_version(),
    }


def committed_manifest(config: JobConfig, the_plan: Plan, lease: Lease) -> dict[str, Any]:
    """What a table holding the plan's rows already says of them (a rerun or backfill of a job
    committed before later ones): its parts and their rows, from the table's current version."""
    table = resolve(the_plan.output, config.storage)
    out_path = lease.location.path
    parts = table_parts(Target.of(config, table), out_path)
    rows_out = sum(parts.values())
    return {
        "output": the_plan.output,
        "plan_id": the_plan.plan_id,
        "model_version": the_plan.model_version or config.model_version,
        "artifacts": list(the_plan.artifacts),
        "rows": {"in": the_plan.total_rows, "out": rows_out, "invalid": the_plan.total_rows - rows_out},
        "parts": [{"name": name, "rows": rows} for name, rows in sorted(parts.items())],
        "state": state_folder(the_plan.output),
        "table": {
            "format": config.output_format,
            "uri": the_plan.output,
            "version": table_committed(Target.of(config, table, _digests(the_plan)), out_path),
            "mode": config.table_mode,
            "partition": config.partition,
            "data_folder": table_relative(table.path, out_path),
        },
        "committed_already": True,
    }


def _digests(the_plan: Plan) -> list[str]:
    return [a["sha256"] for a in the_plan.artifacts]


def _incremental(config: JobConfig, the_plan: Plan) -> Incremental | None:
    """What an incremental commit records of the plan's files (see job/incremental.py)."""
    if not config.incremental:
        return None
    scored = {the_plan.files.uri(i): (the_plan.files[i]["identity"], i) for i in range(len(the_plan.files))}
    key = scoring_key(config, _digests(the_plan))
    return Incremental(scored, key, config.full_refresh)


def _commit_table(
    config: JobConfig,
    the_plan: Plan,
    table: Location,
    lease: Lease,
    manifest: dict[str, Any],
    parts: Sequence[tuple[int, str, int]],
) -> dict[str, Any]:
    """Add the plan's parts to the table in one transaction carrying the manifest's facts; the
    table's new version (or the one that holds this plan already) is what the manifest records."""
    fs, out_path = lease.location.fs, lease.location.path
    size = sizes(fs, out_path)  # one listing: no request per part
    files = [TablePart(name, size[name], rows) for _, name, rows in parts]
    facts = {
        "plan_id": the_plan.plan_id,
        "content_id": the_plan.content_id,
        "model_version": manifest["model_version"],
        "artifacts": [{"role": a["role"], "uri": a["uri"], "sha256": a["sha256"]} for a in the_plan.artifacts],
        "rows": manifest["rows"],
        "predicted_at": the_plan.predicted_at,
        "inputs": len(the_plan.files),
        "parts": len(files),
        "batchscore": manifest["versions"]["batchscore"],
    }
    schema = None
    if files:  # the parts' own schema, from the first footer (the plan records types only as names)
        with open_parquet(part_path(lease.location.uri, files[0].path), config.storage) as (pf, _):
            schema = pf.schema_arrow.remove_metadata()
    stopping.check()  # a stop the main thread has not seen yet still commits nothing
    lease.renew()  # proof, just before publishing, that no other job has taken the output
    with stopping.publishing():
        version, new = table_commit(
            Target.of(config, table, _digests(the_plan)), out_path, files, schema, facts, _incremental(config, the_plan)
        )
    if not new:
        log.info(f"plan {the_plan.plan_id} was committed to {the_plan.output} already, in version {version}")
    return {
        "format": config.output_format,
        "uri": the_plan.output,
        "version": version,
        "mode": config.table_mode,
        "partition": config.partition,
        "data_folder": table_relative(table.path, out_path),
    }


def commit(
    config: JobConfig,
    the_plan: Plan,
    extra: dict[str, Any] | None = None,
    lease: Lease | None = None,
    accept_drift: bool = False,
) -> dict[str, Any]:
    """Check that the receipts add up to the plan, drop stray parts, then report, manifest and _SUCCESS.

    Under the job's lease: ``lease`` when a run commits what it scored, else the plan's (released
    once committed). Drift above ``drift_fail`` stops before the manifest (see run_report).
    """
    guard_overlap(config, the_plan.output, the_plan.files.uris)  # before the lease is written
    if lease is None:
        with hold(config, the_plan, "commit", release="on_success") as own:
            return commit(config, the_plan, extra, own, accept_drift)
    fs, out_path = lease.location.fs, lease.location.path
    table = resolve(the_plan.output, config.storage) if config.output_format != "parquet" else None
    if table is not None and table_committed(Target.of(config, table, _digests(the_plan)), out_path) is not None:
        try:
            done = read_json(fs, manifest_path(out_path))
        except (FileNotFoundError, ValueError):
            done = {}
        # The same input and model, however it was sharded, went to the same data folder.
        if (done.get("table") or {}).get("data_folder") != table_relative(table.path, out_path):
            done = committed_manifest(config, the_plan, lease)  # the state's manifest is a later job's
        log.info(f"{the_plan.output} holds this input scored by this model already; nothing to do")
        return {**done, **(extra or {})}
    receipts: dict[int, dict[str, Any]] = {}
    tagged: dict[int, bool] = {}  # whether a shard's parts are named for its attempt
    missing, foreign, changed, inconsistent = [], [], [], []
    planned_inputs: dict[str, Any] = {}  # filled only if a receipt from another plan needs it
    planned_artifacts = [a["sha256"] for a in the_plan.artifacts]
    # What every shard must have written. A plan rebuilt without the model (commit --shards) knows
    # no schema or version: the first receipt's stand in, so the shards must at least agree.
    schema = None if the_plan.schema is None else list(the_plan.schema)
    reference: dict[str, Any]
    reference, ref = {"schema": schema, "model_version": the_plan.model_version}, "planned"
    for shard in the_plan.shards:
        try:
            receipt = read_json(fs, receipt_path(out_path, shard.index))
        except FileNotFoundError:
            missing.append(shard.index)
            continue
        except ValueError:
            inconsistent.append(f"{shard.index} (unreadable receipt)")
            continue
        if receipt.get("plan_id") != the_plan.plan_id:
            planned_inputs = planned_inputs or {f["uri"]: f["identity"] for f in the_plan.files}
            read = [
                i["uri"]
                for i in receipt.get("inputs", [])
                if planned_inputs.get(i["uri"], i["identity"]) != i["identity"]
            ]
            if read:
                changed.append(f"shard {shard.index} read {', '.join(read)}")
            else:
                foreign.append(shard.index)
            continue
        rows = _part_rows(receipt, [u.part_name for u in shard.units])
        receipt.pop("inputs", None)  # read only for a receipt of another plan
        if the_plan.schema is None and not receipts:
            reference, ref = receipt, f"shard {shard.index}'s"
        schema, version = reference.get("schema"), reference.get("model_version")
        if receipt.get("rows_in") != shard.rows:
            inconsistent.append(f"{shard.index} (rows in {receipt.get('rows_in')} != planned {shard.rows})")
        elif isinstance(rows, str):
            inconsistent.append(f"{shard.index} ({rows})")
        elif receipt.get("artifacts") != planned_artifacts:
            inconsistent.append(
                f"{shard.index} (scored with model artifacts sha256 {receipt.get('artifacts')}, planned {planned_artifacts})"
            )
        elif receipt.get("model_version") != version:
            inconsistent.append(f"{shard.index} (model version {receipt.get('model_version')!r} != {ref} {version!r})")
        elif receipt.get("schema") != schema:
            inconsistent.append(
                f"{shard.index} (output schema differs from {ref}: "
                f"{schema_difference(schema or [], receipt.get('schema') or [])})"
            )
        elif receipt.get("rows_out", 0) + receipt.get("rows_invalid", 0) != shard.rows:
            inconsistent.append(f"{shard.index} (rows out + invalid != rows in)")
        if isinstance(rows, str):
            receipt["parts"] = rows
        else:  # each part's rows, in the plan's order: no dict per part is kept
            receipt["parts"], tagged[shard.index] = rows
        receipts[shard.index] = receipt
    problems = []
    if missing:
        problems.append(f"missing receipts for shard(s) {', '.join(map(str, missing))}")
    if changed:
        problems.append(f"input changed since the plan was made: {'; '.join(changed)}; plan again")
    if foreign:
        problems.append(f"receipts from another plan for shard(s) {', '.join(map(str, foreign))}")
    if inconsistent:
        problems.append(f"inconsistent shard(s): {'; '.join(inconsistent)}")
    if problems:
        raise InputDataError(f"cannot commit {the_plan.output} (plan {the_plan.plan_id}): " + "; ".join(problems))
    invalid = sum(r["rows_invalid"] for r in receipts.values())
    allowed = math.floor(config.max_invalid_fraction * the_plan.total_rows)
    if invalid > allowed:
        raise InputDataError(
            f"cannot commit {the_plan.output}: {invalid} invalid rows exceed {param('max_invalid_fraction')} "
            f"{config.max_invalid_fraction} of {the_plan.total_rows} rows"
        )

    def parts() -> Iterator[tuple[int, str, int]]:  # (shard, name, rows) of every part, in output order
        for i in sorted(receipts):
            attempt = receipts[i]["attempt"] if tagged[i] else None
            for unit, rows in zip(the_plan.shards[i].units, receipts[i]["parts"]):
                yield i, attempt_part_name(unit.part_name, attempt) if attempt else unit.part_name, rows

    part_count = sum(len(r["parts"]) for r in receipts.values())
    rejected = [p for i in sorted(receipts) for p in receipts[i]["rejected_parts"]]
    refuse_foreign(fs, out_path, the_plan.output)  # never publish what another tool put there as this run's rows
    own = list(iter_own_files(fs, out_path))  # one listing serves the check and the clean-up
    present = {path for kind, path in own if kind == "part"}
    absent = [name for _, name, _ in parts() if part_path(out_path, name) not in present]
    del present
    if absent:
        raise InputDataError(
            f"cannot commit {the_plan.output}: parts listed in receipts are missing: {', '.join(absent[:5])}"
        )
    _check_part_attempts(config, lease.location.uri, receipts, parts)
    keep = {part_path(out_path, name) for _, name, _ in parts()} | {rejected_path(out_path, r) for r in rejected}
    stray = [path for _, path in own if path not in keep]
    lease.renew()  # the clean-up deletes files: only while no other job may be writing them
    for path in stray:
        remove_if_exists(fs, path)
    make_durable(fs, sorted(keep))
    folders = _challenger_folders(config, receipts, parts, lease) if table is None else {}
    for name in listing(fs, receipts_folder(out_path)):
        if name.endswith(".json") and name not in {receipt_name(i) for i in receipts}:
            remove_if_exists(fs, join(receipts_folder(out_path), name))
    first = receipts[min(receipts)]
    manifest = {
        "output": the_plan.output,
        "plan_id": the_plan.plan_id,
        "committed_at": now().isoformat(),
        "predicted_at": the_plan.predicted_at,
        "model_version": first["model_version"],
        "artifacts": list(the_plan.artifacts),
        "versions": _versions(),
        "inputs": Streamed(
            lambda: (
                {"uri": uri, "bytes": size, "rows": sum(row_groups)}
                for uri, size, row_groups, *_ in the_plan.files.records()
            ),
            len(the_plan.files),
        ),
        "rows": {"in": the_plan.total_rows, "out": sum(r["rows_out"] for r in receipts.values()), "invalid": invalid},
        "on_invalid": config.on_invalid,
        "schema": first["schema"],
        "parts": Streamed(lambda: ({"name": name, "rows": rows} for _, name, rows in parts()), part_count),
        "state": state_folder(the_plan.output),
        "rejected_parts": [rejected_name(r) for r in rejected],
        "shards": [
            {
                "index": i,
                "rows_in": r["rows_in"],
                "workers": r["workers"],
                "started_at": r["started_at"],
                "seconds": r["seconds"],
                "attempt": r["attempt"],
            }
            for i, r in sorted(receipts.items())
        ],
        "removed_stray_files": len(stray),
        "engine": engine_manifest(receipts),
        **(extra or {}),
    }
    lease.renew()  # proof, just before publishing, that no other job has taken the output
    report = build_report(the_plan.plan_id, the_plan.output, receipts, manifest)
    for entry in report["challengers"]:  # in folders: where its rows are, or why it has none
        if entry["name"] in folders:
            entry.update(folders[entry["name"]].report())
    # What the metrics push, and who reads the manifest alone; in folders each one's parts too.
    manifest["challengers"] = [
        {**c, **folders[c["name"]].parts(the_plan.total_rows)} if c["name"] in folders else c
        for c in report["challengers"]
    ]
    _log_challengers(report["challengers"])
    try:
        publish(config, fs, out_path, report, accept_drift)
    except DriftError:
        try:
            record_held(config, the_plan)  # what `commit OUTPUT --accept-drift` commits
        except Exception as exc:  # the hold stands; only accepting it from the output alone is lost
            log.warning(
                "could not record the commit held for drift beside %s (%s); accept it with the job's "
                "settings and its plan",
                the_plan.output,
                exc,
            )
        raise
    if table is not None:
        manifest["table"] = _commit_table(config, the_plan, table, lease, manifest, list(parts()))
        write_json(fs, manifest_path(out_path), manifest)
    else:
        write_json(fs, manifest_path(out_path), manifest)
        stopping.check()  # a stop the main thread has not seen yet still commits nothing
        with stopping.publishing():
            write_bytes_atomic(fs, success_path(out_path), b"")
    remove_if_exists(fs, held_path(out_path))  # nothing is held any more
    log.info(
        f"committed {manifest['rows']['out']:,} rows in {part_count} part(s) to {the_plan.output}",
        extra=event("committed", output=the_plan.output, rows_out=manifest["rows"]["out"]),
    )
    return manifest


@dataclass
class ChallengerFolder:
    """A challenger's own folder as commit finds it: its parts (named as the output's, in order)
    and their rows, or why it has none (then it is removed)."""

    name: str
    folder: str | None
    rows: array[int] = dc_field(default_factory=lambda: array("q"))
    schema: Any = None
    error: str | None = None
    names: Callable[[], Iterator[str]] = lambda: iter(())

    def report(self) -> dict[str, Any]:
        """What the report says of it besides its agreement: where its rows are, or why none are."""
        if self.error is not None:
            return {"status": "failed", "error": self.error, "folder": None}
        return {"folder": self.folder}

    def parts(self, rows_in: int) -> dict[str, Any]:
        """The manifest's record of its rows and parts, as of the output's: the name and rows of
        each part; ``invalid``: the input rows it could not score, left out of its folder."""
        if self.error is not None:
            return {"folder": None, "rows": None, "parts": []}
        rows, names = self.rows, self.names
        return {
            "folder": self.folder,
            "rows": {"in": rows_in, "out": sum(rows), "invalid": rows_in - sum(rows)},
            "parts": Streamed(lambda: ({"name": n, "rows": r} for n, r in zip(names(), rows)), len(rows)),
        }


def _challenger_folders(
    config: JobConfig,
    receipts: Mapping[int, Mapping[str, Any]],
    parts: Callable[[], Iterator[tuple[int, str, int]]],
    lease: Lease,
) -> dict[str, ChallengerFolder]:
    """Check each challenger's own folder (``challenger_output: folders``) against the receipts as
    the output's parts are checked, then keep only the parts of those that scored every shard.

    Everything else under the challengers' folder goes: a failed challenger's parts, parts of
    another plan or attempt, folders of challengers no longer in the job or of a run in columns.
    A challenger whose parts do not check out fails (the job, under ``challengers_required``)."""
    fs, out_path = lease.location.fs, lease.location.path
    found: dict[str, ChallengerFolder] = {}
    for i in sorted(receipts):
        for entry in receipts[i].get("challengers") or ():
            if "folder" not in entry:
                continue  # a receipt in columns
            name = entry["name"]
            seen = found.setdefault(name, ChallengerFolder(name, entry["folder"], schema=entry.get("schema")))
            rows = entry.get("parts")
            if seen.error is not None:
                continue
            if entry["status"] != "ok" or entry["folder"] is None or rows is None:
                seen.error = entry.get("error") or f"challenger {name}: shard {i} wrote no folder"
            elif len(rows) != len(receipts[i]["parts"]):
                seen.error = (
                    f"challenger {name}: shard {i}'s receipt lists {len(rows)} parts, not {len(receipts[i]['parts'])}"
                )
            elif entry.get("schema") != seen.schema:
                seen.error = f"challenger {name}: shard {i} wrote another schema than the shards before it"
            else:
                seen.rows.extend(rows)
    for name, folder in found.items():
        listed = sum(1 for r in receipts.values() for e in r.get("challengers") or () if e["name"] == name)
        if folder.error is None and listed != len(receipts):
            folder.error = f"challenger {name}: in {listed} of the {len(receipts)} shards' receipts"
        if folder.error is None:
            folder.error = _check_folder(config, receipts, parts, lease, name, folder.rows)
        if folder.error is not None and config.challengers_required:
            raise ModelError(f"{folder.error} (challengers_required)")
        folder.names = lambda: (challenger_part_name(n) for _, n, _ in parts())
    keep = {name for name, f in found.items() if f.error is None}
    lease.renew()  # the clean-up deletes files: only while no other job may be writing them
    for name in listing(fs, challengers_folder(out_path)):
        path = challenger_folder(out_path, name)
        if name not in keep:  # a failed challenger's, or one no longer in the job: no folder at all
            with translated("remove", full_uri(fs, path), (FileNotFoundError,)), contextlib.suppress(FileNotFoundError):
                fs.rm(path, recursive=True)
            continue
        wanted = {part_path(path, challenger_part_name(n)) for _, n, _ in parts()}
        for stray in [part_path(path, n) for n in listing(fs, path)]:
            if stray not in wanted:
                remove_if_exists(fs, stray)
        make_durable(fs, sorted(wanted))
    return found


def _check_folder(
    config: JobConfig,
    receipts: Mapping[int, Mapping[str, Any]],
    parts: Callable[[], Iterator[tuple[int, str, int]]],
    lease: Lease,
    name: str,
    rows: Sequence[int],
) -> str | None:
    """Why challenger ``name``'s parts are not the ones its receipts name (missing, another
    attempt's, other rows), or None: the checks the output's parts get."""
    fs = lease.location.fs
    folder = challenger_folder(lease.location.path, name)
    present = set(listing(fs, folder))
    absent = [challenger_part_name(part) for _, part, _ in parts() if challenger_part_name(part) not in present]
    if absent:
        return f"challenger {name}: parts listed in receipts are missing from {full_uri(fs, folder)}: {_few(absent)}"
    uri = challenger_folder(lease.location.uri, name)
    expected = (
        (i, part_path(uri, challenger_part_name(part)), n, receipts[i].get("attempt"))
        for (i, part, _), n in zip(parts(), rows)
    )
    try:
        _check_footers(config, uri, expected)
    except InputDataError as exc:
        return f"challenger {name}: {exc}"
    return None


def _log_challengers(challengers: Sequence[Mapping[str, Any]]) -> None:
    """One line per challenger: its agreement, or why it failed (the champion's output commits)."""
    for c in challengers:
        if c["status"] != "ok":
            log.warning(
                "challenger %s failed: %s; the champion's output is committed",
                c["name"],
                c["error"],
                extra=event("challenger_failed", challenger=c["name"]),
            )
        elif c.get("agreement"):
            a = c["agreement"]
            log.info(
                "challenger %s: class agreement %s, Spearman %s, PSI %s over %s rows",
                c["name"],
                _number(a["class_agreement"]),
                _number(a["spearman"]),
                _number(a["psi"]),
                f"{a['rows_compared']:,}",
                extra=event("challenger", challenger=c["name"], **{k: v for k, v in a.items() if k != "sampled"}),
            )


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}"
