"""Schema and value checks that run before (schema) and while (values) rows are scored.

Every message names the file and column, and for values the row, so a user can find the culprit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..errors import InputDataError, param
from .source import InputFile


def is_numeric(dtype: pa.DataType) -> bool:
    return (
        pa.types.is_integer(dtype)
        or pa.types.is_floating(dtype)
        or pa.types.is_boolean(dtype)
        or pa.types.is_decimal(dtype)
    )


def passthrough_columns(file: InputFile, keep: Sequence[str] | None) -> tuple[str, ...]:
    """Columns copied to the output: ``keep`` if given, else every input column."""
    return tuple(keep) if keep is not None else tuple(file.schema.names)


@dataclass(frozen=True)
class SchemaContract:
    """The columns every input file must have, fixed by the first file: the output's schema.

    Without ``--keep`` every column of the first file is passed through, so every file must have
    exactly its columns (in any order) with exactly its types: a column missing, extra or of
    another type is refused, never dropped or cast. With ``--keep`` the kept columns and the
    features must be there with the first file's types; other columns were never asked for.
    Types are compared exactly (int32 is not int64, timestamp units and zones, dictionary vs
    plain, nested fields) but not nullability: the output's passthrough columns are nullable.
    """

    reference: str  # the first input file's URI
    reference_schema: pa.Schema
    features: tuple[str, ...]
    passthrough: tuple[str, ...]
    output_columns: tuple[str, ...]
    closed: bool  # no --keep: a column the first file lacks is refused too
    chosen_by: str = param("keep")

    @classmethod
    def of(
        cls, first: InputFile, features: Sequence[str], keep: Sequence[str] | None, output_columns: Sequence[str]
    ) -> SchemaContract:
        chosen_by = param("keep") if keep is not None else f"the first input file {first.uri}"
        return cls(
            first.uri,
            first.schema,
            tuple(features),
            passthrough_columns(first, keep),
            tuple(output_columns),
            keep is None,
            chosen_by,
        )

    def check(self, uri: str, schema: pa.Schema) -> None:
        """Refuse a file whose columns cannot give the model its features or the output its schema."""
        names = list(schema.names)
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InputDataError(f"{uri}: column(s) {', '.join(twice)} appear more than once")
        missing = [c for c in self.features if c not in names]
        if missing:
            raise InputDataError(
                f"{uri}: missing feature column(s) {', '.join(missing)} "
                f"(the model needs {', '.join(self.features)}; the file has {', '.join(names)})"
            )
        for column in self.features:
            dtype = schema.field(column).type
            if not is_numeric(dtype):
                raise InputDataError(f"{uri}: feature column '{column}' has type {dtype}; features must be numeric")
        absent = [c for c in self.passthrough if c not in names]
        if absent:
            raise InputDataError(
                f"{uri}: passthrough column(s) {', '.join(absent)} missing (named by {self.chosen_by}); "
                f"every input file must have them, or choose columns with {param('keep')}"
            )
        clashes = [c for c in self.passthrough if c in self.output_columns]
        if clashes:
            raise InputDataError(
                f"{uri}: input column(s) {', '.join(clashes)} clash with output column(s) of the same name; "
                f"rename them or choose passthrough columns with {param('keep')}"
            )
        if uri == self.reference:
            return
        expected = self.reference_schema
        for column in dict.fromkeys([*self.passthrough, *self.features]):
            want, have = expected.field(column).type, schema.field(column).type
            if have != want:
                role = "feature column" if column in self.features and column not in self.passthrough else "column"
                raise InputDataError(
                    f"{uri}: {role} '{column}' has type {have} but the first input file {self.reference} "
                    f"has {want}; all input files must share one schema (the output's)"
                )
        extra = [c for c in names if c not in expected.names] if self.closed else []
        if extra:
            raise InputDataError(
                f"{uri}: extra column(s) {', '.join(extra)} that the first input file {self.reference} lacks; "
                f"the output's columns are the first file's, so every file must have the same columns "
                f"(or choose passthrough columns with {param('keep')})"
            )


def check_file_schema(
    file: InputFile,
    features: Sequence[str],
    passthrough: Sequence[str],
    output_columns: Sequence[str],
    reference: InputFile | None = None,
    chosen_by: str = param("keep"),
) -> None:
    """Refuse a file whose columns cannot give the model its features or the output its schema.

    ``reference`` (the first input file) fixes the passthrough columns' types for the whole job;
    ``chosen_by`` says where the passthrough columns came from, for the message.
    """
    first = reference or file
    SchemaContract(
        first.uri,
        first.schema,
        tuple(features),
        tuple(passthrough),
        tuple(output_columns),
        closed=False,
        chosen_by=chosen_by,
    ).check(file.uri, file.schema)


def check_schemas(
    files: Sequence[InputFile], features: Sequence[str], keep: Sequence[str] | None, output_columns: Sequence[str]
) -> SchemaContract | None:
    """Check every file against the model and the first file's schema (see ``SchemaContract``):
    the job writes one schema, and a worker must never find a column missing, extra or retyped."""
    if not files:
        return None
    contract = SchemaContract.of(files[0], features, keep, output_columns)
    for file in files:
        contract.check(file.uri, file.schema)
    return contract


def invalid_mask(matrix: np.ndarray) -> np.ndarray | None:
    """Rows with a null, NaN or infinite feature (nulls are NaN by now); None when all are valid."""
    if matrix.dtype.kind in "biu":  # integers and booleans hold no NaN: a null made the matrix float
        return None
    finite = np.isfinite(matrix)
    if finite.all():
        return None
    return ~finite.all(axis=1)


def invalid_reasons(batch: pa.RecordBatch, features: Sequence[str], rows: np.ndarray) -> list[str]:
    """Why each of ``rows`` is invalid, e.g. ``"tenure is null"``; computed only for bad rows."""
    reasons: list[str] = []
    columns = {name: batch.column(name) for name in features}
    for row in rows.tolist():
        problems = []
        for name, column in columns.items():
            value = column[row].as_py()
            if value is None:
                problems.append(f"{name} is null")
            elif isinstance(value, float) and np.isnan(value):
                problems.append(f"{name} is NaN")
            elif isinstance(value, float) and np.isinf(value):
                problems.append(f"{name} is {'+' if value > 0 else '-'}inf")
        reasons.append("; ".join(problems))
    return reasons
