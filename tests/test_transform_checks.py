"""Every transform is checked like the reference: a row scikit-learn refuses after a transform is
an invalid row, never a score.

The reference is scikit-learn itself, asked row by row: a row is refused iff
``model.predict_proba(scaler.transform(df.iloc[[i]]))`` (a Pipeline: ``pipeline.predict_proba``;
regressors: ``predict``) raises. Inputs are two files, float64 and float32 features, with rows
that overflow to infinity after the scaler, rows finite in float64 but infinite as float32 (which
tree models refuse and linear models accept), NaN and -inf from a logarithm (which
HistGradientBoosting accepts), and a Pipeline whose middle step overflows.
"""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.errors import EXIT_INPUT
from helpers import cli, read_output, read_rejected, save

pytestmark = [pytest.mark.fault, pytest.mark.filterwarnings("ignore")]

FEATURES = ["a", "b", "c"]
ROWS = {"float64": 117, "float32": 93}  # one file each, several batches and row groups
FAMILIES = ["logistic", "tree", "forest", "hgb", "gb", "svc", "knn", "naive_bayes", "mlp", "ridge", "hgb_regressor"]


def _estimator(family: str):
    from sklearn.ensemble import (
        GradientBoostingClassifier,
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        RandomForestClassifier,
    )
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC
    from sklearn.tree import DecisionTreeClassifier

    return {
        "logistic": lambda: LogisticRegression(),
        "tree": lambda: DecisionTreeClassifier(max_depth=4, random_state=0),
        "forest": lambda: RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0),
        "hgb": lambda: HistGradientBoostingClassifier(max_iter=10, max_depth=3, random_state=0),
        "gb": lambda: GradientBoostingClassifier(n_estimators=10, max_depth=2, random_state=0),
        "svc": lambda: SVC(probability=True, random_state=0),
        "knn": lambda: KNeighborsClassifier(5),
        "naive_bayes": lambda: GaussianNB(),
        "mlp": lambda: MLPClassifier(hidden_layer_sizes=(8,), max_iter=300, random_state=0),
        "ridge": lambda: Ridge(),
        "hgb_regressor": lambda: HistGradientBoostingRegressor(max_iter=10, max_depth=3, random_state=0),
    }[family]()


def _transformer(kind: str):
    from sklearn.preprocessing import FunctionTransformer, MinMaxScaler, StandardScaler

    return {"standard": StandardScaler, "minmax": MinMaxScaler, "log": lambda: FunctionTransformer(np.log)}[kind]()


def _training(rows: int = 400) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Features in small units (spread about 0.015), so a scaler multiplies them by about 60."""
    rng = np.random.default_rng(5)
    x = pd.DataFrame({name: rng.uniform(0.001, 0.05, rows) for name in FEATURES})
    label = np.where(x["a"] + x["b"] > x["c"] + 0.025, "churn", "stay")
    return x, label, (x["a"] * 10 + x["b"]).to_numpy()


def _model(folder: Path, family: str, kind: str) -> dict[str, Path]:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    x, label, value = _training()
    y = value if family in ("ridge", "hgb_regressor") else label
    if kind == "pipeline":  # the middle step, exp, overflows
        pipe = make_pipeline(StandardScaler(), FunctionTransformer(np.exp), _estimator(family)).fit(x, y)
        return save(folder, model=pipe)
    scaler = _transformer(kind).fit(x)
    return save(folder, model=_estimator(family).fit(scaler.transform(x), y), scaler=scaler)


def _inputs(folder: Path, kind: str) -> list[Path]:
    """A float64 file, then a float32 file (name order), each with rows that break a transform;
    each is scored as a job of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (dtype, rows) in enumerate(ROWS.items()):
        rng = np.random.default_rng(11 + k)
        values = {name: rng.uniform(0.001, 0.05, rows).astype(dtype) for name in FEATURES}
        i = np.arange(rows)
        largest = np.finfo(dtype).max
        if kind == "log":
            values["a"][i % 9 == 4] = -0.01  # NaN after the logarithm
            values["b"][i % 13 == 6] = 0.0  # -inf after it
            if dtype == "float64":
                values["c"][i % 17 == 2] = 1e300  # log is finite
        else:
            values["a"][i % 9 == 4] = largest / 8  # inf after any scaler
            values["a"][i % 23 == 10] = -largest / 8  # -inf
            values["c"][i % 17 == 2] = 12.0  # about 800 standardized: exp overflows (the pipeline's middle step)
            values["c"][i % 19 == 3] = 1.5  # about 100 standardized: exp is finite in float64, inf as float32
            if dtype == "float64":
                values["b"][i % 13 == 6] = 1e298  # finite after the scaler, but inf as float32
        table = pa.table({"id": pa.array(np.arange(rows) + 1000 * k), **{n: pa.array(v) for n, v in values.items()}})
        path = folder / f"part-{k}-{dtype}.parquet"
        pq.write_table(table, path, row_group_size=40)
        paths.append(path)
    return paths


def _reference(paths: dict[str, Path]):
    model = joblib.load(paths["model"])
    scaler = joblib.load(paths["scaler"]) if "scaler" in paths else None

    def call(frame: pd.DataFrame) -> np.ndarray:
        x = scaler.transform(frame) if scaler is not None else frame
        return model.predict_proba(x) if hasattr(model, "predict_proba") else model.predict(x)

    return model, scaler, call


def _refused(call, frame: pd.DataFrame) -> list[int]:
    """The rows scikit-learn refuses, asked one row at a time."""
    refused = []
    for i in range(len(frame)):
        try:
            call(frame.iloc[[i]])
        except Exception:
            refused.append(i)
    return refused


def _padded(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows, then copies of the first up to a multiple of 16: no real row is a BLAS remainder row."""
    return pd.concat([frame] + [frame.iloc[[0]]] * ((-len(frame)) % 16))


def _expected(paths: dict[str, Path], inputs: list[Path]) -> tuple[list[int], list[int], dict[str, np.ndarray]]:
    """Ids kept and refused, and the reference's columns computed on the kept rows."""
    model, scaler, call = _reference(paths)
    kept, refused, columns = [], [], {}
    parts: dict[str, list[np.ndarray]] = {}
    for path in inputs:
        frame = pq.read_table(path).to_pandas()
        bad = _refused(call, frame[FEATURES])
        good = frame.drop(index=frame.index[bad])
        refused += frame["id"].iloc[bad].tolist()
        kept += good["id"].tolist()
        x = _padded(good[FEATURES])
        x = scaler.transform(x) if scaler is not None else x
        n = len(good)
        parts.setdefault("prediction", []).append(model.predict(x)[:n])
        if hasattr(model, "predict_proba"):
            parts.setdefault("probability", []).append(model.predict_proba(x)[:n, 1])
    columns = {name: np.concatenate(values) for name, values in parts.items()}
    return kept, refused, columns


def _run(tmp_path: Path, paths: dict[str, Path], inputs: list[Path], out: str, *extra: str):
    args = [
        "run",
        "--output",
        tmp_path / out,
        "--model",
        paths["model"],
        "--keep",
        "id",
        "--batch-size",
        "50",
        "--workers",
        "1",
        "--max-invalid-fraction",
        "0.5",
        *extra,
    ]
    if "scaler" in paths:
        args += ["--scaler", paths["scaler"]]
    for path in inputs:
        args += ["--input", path]
    return cli(*args)


def _check_quarantine(tmp_path: Path, paths: dict[str, Path], inputs: list[Path], out: str, *extra: str) -> list[int]:
    """Each input file scored as a job of its own (the files of one job share one schema, and these
    differ in dtype), into ``out-<file stem>``; the ids refused, over all of them."""
    return [i for path in inputs for i in _check_job(tmp_path, paths, [path], f"{out}-{path.stem}", *extra)]


def _check_job(tmp_path: Path, paths: dict[str, Path], inputs: list[Path], out: str, *extra: str) -> list[int]:
    kept, refused, columns = _expected(paths, inputs)
    result = _run(tmp_path, paths, inputs, out, "--on-invalid", "quarantine", *extra)
    assert result.exit_code == 0, result.output + result.stderr
    output = read_output(tmp_path / out)
    assert output.column("id").to_pylist() == kept
    for name, values in columns.items():
        got = output.column(name).to_numpy(zero_copy_only=False)
        if extra:  # the compiled engine: within its tolerance, classes identical
            assert (
                np.array_equal(got, values)
                if name == "prediction" and got.dtype == object
                else np.max(np.abs(got - values), initial=0.0) <= 1e-12
            ), name
        else:
            # NaN where scikit-learn gives NaN (naive Bayes on a huge but finite value)
            assert np.array_equal(got, values, equal_nan=got.dtype.kind == "f"), f"{name} differs on the kept rows"
    if refused:
        rejected = read_rejected(tmp_path / out)
        assert rejected.column("id").to_pylist() == refused
        assert all(reason for reason in rejected.column("reject_reason").to_pylist())
    return refused


#: Every family after a scaler and in a Pipeline; MinMaxScaler and the logarithm with a few.
GRID = [(f, k) for f in FAMILIES for k in ("standard", "pipeline")] + [
    (f, k) for f in ("logistic", "tree", "hgb", "knn", "mlp") for k in ("minmax", "log")
]


@pytest.mark.parametrize("family, kind", GRID, ids=[f"{f}-{k}" for f, k in GRID])
def test_rows_the_reference_refuses_are_invalid(tmp_path: Path, family: str, kind: str) -> None:
    """Quarantine: the output is the reference on the rows it accepts, bit for bit, and the rejected
    rows are exactly those it refuses; fail: exit 3 naming the file, the first refused row, its
    column and the transform after which it was non-finite."""
    paths = _model(tmp_path / "model", family, kind)
    inputs = _inputs(tmp_path / "in", kind)
    refused = _check_quarantine(tmp_path, paths, inputs, "quarantined")
    if family.startswith("hgb"):  # accepts NaN and inf: nothing is refused, NaN rows are scored
        assert not refused
        return
    assert refused, "the inputs hold rows scikit-learn refuses"
    failed = _run(tmp_path, paths, inputs[:1], "failed", "--on-invalid", "fail")
    assert failed.exit_code == EXIT_INPUT, failed.output + failed.stderr
    message = failed.stderr.strip().splitlines()[-1]
    first = min(refused)  # ids of the first (float64) file are its row numbers; row 2 overflows exp
    assert str(inputs[0]) in message and f"row {first} " in message, message
    after = {
        "standard": "after StandardScaler",
        "minmax": "after MinMaxScaler",
        "log": "after FunctionTransformer",
        "pipeline": "after FunctionTransformer (pipeline step 'functiontransformer')",
    }[kind]
    assert after in message and "non-finite" in message, message
    assert any(f"{name} " in message or f"column {j}" in message for j, name in enumerate(FEATURES)), message
    assert not (tmp_path / "failed" / "_SUCCESS").exists()


@pytest.mark.parametrize("family, kind", [("gb", "standard"), ("hgb", "pipeline"), ("gb", "pipeline")])
def test_compiled_engine_refuses_the_same_rows(tmp_path: Path, family: str, kind: str) -> None:
    pytest.importorskip("tl2cgen")
    paths = _model(tmp_path / "model", family, kind)
    inputs = _inputs(tmp_path / "in", kind)
    refused = _check_quarantine(
        tmp_path, paths, inputs, "compiled", "--engine", "compiled", "--compiled-cache", str(tmp_path / "cache")
    )
    assert bool(refused) == (family == "gb")


def test_a_transform_that_raises_for_a_batch_refuses_only_its_rows(tmp_path: Path) -> None:
    """A step that raises (not a finiteness check) is judged row by row as well."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    x, label, _ = _training()
    pipe = make_pipeline(FunctionTransformer(_refuse_large), LogisticRegression()).fit(x, label)
    paths = save(tmp_path / "model", model=pipe)
    inputs = _inputs(tmp_path / "in", "standard")
    refused = _check_quarantine(tmp_path, paths, inputs, "out")
    assert (
        refused
        and "refused by scikit-learn: ValueError: too large"
        in read_rejected(tmp_path / f"out-{inputs[0].stem}").column("reject_reason")[0].as_py()
    )


def _refuse_large(x):
    values = np.asarray(x)
    if (np.abs(values) > 1.0).any():
        raise ValueError("too large")
    return values
