"""Plan a job: split the input into shards of whole row groups, from footers alone, deterministically.

A plan is made (``plan``), read back (``load_plan``) or made again from the same footers
(``plan_again``); every step that writes the output holds its lease (``hold``).
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import io
import itertools
import json
import logging
import os
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from ..config import FIELDS, PLAN_FIELDS, JobConfig, check_numbers
from ..errors import BatchscoreError, ConfigError, InputDataError, ModelError, param
from ..io.layout import PART_NUMBER_DIGITS, part_name, table_data_folder
from ..io.lease import held, plan_holder
from ..io.output_guard import guard_output, guard_overlap, guard_plan_file
from ..io.sink import held_path, read_json, uncommit, write_json
from ..io.source import InputFile, InputFiles, check_identity, iter_footers, list_inputs, read_footers
from ..io.storage import Location, atomic_writer, location, resolve
from ..models.artifacts import Artifact, ArtifactPolicy, artifact_digests, challenger_of, challenger_roles
from ..schema import to_argv
from .preparation import Prepared, normalize_output, now, prepare, schema_dicts

#: 3: files stored once, one compact record each; shards stored as their row counts only, their units
#: derived from the files, the shard count and ``rows_per_part`` (an edited split cannot be read back).
PLAN_FORMAT = 3
log = logging.getLogger(__name__)

#: A part (one output file) holds about this many rows (whole row groups, or equal slices of a
#: larger row group); parts are the unit of parallel work, and what one worker holds open.
DEFAULT_ROWS_PER_PART = 524_288
#: What a file record of a plan holds, in order: where, how big, rows per row group, then its identity.
IDENTITY_FIELDS = ("mtime_ns", "inode", "device", "etag", "version_id")
FILE_FIELDS = ("uri", "size", "row_groups", *IDENTITY_FIELDS)
#: An environment variable holding a secret: when set, ``plan`` signs the plan with it and every
#: step that reads a plan refuses one that is unsigned or signed otherwise.
PLAN_KEY_ENV = "BATCHSCORE_PLAN_KEY"


@dataclass(frozen=True, slots=True)
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
        return part_name(self.file, self.first_row_group, self.slice, self.digits)


def _named(shards: Sequence[Shard]) -> tuple[Shard, ...]:
    """The shards with part names of one width: at least ``PART_NUMBER_DIGITS`` digits, more when
    a file or row group number needs them."""
    largest = max((max(u.file, u.first_row_group, u.slice or 0) for s in shards for u in s.units), default=0)
    digits = max(PART_NUMBER_DIGITS, len(str(largest)))
    if digits == PART_NUMBER_DIGITS:  # the units already have it
        return tuple(shards)
    return tuple(Shard(s.index, tuple(replace(u, digits=digits) for u in s.units)) for s in shards)


@dataclass(frozen=True)
class Shard:
    index: int
    units: tuple[Unit, ...]

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units)


class PlanFiles(Sequence[Mapping[str, Any]]):
    """A plan's input files, one compact record each in one table (``source.InputFiles``, shared
    with the footers it was made from): 100,000 files cost a few megabytes, not hundreds.

    Indexing gives the entry every step reads: ``uri``, ``size``, ``row_groups`` and ``identity``.
    """

    __slots__ = ("_table",)

    def __init__(self, table: InputFiles):
        self._table = table

    @classmethod
    def of(cls, files: Sequence[InputFile]) -> PlanFiles:
        return cls(files if isinstance(files, InputFiles) else InputFiles(files))

    @classmethod
    def from_rows(cls, rows: Iterable[Any], source: str) -> PlanFiles:
        table = InputFiles()
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != len(FILE_FIELDS):
                raise InputDataError(
                    f"{source}: not a batchscore plan (file {i} is not a record of {', '.join(FILE_FIELDS)})"
                )
            uri, size, row_groups, *identity = row
            if (
                not isinstance(uri, str)
                or not isinstance(size, int)
                or not isinstance(row_groups, list)
                or not all(isinstance(n, int) and n >= 0 for n in row_groups)
            ):
                raise InputDataError(f"{source}: not a batchscore plan (file {i}'s uri, size or row groups malformed)")
            try:
                table.add(uri, size, row_groups, dict(zip(IDENTITY_FIELDS, identity)))
            except (TypeError, OverflowError, ValueError):
                raise InputDataError(f"{source}: not a batchscore plan (file {i}'s identity malformed)") from None
        return cls(table)

    def __len__(self) -> int:
        return len(self._table)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        uri, size, row_groups, identity = self._table.record(index)
        found = {k: v for k, v in identity.items() if v is not None}
        return {"uri": uri, "size": size, "row_groups": list(row_groups), "identity": {"size": size, **found}}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlanFiles) and self._table == other._table

    def __hash__(self) -> int:
        return hash(tuple(self._table.uris))

    def uri(self, index: int) -> str:
        return self._table.uris[index]

    def row_groups_of(self, index: int) -> tuple[int, ...]:
        return self._table.row_groups(index)

    def records(self) -> Iterator[tuple[Any, ...]]:
        """The records, one at a time: uri, size, row groups, then ``IDENTITY_FIELDS``."""
        for i in range(len(self._table)):
            uri, size, row_groups, identity = self._table.record(i)
            yield (uri, size, row_groups, *(identity[k] for k in IDENTITY_FIELDS))

    @property
    def uris(self) -> list[str]:
        """Every file's URI (the table's own list: read it, do not change it)."""
        return self._table.uris

    @property
    def row_groups(self) -> Sequence[tuple[int, ...]]:
        return _RowGroups(self._table)

    @property
    def total_rows(self) -> int:
        return self._table.total_rows

    def rows(self) -> list[list[Any]]:
        """The records as the plan document stores them."""
        return [[r[0], r[1], list(r[2]), *r[3:]] for r in self.records()]

    def encoded(self) -> Iterator[bytes]:
        """Each record as canonical JSON, one at a time (no list of 100,000 records is built)."""
        for r in self.records():
            yield _canonical([r[0], r[1], list(r[2]), *r[3:]])


class _RowGroups(Sequence[tuple[int, ...]]):
    """Each file's rows per row group, read from the table as asked for."""

    def __init__(self, table: InputFiles):
        self._table = table

    def __len__(self) -> int:
        return len(self._table)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._table.row_groups(index)


def _split(row_groups: Sequence[Sequence[int]], count: int, rows_per_part: int) -> tuple[Shard, ...]:
    """Balanced contiguous shards of whole row groups: a function of the row groups alone."""
    # Every row group is an item; a file with none is one empty item so it still has a part.
    files, groups, weights = array("q"), array("q"), array("q")
    for i in range(len(row_groups)):
        sizes = row_groups[i]
        files.extend([i] * max(1, len(sizes)))
        groups.extend(range(len(sizes)) if sizes else (-1,))
        weights.extend(sizes if sizes else (0,))
    cuts = _split_points(weights, count)
    del weights
    return _named(
        tuple(
            Shard(
                k,
                tuple(
                    _units(row_groups, zip(files[cuts[k] : cuts[k + 1]], groups[cuts[k] : cuts[k + 1]]), rows_per_part)
                ),
            )
            for k in range(count)
        )
    )


@dataclass(frozen=True)
class Plan:
    """What every shard reads and writes; its ``plan_id`` ties receipts to it."""

    files: PlanFiles
    shards: tuple[Shard, ...]
    output: str
    artifacts: tuple[dict[str, Any], ...]  # role, uri, sha256, bytes
    predicted_at: str | None = None
    #: What every shard must write: output columns and types, and the model version. Not part of
    #: ``plan_id``; None when the plan was rebuilt without loading the model (``commit --shards``).
    schema: tuple[dict[str, str], ...] | None = None
    model_version: str | None = None
    rows_per_part: int = DEFAULT_ROWS_PER_PART

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @cached_property
    def total_rows(self) -> int:
        return self.files.total_rows

    @cached_property
    def plan_id(self) -> str:
        """Content hash of what is read, written and with which model (not when it was planned)."""
        digest = hashlib.sha256(
            _canonical(
                {
                    "output": self.output,
                    "artifacts": [a["sha256"] for a in self.artifacts],
                    "num_shards": self.num_shards,
                    "rows_per_part": self.rows_per_part,
                }
            )
        )
        for row in self.files.encoded():
            digest.update(row)
        return digest.hexdigest()[:16]

    @cached_property
    def content_id(self) -> str:
        """Content hash of what is read and with which model into which output, however it is split
        into shards and parts: names a table output's data folder (see layout.py), so the same
        input scored by the same model is recognised as committed whatever the sharding."""
        digest = hashlib.sha256(_canonical({"output": self.output, "artifacts": [a["sha256"] for a in self.artifacts]}))
        for row in self.files.encoded():
            digest.update(row)
        return digest.hexdigest()[:16]

    @cached_property
    def sha256(self) -> str:
        """Digest of the whole plan as written: what ``plan`` prints and ``--plan-sha256`` expects."""
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk)
        return digest.hexdigest()

    def pin(self) -> list[str]:
        """The flags that hold a step of the job to exactly this plan and these artifacts."""
        return [
            *to_argv(PLAN_FIELDS, {"plan_sha256": self.sha256}),
            *[x for a in self.artifacts for x in to_argv(FIELDS, {f"{a['role']}_sha256": a["sha256"]})],
        ]

    def to_dict(self, files: bool = True) -> dict[str, Any]:
        data = {
            "format": PLAN_FORMAT,
            "plan_id": self.plan_id,
            "output": self.output,
            "predicted_at": self.predicted_at,
            "total_rows": self.total_rows,
            "num_shards": self.num_shards,
            "rows_per_part": self.rows_per_part,
            "artifacts": list(self.artifacts),
            "model_version": self.model_version,
            "schema": None if self.schema is None else list(self.schema),
            "file_fields": list(FILE_FIELDS),
            "shards": [{"index": s.index, "rows": s.rows, "parts": len(s.units)} for s in self.shards],
        }
        return {**data, "files": self.files.rows()} if files else data

    def encode(self, **extra: Any) -> bytes:
        """The plan document (with ``extra`` keys), compact: ``python -m json.tool plan.json`` shows it
        indented. Written record by record, so a plan of 100,000 files is never a list of them."""
        out = io.BytesIO()
        for chunk in self.chunks(**extra):
            out.write(chunk)
        return out.getvalue()

    def chunks(self, size: int = 1 << 16, **extra: Any) -> Iterator[bytes]:
        """``encode()``'s bytes in pieces of about ``size``: a plan written or printed this way is
        never one string of all its records."""
        pending, length = [], 0
        for piece in self._pieces(**extra):
            pending.append(piece)
            length += len(piece)
            if length >= size:
                yield b"".join(pending)
                pending, length = [], 0
        yield b"".join(pending)

    def _pieces(self, **extra: Any) -> Iterator[bytes]:
        head = {**self.to_dict(files=False), **extra}
        yield _canonical(head)[:-1] + b',"files":['
        for i, row in enumerate(self.files.encoded()):
            yield b"," + row if i else row
        yield b"]}"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "plan") -> Plan:
        """A plan read back; every derived field (units, rows, plan id) must agree with its files."""
        try:
            if data.get("format") != PLAN_FORMAT:
                raise InputDataError(
                    f"{source}: unsupported plan format {data.get('format')!r} (this batchscore reads format "
                    f"{PLAN_FORMAT}); make the plan again with `batchscore plan`"
                )
            if data["file_fields"] != list(FILE_FIELDS):
                raise InputDataError(f"{source}: not a batchscore plan (file fields {data['file_fields']})")
            files = PlanFiles.from_rows(data["files"], source)
            count, rows_per_part = data["num_shards"], data["rows_per_part"]
            if not (isinstance(count, int) and count >= 1 and isinstance(rows_per_part, int) and rows_per_part >= 1):
                raise InputDataError(
                    f"{source}: not a batchscore plan (num_shards {count!r}, rows_per_part {rows_per_part!r})"
                )
            schema = data["schema"]
            plan = cls(
                files,
                _split(files.row_groups, count, rows_per_part),
                data["output"],
                tuple(data["artifacts"]),
                data.get("predicted_at"),
                schema=None if schema is None else tuple({"name": c["name"], "type": c["type"]} for c in schema),
                model_version=data["model_version"],
                rows_per_part=rows_per_part,
            )
            stored = [(s["index"], s["rows"], s["parts"]) for s in data["shards"]]
        except (KeyError, TypeError) as exc:
            raise InputDataError(f"{source}: not a batchscore plan (missing or malformed {exc})") from None
        derived = [(s.index, s.rows, len(s.units)) for s in plan.shards]
        if stored != derived:
            raise InputDataError(
                f"{source}: plan inconsistent: its shards {_differ(stored, derived)} differ from the "
                f"split of its files into {plan.num_shards} shard(s); plan again"
            )
        if data.get("total_rows") != plan.total_rows:
            raise InputDataError(
                f"{source}: plan inconsistent: total_rows {data.get('total_rows')} != "
                f"{plan.total_rows} in its files' row groups; plan again"
            )
        if data.get("plan_id") != plan.plan_id:
            raise InputDataError(
                f"{source}: plan was edited after it was made (plan_id "
                f"{data.get('plan_id')!r} does not match its content)"
            )
        return plan

    def shard(self, index: int) -> Shard:
        if not 0 <= index < self.num_shards:
            raise ConfigError(f"shard {index} does not exist: the plan has shards 0 to {self.num_shards - 1}")
        return self.shards[index]


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _differ(stored: Sequence[tuple[int, int, int]], derived: Sequence[tuple[int, int, int]]) -> str:
    """The first shard whose (index, rows, parts) differ, in words."""
    if len(stored) != len(derived):
        return f"(listed {len(stored)}, num_shards {len(derived)})"
    i = next(i for i, (a, b) in enumerate(zip(stored, derived)) if a != b)
    return f"(shard {i}: index, rows, parts {list(stored[i])} != {list(derived[i])})"


def _split_points(weights: Sequence[int], parts: int) -> list[int]:
    """Indices that cut ``weights`` into ``parts`` contiguous runs of nearly equal sums.

    Each cut goes to the boundary closest to its ideal cumulative share; runs may be empty
    when there are fewer items than parts.
    """
    total = sum(weights)
    cumulative = array("q", itertools.accumulate(weights, initial=0))
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


def _units(row_groups: Sequence[Sequence[int]], items: Iterable[tuple[int, int]], rows_per_part: int) -> list[Unit]:
    """Cut each file's consecutive (file, row group) items into the fewest parts of about
    ``rows_per_part`` rows, all of nearly equal size; a row group larger than that is cut into
    equal slices of its own, so no part (and no worker's part) grows with the row groups.

    Equal parts keep workers finishing together: a greedy cut would leave a small remainder part,
    and one worker busy with the last full part while the others wait.
    """
    units: list[Unit] = []
    for file_index, group in itertools.groupby(items, key=lambda item: item[0]):
        groups = [rg for _, rg in group]
        if groups == [-1]:  # a file without row groups still gets an (empty) part carrying the schema
            units.append(Unit(file_index, (), 0))
            continue
        sizes = row_groups[file_index]
        for large, grouped in itertools.groupby(groups, key=lambda rg: sizes[rg] > rows_per_part):
            run = list(grouped)
            if large:
                for rg in run:
                    units += _slices(file_index, rg, sizes[rg], rows_per_part)
                continue
            run_sizes = [sizes[rg] for rg in run]
            cuts = _split_points(run_sizes, max(1, -(-sum(run_sizes) // rows_per_part)))
            units += [Unit(file_index, tuple(run[a:b]), sum(run_sizes[a:b])) for a, b in zip(cuts, cuts[1:]) if b > a]
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
    check_numbers(shards=shards, rows_per_shard=rows_per_shard)
    table = PlanFiles.of(files)
    if rows_per_shard is not None:
        shards = max(1, -(-table.total_rows // rows_per_shard))
    return Plan(
        table,
        _split(table.row_groups, shards or 1, rows_per_part),
        output,
        tuple(artifacts),
        predicted_at,
        schema=None if schema is None else tuple(schema),
        model_version=model_version,
        rows_per_part=rows_per_part,
    )


# --- the planning steps of a job ------------------------------------------------------------------


def artifact_dicts(artifacts: Sequence[Artifact]) -> list[dict[str, Any]]:
    return [a.to_dict() for a in artifacts]


def plan_of(prepared: Prepared, **split: Any) -> Plan:
    """The plan of a checked job, recording what every shard must write (schema, model version);
    a table output must be able to take those columns."""
    from .preflight import check_table_output

    check_table_output(prepared)
    return make_plan(
        prepared.files,
        prepared.output,
        artifact_dicts(prepared.model.artifacts)
        + artifact_dicts([a for c in prepared.challengers if c.model is not None for a in c.model.artifacts]),
        schema=schema_dicts(prepared.output_schema),
        model_version=prepared.config.model_version,
        **split,
    )


def plan(
    config: JobConfig, shards: int | None = None, rows_per_shard: int | None = None, out: str | None = None
) -> Plan:
    """Check the whole job from footers and the model, then split it into shards.

    Writing the plan next to the output (``out``) also un-commits an output being redone.
    """
    prepared = prepare(config)
    guard_output(config, prepared.location, prepared.files)  # a refused job leaves the output untouched
    if out:
        guard_overlap(config, out, prepared.files.uris)
        guard_plan_file(prepared.output, out)
    result = plan_of(prepared, shards=shards, rows_per_shard=rows_per_shard, predicted_at=now().isoformat())
    if not out:  # nothing is written: the job's first shard takes the lease
        return result
    from .preflight import check_access, check_lease

    check_lease(prepared, plan_holder(result.plan_id))  # a plan that cannot write is refused before it takes the lease
    plan_file = resolve(out, config.storage)
    check_access(prepared, plan_out=plan_file)
    with hold(config, result, "plan", release="never", output=prepared.location) as lease:
        guard_output(config, prepared.location, prepared.files)  # again: another job may have just finished
        if not committed_already(config, result, lease.location):  # a table's record of it stays
            guard_output(config, lease.location, prepared.files)  # a table's data folder: only its own files
            uncommit(lease.location.fs, lease.location.path)
        with atomic_writer(plan_file.fs, plan_file.path) as fh:
            for chunk in plan_chunks(result):
                fh.write(chunk)
    return result


def parts_location(config: JobConfig, the_plan: Plan, output: Location | None = None) -> Location:
    """Where the plan's shards write their parts: the output folder (``output``, when the step has
    resolved it already), or for a table output the plan's data folder inside the table."""
    if config.output_format == "parquet":
        return output or resolve(the_plan.output, config.storage)
    table = output or resolve(the_plan.output, config.storage)
    return resolve(table_data_folder(table.uri, config.partition, the_plan.content_id), config.storage)


def committed_already(config: JobConfig, the_plan: Plan, parts: Location) -> bool:
    """Whether a table output holds this plan's rows already (its parts are then the table's: they
    are not written again)."""
    if config.output_format == "parquet":
        return False
    from ..io.tables import Target, table_committed

    digests = [a["sha256"] for a in the_plan.artifacts]
    version = table_committed(Target.of(config, resolve(the_plan.output, config.storage), digests), parts.path)
    if version is not None:
        log.info(f"plan {the_plan.plan_id} is committed to {the_plan.output} already (version {version})")
    return version is not None


def hold(
    config: JobConfig,
    the_plan: Plan,
    command: str,
    release: str,
    holder: str | None = None,
    output: Location | None = None,
) -> Any:
    """The lease on the plan's output (``output``, when the step has resolved it already), for a
    sharded job's step (or under ``holder``, a run)."""
    return held(
        parts_location(config, the_plan, output),
        holder or plan_holder(the_plan.plan_id),
        the_plan.plan_id,
        command,
        seconds=config.lease_seconds,
        wait_seconds=config.lock_timeout,
        release=release,
    )


def plan_again(config: JobConfig, shards: int) -> Plan:
    """The plan ``plan --shards N`` would make, rebuilt from footers and artifact digests.

    Plans are deterministic, so shards started as ``--shard I/N`` and a ``commit --shards N``
    agree on it without sharing a file; the model is hashed (and checked against its pins), not loaded.
    """
    output = normalize_output(config)
    artifacts = job_artifacts(config, ArtifactPolicy.of(config))
    files = read_footers(list_inputs(config.input, config.storage), config.storage)
    return make_plan(files, output, artifact_dicts(artifacts), shards=shards)


def job_artifacts(config: JobConfig, policy: ArtifactPolicy, challengers: bool = True) -> tuple[Artifact, ...]:
    """The champion's artifacts, then (``challengers``) every challenger's that can be read and
    passes its pins (hashed, not loaded); one that cannot, whatever the cause (a missing file, a
    registry that does not answer), is left out, as the plan left it out, unless required."""
    found = list(artifact_digests(config.require("model"), config.scaler, config.storage, policy))
    for entry in config.models if challengers else ():
        try:
            found += artifact_digests(entry.model, entry.scaler, config.storage, policy, challenger_roles(entry.name))
        except BatchscoreError:
            if config.challengers_required:
                raise
    return tuple(found)


def _signature(key: str, digest: str) -> str:
    return hmac.new(key.encode(), digest.encode(), hashlib.sha256).hexdigest()


def plan_document(the_plan: Plan) -> bytes:
    """The plan file's bytes: the plan, signed when ``BATCHSCORE_PLAN_KEY`` holds a key."""
    return b"".join(plan_chunks(the_plan))


def plan_chunks(the_plan: Plan) -> Iterator[bytes]:
    """``plan_document`` in pieces, as it is written (never one string of 100,000 records)."""
    key = os.environ.get(PLAN_KEY_ENV)
    extra: dict[str, Any] = {"signature": _signature(key, the_plan.sha256)} if key else {}
    yield from the_plan.chunks(**extra)
    yield b"\n"


def load_plan(uri: str, config: JobConfig, expected_sha256: str | None = None) -> Plan:
    """The plan written at ``uri``, refused unless its artifacts pass the job's pins, it is for the
    job's output, and it is the plan that was made: its digest is ``expected_sha256`` (handed on by
    whoever ran ``plan``, never read from the store) and, with a key in ``BATCHSCORE_PLAN_KEY``,
    its signature is that key's."""
    plan_file = resolve(uri, config.storage)
    try:
        data = read_json(plan_file.fs, plan_file.path)
    except FileNotFoundError:
        raise ConfigError(f"plan not found: {uri}") from None
    except ValueError as exc:
        raise InputDataError(f"plan {uri} is not valid JSON: {exc}") from None
    return checked_plan(data, uri, config, expected_sha256)


def checked_plan(data: Any, uri: str, config: JobConfig, expected_sha256: str | None = None) -> Plan:
    """A plan document read from ``uri``, held to what ``load_plan`` holds it to."""
    if not isinstance(data, dict):
        raise InputDataError(f"{uri}: not a batchscore plan (not a JSON object)")
    data = dict(data)
    signature = data.pop("signature", None)
    result = Plan.from_dict(data, source=uri)
    ArtifactPolicy.of(config).check_planned(result.artifacts, uri)
    if expected_sha256 and result.sha256 != expected_sha256.strip().lower():
        raise InputDataError(
            f"plan {uri} is not the plan that was made: its sha256 is {result.sha256}, "
            f"{param('plan_sha256')} says {expected_sha256}; plan again"
        )
    key = os.environ.get(PLAN_KEY_ENV)
    if key and not (isinstance(signature, str) and hmac.compare_digest(signature, _signature(key, result.sha256))):
        raise InputDataError(
            f"plan {uri} is not signed with the key in {PLAN_KEY_ENV} "
            f"({'unsigned' if signature is None else 'signature does not match'}); plan again"
        )
    if config.output and normalize_output(config) != result.output:
        raise ConfigError(f"plan {uri} is for output {result.output}, not {normalize_output(config)}")
    return result


#: The settings a commit held for drift records with its plan (see ``held_job``).
HELD_SETTINGS = (
    "on_invalid",
    "max_invalid_fraction",
    "model_version",
    "job_name",
    "pushgateway",
    "output_format",
    "table_mode",
    "partition",
)
HELD_FORMAT = 1


def record_held(config: JobConfig, the_plan: Plan) -> None:
    """Beside an output held for drift, what its commit was committing: the plan (signed as plan
    files are) and the job's settings that commit reads, so ``commit OUTPUT --accept-drift``
    can commit it from the output alone. Called after the held report is written."""
    where = resolve(the_plan.output, config.storage)
    document = {
        "format": HELD_FORMAT,
        "plan": json.loads(plan_document(the_plan)),
        "settings": {key: getattr(config, key) for key in HELD_SETTINGS},
    }
    write_json(where.fs, held_path(where.path), document, compact=True)  # one line: it grows with the input


def held_job(config: JobConfig) -> tuple[Plan, JobConfig]:
    """The plan of the commit that held ``config.output`` for drift, with the job's settings: those
    the commit recorded stand where ``config`` leaves them at their defaults."""
    output = normalize_output(config)
    where = resolve(output, config.storage)
    uri = held_path(output)
    try:
        data = read_json(where.fs, held_path(where.path))
    except FileNotFoundError:
        raise ConfigError(
            f"{param('accept_drift')}: {output} has no commit held for drift recorded beside it ({uri}); nothing to "
            f"accept (an output held by an older batchscore needs the job's settings and {param('plan')} or "
            f"{param('shards')}, as it ran)"
        ) from None
    except ValueError as exc:
        raise InputDataError(f"{uri} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != HELD_FORMAT or not isinstance(data.get("settings"), dict):
        raise InputDataError(f"{uri}: not a record of a commit held for drift (format {HELD_FORMAT})")
    the_plan = checked_plan(data.get("plan"), uri, config)
    defaults = JobConfig()
    recorded = {
        key: value
        for key, value in data["settings"].items()
        if key in HELD_SETTINGS and getattr(config, key) == getattr(defaults, key)
    }
    return the_plan, replace(config, output=output, **recorded)


def _locations(uris: Sequence[str]) -> dict[str, str]:
    """Where each file really is (see ``storage.location``), mapped to one spelling of it."""
    return {location(uri): uri for uri in uris}


def check_footer(found: InputFile, entry: Mapping[str, Any]) -> None:
    """Refuse a file that is not the planned one: other row groups, size, mtime, inode, ETag."""
    if list(found.row_groups) != list(entry["row_groups"]):
        raise InputDataError(
            f"input file {found.uri} changed since the plan was made (row groups {list(entry['row_groups'])} -> "
            f"{list(found.row_groups)}); plan again"
        )
    check_identity(found.uri, entry["identity"], found.identity)


def check_within_input(config: JobConfig, the_plan: Plan, source: str) -> None:
    """Refuse a plan whose files are not exactly those the job's own input specs match now: none
    outside them, none named twice, none missing (compared by where the files really are: ``..``,
    symlinks, ``file://``, relative paths, bucket and key). Reads a listing, no footer."""
    listed = _locations(list_inputs(config.input, config.storage))
    planned = [location(uri) for uri in the_plan.files.uris]
    outside = [the_plan.files.uri(i) for i, where in enumerate(planned) if where not in listed]
    if outside:
        raise InputDataError(
            f"plan {source} inconsistent: it names {len(outside)} file(s) outside the job's input "
            f"({', '.join(config.input)}), e.g. {outside[0]}; a plan can only narrow the job: plan again"
        )
    first: dict[str, int] = {}
    twice = [the_plan.files.uri(i) for i, where in enumerate(planned) if first.setdefault(where, i) != i]
    if twice:
        raise InputDataError(f"plan {source} inconsistent: it names {twice[0]} twice; plan again")
    missing = [uri for where, uri in listed.items() if where not in first]
    if missing and not config.incremental:  # an incremental plan names only the files it scores
        raise InputDataError(
            f"plan {source} inconsistent: the job's input matches {len(missing)} file(s) the plan lacks, "
            f"e.g. {missing[0]}; plan again"
        )


def check_against_input(config: JobConfig, the_plan: Plan, source: str) -> None:
    """Make the plan again from the job's own input and artifacts and refuse any difference.

    The files the input specs match now must be exactly the plan's (none added, none missing), each
    with the planned row groups and identity; the artifacts, where the job names them, must have
    the planned digests (exit 4). The split follows from the files and the shard count.
    """
    check_within_input(config, the_plan, source)
    files = the_plan.files
    for i, found in enumerate(iter_footers(files.uris, config.storage)):  # a few at a time, never all
        check_footer(found, files[i])
    if config.model:
        policy = ArtifactPolicy.of(config).following(the_plan.artifacts)  # a registry alias: as planned
        # A challenger not required is not fetched again: the shards scored the planned one or
        # recorded why not, and its registry being down now must not stop the champion's commit.
        actual = {a.role: a for a in job_artifacts(config, policy, challengers=config.challengers_required)}
        for entry in the_plan.artifacts:
            if challenger_of(entry["role"]) is not None and not config.challengers_required:
                continue  # the shards scored the planned challenger or recorded why not: never the champion's failure
            found_artifact = actual.get(entry["role"])
            if found_artifact is None or found_artifact.sha256 != entry["sha256"]:
                raise ModelError(
                    f"plan {source}: {entry['role']} artifact "
                    f"{found_artifact.uri + ' has sha256 ' + found_artifact.sha256 if found_artifact else 'not given'}"
                    f", the plan says {entry['sha256']}; plan again"
                )
