"""Schema and value checks that run before (schema) and while (values) rows are scored.

Every message names the file and column, and for values the row, so a user can find the culprit.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from .errors import InputDataError
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


def check_file_schema(
    file: InputFile,
    features: Sequence[str],
    passthrough: Sequence[str],
    output_columns: Sequence[str],
    reference: InputFile | None = None,
    chosen_by: str = "--keep",
) -> None:
    """Refuse a file whose columns cannot give the model its features or the output its schema.

    ``reference`` (the first input file) fixes the passthrough columns' types for the whole job;
    ``chosen_by`` says where the passthrough columns came from, for the message.
    """
    names = set(file.schema.names)
    missing = [c for c in features if c not in names]
    if missing:
        raise InputDataError(
            f"{file.uri}: missing feature column(s) {', '.join(missing)} "
            f"(the model needs {', '.join(features)}; the file has {', '.join(file.schema.names)})"
        )
    for column in features:
        dtype = file.schema.field(column).type
        if not is_numeric(dtype):
            raise InputDataError(f"{file.uri}: feature column '{column}' has type {dtype}; features must be numeric")
    absent = [c for c in passthrough if c not in names]
    if absent:
        raise InputDataError(
            f"{file.uri}: passthrough column(s) {', '.join(absent)} missing (named by {chosen_by}); "
            f"every input file must have them, or choose columns with --keep"
        )
    clashes = [c for c in passthrough if c in output_columns]
    if clashes:
        raise InputDataError(
            f"{file.uri}: input column(s) {', '.join(clashes)} clash with output column(s) of the same name; "
            f"rename them or choose passthrough columns with --keep"
        )
    if reference is not None:
        for column in passthrough:
            expected = reference.schema.field(column).type if column in reference.schema.names else None
            actual = file.schema.field(column).type
            if expected is not None and actual != expected:
                raise InputDataError(
                    f"{file.uri}: column '{column}' has type {actual} but the first input file {reference.uri} "
                    f"has {expected}; all input files must share one schema for the passthrough columns"
                )


def check_schemas(
    files: Sequence[InputFile], features: Sequence[str], keep: Sequence[str] | None, output_columns: Sequence[str]
) -> None:
    """Check every file against the model, and that each has the first file's passthrough columns
    with the same types: the job writes one schema, and a worker must never find a column missing."""
    if not files:
        return
    passthrough = passthrough_columns(files[0], keep)
    chosen_by = "--keep" if keep is not None else f"the first input file {files[0].uri}"
    for file in files:
        check_file_schema(file, features, passthrough, output_columns, files[0], chosen_by)


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
