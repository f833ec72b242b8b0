"""Bad input: a clear message naming the culprit, a documented exit code, nothing committed."""

from __future__ import annotations

import os
from pathlib import Path

import joblib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.errors import EXIT_INPUT, EXIT_MODEL, EXIT_USAGE
from batchscore.sample import churn_table
from helpers import (
    assert_exact,
    cli,
    no_success,
    only_complete_parts,
    read_manifest,
    read_output,
    rejected_file,
    write_inputs,
)


def run(inputs, out, model, *extra):
    args = ["run", "--output", out, "--model", model["model"], "--scaler", model["scaler"], *extra]
    for path in inputs if isinstance(inputs, list) else [inputs]:
        args += ["--input", path]
    return cli(*args)


def assert_refused(result, code: int, *fragments: str, out: Path | None = None) -> None:
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    for fragment in fragments:
        assert str(fragment) in result.stderr, (fragment, result.stderr)
    assert "Traceback" not in result.stderr
    if out is not None:
        assert no_success(out)
        assert only_complete_parts(out)


def test_no_input_matched(tmp_path: Path, binary_model_paths) -> None:
    out = tmp_path / "out"
    pattern = tmp_path / "nothing-*.parquet"
    assert_refused(run([pattern], out, binary_model_paths), EXIT_INPUT, "no Parquet file matched", pattern, out=out)
    missing = tmp_path / "missing.parquet"
    assert_refused(run([missing], out, binary_model_paths), EXIT_INPUT, "input not found", missing, out=out)
    assert not out.exists()


def test_corrupt_and_non_parquet_files(tmp_path: Path, binary_model_paths, inputs) -> None:
    bad = tmp_path / "in" / "zz-broken.parquet"
    bad.write_bytes(b"this is not parquet at all" * 10)
    out = tmp_path / "out"
    assert_refused(run([tmp_path / "in"], out, binary_model_paths), EXIT_INPUT, bad, out=out)
    truncated = tmp_path / "trunc" / "t.parquet"
    truncated.parent.mkdir()
    truncated.write_bytes(inputs[0].read_bytes()[:-100])
    assert_refused(run([truncated], out, binary_model_paths), EXIT_INPUT, truncated, out=out)
    assert not out.exists()


def test_missing_feature_column(tmp_path: Path, binary_model_paths) -> None:
    path = tmp_path / "nofeat.parquet"
    pq.write_table(churn_table(100).drop(["tenure"]), path)
    out = tmp_path / "out"
    assert_refused(run([path], out, binary_model_paths), EXIT_INPUT, path, "missing feature column(s) tenure", out=out)
    assert not out.exists()


def test_non_numeric_feature_column(tmp_path: Path, binary_model_paths) -> None:
    table = churn_table(100)
    table = table.set_column(table.schema.get_field_index("age"), "age", pa.array(["x"] * 100))
    path = tmp_path / "strings.parquet"
    pq.write_table(table, path)
    out = tmp_path / "out"
    assert_refused(
        run([path], out, binary_model_paths), EXIT_INPUT, path, "feature column 'age' has type string", out=out
    )


def test_output_column_clash(tmp_path: Path, binary_model_paths) -> None:
    table = churn_table(100).append_column("prediction", pa.array(np.zeros(100)))
    path = tmp_path / "clash.parquet"
    pq.write_table(table, path)
    out = tmp_path / "out"
    assert_refused(run([path], out, binary_model_paths), EXIT_INPUT, path, "prediction", "--keep", out=out)
    result = run([path], out, binary_model_paths, "--keep", "customer_id")
    assert result.exit_code == 0, result.stderr


def test_passthrough_type_differs_between_files(tmp_path: Path, binary_model_paths) -> None:
    paths = write_inputs(tmp_path / "in", files=1, rows=100)
    table = churn_table(100)
    table = table.set_column(table.schema.get_field_index("customer_id"), "customer_id", pa.array(["a"] * 100))
    odd = tmp_path / "in" / "day-09.parquet"
    pq.write_table(table, odd)
    assert_refused(run([tmp_path / "in"], tmp_path / "out", binary_model_paths), EXIT_INPUT, odd, "customer_id")
    del paths


def test_model_missing_unloadable_or_unfitted(tmp_path: Path, binary_model_paths, inputs) -> None:
    from sklearn.linear_model import LogisticRegression

    out = tmp_path / "out"
    missing = {"model": tmp_path / "nope.joblib", "scaler": binary_model_paths["scaler"]}
    assert_refused(run(inputs, out, missing), EXIT_MODEL, "model artifact not found", missing["model"], out=out)
    garbage = tmp_path / "garbage.joblib"
    garbage.write_bytes(b"\x80\x04not a pickle")
    assert_refused(
        run(inputs, out, {**binary_model_paths, "model": garbage}), EXIT_MODEL, garbage, "could not be loaded"
    )
    unfitted = tmp_path / "unfitted.joblib"
    joblib.dump(LogisticRegression(), unfitted)
    assert_refused(run(inputs, out, {**binary_model_paths, "model": unfitted}), EXIT_MODEL, unfitted, "not fitted")
    no_scaler = {**binary_model_paths, "scaler": tmp_path / "noscaler.joblib"}
    assert_refused(run(inputs, out, no_scaler), EXIT_MODEL, "scaler artifact not found", no_scaler["scaler"])
    not_estimator = tmp_path / "dict.joblib"
    joblib.dump({"a": 1}, not_estimator)
    assert_refused(run(inputs, out, {**binary_model_paths, "scaler": not_estimator}), EXIT_MODEL, not_estimator)
    assert not out.exists()


def test_feature_count_mismatch(tmp_path: Path, inputs) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    scaler = StandardScaler().fit(churn_table(200).to_pandas()[["age", "tenure", "monthly_charges", "total_charges"]])
    model = LogisticRegression().fit(rng.normal(size=(50, 3)), rng.integers(0, 2, 50))
    paths = {"model": tmp_path / "m.joblib", "scaler": tmp_path / "s.joblib"}
    joblib.dump(model, paths["model"])
    joblib.dump(scaler, paths["scaler"])
    result = run(inputs, tmp_path / "out", paths)
    assert_refused(result, EXIT_MODEL, "feature-count mismatch", "produces 4 features", "expects 3")
    assert not (tmp_path / "out").exists()


def test_output_exists_needs_overwrite(tmp_path: Path, binary_model_paths, inputs) -> None:
    out = tmp_path / "out"
    assert run(inputs, out, binary_model_paths).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert_refused(run(inputs, out, binary_model_paths), EXIT_USAGE, "already exists", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # untouched
    (out / "part-00077-00000.parquet").write_bytes(b"stale")  # left by some older run
    result = run(inputs[:1], out, binary_model_paths, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000-00000.parquet"]
    assert_exact(read_output(out), pq.read_table(inputs[0]), binary_model_paths)


@pytest.mark.parametrize("where", ["same", "inside", "parent", "glob"])
def test_output_in_input_is_always_refused(tmp_path: Path, binary_model_paths, inputs, where: str) -> None:
    folder = tmp_path / "in"
    spec, out = {
        "same": (folder, folder),
        "inside": (folder, folder / "scores"),
        "parent": (inputs[0], tmp_path),
        "glob": (folder / "*.parquet", folder / "scores"),
    }[where]
    before = sorted(os.listdir(folder))
    assert_refused(run([spec], out, binary_model_paths, "--overwrite"), EXIT_USAGE, "overlaps input")
    assert sorted(os.listdir(folder)) == before
    assert not (folder / "scores").exists()


def _with_invalid_rows(path: Path) -> pa.Table:
    table = churn_table(1_027, seed=11)  # 1,024 valid rows
    age = table.column("age").to_numpy().copy()
    age[[10, 500]] = [np.nan, np.inf]
    tenure = pa.array(table.column("tenure").to_pylist()[:700] + [None] + table.column("tenure").to_pylist()[701:])
    table = table.set_column(1, "age", pa.array(age)).set_column(2, "tenure", tenure)
    pq.write_table(table, path, row_group_size=300)
    return table


def test_invalid_rows_fail_by_default(tmp_path: Path, binary_model_paths) -> None:
    path = tmp_path / "bad.parquet"
    _with_invalid_rows(path)
    out = tmp_path / "out"
    assert_refused(run([path], out, binary_model_paths), EXIT_INPUT, path, "row 10", "age is NaN", out=out)
    assert not list(out.glob("part-*"))


def test_invalid_rows_skip_and_quarantine(tmp_path: Path, binary_model_paths) -> None:
    path = tmp_path / "bad.parquet"
    table = _with_invalid_rows(path)
    valid = pa.array(np.isin(np.arange(1_027), [10, 500, 700], invert=True))
    out = tmp_path / "skip"
    result = run([path], out, binary_model_paths, "--on-invalid", "skip", "--batch-size", "256")
    assert result.exit_code == 0, result.stderr
    assert_exact(read_output(out), table.filter(valid), binary_model_paths)
    assert read_manifest(out)["rows"] == {"in": 1027, "out": 1024, "invalid": 3}
    assert not rejected_file(out).parent.exists()

    out = tmp_path / "quarantine"
    result = run([path], out, binary_model_paths, "--on-invalid", "quarantine")
    assert result.exit_code == 0, result.stderr
    assert_exact(read_output(out), table.filter(valid), binary_model_paths)
    rejected = pq.read_table(rejected_file(out))
    assert rejected.column("customer_id").to_pylist() == [11, 501, 701]
    assert rejected.column("reject_reason").to_pylist() == ["age is NaN", "age is +inf", "tenure is null"]

    # The input fixed and scored again: the earlier rejected rows go with the earlier output.
    pq.write_table(table.filter(valid), path, row_group_size=300)
    result = run([path], out, binary_model_paths, "--on-invalid", "quarantine", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert not rejected_file(out).exists() and read_manifest(out)["rejected_parts"] == []
    assert_exact(read_output(out), table.filter(valid), binary_model_paths)


def test_too_many_invalid_rows(tmp_path: Path, binary_model_paths) -> None:
    path = tmp_path / "bad.parquet"
    _with_invalid_rows(path)
    out = tmp_path / "out"
    result = run([path], out, binary_model_paths, "--on-invalid", "skip", "--max-invalid-fraction", "0.002")
    assert_refused(result, EXIT_INPUT, "--max-invalid-fraction", path, out=out)


def test_config_errors(tmp_path: Path, binary_model_paths, inputs) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("input: x.parquet\noutptu: y\n")
    assert_refused(cli("run", "--config", config), EXIT_USAGE, "unknown key(s) outptu")
    config.write_text("input: [x.parquet\n")
    assert_refused(cli("run", "--config", config), EXIT_USAGE, "not valid YAML")
    assert_refused(cli("run", "--config", tmp_path / "absent.yaml"), EXIT_USAGE, "config file not found")
    config.write_text("batch_size: -3\n")
    assert_refused(cli("run", "--config", config), EXIT_USAGE, "batch_size")
    assert_refused(cli("run", "--input", inputs[0], "--model", binary_model_paths["model"]), EXIT_USAGE, "output")
    assert cli("run", "--on-invalid", "maybe").exit_code == EXIT_USAGE


def test_a_part_that_cannot_be_flushed_is_a_storage_error(tmp_path: Path) -> None:
    from fsspec.implementations.local import LocalFileSystem

    from batchscore.errors import StorageError
    from batchscore.io.storage import make_durable

    missing = str(tmp_path / "part-00000-00000.parquet")
    with pytest.raises(StorageError, match="cannot flush .*part-00000-00000.parquet"):
        make_durable(LocalFileSystem(), [missing])
