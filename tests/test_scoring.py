"""Exactness: every output row equals the model's own prediction for its input row, in order."""

from __future__ import annotations

import shutil
from pathlib import Path

import joblib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import (
    REPO,
    assert_exact,
    binary_model,
    cli,
    multiclass_model,
    pipeline_model,
    read_inputs,
    read_manifest,
    read_output,
    regressor_model,
    write_inputs,
)


def _run(inputs: list[Path], out: Path, model: dict[str, Path], *extra: str) -> None:
    args = ["run", "--output", out, "--model", model["model"], "--batch-size", "700", *extra]
    for path in inputs:
        args += ["--input", path]
    if "scaler" in model:
        args += ["--scaler", model["scaler"]]
    result = cli(*args)
    assert result.exit_code == 0, result.output + result.stderr
    assert (out / "_SUCCESS").exists()


def test_sample_job_is_exact(tmp_path: Path) -> None:
    """The README's sample job, with the sample model trained from the committed data."""
    data = tmp_path / "sample"
    shutil.copytree(REPO / "sample_data", data, ignore=shutil.ignore_patterns("model"))
    assert cli("sample", "--out-dir", data, "--model-only").exit_code == 0
    out = tmp_path / "out"
    result = cli(
        "run",
        "--config",
        REPO / "configs" / "sample.yaml",
        "--input",
        data / "churn.parquet",
        "--model",
        data / "model" / "model.joblib",
        "--scaler",
        data / "model" / "scaler.joblib",
        "--output",
        out,
    )
    assert result.exit_code == 0, result.stderr
    table = read_output(out)
    assert_exact(
        table,
        pq.read_table(data / "churn.parquet"),
        {"model": data / "model" / "model.joblib", "scaler": data / "model" / "scaler.joblib"},
    )
    assert table.column_names[-4:] == ["prediction", "probability", "predicted_at", "model_version"]
    assert table.schema.field("predicted_at").type == pa.timestamp("us", tz="UTC")
    assert set(table.column("model_version").to_pylist()) == {"1.0.0"}
    assert "scored 10,000 of 10,000 rows" in result.output


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("builder", [binary_model, multiclass_model, regressor_model, pipeline_model])
def test_exact_across_files_and_row_groups(tmp_path: Path, builder, workers: str) -> None:
    inputs = write_inputs(tmp_path / "in", files=3, rows=2_400, row_group_size=600)
    model = builder(tmp_path / "model")
    out = tmp_path / "out"
    # Small parts so that several processes share the work.
    _run(inputs, out, model, "--workers", workers)
    assert_exact(read_output(out), read_inputs(inputs), model)


def test_worker_count_does_not_change_output(tmp_path: Path, binary_model_paths) -> None:
    inputs = write_inputs(tmp_path / "in", files=4, rows=3_200, row_group_size=500)
    one, two = tmp_path / "one", tmp_path / "two"
    _run(inputs, one, binary_model_paths, "--workers", "1")
    _run(inputs, two, binary_model_paths, "--workers", "2")
    a, b = read_output(one), read_output(two)
    assert a.drop(["predicted_at"]).equals(b.drop(["predicted_at"]))
    assert sorted(p.name for p in one.glob("part-*")) == sorted(p.name for p in two.glob("part-*"))


def test_multiclass_output_columns(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in", files=1, rows=512)
    model = multiclass_model(tmp_path / "model")
    _run(inputs, tmp_path / "out", model)
    names = read_output(tmp_path / "out").column_names
    assert names[-6:] == [
        "prediction",
        "probability_basic",
        "probability_premium",
        "probability_standard",
        "predicted_at",
        "model_version",
    ]


def test_regressor_has_prediction_only(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in", files=1, rows=512)
    _run(inputs, tmp_path / "out", regressor_model(tmp_path / "model"))
    table = read_output(tmp_path / "out")
    assert not [c for c in table.column_names if c.startswith("probability")]
    assert table.schema.field("prediction").type == pa.float64()


def test_keep_limits_passthrough(tmp_path: Path, binary_model_paths) -> None:
    inputs = write_inputs(tmp_path / "in", files=2, rows=800)
    _run(inputs, tmp_path / "out", binary_model_paths, "--keep", "customer_id,region")
    table = read_output(tmp_path / "out")
    assert table.column_names == ["customer_id", "region", "prediction", "probability", "predicted_at", "model_version"]
    assert_exact(table, read_inputs(inputs), binary_model_paths, passthrough=["customer_id", "region"])


def test_directory_glob_and_several_inputs_in_deterministic_order(tmp_path: Path, binary_model_paths) -> None:
    inputs = write_inputs(tmp_path / "in", files=3, rows=320)
    (tmp_path / "in" / "nested").mkdir()
    nested = write_inputs(tmp_path / "in" / "nested", files=1, rows=208, seed=50)
    (tmp_path / "in" / "_SUCCESS").write_text("")  # not data
    _run([tmp_path / "in"], tmp_path / "dir", binary_model_paths)
    assert_exact(read_output(tmp_path / "dir"), read_inputs(inputs + nested), binary_model_paths)
    _run(
        [tmp_path / "in" / "day-02.parquet", tmp_path / "in" / "day-0[01].parquet"],
        tmp_path / "glob",
        binary_model_paths,
    )
    assert_exact(read_output(tmp_path / "glob"), read_inputs([inputs[2], inputs[0], inputs[1]]), binary_model_paths)


def test_decision_boundary_ties_follow_predict(tmp_path: Path) -> None:
    """Where probabilities tie exactly, the class still equals ``predict``'s."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.array([[1e-20, 0, 0, 0], [-1e-20, 0, 0, 0], [0.0, 0, 0, 0], [2.0, 0, 0, 0], [-3.0, 0, 0, 0]] * 20)
    scaler = StandardScaler().fit(np.vstack([np.eye(4), -np.eye(4)]))
    model = LogisticRegression().fit(np.vstack([np.eye(4), -np.eye(4)]), [1, 0, 0, 0, 0, 0, 0, 0])
    model.coef_ = np.array([[1.0, 0, 0, 0]])
    model.intercept_ = np.array([0.0])
    names = ["a", "b", "c", "d"]
    folder = tmp_path / "m"
    folder.mkdir()
    joblib.dump(model, folder / "model.joblib")
    joblib.dump(scaler, folder / "scaler.joblib")
    raw = scaler.inverse_transform(x)
    pq.write_table(pa.table({n: raw[:, i] for i, n in enumerate(names)}), tmp_path / "ties.parquet")
    proba = model.predict_proba(scaler.transform(raw))
    assert (proba[:, 0] == proba[:, 1]).any(), "the data must contain exact ties"
    result = cli(
        "run",
        "--input",
        tmp_path / "ties.parquet",
        "--output",
        tmp_path / "out",
        "--model",
        folder / "model.joblib",
        "--scaler",
        folder / "scaler.joblib",
        "--features",
        "a,b,c,d",
    )
    assert result.exit_code == 0, result.stderr
    got = read_output(tmp_path / "out").column("prediction").to_numpy()
    assert np.array_equal(got, model.predict(scaler.transform(raw)))


def test_empty_files_and_zero_row_groups(tmp_path: Path, binary_model_paths) -> None:
    inputs = write_inputs(tmp_path / "in", files=1, rows=400)
    schema = pq.read_schema(inputs[0])
    pq.write_table(schema.empty_table(), tmp_path / "in" / "empty.parquet")
    with pq.ParquetWriter(tmp_path / "in" / "zero-rg.parquet", schema) as writer:
        writer.write_table(schema.empty_table())
        writer.write_table(pq.read_table(inputs[0]).slice(0, 16))
    _run([tmp_path / "in"], tmp_path / "out", binary_model_paths)
    expected = read_inputs([inputs[0], tmp_path / "in" / "empty.parquet", tmp_path / "in" / "zero-rg.parquet"])
    assert_exact(read_output(tmp_path / "out"), expected, binary_model_paths)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["rows"] == {"in": 416, "out": 416, "invalid": 0}


def test_manifest_records_inputs_artifacts_and_versions(tmp_path: Path, binary_model_paths) -> None:
    import hashlib

    inputs = write_inputs(tmp_path / "in", files=2, rows=320)
    _run(inputs, tmp_path / "out", binary_model_paths, "--model-version", "2.1.0")
    manifest = read_manifest(tmp_path / "out")
    assert [i["uri"] for i in manifest["inputs"]] == [str(p) for p in inputs]
    digests = {a["role"]: a["sha256"] for a in manifest["artifacts"]}
    assert digests["model"] == hashlib.sha256(binary_model_paths["model"].read_bytes()).hexdigest()
    assert digests["scaler"] == hashlib.sha256(binary_model_paths["scaler"].read_bytes()).hexdigest()
    assert set(manifest["versions"]) == {"batchscore", "scikit-learn", "pyarrow", "python"}
    assert manifest["model_version"] == "2.1.0"
    assert manifest["seconds"] > 0


def test_a_rows_value_does_not_depend_on_how_the_input_is_split(tmp_path: Path, binary_model_paths) -> None:
    """Odd batch sizes, row groups and worker counts all give bit-identical outputs."""
    inputs = write_inputs(tmp_path / "in", files=2, rows=1_001, row_group_size=333)
    outputs = []
    for batch_size, workers in (("1", "1"), ("7", "2"), ("4096", "1")):
        out = tmp_path / f"out-{batch_size}"
        _run(inputs, out, binary_model_paths, "--batch-size", batch_size, "--workers", workers)
        outputs.append(read_output(out).drop(["predicted_at"]))
    assert outputs[0].equals(outputs[1]) and outputs[0].equals(outputs[2])
