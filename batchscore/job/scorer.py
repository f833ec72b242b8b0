"""Score one plan unit: read its row groups, check values, predict, write its part.

A unit is the smallest piece of work with its own output file, so units can run in any order
and in any process, and the output is identical whichever way they are spread.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import StorageSettings
from ..errors import InputDataError, ModelError, StorageError, param
from ..io.layout import attempt_part_name, challenger_part_path
from ..io.sink import REJECT_REASON, part_path, part_writer, rejected_path
from ..io.source import columns_with_nulls, iter_batches
from ..io.storage import Location, join
from ..io.validation import invalid_mask, invalid_reasons
from ..models.artifacts import LoadedModel
from ..models.challengers import Challenger, comparable, score_index
from ..models.engine import PREDICTED_AT, Predictor, StageCache
from ..observe.agreement import Agreement, row_keys
from ..observe.profile import UnitProfile, score_columns
from .pipeline import BackgroundWriter, prefetch
from .planning import Unit
from .pool import report_progress


@dataclass
class ScoreTask:
    """Everything a process needs to score units; sent once to each worker."""

    model: LoadedModel
    model_version: str
    predicted_at: datetime
    files: Sequence[Mapping[str, Any]]  # plan file entries: uri, size, row_groups
    output: Location  # the output dataset
    passthrough: tuple[str, ...]
    output_schema: pa.Schema
    batch_size: int
    on_invalid: str
    max_invalid_rows: int
    storage: StorageSettings  # to read the input files with
    attempt: str = ""  # named in every part's footer, checked by commit against the receipt
    fence: Any = None  # lease.Fence: no part is published once the output's lease may have run out
    compiled_library: str | None = None  # verified for these files (see verification.py), else scikit-learn
    profile: bool = True  # profile features and scores for the run report (off only to measure its cost)
    contract: Any = None  # validation.SchemaContract: each file's footer is checked against it as it is opened
    challengers: tuple[Challenger, ...] = ()  # scored on the same rows, into their own columns
    challengers_required: bool = False  # a challenger that raises fails the job (else it is recorded)
    max_batch_bytes: int | None = None  # bytes of read columns per batch, besides batch_size's rows
    attempt_names: bool = False  # parts named for their attempt: another attempt may write the same units at once
    challenger_folders: bool = False  # ``challenger_output: folders``: each challenger writes its own parts
    #: In folders: each loaded challenger's parts' schema, by name
    challenger_schemas: Mapping[str, pa.Schema] = field(default_factory=dict)

    @property
    def features(self) -> list[str]:
        """The champion's features, then the loaded challengers' others."""
        names = list(self.model.features)
        for c in self.challengers:
            names += [f for f in (c.model.features if c.model is not None else ()) if f not in names]
        return names

    def part_name(self, unit: Unit) -> str:
        """The name of ``unit``'s part: the plan's, or with this attempt in it (``attempt_names``)."""
        return attempt_part_name(unit.part_name, self.attempt) if self.attempt_names else unit.part_name

    @property
    def read_columns(self) -> list[str]:
        """Passthrough columns, then features not among them; nothing else is read."""
        return list(self.passthrough) + [f for f in self.features if f not in self.passthrough]

    def open_part(self, fs: Any, path: str, schema: pa.Schema) -> Any:
        """A part writer that names this attempt and publishes only under the lease."""
        fence = self.fence
        check = (lambda: fence.check(path)) if fence is not None else None
        return part_writer(fs, path, schema, self.attempt, check)

    @property
    def rejected_schema(self) -> pa.Schema:
        return pa.schema(
            [self.output_schema.field(c) for c in self.passthrough] + [pa.field(REJECT_REASON, pa.string())]
        )


@dataclass
class UnitResult:
    part: str
    rows_in: int
    rows_out: int
    rows_invalid: int
    rejected_part: str | None
    seconds: float
    profile: dict[str, Any] | None = None
    #: ``challenger_output: folders``: rows of each challenger's part (by name), and why any stopped
    challenger_rows: dict[str, int] = field(default_factory=dict)
    challenger_errors: dict[str, str] = field(default_factory=dict)


def _first_row(file: Mapping[str, Any], unit: Unit) -> int:
    return sum(file["row_groups"][: unit.row_groups[0]]) + unit.start if unit.row_groups else 0


class ChallengerScoring:
    """A process's challengers: each scores the champion's rows from the same batch, sharing its
    feature matrix (same features) and its scaled matrix (same scaler sha256, see ``StageCache``).

    A challenger that raises is recorded and writes nulls from that batch on in this process,
    unless ``challengers_required``; the champion's columns are never touched."""

    def __init__(self, task: ScoreTask, champion: Predictor):
        self.task, self.champion = task, champion
        self.cache = StageCache()
        champion.stage_cache = self.cache
        self.predictors: dict[str, Predictor] = {}
        self.errors: dict[str, str] = {}
        for c in task.challengers:
            if c.model is not None:
                predictor = Predictor(c.model, c.version, task.predicted_at)
                predictor.stage_cache = self.cache
                predictor.isolates_failures = False  # a challenger that raises stops, recorded
                self.predictors[c.name] = predictor

    def scored(
        self,
        batch: pa.RecordBatch,
        matrix: np.ndarray,
        n: int,
        champion_bad: np.ndarray | None,
        feature_bad: np.ndarray | None,
        champion_columns: list[pa.Array] | None,
        file_nulls: frozenset[str],
        place: tuple[int, int],
        profile: UnitProfile | None,
    ) -> list[tuple[Challenger, tuple[list[pa.Array], np.ndarray] | None]]:
        """Every challenger's columns over the batch's ``n`` rows (its predictor's, ``predicted_at``
        included) and which rows hold its values; None for one that gave none.

        In columns the rows are the champion's: a row it set aside (``champion_bad``) is no one's.
        In folders each challenger's rows are its own: it leaves out only rows invalid for its own
        features (``feature_bad``: the champion's null/NaN/inf rows, placeholders in the shared
        matrix) or refused after its own transforms."""
        folders = self.task.challenger_folders
        # The champion's matrix: its invalid rows are already placeholders, in ``feature_bad``.
        matrices: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray | None]] = {
            tuple(self.champion.model.features): (matrix, feature_bad if folders else None)
        }
        baseline = None if folders else champion_bad
        found: list[tuple[Challenger, tuple[list[pa.Array], np.ndarray] | None]] = []
        for c in self.task.challengers:
            predictor = self.predictors.get(c.name)
            values = None
            if predictor is not None and c.name not in self.errors:
                try:
                    values = self._score(c, predictor, batch, matrices, n, baseline, file_nulls)
                except Exception as exc:  # the challenger's failure, never the champion's
                    message = f"challenger {c.name} raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    if self.task.challengers_required:
                        raise ModelError(f"{message} (challengers_required)") from None
                    self.errors[c.name] = message
                    if profile is not None:
                        profile.challenger_errors.setdefault(c.name, message)
            if values is not None and profile is not None and predictor is not None and champion_columns is not None:
                self._compare(c, predictor, champion_columns, values[0], values[1], champion_bad, place, profile)
            found.append((c, values))
        self.cache.clear()
        return found

    def columns(
        self,
        batch: pa.RecordBatch,
        matrix: np.ndarray,
        n: int,
        champion_bad: np.ndarray | None,
        champion_columns: list[pa.Array],
        file_nulls: frozenset[str],
        place: tuple[int, int],
        profile: UnitProfile | None,
    ) -> list[pa.Array]:
        """Every challenger's columns for the batch's ``n`` rows (null where it gave no value)."""
        arrays: list[pa.Array] = []
        for c, values in self.scored(
            batch, matrix, n, champion_bad, None, champion_columns, file_nulls, place, profile
        ):
            if values is None:
                arrays += [pa.nulls(n, f.type) for f in c.fields]
                continue
            columns, valid = values
            # The challenger's predicted_at is the job's: its columns are the champion's but that one.
            columns = [a for a, f in zip(columns, self.predictors[c.name].fields) if f.name != PREDICTED_AT]
            if not valid.all():
                mask = pa.array(valid)
                columns = [pc.if_else(mask, column, pa.nulls(n, column.type)) for column in columns]
            arrays += columns
        return arrays

    def folder_batches(
        self,
        batch: pa.RecordBatch,
        matrix: np.ndarray,
        n: int,
        champion_bad: np.ndarray | None,
        feature_bad: np.ndarray | None,
        champion_columns: list[pa.Array] | None,
        file_nulls: frozenset[str],
        place: tuple[int, int],
        profile: UnitProfile | None,
    ) -> dict[str, pa.RecordBatch]:
        """Each scoring challenger's rows of the batch for its own folder: the passthrough columns,
        then its predictor's, only the rows it scored (see ``scored``)."""
        found: dict[str, pa.RecordBatch] = {}
        passthrough = [batch.column(c) for c in self.task.passthrough]
        for c, values in self.scored(
            batch, matrix, n, champion_bad, feature_bad, champion_columns, file_nulls, place, profile
        ):
            if values is None or c.name not in self.task.challenger_schemas:
                continue
            columns, valid = values
            rows = pa.RecordBatch.from_arrays(passthrough + columns, schema=self.task.challenger_schemas[c.name])
            found[c.name] = rows if valid.all() else rows.filter(pa.array(valid))
        return found

    def _score(
        self,
        challenger: Challenger,
        predictor: Predictor,
        batch: pa.RecordBatch,
        matrices: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray | None]],
        n: int,
        baseline: np.ndarray | None,
        file_nulls: frozenset[str],
    ) -> tuple[list[pa.Array], np.ndarray] | None:
        """The challenger's columns over the batch's rows, and which of them hold its values
        (``baseline``: rows set aside before it scores)."""
        features = tuple(predictor.model.features)
        if features not in matrices:
            built = predictor.feature_matrix(batch, file_nulls)
            own = invalid_mask(built[:n])
            if own is not None:
                built[:n][own] = 0.0  # a placeholder, never scored (as the champion's)
            matrices[features] = (built, own)
        matrix, own = matrices[features]
        invalid = np.zeros(n, dtype=bool) if baseline is None else baseline.copy()
        if own is not None:
            invalid |= own
        scored = predictor.score(matrix, n, invalid)
        if scored.columns is None:
            return None
        if scored.refused is not None:
            invalid |= scored.refused
        return scored.columns, ~invalid

    def _compare(
        self,
        challenger: Challenger,
        predictor: Predictor,
        champion_columns: list[pa.Array],
        columns: list[pa.Array],
        valid: np.ndarray,
        champion_bad: np.ndarray | None,
        place: tuple[int, int],
        profile: UnitProfile,
    ) -> None:
        """Count the rows both models scored into the challenger's agreement (see observe/agreement.py)."""
        rows = valid if champion_bad is None else valid & ~champion_bad
        picked = np.flatnonzero(rows)
        if not picked.size:
            return
        champion, model = self.champion.model, predictor.model
        can = comparable(champion, model)
        a, b = score_index(champion), score_index(model)

        def values(column: pa.Array) -> np.ndarray:
            return column.to_numpy(zero_copy_only=False)[picked]

        agreement = profile.agreement.setdefault(challenger.name, Agreement())
        agreement.add(
            row_keys(place[0], place[1], picked),
            (values(champion_columns[0]), values(columns[0])) if can["classes"] else None,
            (values(champion_columns[a]), values(columns[b]))
            if can["scores"] and a is not None and b is not None
            else None,
            can["delta"],
        )


class _UnitScorer:
    """One unit's pass over its batches, with the invalid-row policy applied."""

    def __init__(self, task: ScoreTask, predictor: Predictor, unit: Unit, challengers: ChallengerScoring | None = None):
        self.task, self.predictor, self.unit = task, predictor, unit
        self.challengers = challengers
        self.file = task.files[unit.file]
        self.invalid = 0
        self.rejected_writer: Any = None

    def _handle_invalid(
        self,
        batch: pa.RecordBatch,
        bad: np.ndarray,
        offset: int,
        stack: contextlib.ExitStack,
        refusals: Mapping[int, str],
    ) -> None:
        """Apply ``--on-invalid`` to the batch's ``bad`` rows: invalid features, or rows the model
        refuses after a transform (``refusals``: why, by row)."""
        rows = np.flatnonzero(bad)
        uri = self.file["uri"]

        def reasons(picked: np.ndarray) -> list[str]:
            plain = [r for r in picked.tolist() if r not in refusals]
            found = dict(zip(plain, invalid_reasons(batch, self.task.model.features, np.asarray(plain, dtype=np.intp))))
            return [refusals[r] if r in refusals else found[r] for r in picked.tolist()]

        first = reasons(rows[:1])[0]
        if self.task.on_invalid == "fail":
            if int(rows[0]) in refusals:
                raise InputDataError(
                    f"{uri}: row {offset + int(rows[0])} is refused by the model: {first}; scikit-learn raises for "
                    f"such a row, so {param('on_invalid')} fail stops there (use skip or quarantine to set rows aside)"
                )
            raise InputDataError(
                f"{uri}: row {offset + int(rows[0])} has an invalid feature value ({first}); "
                f"{param('on_invalid')} fail stops at the first null/NaN/inf feature (use skip or quarantine to set rows aside)"
            )
        self.invalid += rows.size
        if self.invalid > self.task.max_invalid_rows:
            raise InputDataError(
                f"{uri}: more invalid rows than {param('max_invalid_fraction')} allows "
                f"({self.task.max_invalid_rows} in all); e.g. row {offset + int(rows[0])}: {first}"
            )
        if self.task.on_invalid == "quarantine":
            if self.rejected_writer is None:
                output = self.task.output
                path = rejected_path(output.path, self.task.part_name(self.unit))
                part = self.task.open_part(output.fs, path, self.task.rejected_schema)
                self.rejected_writer = stack.enter_context(part)
            picked = batch.select(list(self.task.passthrough)).filter(pa.array(bad))
            self.rejected_writer.write_batch(
                pa.RecordBatch.from_arrays(
                    list(picked.columns) + [pa.array(reasons(rows), pa.string())], schema=self.task.rejected_schema
                )
            )

    def run(self) -> UnitResult:
        task, predictor = self.task, self.predictor
        started = time.perf_counter()
        rows_in = rows_out = 0
        offset = _first_row(self.file, self.unit)
        fs, base = task.output.fs, task.output.path  # this worker's own filesystem (see Location)
        profile = (
            UnitProfile(task.model.features, *score_columns(task.output_schema, task.model.is_classifier))
            if task.profile
            else None
        )
        with contextlib.ExitStack() as stack:
            parquet = stack.enter_context(
                task.open_part(fs, part_path(base, task.part_name(self.unit)), task.output_schema)
            )
            writer = stack.enter_context(BackgroundWriter(parquet.write_batch))
            # Each challenger's part in its own folder, named as the champion's: one per unit, even empty.
            folders = {
                name: stack.enter_context(
                    task.open_part(fs, challenger_part_path(base, name, task.part_name(self.unit)), schema)
                )
                for name, schema in task.challenger_schemas.items()
            }
            challenger_rows = dict.fromkeys(folders, 0)
            file_nulls: frozenset[str] = frozenset()

            def footer(meta: Any) -> None:
                nonlocal file_nulls
                if task.contract is not None:
                    task.contract.check(self.file["uri"], meta.schema.to_arrow_schema())
                file_nulls = columns_with_nulls(meta, task.features)

            # One batch read ahead keeps the reader busy while this one scores; a second one
            # only costs memory (a batch of every read column).
            batches = prefetch(
                iter_batches(
                    self.file["uri"],
                    self.unit.row_groups,
                    task.read_columns,
                    task.batch_size,
                    task.storage,
                    expected=self.file["identity"],
                    on_footer=footer,
                    start=self.unit.start,
                    rows=self.unit.rows if self.unit.slice is not None else None,
                    max_bytes=task.max_batch_bytes,
                ),
                depth=1,
            )
            for batch in batches:
                batch_started = time.perf_counter()
                n = batch.num_rows
                matrix = predictor.feature_matrix(batch, file_nulls)
                if profile is not None:
                    profile.add_features(batch, matrix, n)
                bad = invalid_mask(matrix[:n])
                if bad is not None:
                    matrix[:n][bad] = 0.0  # a placeholder: the predictor never scores it (see engine.TransformCheck)
                feature_bad = bad
                if n:
                    prediction = predictor.score(matrix, n, bad)
                    if prediction.refused is not None:  # rows scikit-learn refuses after a transform
                        bad = prediction.refused if bad is None else bad | prediction.refused
                    if bad is not None:
                        self._handle_invalid(batch, bad, offset, stack, prediction.reasons)
                    if prediction.columns is not None:
                        columns = [batch.column(c) for c in task.passthrough] + prediction.columns
                        if self.challengers is not None and not task.challenger_folders:
                            columns += self.challengers.columns(
                                batch, matrix, n, bad, prediction.columns, file_nulls, (self.unit.file, offset), profile
                            )
                        scored = pa.RecordBatch.from_arrays(columns, schema=task.output_schema)
                        if bad is not None:
                            scored = scored.filter(pa.array(~bad))
                        if scored.num_rows:
                            writer.write(scored)
                            if profile is not None:
                                profile.add_scores(scored)
                        rows_out += scored.num_rows
                    # In folders each challenger writes its own rows, also where the champion has none.
                    if self.challengers is not None and task.challenger_folders:
                        for name, rows in self.challengers.folder_batches(
                            batch,
                            matrix,
                            n,
                            bad,
                            feature_bad,
                            prediction.columns,
                            file_nulls,
                            (self.unit.file, offset),
                            profile,
                        ).items():
                            if rows.num_rows:
                                folders[name].write_batch(rows)
                            challenger_rows[name] += rows.num_rows
                rows_in += n
                offset += n
                report_progress((n, time.perf_counter() - batch_started))  # rows, scoring seconds
        return UnitResult(
            part=task.part_name(self.unit),
            rows_in=rows_in,
            rows_out=rows_out,
            rows_invalid=self.invalid,
            rejected_part=task.part_name(self.unit) if self.rejected_writer is not None else None,
            seconds=time.perf_counter() - started,
            profile=profile.to_dict() if profile is not None else None,
            challenger_rows=challenger_rows,
            challenger_errors=dict(self.challengers.errors) if self.challengers is not None else {},
        )


def score_unit(
    task: ScoreTask, predictor: Predictor, unit: Unit, challengers: ChallengerScoring | None = None
) -> UnitResult:
    try:
        return _UnitScorer(task, predictor, unit, challengers).run()
    except OSError as exc:  # reads raise InputDataError, so this is the part's write (disk full...)
        raise StorageError(
            f"cannot write part {join(task.output.uri, task.part_name(unit))}: {exc.strerror or exc}"
        ) from None
