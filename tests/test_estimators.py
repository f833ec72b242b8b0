"""Estimators off the beaten path: width-changing scalers, multi-output models, look-alike
classifiers, and models saved to use every core."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import joblib
import numpy as np
import pyarrow as pa
import pytest
from sklearn.linear_model import LogisticRegression

from batchscore.job.workers import single_threaded
from batchscore.models.artifacts import load_model
from batchscore.models.engine import Predictor
from batchscore.sample import FEATURES
from helpers import assert_exact, cli, read_inputs, read_output, save, training_frame, write_inputs


class CautiousLogisticRegression(LogisticRegression):
    """Says "churn" from a probability of 0.3 up: its predict is not the argmax of predict_proba."""

    def predict(self, X):
        return self.classes_.take((self.predict_proba(X)[:, 1] >= 0.3).astype(int))


def _run(tmp_path: Path, model: dict[str, Path], *extra: str):
    inputs = write_inputs(tmp_path / "in", files=2, rows=1_216, row_group_size=400)
    out = tmp_path / "out"
    args = ["run", "--output", out, "--model", model["model"], "--batch-size", "500", *extra]
    for path in inputs:
        args += ["--input", path]
    if "scaler" in model:
        args += ["--scaler", model["scaler"]]
    return cli(*args), inputs, out


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("scaler", ["pca", "poly"])
def test_width_changing_scaler_scores_exactly(tmp_path: Path, scaler: str) -> None:
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import PolynomialFeatures

    frame = training_frame()
    transformer = PCA(n_components=3) if scaler == "pca" else PolynomialFeatures(degree=2)
    transformer.fit(frame[list(FEATURES)])
    x = transformer.transform(frame[list(FEATURES)])
    assert x.shape[1] != len(FEATURES)
    model = LogisticRegression(max_iter=100).fit(x, frame["churned"])
    paths = save(tmp_path / "model", model=model, scaler=transformer)
    result, inputs, out = _run(tmp_path, paths, "--workers", "2")
    assert result.exit_code == 0, result.output + result.stderr
    assert_exact(read_output(out), read_inputs(inputs), paths)


def test_scaler_of_the_wrong_width_is_refused(tmp_path: Path) -> None:
    from sklearn.decomposition import PCA

    frame = training_frame()
    pca = PCA(n_components=3).fit(frame[list(FEATURES)])
    model = LogisticRegression().fit(frame[list(FEATURES)].to_numpy(), frame["churned"])
    paths = save(tmp_path / "model", model=model, scaler=pca)
    result, _, _ = _run(tmp_path, paths)
    assert result.exit_code == 4
    assert "produces 3 features" in result.stderr and f"expects {len(FEATURES)}" in result.stderr


@pytest.mark.parametrize("kind", ["forest", "ridge", "wrapper"])
def test_multi_output_models_are_refused(tmp_path: Path, kind: str) -> None:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import Ridge
    from sklearn.multioutput import MultiOutputRegressor

    frame = training_frame()
    x = frame[list(FEATURES)]
    if kind == "forest":
        model = RandomForestClassifier(n_estimators=3, random_state=0).fit(
            x, np.c_[frame["churned"].astype(int), frame["plan"].astype("category").cat.codes]
        )
    elif kind == "ridge":
        model = Ridge().fit(x, frame[["total_charges", "tenure"]])
    else:
        model = MultiOutputRegressor(Ridge()).fit(x, frame[["total_charges", "tenure"]])
    paths = save(tmp_path / "model", model=model)
    result, _, out = _run(tmp_path, paths)
    assert result.exit_code == 4, result.output + result.stderr
    assert "multi-output" in result.stderr and "2 outputs per row" in result.stderr
    assert not out.exists()


def test_subclass_with_its_own_predict_is_asked_predict(tmp_path: Path) -> None:
    """Same class name family, same predict_proba, another decision rule: its predict wins."""
    frame = training_frame()
    model = CautiousLogisticRegression().fit(frame[list(FEATURES)].to_numpy(), frame["churned"])
    paths = save(tmp_path / "model", model=model)
    result, inputs, out = _run(tmp_path, paths, "--features", ",".join(FEATURES))
    assert result.exit_code == 0, result.output + result.stderr
    table, x = read_output(out), read_inputs(inputs).to_pandas()[list(FEATURES)].to_numpy()
    proba = model.predict_proba(x)
    assert (proba.argmax(axis=1) != (proba[:, 1] >= 0.3)).any()  # the rules really differ here
    assert np.array_equal(table.column("prediction").to_numpy(), model.predict(x))


def test_shortcut_is_checked_against_predict_on_the_loaded_model(tmp_path: Path) -> None:
    """A model whose derived classes disagree with ``predict`` (here: classes listed in another
    order than the estimator's) is caught by the sample check and scored with ``predict``."""
    frame = training_frame()
    model = LogisticRegression().fit(frame[list(FEATURES)].to_numpy(), frame["churned"])
    paths = save(tmp_path / "model", model=model)
    loaded = load_model(str(paths["model"]), features=FEATURES)
    loaded.classes = loaded.classes[::-1]
    predictor = Predictor(loaded, "1", datetime.now(timezone.utc))
    batch = pa.RecordBatch.from_pandas(frame[list(FEATURES)].iloc[:992], preserve_index=False)
    columns = predictor.predict(predictor.feature_matrix(batch), batch.num_rows)
    assert np.array_equal(
        columns[0].to_numpy(zero_copy_only=False), model.predict(frame[list(FEATURES)].iloc[:992].to_numpy())
    )
    assert not predictor._derive_class


def test_forest_saved_with_every_core_scores_single_threaded(tmp_path: Path) -> None:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    frame = training_frame()
    forest = RandomForestClassifier(n_estimators=40, max_depth=8, random_state=0, n_jobs=-1)
    pipe = make_pipeline(StandardScaler(), forest).fit(frame[list(FEATURES)], frame["churned"])
    paths = save(tmp_path / "model", model=pipe)
    result, inputs, out = _run(tmp_path, paths, "--workers", "2")
    assert result.exit_code == 0, result.output + result.stderr
    reference = joblib.load(paths["model"])
    assert reference.get_params()["randomforestclassifier__n_jobs"] == -1
    single_threaded(reference)
    assert reference.get_params()["randomforestclassifier__n_jobs"] == 1
    # Threads add up the trees' votes in the order they finish, so only one thread has one answer.
    x, table = read_inputs(inputs).to_pandas()[list(FEATURES)], read_output(out)
    assert np.array_equal(table.column("probability").to_numpy(), reference.predict_proba(x)[:, 1])
    assert np.array_equal(table.column("prediction").to_numpy(), reference.predict(x))


def test_shortcut_is_chosen_by_class_not_by_name() -> None:
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.svm import SVC

    from batchscore.models.engine import derives_class_from_proba

    LookAlike = type("LogisticRegression", (SVC,), {})  # the name alone proves nothing
    patched = LogisticRegression()
    patched.predict = patched.decision_function  # an instance that replaces predict
    assert derives_class_from_proba(LogisticRegression()) and derives_class_from_proba(GradientBoostingClassifier())
    assert not derives_class_from_proba(LookAlike())
    assert not derives_class_from_proba(CautiousLogisticRegression())
    assert not derives_class_from_proba(patched)


def test_regressor_fitted_on_a_one_column_target_scores(tmp_path: Path) -> None:
    from sklearn.linear_model import Ridge
    from sklearn.multioutput import MultiOutputRegressor

    frame = training_frame()
    model = MultiOutputRegressor(Ridge()).fit(frame[list(FEATURES)], frame[["total_charges"]])
    assert model.predict(frame[list(FEATURES)].iloc[:2]).shape == (2, 1)
    paths = save(tmp_path / "model", model=model)
    result, inputs, out = _run(tmp_path, paths)
    assert result.exit_code == 0, result.output + result.stderr
    x = read_inputs(inputs).to_pandas()[list(FEATURES)]
    assert np.array_equal(read_output(out).column("prediction").to_numpy(), model.predict(x).ravel())
