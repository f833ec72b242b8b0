"""Turn a record batch into prediction columns, computing each model once per batch.

Exactness is the contract: every value equals what ``predict``/``predict_proba`` of the fitted
estimator returns for ``scaler.transform`` of that row.
"""

from __future__ import annotations

import sys
import warnings
from datetime import datetime
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from .model import LoadedModel

#: Feature matrices have a multiple of this many rows (see ``Predictor.feature_matrix``).
ROW_ALIGNMENT = 16
#: Gap between the top two probabilities under which a row is re-predicted with ``predict``.
TIE_MARGIN = 1e-9
#: Rows of each batch whose derived class is checked against ``predict`` itself.
CHECKED_ROWS = 16

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
    "sklearn.ensemble": ("HistGradientBoostingClassifier", "RandomForestClassifier", "ExtraTreesClassifier",
                         "GradientBoostingClassifier"),
    "sklearn.tree": ("DecisionTreeClassifier", "ExtraTreeClassifier"),
}


def argmax_classifiers() -> tuple[type, ...]:
    """The ``ARGMAX_CLASSIFIERS`` classes among those already imported: an instance of one of them
    was loaded only if its module was imported, so nothing is imported just to ask."""
    return tuple(
        getattr(sys.modules[module], name)
        for module, names in ARGMAX_CLASSIFIERS.items() if module in sys.modules for name in names
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
    return np.dtype(np.float64) if common == object else common


def _class_name(label: Any) -> str:
    return str(label.item() if hasattr(label, "item") else label)


def _arrow_type(values: np.ndarray) -> pa.DataType:
    if values.dtype == object or values.dtype.kind in "US":
        return pa.string()
    return pa.from_numpy_dtype(values.dtype)


class Predictor:
    """Scores feature matrices with one loaded model and knows the output columns it produces."""

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

    def _scaled(self, matrix: np.ndarray) -> np.ndarray:
        return self.model.scaler.transform(matrix) if self.model.scaler is not None else matrix

    def predict(self, matrix: np.ndarray, rows: int) -> list[pa.Array]:
        """Prediction columns for the first ``rows`` rows of a ``feature_matrix``, in ``self.fields`` order."""
        import sklearn

        # Every value is already known to be finite (invalid rows were set aside and zeroed), so
        # scikit-learn need not check again; features arrive as a plain array even if the
        # estimator was fitted on a DataFrame.
        with sklearn.config_context(assume_finite=True), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="X does not have valid feature names", category=UserWarning)
            return self._predict(matrix, rows)

    def _predict(self, matrix: np.ndarray, n: int) -> list[pa.Array]:
        estimator = self.model.estimator
        scaled = self._scaled(matrix)
        columns: list[np.ndarray] = []
        if self.model.has_proba:
            proba = self._predict_proba(scaled)
            columns.append(self._classes_from(proba, scaled, n) if self._derive_class else estimator.predict(scaled))
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
        return self.model.estimator.predict_proba(scaled)

    def _predict_values(self, scaled: Any) -> np.ndarray:
        predicted = self.model.estimator.predict(scaled)
        return predicted.ravel() if predicted.ndim == 2 else predicted  # fitted on a one-column y

    def _classes_from(self, proba: np.ndarray, scaled: Any, rows: int) -> np.ndarray:
        """Classes from the probabilities, checked against ``predict`` on a sample of the batch's
        rows; on any disagreement this predictor asks ``predict`` from then on."""
        labels = self._argmax_classes(proba, scaled)
        sample = np.unique(np.linspace(0, max(rows - 1, 0), min(CHECKED_ROWS, max(rows, 1))).astype(np.intp))
        if not np.array_equal(self._predict_rows(scaled, sample), labels[sample]):
            self._derive_class = False
            return self.model.estimator.predict(scaled)
        return labels

    def _predict_rows(self, scaled: Any, rows: np.ndarray) -> np.ndarray:
        """``predict`` of some rows, in an aligned matrix so they round like every other row."""
        subset = np.zeros((rows.size + (-rows.size) % ROW_ALIGNMENT, scaled.shape[1]), dtype=scaled.dtype, order="F")
        subset[: rows.size] = scaled[rows]
        return self.model.estimator.predict(subset)[: rows.size]

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

