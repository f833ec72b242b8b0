"""Every numeric feature type scores exactly as pandas + scikit-learn score the user's DataFrame.

The reference is what a user writes: ``df = pq.read_table(path).to_pandas()`` and
``model.predict_proba(scaler.transform(df[features]))``, compared bit for bit. Row counts are
multiples of 16 (see helpers.assert_exact) but not round.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import joblib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import cli, read_rejected, save

ROWS = 2_416
FEATURES = ["a", "b", "c"]


def _decimals(values: np.ndarray, scale: int = 2) -> pa.Array:
    return pa.array([Decimal(f"{v:.{scale}f}") for v in values], pa.decimal128(12, scale))


def _columns(kind: str, rng: np.random.Generator, rows: int) -> dict[str, pa.Array]:
    """Three feature columns of one kind, on scales where the type's rounding shows."""
    x = rng.normal(size=(rows, 3)) * [120.0, 3.0, 0.7] + [100.0, 0.0, 1.0]
    if kind == "float32":
        return {n: pa.array(x[:, j].astype(np.float32)) for j, n in enumerate(FEATURES)}
    if kind == "float16":
        return {n: pa.array(x[:, j].astype(np.float16)) for j, n in enumerate(FEATURES)}
    if kind == "decimal":  # e.g. 119.99, which Arrow's cast would make 119.99000000000001
        return {"a": _decimals(x[:, 0]), "b": _decimals(x[:, 1], 4), "c": pa.array(x[:, 2])}
    if kind == "int64_big":  # beyond 2^53, where int64 -> float64 rounds
        big = (2**60 + rng.integers(-(2**58), 2**58, size=rows)).astype(np.int64)
        return {"a": pa.array(big), "b": pa.array(rng.integers(-5, 50, size=rows)), "c": pa.array(x[:, 2])}
    if kind == "all_int":  # integer features only: the matrix stays int64 until scikit-learn converts it
        return {n: pa.array(np.round(x[:, j] * 10).astype(np.int64)) for j, n in enumerate(FEATURES)}
    if kind == "bool_float32":  # pandas would make this object; scikit-learn makes it float32
        return {
            "a": pa.array(x[:, 0] > 100),
            "b": pa.array(x[:, 1].astype(np.float32)),
            "c": pa.array(x[:, 2].astype(np.float32)),
        }
    if kind == "int_nulls":  # nulls in 32 rows of an int64 column: those rows are invalid
        ints = np.round(x[:, 0]).astype(np.int64)
        mask = np.zeros(rows, dtype=bool)
        mask[rng.choice(rows, 32, replace=False)] = True
        return {"a": pa.array(ints, mask=mask), "b": pa.array(x[:, 1]), "c": pa.array(x[:, 2].astype(np.float32))}
    if kind == "int16_nulls_float32":  # nulls only early in the file: pandas makes the column float64 throughout
        ints = np.round(x[:, 1] * 100).astype(np.int16)
        mask = np.zeros(rows, dtype=bool)
        mask[rng.choice(min(rows, 160), 16, replace=False)] = True
        return {
            "a": pa.array(x[:, 0].astype(np.float32)),
            "b": pa.array(ints, mask=mask),
            "c": pa.array(x[:, 2].astype(np.float32)),
        }
    raise AssertionError(kind)


KINDS = ["float32", "float16", "decimal", "int64_big", "all_int", "bool_float32", "int_nulls", "int16_nulls_float32"]


def _classifiers() -> dict[str, Callable[[], object]]:
    from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    return {
        "lr": lambda: LogisticRegression(max_iter=500),
        "hgb": lambda: HistGradientBoostingClassifier(max_iter=15, random_state=0),
        "rf": lambda: RandomForestClassifier(n_estimators=8, max_depth=6, random_state=0, n_jobs=-1),
        "gb": lambda: GradientBoostingClassifier(n_estimators=8, max_depth=2, random_state=0),
    }


def _table(kind: str, rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    columns = _columns(kind, rng, rows)
    return pa.table({"id": pa.array(np.arange(rows)), **columns})


def _reference(model_paths: dict[str, Path], frame) -> tuple[np.ndarray, np.ndarray]:
    model, scaler = joblib.load(model_paths["model"]), joblib.load(model_paths["scaler"])
    if hasattr(model, "n_jobs"):
        model.set_params(n_jobs=1)  # the model's own single-threaded answer
    x = scaler.transform(frame[FEATURES])
    return model.predict(x), model.predict_proba(x)


@pytest.mark.parametrize("estimator", ["lr", "hgb", "rf", "gb"])
@pytest.mark.parametrize("kind", KINDS)
def test_feature_type_scores_as_pandas_does(tmp_path: Path, kind: str, estimator: str) -> None:
    from sklearn.preprocessing import StandardScaler

    train = _table(kind, 1_600, seed=1).to_pandas().dropna()
    scaler = StandardScaler().fit(train[FEATURES])
    labels = (train["b"].astype(float) + np.sin(train["c"].astype(float)) > 0.4).to_numpy()
    model = _classifiers()[estimator]().fit(scaler.transform(train[FEATURES]), labels)
    paths = save(tmp_path / "model", model=model, scaler=scaler)

    data = tmp_path / "in.parquet"
    pq.write_table(_table(kind, ROWS, seed=2), data, row_group_size=1_000)
    out = tmp_path / "out"
    result = cli(
        "run",
        "--input",
        data,
        "--output",
        out,
        "--model",
        paths["model"],
        "--scaler",
        paths["scaler"],
        "--batch-size",
        "700",
        "--workers",
        "2",
        "--on-invalid",
        "skip",
    )
    assert result.exit_code == 0, result.output + result.stderr

    frame = pq.read_table(data).to_pandas()
    frame = frame[frame[FEATURES].notna().all(axis=1)]  # what --on-invalid skip leaves
    assert len(frame) % 16 == 0
    expected_pred, expected_proba = _reference(paths, frame)
    got = pq.read_table(out).sort_by("id")
    assert got.column("id").to_pylist() == frame["id"].tolist()
    assert np.array_equal(got.column("prediction").to_numpy(), expected_pred)
    assert np.array_equal(got.column("probability").to_numpy(), expected_proba[:, 1])


def test_float32_features_stay_float32(tmp_path: Path) -> None:
    """The numbers differ from a float64 computation, and batchscore gives the float32 ones."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train = _table("float32", 1_600, seed=1).to_pandas()
    scaler = StandardScaler().fit(train[FEATURES])
    model = LogisticRegression().fit(scaler.transform(train[FEATURES]), train["b"] > 0)
    paths = save(tmp_path / "model", model=model, scaler=scaler)
    data = tmp_path / "in.parquet"
    pq.write_table(_table("float32", ROWS, seed=2), data)
    out = tmp_path / "out"
    assert (
        cli(
            "run",
            "--input",
            data,
            "--output",
            out,
            "--model",
            paths["model"],
            "--scaler",
            paths["scaler"],
            "--workers",
            "1",
        ).exit_code
        == 0
    )
    frame = pq.read_table(data).to_pandas()
    as_float32 = model.predict_proba(scaler.transform(frame[FEATURES]))[:, 1]
    as_float64 = model.predict_proba(scaler.transform(frame[FEATURES].astype(np.float64)))[:, 1]
    got = pq.read_table(out).column("probability").to_numpy()
    assert not np.array_equal(as_float32, as_float64)  # the test can tell them apart
    assert np.array_equal(got, as_float32)


def test_decimal_converts_with_float_of_each_value(tmp_path: Path) -> None:
    """119.99 is 119.99 (``float(Decimal)``), not Arrow's cast 119.99000000000001."""
    from sklearn.linear_model import LinearRegression

    values = pa.array([Decimal("119.99")] * 32, pa.decimal128(10, 2))
    assert pa.compute.cast(values, pa.float64())[0].as_py() != 119.99  # what the cast would have given
    model = LinearRegression().fit(np.array([[0.0], [1.0]]), np.array([0.0, 1.0]))
    model.coef_, model.intercept_ = np.array([1.0]), 0.0  # prediction == feature, to read it back
    paths = save(tmp_path / "model", model=model)
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"price": values}), data)
    out = tmp_path / "out"
    result = cli("run", "--input", data, "--output", out, "--model", paths["model"], "--features", "price")
    assert result.exit_code == 0, result.output + result.stderr
    assert set(pq.read_table(out).column("prediction").to_pylist()) == {119.99}


def test_int_nulls_follow_the_invalid_policy(tmp_path: Path, binary_model_paths) -> None:
    """An integer feature with nulls: quarantined rows name the column, the rest score."""
    from batchscore.sample import churn_table

    table = churn_table(1_616, seed=5)
    tenure = table.column("tenure").cast(pa.int64()).to_numpy()
    mask = np.zeros(len(tenure), dtype=bool)
    mask[[3, 700, 1_500]] = True
    table = table.set_column(table.schema.get_field_index("tenure"), "tenure", pa.array(tenure, mask=mask))
    data = tmp_path / "in.parquet"
    pq.write_table(table, data)
    out = tmp_path / "out"
    result = cli(
        "run",
        "--input",
        data,
        "--output",
        out,
        "--model",
        binary_model_paths["model"],
        "--scaler",
        binary_model_paths["scaler"],
        "--on-invalid",
        "quarantine",
    )
    assert result.exit_code == 0, result.output + result.stderr
    rejected = read_rejected(out)
    assert rejected.column("reject_reason").to_pylist() == ["tenure is null"] * 3
    assert pq.read_table(out).num_rows == 1_613
    failed = cli(
        "run",
        "--input",
        data,
        "--output",
        tmp_path / "out2",
        "--model",
        binary_model_paths["model"],
        "--scaler",
        binary_model_paths["scaler"],
        "--on-invalid",
        "fail",
    )
    assert failed.exit_code == 3 and "row 3" in failed.stderr and "tenure is null" in failed.stderr


def test_gradient_boosting_tie_is_predicts_own_answer(tmp_path: Path) -> None:
    """Rows whose raw score is exactly 0 (probability 0.5): ``predict`` says class 1 (raw >= 0),
    an argmax of the probabilities would say class 0."""
    from sklearn.ensemble import GradientBoostingClassifier

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-2, -1, 400), rng.uniform(1, 2, 400)])
    y = np.concatenate([np.tile([0, 1], 200), np.ones(400, dtype=int)])  # balanced left: leaf value 0
    model = GradientBoostingClassifier(n_estimators=1, max_depth=1, init="zero").fit(x[:, None], y)
    scored = np.concatenate([rng.uniform(-2, -1, 400), rng.uniform(1, 2, 400)])
    assert (model.predict_proba(scored[:, None])[:, 1] == 0.5).sum() == 400
    paths = save(tmp_path / "model", model=model)
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"x": scored.astype(np.float32)}), data)
    out = tmp_path / "out"
    result = cli("run", "--input", data, "--output", out, "--model", paths["model"], "--features", "x")
    assert result.exit_code == 0, result.output + result.stderr
    frame = pq.read_table(data).to_pandas()
    assert np.array_equal(pq.read_table(out).column("prediction").to_numpy(), model.predict(frame[["x"]].to_numpy()))
