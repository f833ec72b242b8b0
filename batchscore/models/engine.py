"""Turn a record batch into prediction columns, computing each model once per batch.

Exactness is the contract: every value equals what ``predict``/``predict_proba`` of the fitted
estimator returns for ``scaler.transform`` of that row.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import ModelError
from .artifacts import LoadedModel

#: Feature matrices have a multiple of this many rows (see ``Predictor.feature_matrix``).
ROW_ALIGNMENT = 16
#: Gap between the top two probabilities under which a row is re-predicted with ``predict``.
TIE_MARGIN = 1e-9
#: Rows of each batch whose derived class is checked against ``predict`` itself.
CHECKED_ROWS = 16
#: float64 magnitudes from here up round to infinity when cast to float32 (as tree models cast
#: their input); below it they round to a finite float32.
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103

PREDICTION = "prediction"
PROBABILITY = "probability"
PREDICTED_AT = "predicted_at"
MODEL_VERSION = "model_version"
PREDICTED_AT_TYPE = pa.timestamp("us", tz="UTC")

#: Classifiers whose ``predict`` is the argmax of ``predict_proba`` (or of a decision function that
#: ``predict_proba`` maps monotonically), so the class can be derived from the probabilities. Rows
#: whose top two probabilities (nearly) tie are re-predicted with ``predict`` itself, which settles
#: rounding at the decision boundary exactly. By module, as scikit-learn exports them.
ARGMAX_CLASSIFIERS = {
    "sklearn.linear_model": ("LogisticRegression",),
    "sklearn.ensemble": (
        "HistGradientBoostingClassifier",
        "RandomForestClassifier",
        "ExtraTreesClassifier",
        "GradientBoostingClassifier",
    ),
    "sklearn.tree": ("DecisionTreeClassifier", "ExtraTreeClassifier"),
}


def argmax_classifiers() -> tuple[type, ...]:
    """The ``ARGMAX_CLASSIFIERS`` classes among those already imported: an instance of one of them
    was loaded only if its module was imported, so nothing is imported just to ask."""
    return tuple(
        getattr(sys.modules[module], name)
        for module, names in ARGMAX_CLASSIFIERS.items()
        if module in sys.modules
        for name in names
    )


def derives_class_from_proba(estimator: Any) -> bool:
    """Whether ``estimator`` is one of ``argmax_classifiers`` with their own ``predict`` and
    ``predict_proba``: a subclass or an instance that replaces either is asked ``predict`` itself."""
    for cls in argmax_classifiers():
        if isinstance(estimator, cls):
            own = vars(estimator)
            return all(
                getattr(type(estimator), name) is getattr(cls, name) and name not in own
                for name in ("predict", "predict_proba")
            )
    return False


def pandas_dtype(dtype: pa.DataType, has_nulls: bool) -> np.dtype:
    """The NumPy dtype of a column of this Arrow type in ``table.to_pandas()``: integers with nulls
    become float64, booleans with nulls and decimals become objects (Python ``bool``/``Decimal``)."""
    if pa.types.is_decimal(dtype) or (pa.types.is_boolean(dtype) and has_nulls):
        return np.dtype(object)
    if pa.types.is_integer(dtype) and has_nulls:
        return np.dtype(np.float64)
    return np.dtype(dtype.to_pandas_dtype())


def matrix_dtype(columns: Sequence[pa.Array | pa.ChunkedArray], with_nulls: Sequence[bool] = ()) -> np.dtype:
    """The dtype scikit-learn gets from ``df[features]`` for these columns: NumPy's common type
    (scikit-learn's rule for a DataFrame), with objects (decimals, nullable booleans) as the
    float64 it converts them to, value by value with ``float()``. ``with_nulls`` marks columns
    whose file holds nulls elsewhere (pandas types a column by the whole file)."""
    marked = list(with_nulls) or [False] * len(columns)
    common = np.result_type(*(pandas_dtype(c.type, c.null_count > 0 or m) for c, m in zip(columns, marked)))
    return np.dtype(np.float64) if common.kind == "O" else common


def _class_name(label: Any) -> str:
    return str(label.item() if hasattr(label, "item") else label)


def _arrow_type(values: np.ndarray) -> pa.DataType:
    if values.dtype == object or values.dtype.kind in "US":
        return pa.string()
    return pa.from_numpy_dtype(values.dtype)


class StageCache:
    """A batch's scaled matrices, by scaler: models that share a scaler (same sha256) on the same
    feature matrix get one ``transform`` per batch, the very array each would have computed."""

    def __init__(self) -> None:
        self._matrix: Any = None
        self._scaled: dict[str, Any] = {}

    def transform(self, matrix: np.ndarray, key: str, scaler: Any) -> Any:
        if matrix is not self._matrix:  # another batch, or a matrix rebuilt to score again
            self._matrix, self._scaled = matrix, {}
        if key not in self._scaled:
            self._scaled[key] = scaler.transform(matrix)
        return self._scaled[key]

    def clear(self) -> None:
        self._matrix, self._scaled = None, {}


class Predictor:
    """Scores feature matrices with one loaded model and knows the output columns it produces."""

    #: Shared by the models of a job that score the same batches (see ``StageCache``); None: none shared.
    stage_cache: StageCache | None = None
    #: Whether a batch that raises is searched for the rows scikit-learn refuses one by one (the
    #: champion's), or the error is raised as it is (a challenger's: it then stops, alone).
    isolates_failures: bool = True

    def __init__(self, model: LoadedModel, model_version: str, predicted_at: datetime):
        self.model = model
        self.model_version = model_version
        self.predicted_at = pa.scalar(predicted_at, type=PREDICTED_AT_TYPE)
        self._derive_class = model.has_proba and derives_class_from_proba(model.final_estimator)
        fields: list[pa.Field] = []
        if model.is_classifier:
            fields.append(pa.field(PREDICTION, _arrow_type(np.asarray(model.classes))))
            if model.has_proba:
                if len(model.classes) == 2:
                    fields.append(pa.field(PROBABILITY, pa.float64()))
                else:
                    fields += [pa.field(f"{PROBABILITY}_{_class_name(c)}", pa.float64()) for c in model.classes]
        else:
            fields.append(pa.field(PREDICTION, pa.float64()))
        fields += [pa.field(PREDICTED_AT, PREDICTED_AT_TYPE), pa.field(MODEL_VERSION, pa.string())]
        self.fields = tuple(fields)
        steps = _pipeline_steps(model.estimator)
        self._transforms = ([(type(model.scaler).__name__, model.scaler)] if model.scaler is not None else []) + (
            steps[:-1] if steps is not None else []
        )
        self._final = steps[-1][1] if steps is not None else model.estimator

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def feature_matrix(self, batch: pa.RecordBatch, file_nulls: frozenset[str] = frozenset()) -> np.ndarray:
        """The matrix scikit-learn would get from this batch as a pandas DataFrame, padded with zero rows.

        Its dtype is the one ``df[features]`` gives for the batch's file (float32 features stay
        float32, integers stay integers until scikit-learn converts them, unless ``file_nulls``
        names them: columns with nulls somewhere in the file); each value converts as NumPy
        converts it (decimals with ``float()``, int64 to float64 by rounding). Column-major, like the
        matrix pandas hands scikit-learn for a DataFrame. Its row count is
        padded to a multiple of ``ROW_ALIGNMENT`` because BLAS and SIMD kernels round the last few
        rows of a matrix (the remainder of their unrolled loop) differently: padded, no real row is
        ever a remainder row, so a row's value never depends on how the input was split up.
        """
        rows = batch.num_rows
        columns = [batch.column(name) for name in self.model.features]
        dtype = matrix_dtype(columns, [name in file_nulls for name in self.model.features])
        matrix = np.zeros((rows + (-rows) % ROW_ALIGNMENT, len(columns)), dtype=dtype, order="F")
        for j, column in enumerate(columns):
            matrix[:rows, j] = column.to_numpy(zero_copy_only=False)  # decimals: Decimal objects, float() each
        return matrix

    def predict(self, matrix: np.ndarray, rows: int) -> list[pa.Array]:
        """Prediction columns for the first ``rows`` rows of a ``feature_matrix``, in ``self.fields``
        order; a row scikit-learn would refuse raises ``ValueError`` naming it (see ``score``)."""
        scored = self.score(matrix, rows)
        if scored.refused is not None or scored.columns is None:
            first = int(np.flatnonzero(scored.refused)[0]) if scored.refused is not None else 0
            raise ValueError(f"row {first} is refused: {scored.reasons.get(first, 'no valid row')}")
        return scored.columns

    def score(self, matrix: np.ndarray, rows: int, invalid: np.ndarray | None = None) -> Scored:
        """Score the first ``rows`` rows of a ``feature_matrix``; rows scikit-learn would refuse are
        set aside, never scored.

        ``invalid`` marks rows already set aside (null/NaN/inf features): their values are
        placeholders. Every other row is checked as scikit-learn checks it at predict, after every
        transform: the matrix before each step and before the estimator (see ``TransformCheck``).
        The fast path is one vectorised pass per stage; only rows with a non-finite (or, as
        float32, infinite) value are asked of scikit-learn itself.
        """
        import sklearn

        # Values are checked here, row by row, so scikit-learn need not check the batch again;
        # features arrive as a plain array even if the estimator was fitted on a DataFrame.
        with (
            sklearn.config_context(assume_finite=True),
            warnings.catch_warnings(),
            np.errstate(over="ignore", invalid="ignore", divide="ignore"),
        ):
            warnings.filterwarnings("ignore", message="X does not have valid feature names", category=UserWarning)
            return TransformCheck(self, matrix, rows, invalid).run()

    def transforms(self) -> list[tuple[str, Any]]:
        """(label, transformer) in the order they apply before the final estimator: the scaler,
        then every step of a Pipeline (nested Pipelines flattened), as ``predict_proba`` runs them."""
        return self._transforms

    @property
    def final(self) -> Any:
        """What predicts from the last transform's output: a Pipeline's last step, else the model."""
        return self._final

    def reference_refuses(self, rows: np.ndarray) -> str | None:
        """Why scikit-learn's own call, with its checks on, raises for these rows; None when it
        does not: ``predict_proba`` (``predict`` without it) of ``scaler.transform`` of the rows."""
        import sklearn

        estimator = self.model.estimator
        try:
            with sklearn.config_context(assume_finite=False), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x = self.model.scaler.transform(rows) if self.model.scaler is not None else rows
                estimator.predict_proba(x) if self.model.has_proba else estimator.predict(x)
        except Exception as exc:  # whatever scikit-learn raises, the row is not scored
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
        return None

    def _stages(self, matrix: np.ndarray) -> list[Any]:
        """The input, then the output of every transform in turn (the last one is the final
        estimator's input)."""
        stages: list[Any] = [matrix]
        for i, (_, transformer) in enumerate(self.transforms()):
            if i == 0 and self.stage_cache is not None and self.model.scaler is not None:
                scaler = next(a for a in self.model.artifacts if a is not self.model.artifacts[0])
                stages.append(self.stage_cache.transform(matrix, scaler.sha256, transformer))
            else:
                stages.append(transformer.transform(stages[-1]))
        return stages

    def _predict(self, scaled: Any, n: int) -> list[pa.Array]:
        """Prediction columns from the final estimator's input (every transform applied)."""
        columns: list[np.ndarray] = []
        if self.model.has_proba:
            proba = self._predict_proba(scaled)
            columns.append(self._classes_from(proba, scaled, n) if self._derive_class else self.final.predict(scaled))
            if proba.shape[1] == 2:
                columns.append(proba[:, 1])
            else:
                columns += [proba[:, k] for k in range(proba.shape[1])]
        else:
            columns.append(self._predict_values(scaled))
        arrays = [pa.array(values[:n], type=f.type) for values, f in zip(columns, self.fields)]
        arrays.append(pa.nulls(n, PREDICTED_AT_TYPE).fill_null(self.predicted_at))
        arrays.append(pa.nulls(n, pa.string()).fill_null(self.model_version))
        return arrays

    def _predict_proba(self, scaled: Any) -> np.ndarray:
        return self.final.predict_proba(scaled)

    def _predict_values(self, scaled: Any) -> np.ndarray:
        predicted = self.final.predict(scaled)
        return predicted.ravel() if predicted.ndim == 2 else predicted  # fitted on a one-column y

    def _classes_from(self, proba: np.ndarray, scaled: Any, rows: int) -> np.ndarray:
        """Classes from the probabilities, checked against ``predict`` on a sample of the batch's
        rows; on any disagreement this predictor asks ``predict`` from then on."""
        labels = self._argmax_classes(proba, scaled)
        sample = np.unique(np.linspace(0, max(rows - 1, 0), min(CHECKED_ROWS, max(rows, 1))).astype(np.intp))
        if not np.array_equal(self._predict_rows(scaled, sample), labels[sample]):
            self._derive_class = False
            return self.final.predict(scaled)
        return labels

    def _predict_rows(self, scaled: Any, rows: np.ndarray) -> np.ndarray:
        """``predict`` of some rows, in an aligned matrix so they round like every other row."""
        values = np.asarray(scaled)
        subset = np.zeros((rows.size + (-rows.size) % ROW_ALIGNMENT, values.shape[1]), dtype=values.dtype, order="F")
        subset[: rows.size] = values[rows]
        return self.final.predict(subset)[: rows.size]

    def _argmax_classes(self, proba: np.ndarray, scaled: Any) -> np.ndarray:
        index = proba.argmax(axis=1)
        labels = np.asarray(self.model.classes).take(index)
        if proba.shape[1] == 2:
            gap = np.abs(proba[:, 1] - proba[:, 0])
        else:
            rest = proba.copy()
            rest[np.arange(len(index)), index] = -np.inf
            gap = proba.max(axis=1) - rest.max(axis=1)
        close = np.flatnonzero(gap <= TIE_MARGIN)
        if close.size:
            labels[close] = self._predict_rows(scaled, close)
        return labels


def _pipeline_steps(estimator: Any) -> list[tuple[str, Any]] | None:
    """A scikit-learn Pipeline's steps as (label, step), nested Pipelines flattened and
    ``"passthrough"`` steps left out, exactly as its ``predict_proba`` applies them; None for
    anything else (which is then checked only before and after the scaler)."""
    from sklearn.pipeline import Pipeline

    if type(estimator) is not Pipeline:
        return None
    steps: list[tuple[str, Any]] = []
    for name, step in estimator.steps:
        if step is None or (isinstance(step, str) and step == "passthrough"):
            continue
        inner = _pipeline_steps(step)
        if inner is not None:
            steps += inner
        else:
            steps.append((f"{type(step).__name__} (pipeline step '{name}')", step))
    return steps


@dataclass
class Scored:
    """A batch's prediction columns and the rows scikit-learn would refuse."""

    columns: list[pa.Array] | None  # None when no row of the batch may be scored
    refused: np.ndarray | None = None  # over the batch's rows: refused beyond those marked invalid
    reasons: dict[int, str] = field(default_factory=dict)  # why, by row


def _not_ok_rows(stage: Any) -> np.ndarray | None:
    """Rows holding a value that scikit-learn's check could refuse (NaN, inf, or a float64 that
    is inf as float32); None when there is none, found from the stage's minimum and maximum
    (two passes, no temporary: NaN makes both NaN, and NaN compares False)."""
    values = np.asarray(stage)
    if values.dtype.kind != "f" or values.ndim != 2 or not values.size:
        return None  # integers and booleans hold no NaN; sparse or object outputs are not checked
    with np.errstate(invalid="ignore"):
        if values.min() > -FLOAT32_OVERFLOW and values.max() < FLOAT32_OVERFLOW:
            return None
        return ~(np.abs(values) < FLOAT32_OVERFLOW).all(axis=1)


class TransformCheck:
    """One batch through the transforms and the estimator, checked at every stage as
    scikit-learn checks at predict (``check_array``: NaN and inf, float32 overflow where the
    estimator casts), with scikit-learn itself as the judge of each suspect row.

    The reference refuses a whole batch for one bad row; here each row is judged on its own, as
    ``predict_proba`` of that row alone would judge it. A row's verdict depends only on which
    stages hold NaN, an infinity or a float32 overflow in it, so rows are grouped by that pattern
    and one row of each group is asked of scikit-learn with its checks on. Refused and invalid
    rows then take the values of a row scikit-learn accepts, and the batch is scored again, so
    no refused value reaches the estimator (rows are scored independently: the others are
    unchanged). A transform or estimator that raises for the batch is answered by halving the
    batch until the rows scikit-learn refuses one by one are found.
    """

    def __init__(self, predictor: Predictor, matrix: np.ndarray, rows: int, invalid: np.ndarray | None):
        self.predictor, self.matrix, self.n = predictor, matrix, rows
        self.invalid = invalid.copy() if invalid is not None else np.zeros(rows, dtype=bool)
        self.refused = np.zeros(rows, dtype=bool)
        self.reasons: dict[int, str] = {}
        self.labels = ["in the input"] + [f"after {label}" for label, _ in predictor.transforms()]

    def run(self) -> Scored:
        try:
            stages = self.predictor._stages(self.matrix)
        except Exception as exc:
            return self._after_failure(exc)
        flagged = [_not_ok_rows(stage) for stage in stages]
        if any(f is not None for f in flagged):
            self._classify(stages, flagged)
            neutral = self.invalid | self.refused
            if self.refused.any() or any(
                f is not None and (f[: self.n][neutral].any() or f[self.n :].any()) for f in flagged
            ):
                return self._rescore(None)
        try:
            return self._result(self.predictor._predict(stages[-1], self.n))
        except Exception as exc:
            return self._after_failure(exc)

    def _result(self, columns: list[pa.Array] | None) -> Scored:
        return Scored(columns, self.refused if self.refused.any() else None, self.reasons)

    def _classify(self, stages: list[Any], flagged: list[np.ndarray | None]) -> None:
        """Judge every flagged row: one reference call per pattern of problems across stages."""
        suspect = np.zeros(self.n, dtype=bool)
        for rows in flagged:
            if rows is not None:
                suspect |= rows[: self.n]
        suspects = np.flatnonzero(suspect & ~self.invalid)
        if not suspects.size:
            return
        codes = np.zeros(suspects.size, dtype=np.int64)
        for stage, rows in zip(stages, flagged):
            if rows is None:
                continue
            values = np.asarray(stage)[suspects]
            with np.errstate(invalid="ignore"):
                kinds = (np.isnan(values), np.isinf(values), np.isfinite(values) & (np.abs(values) >= FLOAT32_OVERFLOW))
            for kind in kinds:
                codes = codes * 2 + kind.any(axis=1)
        for code in np.unique(codes):
            group = suspects[codes == code]
            why = self.predictor.reference_refuses(self.matrix[group[:1]])
            if why is None:
                continue
            self.refused[group] = True
            for row in group.tolist():
                self.reasons[row] = self._describe(stages, row, why)

    def _describe(self, stages: list[Any], row: int, why: str) -> str:
        """Where the row first holds a value scikit-learn refuses: stage, column and value (a
        NaN or infinity first; else a value that only float32 cannot hold)."""
        for as_float32 in (False, True):
            for s, stage in enumerate(stages):
                values = np.asarray(stage)
                if values.dtype.kind != "f":
                    continue
                line = values[row]
                with np.errstate(invalid="ignore"):
                    bad = np.flatnonzero(~(np.abs(line) < FLOAT32_OVERFLOW) if as_float32 else ~np.isfinite(line))
                if not bad.size:
                    continue
                j, value = int(bad[0]), float(line[bad[0]])
                name = self._column_name(s, j)
                if as_float32:
                    return (
                        f"non-finite as float32 {self.labels[s]}: {name} is {value:.17g}, beyond float32's range "
                        f"(scikit-learn: {why})"
                    )
                return f"non-finite {self.labels[s]}: {name} is {value}"
        return f"refused by scikit-learn: {why}"

    def _column_name(self, stage: int, j: int) -> str:
        if stage == 0:
            return self.predictor.model.features[j]
        transformer = self.predictor.transforms()[stage - 1][1]
        try:
            return f"{transformer.get_feature_names_out()[j]} (column {j})"
        except Exception:  # a transformer that cannot name its outputs
            return f"column {j}"

    def _after_failure(self, error: Exception) -> Scored:
        """The batch raised: find the rows scikit-learn refuses one by one, by halving."""
        if not self.predictor.isolates_failures:
            raise error
        pending = [np.flatnonzero(~(self.invalid | self.refused))]
        while pending:
            rows = pending.pop()
            why = self.predictor.reference_refuses(self.matrix[rows]) if rows.size else None
            if why is None:
                continue
            if rows.size == 1:
                self.refused[rows[0]] = True
                self.reasons[int(rows[0])] = f"refused by scikit-learn: {why}"
                continue
            half = rows.size // 2
            pending += [rows[half:], rows[:half]]
        return self._rescore(error)

    def _rescore(self, error: Exception | None) -> Scored:
        """Score again with every refused, invalid and padding row replaced by an accepted row."""
        good = np.flatnonzero(~(self.invalid | self.refused))
        if not good.size:
            return self._result(None)
        matrix = np.array(self.matrix, order="F")
        matrix[np.flatnonzero(self.invalid | self.refused)] = self.matrix[good[0]]
        matrix[self.n :] = self.matrix[good[0]]
        try:
            stages = self.predictor._stages(matrix)
            return self._result(self.predictor._predict(stages[-1], self.n))
        except Exception as exc:
            cause = error or exc
            raise ModelError(
                f"the model raised {type(cause).__name__} ({str(cause).splitlines()[0] if str(cause) else ''}) for a "
                f"batch whose rows scikit-learn accepts one by one"
            ) from exc
