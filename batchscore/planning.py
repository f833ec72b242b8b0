"""Plan a job: split the input into shards of whole row groups, from footers alone, deterministically.

A plan is made (``plan``), read back (``load_plan``) or made again from the same footers
(``plan_again``); every step that writes the output holds its lease (``hold``).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from .config import JobConfig, check_numbers
from .errors import ConfigError, InputDataError
from .lease import held, plan_holder
from .model import Artifact, ArtifactPolicy, artifact_digests
from .output_guard import guard_output, guard_overlap, guard_plan_file
from .preparation import Prepared, normalize_output, now, prepare, schema_dicts
from .sink import read_json, uncommit, write_json
from .source import InputFile, list_inputs, read_footers
from .storage import filesystem

#: 2: each file's identity (to catch a rewritten input), the output schema and the model version.
PLAN_FORMAT = 2
#: A part (one output file) holds about this many rows (whole row groups, or equal slices of a
#: larger row group); parts are the unit of parallel work, and what one worker holds open.
DEFAULT_ROWS_PER_PART = 524_288


#: Fewest digits of the file and row group numbers in a part's name.
PART_NUMBER_DIGITS = 5


@dataclass(frozen=True)
class Unit:
    """Consecutive row groups of one file that become one output part, or one slice of a row
    group larger than a part: ``rows`` rows from row ``start`` of its only row group."""

    file: int
    row_groups: tuple[int, ...]
    rows: int
    #: Digits of every number in the part's name: the same for every part of a plan, so that name
    #: order is input order however many files and row groups there are. Not part of the plan's id.
    digits: int = field(default=PART_NUMBER_DIGITS, compare=False)
    slice: int | None = None  # which slice of its row group (None: whole row groups)
    start: int = 0  # first row of the slice within its row group

    @property
    def first_row_group(self) -> int:
        return self.row_groups[0] if self.row_groups else 0

    @property
    def part_name(self) -> str:
        """``part-FILE-ROWGROUP.parquet``, or ``part-FILE-ROWGROUP-SLICE.parquet`` for a slice:
        every slice of a row group carries its number, so names sort in input order."""
        d = self.digits
        tail = f"-{self.slice:0{d}d}" if self.slice is not None else ""
        return f"part-{self.file:0{d}d}-{self.first_row_group:0{d}d}{tail}.parquet"

    def to_dict(self) -> dict[str, Any]:
        entry = {"file": self.file, "row_groups": list(self.row_groups), "rows": self.rows}
        if self.slice is not None:
            entry.update(slice=self.slice, start=self.start)
        return entry

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> "Unit":
        return cls(entry["file"], tuple(entry["row_groups"]), entry["rows"], slice=entry.get("slice"),
                   start=entry.get("start", 0))


def _named(shards: Sequence["Shard"]) -> tuple["Shard", ...]:
    """The shards with part names of one width: at least ``PART_NUMBER_DIGITS`` digits, more when
    a file or row group number needs them."""
    largest = max((max(u.file, u.first_row_group, u.slice or 0) for s in shards for u in s.units), default=0)
    digits = max(PART_NUMBER_DIGITS, len(str(largest)))
    return tuple(Shard(s.index, tuple(replace(u, digits=digits) for u in s.units)) for s in shards)


@dataclass(frozen=True)
class Shard:
    index: int
    units: tuple[Unit, ...]

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units)


@dataclass(frozen=True)
class Plan:
    """What every shard reads and writes; its ``plan_id`` ties receipts to it."""

    files: tuple[dict[str, Any], ...]  # uri, size, row_groups, identity
    shards: tuple[Shard, ...]
    output: str
    artifacts: tuple[dict[str, Any], ...]  # role, uri, sha256, bytes
    predicted_at: str | None = None
    #: What every shard must write: output columns and types, and the model version. Not part of
    #: ``plan_id``; None when the plan was rebuilt without loading the model (``commit --shards``).
    schema: tuple[dict[str, str], ...] | None = None
    model_version: str | None = None

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def total_rows(self) -> int:
        return sum(sum(f["row_groups"]) for f in self.files)

    @property
    def plan_id(self) -> str:
        """Content hash of what is read, written and with which model (not when it was planned)."""
        body = {
            "files": self.files,
            "shards": [[u.to_dict() for u in s.units] for s in self.shards],
            "output": self.output,
            "artifacts": [a["sha256"] for a in self.artifacts],
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "plan_id": self.plan_id,
            "output": self.output,
            "predicted_at": self.predicted_at,
            "total_rows": self.total_rows,
            "num_shards": self.num_shards,
            "artifacts": list(self.artifacts),
            "model_version": self.model_version,
            "schema": None if self.schema is None else list(self.schema),
            "files": list(self.files),
            "shards": [
                {
                    "index": s.index,
                    "rows": s.rows,
                    "units": [u.to_dict() for u in s.units],
                }
                for s in self.shards
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "plan") -> "Plan":
        try:
            if data.get("format") != PLAN_FORMAT:
                raise InputDataError(
                    f"{source}: unsupported plan format {data.get('format')!r} (this batchscore reads format "
                    f"{PLAN_FORMAT}); make the plan again with `batchscore plan`"
                )
            shards = _named(tuple(
                Shard(
                    index=s["index"],
                    units=tuple(Unit.from_dict(u) for u in s["units"]),
                )
                for s in data["shards"]
            ))
            files = tuple(
                {"uri": f["uri"], "size": f["size"], "row_groups": list(f["row_groups"]), "identity": dict(f["identity"])}
                for f in data["files"]
            )
            schema = data["schema"]
            plan = cls(
                files, shards, data["output"], tuple(data["artifacts"]), data.get("predicted_at"),
                schema=None if schema is None else tuple({"name": c["name"], "type": c["type"]} for c in schema),
                model_version=data["model_version"],
            )
        except (KeyError, TypeError) as exc:
            raise InputDataError(f"{source}: not a batchscore plan (missing or malformed {exc})") from None
        if data.get("plan_id") not in (None, plan.plan_id):
            raise InputDataError(f"{source}: plan was edited after it was made (plan_id does not match its content)")
        return plan

    def shard(self, index: int) -> Shard:
        if not 0 <= index < self.num_shards:
            raise ConfigError(f"shard {index} does not exist: the plan has shards 0 to {self.num_shards - 1}")
        return self.shards[index]


def _split_points(weights: Sequence[int], parts: int) -> list[int]:
    """Indices that cut ``weights`` into ``parts`` contiguous runs of nearly equal sums.

    Each cut goes to the boundary closest to its ideal cumulative share; runs may be empty
    when there are fewer items than parts.
    """
    total = sum(weights)
    cumulative = [0]
    for w in weights:
        cumulative.append(cumulative[-1] + w)
    cuts = [0]
    for k in range(1, parts):
        if total == 0:  # nothing to balance: spread items evenly by count
            cuts.append(max(cuts[-1], round(len(weights) * k / parts)))
            continue
        target = total * k / parts
        i = bisect.bisect_left(cumulative, target, lo=cuts[-1])
        candidates = [c for c in (i - 1, i) if cuts[-1] <= c <= len(weights)]
        cuts.append(min(candidates, key=lambda c: (abs(cumulative[c] - target), c)))
    cuts.append(len(weights))
    return cuts


def _units(files: Sequence[InputFile], items: Sequence[tuple[int, int]], rows_per_part: int) -> list[Unit]:
    """Cut each file's consecutive (file, row group) items into the fewest parts of about
    ``rows_per_part`` rows, all of nearly equal size; a row group larger than that is cut into
    equal slices of its own, so no part (and no worker's part) grows with the row groups.

    Equal parts keep workers finishing together: a greedy cut would leave a small remainder part,
    and one worker busy with the last full part while the others wait.
    """
    units: list[Unit] = []
    for file_index, group in itertools.groupby(items, key=lambda item: item[0]):
        row_groups = [rg for _, rg in group]
        if row_groups == [-1]:  # a file without row groups still gets an (empty) part carrying the schema
            units.append(Unit(file_index, (), 0))
            continue
        sizes = files[file_index].row_groups
        for large, run in itertools.groupby(row_groups, key=lambda rg: sizes[rg] > rows_per_part):
            run = list(run)
            if large:
                for rg in run:
                    units += _slices(file_index, rg, sizes[rg], rows_per_part)
                continue
            run_sizes = [sizes[rg] for rg in run]
            cuts = _split_points(run_sizes, max(1, -(-sum(run_sizes) // rows_per_part)))
            units += [
                Unit(file_index, tuple(run[a:b]), sum(run_sizes[a:b])) for a, b in zip(cuts, cuts[1:]) if b > a
            ]
    return units


def _slices(file_index: int, row_group: int, rows: int, rows_per_part: int) -> list[Unit]:
    """A row group of more than ``rows_per_part`` rows as the fewest equal slices of at most that many."""
    count = -(-rows // rows_per_part)
    bounds = [rows * k // count for k in range(count + 1)]
    return [Unit(file_index, (row_group,), b - a, slice=k, start=a) for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def make_plan(
    files: Sequence[InputFile],
    output: str,
    artifacts: Sequence[dict[str, Any]],
    shards: int | None = None,
    rows_per_shard: int | None = None,
    rows_per_part: int | None = None,
    predicted_at: str | None = None,
    schema: Sequence[dict[str, str]] | None = None,
    model_version: str | None = None,
) -> Plan:
    """Balanced contiguous shards of whole row groups; the same input always gives the same plan.
    Parts hold at most ``rows_per_part`` rows (default ``DEFAULT_ROWS_PER_PART``)."""
    rows_per_part = rows_per_part or DEFAULT_ROWS_PER_PART
    if shards is not None and rows_per_shard is not None:
        raise ConfigError("give either --shards or --rows-per-shard, not both")
    check_numbers(shards=shards, rows_per_shard=rows_per_shard)
    # Every row group is an item; a file with none is one empty item so it still has a part.
    items = [(i, rg) for i, f in enumerate(files) for rg in (range(len(f.row_groups)) or [-1])]
    weights = [files[i].row_groups[rg] if rg >= 0 else 0 for i, rg in items]
    total = sum(weights)
    if rows_per_shard is not None:
        shards = max(1, -(-total // rows_per_shard))
    count = shards or 1
    cuts = _split_points(weights, count)
    shard_list = _named(tuple(
        Shard(k, tuple(_units(files, items[cuts[k] : cuts[k + 1]], rows_per_part))) for k in range(count)
    ))
    file_entries = tuple(
        {"uri": f.uri, "size": f.size, "row_groups": list(f.row_groups), "identity": dict(f.identity)} for f in files
    )
    return Plan(
        file_entries, shard_list, output, tuple(artifacts), predicted_at,
        schema=None if schema is None else tuple(schema), model_version=model_version,
    )


# --- the planning steps of a job ------------------------------------------------------------------


def artifact_dicts(artifacts: Sequence[Artifact]) -> list[dict[str, Any]]:
    return [a.to_dict() for a in artifacts]


def plan_of(prepared: Prepared, **split: Any) -> Plan:
    """The plan of a checked job, recording what every shard must write (schema, model version)."""
    return make_plan(
        prepared.files, prepared.output, artifact_dicts(prepared.model.artifacts),
        schema=schema_dicts(prepared.output_schema), model_version=prepared.config.model_version, **split,
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
        guard_plan_file(prepared.output, out)
    result = plan_of(prepared, shards=shards, rows_per_shard=rows_per_shard, predicted_at=now().isoformat())
    if not out:  # nothing is written: the job's first shard takes the lease
        return result
    from .preflight import check_access, check_lease

    check_lease(prepared, plan_holder(result.plan_id))  # a plan that cannot write is refused before it takes the lease
    check_access(prepared, plan_out=out)
    with hold(config, result, "plan", release="never"):
        guard_output(config, prepared.output, prepared.files)  # again: another job may have just finished
        fs, path = filesystem(prepared.output, config.storage_options)
        uncommit(fs, path)
        plan_fs, plan_path = filesystem(out, config.storage_options)
        write_json(plan_fs, plan_path, result.to_dict())
    return result


def hold(config: JobConfig, the_plan: Plan, command: str, release: str, holder: str | None = None) -> Any:
    """The lease on the plan's output, for a sharded job's step (or under ``holder``, a run)."""
    return held(the_plan.output, config.storage_options, holder or plan_holder(the_plan.plan_id), the_plan.plan_id,
                command, seconds=config.lease_seconds, wait_seconds=config.lock_timeout, release=release)


def plan_again(config: JobConfig, shards: int) -> Plan:
    """The plan ``plan --shards N`` would make, rebuilt from footers and artifact digests.

    Plans are deterministic, so shards started as ``--shard I/N`` and a ``commit --shards N``
    agree on it without sharing a file; the model is hashed (and checked against its pins), not loaded.
    """
    config.require("model")
    output = normalize_output(config)
    policy = ArtifactPolicy.of(config)
    artifacts = artifact_digests(config.model, config.scaler, config.storage_options, policy)  # type: ignore[arg-type]
    files = read_footers(list_inputs(config.input, config.storage_options), config.storage_options)
    return make_plan(files, output, artifact_dicts(artifacts), shards=shards)


def load_plan(uri: str, config: JobConfig) -> Plan:
    """The plan written at ``uri``, refused unless its artifacts pass the job's pins and it is for the job's output."""
    fs, path = filesystem(uri, config.storage_options)
    try:
        data = read_json(fs, path)
    except FileNotFoundError:
        raise ConfigError(f"plan not found: {uri}") from None
    except ValueError as exc:
        raise InputDataError(f"plan {uri} is not valid JSON: {exc}") from None
    result = Plan.from_dict(data, source=uri)
    ArtifactPolicy.of(config).check_planned(result.artifacts, uri)
    if config.output and normalize_output(config) != result.output:
        raise ConfigError(f"plan {uri} is for output {result.output}, not {normalize_output(config)}")
    return result
