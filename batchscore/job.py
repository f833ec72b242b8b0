"""The library API behind the CLI: validate, plan, score a shard, commit, or all in one run."""

from __future__ import annotations

import math
import platform
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

import pyarrow as pa

from . import __version__
from .config import JobConfig
from .engine import Predictor
from .errors import ConfigError, InputDataError
from .lease import LEASE_FILE, Lease, held, plan_holder, run_holder
from .model import Artifact, ArtifactPolicy, LoadedModel, artifact_digests, artifact_roles, load_model
from .plan import Plan, make_plan
from .report import Reporter
from .run_report import build_report, publish, shard_profile
from .scorer import ScoreTask, score_units
from .sink import (
    ATTEMPT_KEY,
    PLAN_FILE,
    RECEIPTS_DIR,
    REJECTED_DIR,
    SUCCESS_FILE,
    iter_own_files,
    listing,
    manifest_path,
    part_path,
    read_json,
    receipt_path,
    rejected_path,
    uncommit,
    write_json,
)
from .source import FOOTER_THREADS, GLOB_CHARS, InputFile, check_identity, list_inputs, open_parquet, read_footers
from .storage import (
    abort_uploads,
    abort_uploads_after_failure,
    filesystem,
    full_uri,
    join,
    location,
    make_durable,
    overlapping,
    probe_writable,
    remove_if_exists,
    write_bytes_atomic,
)
from .validate import check_schemas, passthrough_columns


@dataclass
class Prepared:
    """A job whose model, inputs and schemas have all been checked; nothing scored yet."""

    config: JobConfig
    model: LoadedModel
    files: list[InputFile]
    output: str  # full URI
    passthrough: tuple[str, ...]
    output_schema: pa.Schema


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _normalize_output(config: JobConfig) -> str:
    config.require("output")
    fs, path = filesystem(config.output, config.storage_options)  # type: ignore[arg-type]
    return full_uri(fs, fs._strip_protocol(path).rstrip("/"))


def prepare(
    config: JobConfig, input_uris: Sequence[str] | None = None, policy: ArtifactPolicy | None = None
) -> Prepared:
    """Load the model first (a bad model costs no I/O), then read footers and check every schema.

    The artifacts must pass ``policy`` (by default the job's pins and formats) before loading.
    """
    config.require("model")
    output = _normalize_output(config)
    policy = policy or ArtifactPolicy.of(config)
    model = load_model(
        config.model, config.scaler, config.features, config.storage_options, policy  # type: ignore[arg-type]
    )
    uris = list(input_uris) if input_uris is not None else list_inputs(config.input, config.storage_options)
    files = read_footers(uris, config.storage_options)
    predictor_fields = Predictor(model, config.model_version, _now()).fields
    check_schemas(files, model.features, config.keep, [f.name for f in predictor_fields])
    passthrough = passthrough_columns(files[0], config.keep)
    fields = [files[0].schema.field(c) for c in passthrough] + list(predictor_fields)
    return Prepared(config, model, files, output, passthrough, pa.schema(fields))


def _input_root(spec: str, config: JobConfig) -> str:
    """The folder or file an input spec covers; for a glob, the folder before its first wildcard."""
    fs, path = filesystem(spec, config.storage_options)
    path = fs._strip_protocol(path)
    if any(ch in path for ch in GLOB_CHARS):
        head = path[: min(path.index(ch) for ch in GLOB_CHARS if ch in path)]
        path = head.rsplit("/", 1)[0] if "/" in head else ""
    return full_uri(fs, path)


def guard_output(config: JobConfig, output: str, files: Sequence[InputFile]) -> None:
    """Never write where the input lives; never replace a finished output unless asked to."""
    guard_overlap(config, output, [f.uri for f in files])
    fs, path = filesystem(output, config.storage_options)
    if fs.exists(path):
        if not fs.isdir(path):
            raise ConfigError(f"output {output} exists and is a file")
        leftovers = [n for n in listing(fs, path) if n not in (PLAN_FILE, LEASE_FILE)]
        if leftovers and not config.overwrite:
            raise ConfigError(
                f"output {output} already exists ({len(leftovers)} entries, e.g. {leftovers[0]}); "
                f"pass --overwrite to replace it"
            )


def guard_overlap(config: JobConfig, output: str, input_uris: Sequence[str]) -> None:
    """Refuse an output equal to, inside, or holding any input: the input is never at risk.

    Locations are compared, not spellings: ``out/../data``, ``data/./``, a symlink to the input
    folder, ``file://`` and relative paths all resolve to where they really are, and so does each
    input file (which may itself be a symlink into the output).
    """
    out = location(output)
    inputs = [(spec, location(_input_root(spec, config))) for spec in config.input]
    inputs += [(uri, location(uri)) for uri in input_uris]
    for name, where in inputs:
        if overlapping(where, out):
            raise ConfigError(
                f"output {output} (at {out}) overlaps input {name} (at {where}): refusing to write where the input lives"
            )


def validate(config: JobConfig) -> Prepared:
    """Check model, inputs and schemas, and that the output may be written (a probe file is
    written and removed); score nothing."""
    prepared = prepare(config)
    guard_output(config, prepared.output, prepared.files)
    fs, path = filesystem(prepared.output, config.storage_options)
    probe_writable(fs, path)
    return prepared


def _artifact_dicts(artifacts: Sequence[Artifact]) -> list[dict[str, Any]]:
    return [a.to_dict() for a in artifacts]


def _schema_dicts(schema: pa.Schema) -> list[dict[str, str]]:
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def _plan_of(prepared: Prepared, **split: Any) -> Plan:
    """The plan of a checked job, recording what every shard must write (schema, model version)."""
    return make_plan(
        prepared.files, prepared.output, _artifact_dicts(prepared.model.artifacts),
        schema=_schema_dicts(prepared.output_schema), model_version=prepared.config.model_version, **split,
    )


def plan(
    config: JobConfig, shards: int | None = None, rows_per_shard: int | None = None, out: str | None = None
) -> Plan:
    """Check the whole job from footers and the model, then split it into shards.

    Writing the plan next to the output (``out``) also un-commits an output being redone.
    """
    prepared = prepare(config)
    guard_output(config, prepared.output, prepared.files)  # a refused job leaves the output untouched
    if out:
        guard_overlap(config, out, [f.uri for f in prepared.files])
    result = _plan_of(prepared, shards=shards, rows_per_shard=rows_per_shard, predicted_at=_now().isoformat())
    if not out:  # nothing is written: the job's first shard takes the lease
        return result
    with _held(config, result, "plan", release="never"):
        guard_output(config, prepared.output, prepared.files)  # again: another job may have just finished
        fs, path = filesystem(prepared.output, config.storage_options)
        uncommit(fs, path)
        plan_fs, plan_path = filesystem(out, config.storage_options)
        write_json(plan_fs, plan_path, result.to_dict())
    return result


def _held(config: JobConfig, the_plan: Plan, command: str, release: str, holder: str | None = None) -> Any:
    """The lease on the plan's output, for a sharded job's step (or under ``holder``, a run)."""
    return held(the_plan.output, config.storage_options, holder or plan_holder(the_plan.plan_id), the_plan.plan_id,
                command, seconds=config.lease_seconds, wait_seconds=config.lock_timeout, release=release)


def plan_again(config: JobConfig, shards: int) -> Plan:
    """The plan ``plan --shards N`` would make, rebuilt from footers and artifact digests.

    Plans are deterministic, so shards started as ``--shard I/N`` and a ``commit --shards N``
    agree on it without sharing a file; the model is hashed (and checked against its pins), not loaded.
    """
    config.require("model")
    output = _normalize_output(config)
    policy = ArtifactPolicy.of(config)
    artifacts = artifact_digests(config.model, config.scaler, config.storage_options, policy)  # type: ignore[arg-type]
    files = read_footers(list_inputs(config.input, config.storage_options), config.storage_options)
    return make_plan(files, output, _artifact_dicts(artifacts), shards=shards)


def run_shard_of(config: JobConfig, index: int, count: int, reporter: Reporter | None = None) -> dict[str, Any]:
    """Score shard ``index`` of ``count`` without a plan file, planning on the fly."""
    prepared = prepare(config)
    guard_overlap(config, prepared.output, [f.uri for f in prepared.files])
    the_plan = _plan_of(prepared, shards=count)
    with _held(config, the_plan, "shard", release="never") as lease:
        return _score_shard(prepared, the_plan, index, reporter or Reporter(quiet=True), lease)


def load_plan(uri: str, config: JobConfig) -> Plan:
    fs, path = filesystem(uri, config.storage_options)
    try:
        data = read_json(fs, path)
    except FileNotFoundError:
        raise ConfigError(f"plan not found: {uri}") from None
    except ValueError as exc:
        raise InputDataError(f"plan {uri} is not valid JSON: {exc}") from None
    result = Plan.from_dict(data, source=uri)
    ArtifactPolicy.of(config).check_planned(result.artifacts, uri)
    if config.output and _normalize_output(config) != result.output:
        raise ConfigError(f"plan {uri} is for output {result.output}, not {_normalize_output(config)}")
    return result


def _check_inputs_unchanged(files: Sequence[InputFile], the_plan: Plan) -> None:
    """Refuse input files that are not the ones planned: other row groups, size, mtime, inode, ETag."""
    planned = {f["uri"]: f for f in the_plan.files}
    for file in files:
        entry = planned[file.uri]
        if list(file.row_groups) != list(entry["row_groups"]):
            raise InputDataError(
                f"input file {file.uri} changed since the plan was made (row groups {list(entry['row_groups'])} -> "
                f"{list(file.row_groups)}); plan again"
            )
        check_identity(file.uri, entry["identity"], file.identity)


def _schema_difference(expected: Sequence[dict[str, str]], actual: Sequence[dict[str, str]]) -> str:
    """What tells two output schemas apart, in words: ``score double != float``, ``missing x``."""
    want, have = {c["name"]: c["type"] for c in expected}, {c["name"]: c["type"] for c in actual}
    words = [f"{n} {have[n]} != {t}" for n, t in want.items() if n in have and have[n] != t]
    words += [f"missing {n}" for n in want if n not in have] + [f"extra {n}" for n in have if n not in want]
    return ", ".join(words) or "column order differs"


def run_shard(config: JobConfig, the_plan: Plan, index: int, reporter: Reporter | None = None) -> dict[str, Any]:
    """Score one shard of a plan and write its receipt; a retry rewrites the same parts.

    The plan's first file's footer is read too, so the shard picks the same passthrough columns as
    the plan did; the output schema must then be the planned one.
    """
    reporter = reporter or Reporter(quiet=True)
    shard = the_plan.shard(index)
    config = _with_output(config, the_plan.output)
    guard_overlap(config, the_plan.output, [f["uri"] for f in the_plan.files])
    if the_plan.model_version is not None and config.model_version != the_plan.model_version:
        raise InputDataError(
            f"shard {index}: --model-version {config.model_version!r} differs from the plan's "
            f"{the_plan.model_version!r}; run every shard of a plan with its model version"
        )
    shard_uris = [the_plan.files[i]["uri"] for i in sorted({u.file for u in shard.units})]
    policy = ArtifactPolicy.of(config).with_plan(the_plan.artifacts, the_plan.plan_id, artifact_roles(config.scaler))
    prepared = prepare(config, input_uris=list(dict.fromkeys([the_plan.files[0]["uri"]] + shard_uris)), policy=policy)
    _check_inputs_unchanged([f for f in prepared.files if f.uri in shard_uris], the_plan)
    schema = _schema_dicts(prepared.output_schema)
    if the_plan.schema is not None and schema != list(the_plan.schema):
        raise InputDataError(
            f"shard {index}: output schema differs from the plan ({_schema_difference(the_plan.schema, schema)}); "
            f"plan again"
        )
    with _held(config, the_plan, "shard", release="never") as lease:
        return _score_shard(prepared, the_plan, index, reporter, lease)


def _score_shard(prepared: Prepared, the_plan: Plan, index: int, reporter: Reporter, lease: Lease) -> dict[str, Any]:
    """Score a shard under the output's lease; its parts and receipt name this attempt."""
    config, shard = prepared.config, the_plan.shard(index)
    started, clock = _now(), time.perf_counter()
    planned = [a["sha256"] for a in the_plan.artifacts]
    fs, out_path = filesystem(the_plan.output, config.storage_options)
    remove_if_exists(fs, receipt_path(out_path, index))
    uncommit(fs, out_path)  # parts are about to change: the output no longer is what was committed
    attempt = uuid.uuid4().hex
    predicted_at = datetime.fromisoformat(the_plan.predicted_at) if the_plan.predicted_at else started
    task = ScoreTask(
        model=prepared.model, model_version=config.model_version, predicted_at=predicted_at,
        files=the_plan.files, output=the_plan.output, passthrough=prepared.passthrough,
        output_schema=prepared.output_schema, batch_size=config.batch_size, on_invalid=config.on_invalid,
        max_invalid_rows=math.floor(config.max_invalid_fraction * the_plan.total_rows),
        storage_options=config.storage_options, attempt=attempt, fence=lease.fence,
    )
    workers = config.worker_count
    reporter.event("shard_start", f"shard {index}/{the_plan.num_shards}: {shard.rows:,} rows in {len(shard.units)} parts, "
                   f"{min(workers, max(1, len(shard.units)))} worker(s)", shard=index, rows=shard.rows)
    # Multipart uploads of this shard's parts that a killed attempt left behind, then any that
    # this attempt leaves if it fails: only this shard's own part names, never anything else.
    uploads = [u.part_name for u in shard.units] + [f"{REJECTED_DIR}/{u.part_name}" for u in shard.units]
    abort_uploads(fs, out_path, uploads)
    try:
        with reporter.progress(shard.rows) as progress:
            results = score_units(task, shard.units, workers, progress.advance)
    except BaseException as exc:
        abort_uploads_after_failure(fs, out_path, uploads, exc)
        raise
    invalid = sum(r.rows_invalid for r in results)
    if invalid > task.max_invalid_rows:
        raise InputDataError(
            f"{invalid} invalid rows exceed --max-invalid-fraction {config.max_invalid_fraction} "
            f"of {the_plan.total_rows} input rows"
        )
    receipt = {
        "plan_id": the_plan.plan_id,
        "attempt": attempt,
        "shard": index,
        "rows_in": sum(r.rows_in for r in results),
        "rows_out": sum(r.rows_out for r in results),
        "rows_invalid": invalid,
        "parts": [{"name": r.part, "rows": r.rows_out} for r in results],
        "rejected_parts": [r.rejected_part for r in results if r.rejected_part],
        "artifacts": planned,
        "model_version": config.model_version,
        "schema": _schema_dicts(prepared.output_schema),
        "inputs": [{"uri": the_plan.files[i]["uri"], "identity": the_plan.files[i]["identity"]}
                   for i in sorted({u.file for u in shard.units})],
        "workers": min(workers, max(1, len(shard.units))),
        "started_at": started.isoformat(),
        "seconds": round(time.perf_counter() - clock, 3),
        "profile": shard_profile(results),
    }
    lease.renew()  # still ours: no other job replaced these parts while we scored
    write_json(fs, receipt_path(out_path, index), receipt)
    return receipt


def _check_part_attempts(config: JobConfig, output: str, receipts: dict[int, dict[str, Any]]) -> None:
    """Every listed part must still be the one its receipt describes: written by that shard's
    attempt (named in the footer), with its row count. A part another writer replaced after the
    receipt (a paused or zombie attempt) is refused by name rather than committed."""
    expected = [(i, part_path(output, p["name"]), p["rows"], r.get("attempt")) for i, r in sorted(receipts.items())
                for p in r["parts"]]
    expected += [(i, rejected_path(output, name), None, r.get("attempt")) for i, r in sorted(receipts.items())
                 for name in r["rejected_parts"]]

    def problem(item: tuple[int, str, int | None, str | None]) -> str | None:
        index, uri, rows, attempt = item
        with open_parquet(uri, config.storage_options) as (pf, _):
            found = (pf.metadata.metadata or {}).get(ATTEMPT_KEY.encode(), b"").decode()
            if found != attempt:
                return f"{uri} was written by attempt {found or 'unknown'}, not shard {index}'s attempt {attempt}"
            if rows is not None and pf.metadata.num_rows != rows:
                return f"{uri} holds {pf.metadata.num_rows} rows, not the {rows} in shard {index}'s receipt"
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(FOOTER_THREADS, len(expected)))) as pool:
        problems = [p for p in pool.map(problem, expected) if p]
    if problems:
        raise InputDataError(f"cannot commit {output}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if
                             len(problems) > 1 else "") + "; run that shard again")


def _with_output(config: JobConfig, output: str) -> JobConfig:
    from dataclasses import replace

    return replace(config, output=output)


def _versions() -> dict[str, str]:
    """Library versions for the manifest, without importing scikit-learn just to ask."""
    from importlib.metadata import version

    return {"batchscore": __version__, "scikit-learn": version("scikit-learn"), "pyarrow": pa.__version__,
            "python": platform.python_version()}


def commit(
    config: JobConfig, the_plan: Plan, reporter: Reporter | None = None, extra: dict[str, Any] | None = None,
    lease: Lease | None = None, accept_drift: bool = False,
) -> dict[str, Any]:
    """Check that the receipts add up to the plan, drop stray parts, then report, manifest and _SUCCESS.

    Under the job's lease: ``lease`` when a run commits what it scored, else the plan's (released
    once committed). Drift above ``drift_fail`` stops before the manifest (see run_report).
    """
    guard_overlap(config, the_plan.output, [f["uri"] for f in the_plan.files])  # before the lease is written
    if lease is None:
        with _held(config, the_plan, "commit", release="on_success") as own:
            return commit(config, the_plan, reporter, extra, own, accept_drift)
    reporter = reporter or Reporter(quiet=True)
    fs, out_path = filesystem(the_plan.output, config.storage_options)
    receipts: dict[int, dict[str, Any]] = {}
    missing, foreign, changed, inconsistent = [], [], [], []
    planned_inputs = {f["uri"]: f["identity"] for f in the_plan.files}
    planned_artifacts = [a["sha256"] for a in the_plan.artifacts]
    # What every shard must have written. A plan rebuilt without the model (commit --shards) knows
    # no schema or version: the first receipt's stand in, so the shards must at least agree.
    schema = None if the_plan.schema is None else list(the_plan.schema)
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
            read = [i["uri"] for i in receipt.get("inputs", [])
                    if planned_inputs.get(i["uri"], i["identity"]) != i["identity"]]
            if read:
                changed.append(f"shard {shard.index} read {', '.join(read)}")
            else:
                foreign.append(shard.index)
            continue
        expected_parts = [u.part_name for u in shard.units]
        listed = [p["name"] for p in receipt.get("parts", [])]
        if the_plan.schema is None and not receipts:
            reference, ref = receipt, f"shard {shard.index}'s"
        schema, version = reference.get("schema"), reference.get("model_version")
        if receipt.get("rows_in") != shard.rows:
            inconsistent.append(f"{shard.index} (rows in {receipt.get('rows_in')} != planned {shard.rows})")
        elif listed != expected_parts:
            inconsistent.append(f"{shard.index} (parts {listed} != planned {expected_parts})")
        elif receipt.get("artifacts") != planned_artifacts:
            inconsistent.append(
                f"{shard.index} (scored with model artifacts sha256 {receipt.get('artifacts')}, planned {planned_artifacts})"
            )
        elif receipt.get("model_version") != version:
            inconsistent.append(f"{shard.index} (model version {receipt.get('model_version')!r} != {ref} {version!r})")
        elif receipt.get("schema") != schema:
            inconsistent.append(
                f"{shard.index} (output schema differs from {ref}: "
                f"{_schema_difference(schema or [], receipt.get('schema') or [])})"
            )
        elif receipt.get("rows_out", 0) + receipt.get("rows_invalid", 0) != shard.rows:
            inconsistent.append(f"{shard.index} (rows out + invalid != rows in)")
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
            f"cannot commit {the_plan.output}: {invalid} invalid rows exceed --max-invalid-fraction "
            f"{config.max_invalid_fraction} of {the_plan.total_rows} rows"
        )
    parts = [p for i in sorted(receipts) for p in receipts[i]["parts"]]
    rejected = [p for i in sorted(receipts) for p in receipts[i]["rejected_parts"]]
    own = list(iter_own_files(fs, out_path))  # one listing serves the check and the clean-up
    present = {path for kind, path in own if kind == "part"}
    absent = [p["name"] for p in parts if join(out_path, p["name"]) not in present]
    if absent:
        raise InputDataError(f"cannot commit {the_plan.output}: parts listed in receipts are missing: {', '.join(absent[:5])}")
    _check_part_attempts(config, the_plan.output, receipts)
    keep = {join(out_path, p["name"]) for p in parts} | {join(out_path, "_rejected", r) for r in rejected}
    stray = [path for _, path in own if path not in keep]
    lease.renew()  # the clean-up deletes files: only while no other job may be writing them
    for path in stray:
        remove_if_exists(fs, path)
    make_durable(fs, sorted(keep))
    for name in listing(fs, join(out_path, RECEIPTS_DIR)):
        if name.endswith(".json") and name not in {f"shard-{i:05d}.json" for i in receipts}:
            remove_if_exists(fs, join(out_path, RECEIPTS_DIR, name))
    first = receipts[min(receipts)]
    manifest = {
        "output": the_plan.output,
        "plan_id": the_plan.plan_id,
        "committed_at": _now().isoformat(),
        "predicted_at": the_plan.predicted_at,
        "model_version": first["model_version"],
        "artifacts": list(the_plan.artifacts),
        "versions": _versions(),
        "inputs": [{"uri": f["uri"], "bytes": f["size"], "rows": sum(f["row_groups"])} for f in the_plan.files],
        "rows": {"in": the_plan.total_rows, "out": sum(r["rows_out"] for r in receipts.values()), "invalid": invalid},
        "on_invalid": config.on_invalid,
        "schema": first["schema"],
        "parts": parts,
        "rejected_parts": rejected,
        "shards": [{"index": i, "rows_in": r["rows_in"], "workers": r["workers"], "started_at": r["started_at"],
                    "seconds": r["seconds"], "attempt": r["attempt"]} for i, r in sorted(receipts.items())],
        "removed_stray_files": len(stray),
        **(extra or {}),
    }
    lease.renew()  # proof, just before publishing, that no other job has taken the output
    publish(config, fs, out_path, build_report(the_plan.plan_id, the_plan.output, receipts, manifest), accept_drift)
    write_json(fs, manifest_path(out_path), manifest)
    write_bytes_atomic(fs, join(out_path, SUCCESS_FILE), b"")
    reporter.event("committed", f"committed {manifest['rows']['out']:,} rows in {len(parts)} part(s) to {the_plan.output}",
                   output=the_plan.output, rows_out=manifest["rows"]["out"])
    return manifest


def run(config: JobConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Score everything as one shard and commit: the terminal user's one command."""
    reporter = reporter or Reporter(quiet=True)
    clock = time.perf_counter()
    prepared = prepare(config)
    guard_output(config, prepared.output, prepared.files)  # a refused run leaves the output untouched
    the_plan = _plan_of(prepared, shards=1, predicted_at=_now().isoformat())
    with _held(config, the_plan, "run", release="always", holder=run_holder()) as lease:
        guard_output(config, prepared.output, prepared.files)  # again: another job may have just finished
        _score_shard(prepared, the_plan, 0, reporter, lease)
        return commit(config, the_plan, reporter, extra={"seconds": round(time.perf_counter() - clock, 3)},
                      lease=lease)
