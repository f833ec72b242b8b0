"""Turn a record batch into prediction columns, computing each model once per batch.

Exactness is the contract: every value equals what ``predict``/``predict_proba`` of the fitted
estimator returns for ``scaler.transform`` of that row.
"""

from __future__ import annotations

import warnings
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .model import LoadedModel

#: Classifiers whose ``predict`` is the argmax of ``predict_proba`` (or of a decision function that
#: ``predict_proba`` maps monotonically), so the class can be derived from the probabilities. Rows
#: whose top two probabilities (nearly) tie are re-predicted with ``predict`` itself, which settles
#: rounding at the decision boundary exactly.
ARGMAX_CLASSIFIERS = frozenset(
    {
        "LogisticRegression",
        "HistGradientBoostingClassifier",
        "RandomForestClassifier",
        "ExtraTreesClassifier",
        "DecisionTreeClassifier",
        "ExtraTreeClassifier",
        "GradientBoostingClassifier",
    }
)
#: Feature matrices have a multiple of this many rows (see ``Predictor.feature_matrix``).
ROW_ALIGNMENT = 16
#: Gap between the top two probabilities under which a row is re-predicted with ``predict``.
TIE_MARGIN = 1e-9

PREDICTION = "prediction"
PROBABILITY = "probability"
PREDICTED_AT = "predicted_at"
MODEL_VERSION = "model_version"
PREDICTED_AT_TYPE = pa.timestamp("us", tz="UTC")



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
        self._derive_class = model.has_proba and type(model.final_estimator).__name__ in ARGMAX_CLASSIFIERS
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

    def feature_matrix(self, batch: pa.RecordBatch) -> np.ndarray:
        """A float64 matrix straight from the Arrow columns (nulls become NaN), padded with zero rows.

        Column-major, like the matrix pandas hands scikit-learn for a DataFrame. Its row count is
        padded to a multiple of ``ROW_ALIGNMENT`` because BLAS and SIMD kernels round the last few
        rows of a matrix (the remainder of their unrolled loop) differently: padded, no real row is
        ever a remainder row, so a row's value never depends on how the input was split up.
        """
        rows = batch.num_rows
        matrix = np.zeros((rows + (-rows) % ROW_ALIGNMENT, len(self.model.features)), dtype=np.float64, order="F")
        for j, name in enumerate(self.model.features):
            column = batch.column(name)
            if column.type != pa.float64():
                column = pc.cast(column, pa.float64())
            matrix[:rows, j] = column.to_numpy(zero_copy_only=False)
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
            proba = estimator.predict_proba(scaled)
            columns.append(self._classes_from(proba, scaled) if self._derive_class else estimator.predict(scaled))
            if proba.shape[1] == 2:
                columns.append(proba[:, 1])
            else:
                columns += [proba[:, k] for k in range(proba.shape[1])]
        else:
            columns.append(estimator.predict(scaled))
        arrays = [pa.array(values[:n], type=f.type) for values, f in zip(columns, self.fields)]
        arrays.append(pa.nulls(n, PREDICTED_AT_TYPE).fill_null(self.predicted_at))
        arrays.append(pa.nulls(n, pa.string()).fill_null(self.model_version))
        return arrays

    def _classes_from(self, proba: np.ndarray, scaled: np.ndarray) -> np.ndarray:
        index = proba.argmax(axis=1)
        labels = np.asarray(self.model.classes).take(index)
        if proba.shape[1] == 2:
            gap = np.abs(proba[:, 1] - proba[:, 0])
        else:
            rest = proba.copy()
            rest[np.arange(len(index)), index] = -np.inf
            gap = proba.max(axis=1) - rest.max(axis=1)
        close = np.flatnonzero(gap <= TIE_MARGIN)
        if close.size:  # re-predicted in an aligned matrix too, so they round like every other row
            subset = np.zeros((close.size + (-close.size) % ROW_ALIGNMENT, scaled.shape[1]), order="F")
            subset[: close.size] = scaled[close]
            labels[close] = self.model.estimator.predict(subset)[: close.size]
        return labels

