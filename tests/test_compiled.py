"""The compiled tree engine: exact to 1e-12 with identical classes, verified on every run, cached.

Models are small (few, shallow trees) so each compiles in well under a second; they are trained
and compiled once for the module. Row counts here are deliberately not multiples of 16: the
compiled kernel has no remainder rows, and the comparison is to a tolerance, not bit-for-bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import joblib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tl2cgen  # noqa: F401  (the compiled extra, which dev installs with the tests)
import treelite  # noqa: F401

if shutil.which(compiled_toolchain := "gcc") is None:
    pytest.skip(f"no C compiler ({compiled_toolchain}) to build libraries with", allow_module_level=True)

from batchscore.errors import EXIT_MODEL, EXIT_USAGE  # noqa: E402
from batchscore.models import compiled  # noqa: E402
from batchscore.models.artifacts import load_model  # noqa: E402
from batchscore.models.engine import Predictor  # noqa: E402
from batchscore.models.verification import TOLERANCE  # noqa: E402
from batchscore.sample import FEATURES, churn_table  # noqa: E402
from helpers import cli, read_manifest, read_output, training_frame  # noqa: E402

ROWS = 1_003  # not a multiple of 16
pytestmark = pytest.mark.filterwarnings("ignore:X does not have valid feature names")
BATCHSCORE = [sys.executable, "-m", "batchscore"]


def _models() -> dict[str, object]:
    from sklearn.ensemble import (
        ExtraTreesClassifier,
        GradientBoostingClassifier,
        GradientBoostingRegressor,
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        RandomForestClassifier,
    )
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    frame = training_frame()
    x = frame[list(FEATURES)]
    with_nan = x.copy()
    with_nan.iloc[::7, 0] = np.nan  # so HistGradientBoosting learns where missing ages go
    with_nan.iloc[::11, 2] = np.nan
    small = dict(max_iter=12, max_depth=3, random_state=0)
    classic = dict(n_estimators=12, max_depth=3, random_state=0)
    return {
        "hgb_binary": HistGradientBoostingClassifier(**small).fit(with_nan, frame["churned"]),
        "hgb_multiclass": HistGradientBoostingClassifier(**small).fit(with_nan, frame["plan"]),
        "hgb_regressor": HistGradientBoostingRegressor(**small).fit(with_nan, frame["total_charges"]),
        "gb_binary": GradientBoostingClassifier(**classic).fit(x, frame["churned"]),
        "gb_multiclass": GradientBoostingClassifier(**classic).fit(x, frame["plan"]),
        "gb_regressor": GradientBoostingRegressor(**classic).fit(x, frame["total_charges"]),
        "rf_binary": RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0).fit(x, frame["churned"]),
        "et_binary": ExtraTreesClassifier(n_estimators=5, max_depth=4, random_state=0).fit(x, frame["churned"]),
        "hgb_other": HistGradientBoostingClassifier(max_iter=5, max_depth=2, random_state=1).fit(x, frame["churned"]),
        "pipeline_hgb": make_pipeline(StandardScaler(), HistGradientBoostingClassifier(**small)).fit(
            with_nan, frame["plan"]
        ),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("compiled-models")
    paths = {}
    for name, model in _models().items():
        paths[name] = folder / f"{name}.joblib"
        joblib.dump(model, paths[name])
    return paths


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One library cache for the module: each model compiles once."""
    return tmp_path_factory.mktemp("compiled-cache")


def _predictors(path: Path, cache: Path) -> tuple[Predictor, Predictor]:
    model = load_model(str(path))
    now = datetime.now(timezone.utc)
    library = compiled.obtain(model, str(cache))
    return Predictor(model, "v", now), compiled.CompiledPredictor(model, "v", now, library.path)


def _batch(rows: int, nan: bool, seed: int = 11) -> pa.RecordBatch:
    table = (
        churn_table(rows, seed=seed).select(list(FEATURES)).cast(pa.schema([(name, pa.float64()) for name in FEATURES]))
    )
    if nan:
        rng = np.random.default_rng(seed)
        columns = []
        for name in FEATURES:
            values = table.column(name).to_numpy().copy()
            values[rng.random(rows) < 0.15] = np.nan
            columns.append(pa.array(values))
        return pa.RecordBatch.from_arrays(columns, names=list(FEATURES))
    return table.to_batches(max_chunksize=rows)[0]


EXACT = [
    ("hgb_binary", False),
    ("hgb_binary", True),
    ("hgb_multiclass", False),
    ("hgb_multiclass", True),
    ("hgb_regressor", False),
    ("hgb_regressor", True),
    ("gb_binary", False),
    ("gb_multiclass", False),
    ("gb_regressor", False),
    ("pipeline_hgb", False),
    ("pipeline_hgb", True),
]


@pytest.mark.parametrize("name, nan", EXACT, ids=[f"{n}-{'nan' if m else 'finite'}" for n, m in EXACT])
def test_compiled_agrees_with_scikit_learn_on_every_row(models, cache, name: str, nan: bool) -> None:
    """Every probability within 1e-12 of predict_proba, every class equal to predict's, every
    regression value within 1e-12 of predict's (relative above 1); NaN rows follow the learned
    missing-value directions (HistGradientBoosting; GradientBoosting refuses NaN itself)."""
    reference, candidate = _predictors(models[name], cache)
    batch = _batch(ROWS, nan)
    matrix = reference.feature_matrix(batch)
    assert ROWS % 16 and np.isnan(matrix[:ROWS]).any() == nan
    estimator = reference.model.estimator
    x = matrix[:ROWS]
    got = candidate.predict(matrix, ROWS)
    if reference.model.is_classifier:
        assert got[0].to_pylist() == estimator.predict(x).tolist()
        proba = estimator.predict_proba(x)
        columns = [proba[:, 1]] if proba.shape[1] == 2 else [proba[:, k] for k in range(proba.shape[1])]
        differences = [np.abs(g.to_numpy() - c) for g, c in zip(got[1:], columns)]
        assert max(d.max() for d in differences) <= TOLERANCE
    else:
        expected = estimator.predict(x)
        assert np.max(np.abs(got[0].to_numpy() - expected) / np.maximum(1.0, np.abs(expected))) <= TOLERANCE


def test_rows_on_gradient_boosting_thresholds_are_compared_as_float32(models, cache) -> None:
    """GradientBoosting's trees compare float32 inputs against float64 thresholds: float64 values
    just beside a threshold must go where scikit-learn sends them, so the compiled kernel gets
    the same float32 values."""
    reference, candidate = _predictors(models["gb_binary"], cache)
    estimator = reference.model.estimator
    tree = estimator.estimators_[0, 0].tree_
    inner = np.flatnonzero(tree.feature >= 0)
    base = reference.feature_matrix(_batch(len(inner) * 3, nan=False))[: len(inner) * 3].copy()
    for k, node in enumerate(inner):
        threshold = tree.threshold[node]
        for j, value in enumerate((threshold, np.nextafter(threshold, np.inf), np.nextafter(threshold, -np.inf))):
            base[3 * k + j, tree.feature[node]] = value
    assert (base.astype(np.float32).astype(np.float64) != base).any()  # rows where the precision decides
    rows = len(base)
    matrix = np.zeros((rows + (-rows) % 16, base.shape[1]), order="F")
    matrix[:rows] = base
    got = candidate.predict(matrix, rows)
    assert got[0].to_pylist() == estimator.predict(base).tolist()
    assert np.max(np.abs(got[1].to_numpy() - estimator.predict_proba(base)[:, 1])) <= TOLERANCE


def test_forests_are_not_compiled(tmp_path, models) -> None:
    """RandomForest and ExtraTrees compile into slower code than scikit-learn's: never compiled."""
    for name in ("rf_binary", "et_binary"):
        reason = compiled.unsupported_reason(load_model(str(models[name])))
        assert reason and "slower" in reason
    refused = cli("compile", models["rf_binary"], "--out", tmp_path)
    assert refused.exit_code == EXIT_MODEL and "slower" in refused.stderr and not list(tmp_path.iterdir())


# --- whole jobs --------------------------------------------------------------------------------


def _inputs(folder: Path, nan: bool = False) -> list[Path]:
    """Two files, rows not a multiple of 16, several row groups each; ``nan`` puts NaN in some."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, rows in enumerate((1_003, 517)):
        table = churn_table(rows, seed=20 + i, first_id=1 + i * 2_000)
        if nan:
            ages = table.column("age").to_numpy().astype(np.float64)
            ages[::9] = np.nan
            table = table.set_column(table.schema.get_field_index("age"), "age", pa.array(ages))
        paths.append(folder / f"part-{i}.parquet")
        pq.write_table(table, paths[-1], row_group_size=400)
    return paths


def _run(
    tmp_path: Path,
    model: Path,
    name: str,
    *args: str,
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(command or BATCHSCORE),
            "run",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / name),
            "--model",
            str(model),
            "--log-format",
            "json",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _engine_events(stderr: str) -> list[dict]:
    return [
        e
        for e in map(json.loads, (line for line in stderr.splitlines() if line.startswith("{")))
        if e.get("event") == "engine"
    ]


@pytest.mark.parametrize("name", ["hgb_multiclass", "hgb_regressor"])
def test_job_with_compiled_engine_matches_scikit_learn_and_records_the_evidence(tmp_path, models, cache, name) -> None:
    _inputs(tmp_path / "in", nan=True)
    skip = ("--on-invalid", "skip", "--max-invalid-fraction", "0.2")
    sk = _run(tmp_path, models[name], "sk", *skip)
    assert sk.returncode == 0, sk.stderr
    done = _run(tmp_path, models[name], "c", *skip, "--engine", "compiled", "--compiled-cache", str(cache))
    assert done.returncode == 0, done.stderr
    expected, got = read_output(tmp_path / "sk"), read_output(tmp_path / "c")
    assert got.num_rows == expected.num_rows == 1_520 - 112 - 58  # NaN ages set aside the same way
    for column in got.column_names:
        if column.startswith(("probability", "prediction")) and pa.types.is_floating(got.schema.field(column).type):
            a, b = got.column(column).to_numpy(), expected.column(column).to_numpy()
            assert np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))) <= TOLERANCE
        elif column not in ("predicted_at",):
            assert got.column(column).equals(expected.column(column)), column
    engine = read_manifest(tmp_path / "c")["engine"]
    assert engine["used"] == "compiled" and engine["tolerance"] == TOLERANCE
    assert engine["checked_rows"] >= 2 * 256 and engine["nan_rows"] == 2 * 64  # rows from both files
    assert engine["largest_difference"] <= TOLERANCE and engine["class_mismatches"] == 0
    assert engine["shards"][0]["library_sha256"] == engine["library_sha256"]
    assert "verified on" in _engine_events(done.stderr)[0]["message"]
    assert read_manifest(tmp_path / "sk")["engine"]["used"] == "sklearn"


def test_forest_asked_to_compile_is_scored_by_scikit_learn_bit_for_bit(tmp_path, models, cache) -> None:
    _inputs(tmp_path / "in")
    sk = _run(tmp_path, models["rf_binary"], "sk")
    done = _run(tmp_path, models["rf_binary"], "c", "--engine", "compiled", "--compiled-cache", str(cache))
    assert sk.returncode == 0 and done.returncode == 0, done.stderr
    assert (
        read_output(tmp_path / "c").drop(["predicted_at"]).equals(read_output(tmp_path / "sk").drop(["predicted_at"]))
    )
    engine = read_manifest(tmp_path / "c")["engine"]
    assert engine["used"] == "sklearn" and "slower" in engine["reasons"][0]
    assert "slower" in _engine_events(done.stderr)[0]["message"]


def _poison(cache: Path, victim: Path, impostor: Path, folder: Path) -> None:
    """Put the library of ``impostor`` where ``victim``'s belongs, as a stale or tampered cache would."""
    wrong = compiled.obtain(load_model(str(impostor)), str(folder))
    key = compiled.library_name(compiled.model_sha256(load_model(str(victim))))
    shutil.copyfile(wrong.path, cache / key)


@pytest.mark.slow  # several real processes, each compiling or starting up
def test_library_that_disagrees_falls_back_in_auto_and_stops_in_compiled(tmp_path, models, cache) -> None:
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    _poison(poisoned, models["hgb_binary"], models["hgb_other"], cache)
    _inputs(tmp_path / "in")
    sk = _run(tmp_path, models["hgb_binary"], "sk")
    auto = _run(tmp_path, models["hgb_binary"], "auto", "--engine", "auto", "--compiled-cache", str(poisoned))
    assert sk.returncode == 0 and auto.returncode == 0, auto.stderr
    assert (
        read_output(tmp_path / "auto")
        .drop(["predicted_at"])
        .equals(read_output(tmp_path / "sk").drop(["predicted_at"]))
    )
    engine = read_manifest(tmp_path / "auto")["engine"]
    assert engine["used"] == "sklearn" and engine["largest_difference"] > TOLERANCE
    assert "disagrees with scikit-learn" in engine["reasons"][0]
    stopped = _run(tmp_path, models["hgb_binary"], "stopped", "--engine", "compiled", "--compiled-cache", str(poisoned))
    assert stopped.returncode == EXIT_MODEL
    assert "disagrees with scikit-learn" in json.loads(stopped.stderr.splitlines()[-1])["message"]
    assert not (tmp_path / "stopped" / "_SUCCESS").exists()
    assert not any(p.name.startswith("part-") for p in (tmp_path / "stopped").glob("*"))


@pytest.mark.slow  # several real processes, each compiling or starting up
def test_prebuilt_library_loads_without_a_compiler(tmp_path, models) -> None:
    """The container flow: `batchscore compile` where gcc is, then runs where it is not."""
    prebuilt = tmp_path / "prebuilt"
    built = subprocess.run(
        [*BATCHSCORE, "compile", str(models["gb_binary"]), "--out", str(prebuilt)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    record = json.loads(built.stdout)
    assert Path(record["path"]).parent == prebuilt and record["compiled_now"] is True
    _inputs(tmp_path / "in")
    bare = tmp_path / "bin"  # a PATH with no compiler on it
    bare.mkdir()
    env = {**os.environ, "PATH": str(bare)}
    command = [sys.executable, "-m", "batchscore"]
    done = _run(
        tmp_path,
        models["gb_binary"],
        "c",
        "--engine",
        "compiled",
        "--compiled-cache",
        f"file://{prebuilt}",
        env=env,
        command=command,
    )  # the same folder spelled as a URL
    assert done.returncode == 0, done.stderr
    engine = read_manifest(tmp_path / "c")["engine"]
    assert engine["used"] == "compiled" and engine["shards"][0]["compiled_now"] is False
    assert engine["library_sha256"] == record["library_sha256"]
    empty = tmp_path / "empty-cache"
    stopped = _run(
        tmp_path,
        models["gb_binary"],
        "none",
        "--engine",
        "compiled",
        "--compiled-cache",
        str(empty),
        env=env,
        command=command,
    )
    assert stopped.returncode == EXIT_MODEL and "no C compiler" in stopped.stderr
    auto = _run(
        tmp_path,
        models["gb_binary"],
        "auto",
        "--engine",
        "auto",
        "--compiled-cache",
        str(empty),
        env=env,
        command=command,
    )
    assert auto.returncode == 0, auto.stderr
    assert "no C compiler" in read_manifest(tmp_path / "auto")["engine"]["reasons"][0]


def test_library_api_compiles_into_the_job_cache_and_results_name_the_engine(tmp_path, models) -> None:
    """compile_model fills the job's compiled_cache; run and run_shard then report the engine used."""
    import batchscore

    cache = tmp_path / "cache"
    config = batchscore.build_config(None, model=str(models["gb_regressor"]), compiled_cache=str(cache))
    built = batchscore.compile_model(config)
    assert Path(built.path).parent == cache and built.library["compiled_now"] is True
    assert batchscore.compile_model(config).library["compiled_now"] is False
    _inputs(tmp_path / "in")
    job = batchscore.build_config(
        None,
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        workers=1,
        model=str(models["gb_regressor"]),
        engine="compiled",
        compiled_cache=str(cache),
    )
    ran = batchscore.run(job)
    assert ran.engine["used"] == "compiled" and ran.engine["library_sha256"] == built.library["library_sha256"]
    assert ran.engine["checked_rows"] > 0 and ran.engine["largest_difference"] <= TOLERANCE
    plain = batchscore.build_config(
        None, input=str(tmp_path / "in"), output=str(tmp_path / "sharded"), workers=1, model=str(models["gb_regressor"])
    )
    assert batchscore.run_shard(plain, 0, count=1).engine == {"requested": "sklearn", "used": "sklearn"}


def test_engine_setting_is_checked(tmp_path, models) -> None:
    result = cli(
        "run", "--input", tmp_path, "--output", tmp_path / "o", "--model", models["gb_binary"], "--engine", "fast"
    )
    assert result.exit_code == EXIT_USAGE
    config = tmp_path / "job.yaml"
    config.write_text("engine: fast\n")
    result = cli("run", "--config", config)
    assert result.exit_code == EXIT_USAGE and "setting 'engine' must be one of sklearn, compiled, auto" in result.stderr


@pytest.mark.slow  # several real processes, each compiling or starting up
def test_remote_cache_compiles_once_for_every_host(tmp_path, models, s3) -> None:
    """A cache on S3: `compile --out s3://...` publishes the library, a host with an empty local
    cache and no compiler downloads it, a host that finds nothing compiles and uploads, and a
    failed publish is an error where publishing is the point."""
    fs, bucket, options = s3
    remote = f"s3://{bucket}/models/churn/compiled/"
    storage = ["--storage-option", f"endpoint_url={options['endpoint_url']}"]
    builder = {**os.environ, compiled.CACHE_ENV: str(tmp_path / "builder-cache")}
    built = subprocess.run(
        [*BATCHSCORE, "compile", str(models["gb_binary"]), "--out", remote, *storage],
        capture_output=True,
        text=True,
        timeout=120,
        env=builder,
    )
    assert built.returncode == 0, built.stderr
    record = json.loads(built.stdout)
    published = f"{remote}{record['library']}"
    assert record["remote_library"] == published and record["compiled_now"] is True
    assert hashlib.sha256(fs.cat_file(published)).hexdigest() == record["library_sha256"]

    _inputs(tmp_path / "in")
    bare = tmp_path / "bin"  # a host with no compiler and nothing in its local cache
    bare.mkdir()
    host = {**os.environ, "PATH": str(bare), compiled.CACHE_ENV: str(tmp_path / "host-cache")}
    done = _run(
        tmp_path,
        models["gb_binary"],
        "c",
        "--engine",
        "compiled",
        "--compiled-cache",
        remote,
        *storage,
        env=host,
        command=[sys.executable, "-m", "batchscore"],
    )
    assert done.returncode == 0, done.stderr
    engine = read_manifest(tmp_path / "c")["engine"]
    shard = engine["shards"][0]
    assert engine["used"] == "compiled" and engine["library_sha256"] == record["library_sha256"]
    assert shard["downloaded_now"] is True and shard["compiled_now"] is False and shard["remote_library"] == published
    assert (tmp_path / "host-cache" / record["library"]).is_file()

    fresh = f"s3://{bucket}/other/compiled"  # nothing there yet: this host compiles and uploads
    first = _run(
        tmp_path,
        models["hgb_binary"],
        "h",
        "--engine",
        "compiled",
        "--compiled-cache",
        fresh,
        *storage,
        env={**os.environ, compiled.CACHE_ENV: str(tmp_path / "first-cache")},
    )
    assert first.returncode == 0, first.stderr
    uploaded = read_manifest(tmp_path / "h")["engine"]["shards"][0]
    assert uploaded["compiled_now"] is True and uploaded["downloaded_now"] is False
    assert hashlib.sha256(fs.cat_file(uploaded["remote_library"])).hexdigest() == uploaded["library_sha256"]

    missing = subprocess.run(
        [*BATCHSCORE, "compile", str(models["gb_binary"]), "--out", f"s3://{bucket}-absent/compiled/", *storage],
        capture_output=True,
        text=True,
        timeout=120,
        env=builder,
    )
    assert missing.returncode == 1 and "cannot upload the compiled library" in missing.stderr


@pytest.mark.slow  # several real processes, each compiling or starting up
def test_compiled_cache_never_lands_in_the_input_or_the_output(tmp_path, models) -> None:
    """A run may write libraries into its cache: a cache inside (or holding) the input or the output,
    however spelled, is refused with exit 2 before anything is compiled or written."""
    inputs = _inputs(tmp_path / "in")
    before = {p: p.read_bytes() for p in inputs}
    (tmp_path / "link").symlink_to(tmp_path / "in")
    for name, cache in [
        ("inside-input", tmp_path / "in" / "compiled"),
        ("via-symlink", tmp_path / "link" / "lib"),
        ("holds-input", tmp_path),
        ("inside-output", tmp_path / "o" / "lib"),
        ("in-state", tmp_path / "_batchscore" / "o"),
    ]:
        output = "o" if name in ("inside-output", "in-state") else name
        done = _run(tmp_path, models["gb_binary"], output, "--engine", "auto", "--compiled-cache", str(cache))
        assert done.returncode == EXIT_USAGE, (name, done.stderr)
        assert "compiled_cache" in json.loads(done.stderr.splitlines()[-1])["message"], name
        assert not cache.exists() or name == "holds-input", name
        assert not (tmp_path / output).exists(), name
    assert {p: p.read_bytes() for p in inputs} == before and sorted((tmp_path / "in").iterdir()) == sorted(inputs)
    unused = _run(tmp_path, models["gb_binary"], "plain", "--compiled-cache", str(tmp_path / "in" / "compiled"))
    assert unused.returncode == 0, unused.stderr  # the scikit-learn engine never writes its cache
