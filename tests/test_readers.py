"""The output as users read it: every common reader gets exactly the scored rows.

The output of a quarantine run (some rows rejected) for two dates, ``scores/dt=2026-11-24/`` and
``scores/dt=2026-11-25/``, is read the way users read it: the folder, ``*.parquet``,
``**/*.parquet``, and the dated partitions together with Hive partitioning, by pandas, pyarrow,
Polars, DuckDB and Spark (where Java is installed). None may fail on the job's own files, and
none may return a rejected row.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from batchscore.io.layout import state_folder
from batchscore.sample import churn_table
from helpers import assert_exact, cli, read_manifest, read_output, read_rejected, state

DATES = ("2026-11-24", "2026-11-25")
#: Per date: rows per input file and the rows made invalid in each; what is left is a multiple of 16.
FILES = ((627, (10, 300)), (608, (5,)))  # 1,235 rows, 1,235 - 3 = 1,232 = 77 x 16 valid
COMPARED = ["customer_id", "prediction", "probability"]


def _write_day(folder: Path, first_id: int, seed: int) -> pa.Table:
    """Two input files whose listed rows have a NaN feature; returns the valid rows, in order."""
    folder.mkdir(parents=True)
    valid = []
    for i, (rows, bad) in enumerate(FILES):
        table = churn_table(rows, seed=seed + i, first_id=first_id + i * 1_000)
        age = table.column("age").to_numpy().copy()
        age[list(bad)] = np.nan
        table = table.set_column(table.schema.get_field_index("age"), "age", pa.array(age))
        pq.write_table(table, folder / f"events-{i}.parquet", row_group_size=200)
        valid.append(table.filter(pa.array(np.isin(np.arange(rows), bad, invert=True))))
    return pa.concat_tables(valid)


@pytest.fixture(scope="module")
def scores(tmp_path_factory: pytest.TempPathFactory, binary_model_paths: dict[str, Path]) -> dict[str, Any]:
    """Two dated quarantine runs into ``scores/dt=.../``; the expected rows of each, checked exactly."""
    root = tmp_path_factory.mktemp("readers")
    expected = {}
    for n, day in enumerate(DATES):
        valid = _write_day(root / "events" / f"dt={day}", first_id=1 + n * 10_000, seed=20 + n)
        output = root / "scores" / f"dt={day}"
        result = cli(
            "run",
            "--input",
            root / "events" / f"dt={day}",
            "--output",
            output,
            "--model",
            binary_model_paths["model"],
            "--scaler",
            binary_model_paths["scaler"],
            "--on-invalid",
            "quarantine",
            "--model-version",
            "v1",
        )
        assert result.exit_code == 0, result.stderr
        committed = read_output(output)
        assert_exact(committed, valid, binary_model_paths)
        expected[day] = committed
    return {"root": root, "scores": root / "scores", "expected": expected}


def _frame(table: Any) -> pd.DataFrame:
    """Any reader's result as a pandas frame of the compared columns, in id order."""
    if hasattr(table, "to_pandas"):
        table = table.to_pandas()
    frame = pd.DataFrame(table)
    return frame[[c for c in COMPARED + ["dt"] if c in frame.columns]].sort_values("customer_id").reset_index(drop=True)


def _expected(data: dict[str, Any], days: tuple[str, ...], dt: bool) -> pd.DataFrame:
    frames = []
    for day in days:
        frame = data["expected"][day].select(COMPARED).to_pandas()
        frames.append(frame.assign(dt=day) if dt else frame)
    return pd.concat(frames).sort_values("customer_id").reset_index(drop=True)


def assert_scored_rows(
    got: Any, data: dict[str, Any], days: tuple[str, ...] = DATES[:1], dt: bool | None = None
) -> None:
    """Exactly the scored rows of ``days``: the manifest's count, the expected predictions, no rejected row;
    with the Hive partition column ``dt`` when ``dt`` is true, without it when false (either way when None:
    some readers find ``dt=`` in a single folder's path too)."""
    frame = _frame(got)
    manifests = [read_manifest(data["scores"] / f"dt={day}") for day in days]
    assert len(frame) == sum(m["rows"]["out"] for m in manifests)
    rejected = set().union(
        *(read_rejected(data["scores"] / f"dt={day}").column("customer_id").to_pylist() for day in days)
    )
    assert rejected and not rejected & set(frame["customer_id"])
    assert dt is None or dt == ("dt" in frame.columns)
    want = _expected(data, days, "dt" in frame.columns)
    if "dt" in frame.columns:  # a Hive partition column: a string, a date or a timestamp, as each reader likes
        frame["dt"] = pd.to_datetime(frame["dt"].astype(str)).dt.strftime("%Y-%m-%d")
    pd.testing.assert_frame_equal(frame, want, check_dtype=False, check_exact=True)


def test_the_output_folder_holds_only_parts_and_an_empty_success(scores: dict[str, Any]) -> None:
    output = scores["scores"] / f"dt={DATES[0]}"
    names = sorted(os.listdir(output))
    assert names == ["_SUCCESS", "part-00000-00000.parquet", "part-00001-00000.parquet"]
    assert (output / "_SUCCESS").stat().st_size == 0
    assert sorted(os.listdir(scores["scores"])) == [state(output).parent.name, *(f"dt={d}" for d in DATES)]
    manifest = read_manifest(output)
    assert manifest["rows"] == {"in": 1_235, "out": 1_232, "invalid": 3}
    assert manifest["state"] == str(state(output))
    rejected = sorted(os.listdir(state(output) / "rejected"))
    assert (
        rejected
        == manifest["rejected_parts"]
        == ["part-00000-00000.parquet.rejected", "part-00001-00000.parquet.rejected"]
    )
    assert read_rejected(output).column("reject_reason").to_pylist() == ["age is NaN"] * 3
    assert len(pd.read_parquet(state(output) / "rejected")) == 3  # as docs/output.md reads them


def test_pandas_and_pyarrow(scores: dict[str, Any]) -> None:
    output, root = scores["scores"] / f"dt={DATES[0]}", scores["scores"]
    assert_scored_rows(pd.read_parquet(output), scores)
    assert_scored_rows(pq.read_table(output), scores)
    assert_scored_rows(ds.dataset(output, format="parquet").to_table(), scores)
    assert_scored_rows(pd.read_parquet(root), scores, DATES, dt=True)  # Hive partitions: adds dt
    assert_scored_rows(ds.dataset(root, format="parquet", partitioning="hive").to_table(), scores, DATES, dt=True)


POLARS_READS: dict[str, Callable[[Any, Path], Any]] = {
    "read_parquet(folder)": lambda pl, out: pl.read_parquet(out),
    "scan_parquet(folder)": lambda pl, out: pl.scan_parquet(out).collect(),
    "read_parquet(folder/*.parquet)": lambda pl, out: pl.read_parquet(f"{out}/*.parquet"),
    "read_parquet(folder/**/*.parquet)": lambda pl, out: pl.read_parquet(f"{out}/**/*.parquet"),
    "scan_parquet(folder/**/*.parquet)": lambda pl, out: pl.scan_parquet(f"{out}/**/*.parquet").collect(),
}


@pytest.mark.parametrize("read", POLARS_READS.values(), ids=POLARS_READS.keys())
def test_polars_one_date(scores: dict[str, Any], read: Callable[[Any, Path], Any]) -> None:
    import polars as pl

    assert_scored_rows(read(pl, scores["scores"] / f"dt={DATES[0]}"), scores)


def test_polars_dated_partitions(scores: dict[str, Any]) -> None:
    import polars as pl

    pattern = f"{scores['scores']}/**/*.parquet"
    assert_scored_rows(pl.scan_parquet(pattern, hive_partitioning=True).collect(), scores, DATES, dt=True)
    assert_scored_rows(pl.read_parquet(pattern, hive_partitioning=False), scores, DATES, dt=False)


DUCKDB_READS = {
    "folder": "{out}",
    "*.parquet": "{out}/*.parquet",
    "**/*.parquet": "{out}/**/*.parquet",
}


@pytest.mark.parametrize("pattern", DUCKDB_READS.values(), ids=DUCKDB_READS.keys())
def test_duckdb_one_date(scores: dict[str, Any], pattern: str) -> None:
    import duckdb

    path = pattern.format(out=scores["scores"] / f"dt={DATES[0]}")
    with duckdb.connect() as con:
        assert_scored_rows(con.execute("select * from read_parquet(?)", [path]).df(), scores)


def test_duckdb_dated_partitions(scores: dict[str, Any]) -> None:
    import duckdb

    pattern = f"{scores['scores']}/**/*.parquet"
    with duckdb.connect() as con:
        got = con.execute("select * from read_parquet(?, hive_partitioning = true)", [pattern]).df()
        assert_scored_rows(got, scores, DATES, dt=True)
        # The rejected rows are Parquet too, for whoever asks for them by name.
        rejected = str(state(scores["scores"] / "dt=*") / "rejected" / "*.parquet.rejected")
        count = con.execute("select count(*) from read_parquet(?)", [rejected]).fetchone()[0]
        assert count == sum(read_manifest(scores["scores"] / f"dt={d}")["rows"]["invalid"] for d in DATES)


@pytest.fixture(scope="module")
def spark() -> Any:
    """One local Spark session for the module; skipped, saying why, where no Java runtime is installed."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("no Java runtime (java not on PATH, JAVA_HOME unset): Spark cannot start here")
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[1]")
        .appName("batchscore-readers")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.mark.slow
def test_spark(spark: Any, scores: dict[str, Any]) -> None:
    output, root = scores["scores"] / f"dt={DATES[0]}", scores["scores"]
    assert_scored_rows([r.asDict() for r in spark.read.parquet(str(output)).select(*COMPARED).collect()], scores)
    rows = spark.read.parquet(str(root)).select(*COMPARED, "dt").collect()
    assert_scored_rows([r.asDict() for r in rows], scores, DATES, dt=True)


def test_polars_reads_the_output_on_s3(scores: dict[str, Any], s3, binary_model_paths) -> None:
    """The same on S3 (moto on 127.0.0.1). DuckDB is left out here: its S3 support is an extension
    it downloads on first use."""
    import polars as pl

    fs, bucket, options = s3
    day = DATES[0]
    output = f"s3://{bucket}/scores/dt={day}"
    result = cli(
        "run",
        "--input",
        scores["root"] / "events" / f"dt={day}",
        "--output",
        output,
        "--model",
        binary_model_paths["model"],
        "--scaler",
        binary_model_paths["scaler"],
        "--on-invalid",
        "quarantine",
        "--model-version",
        "v1",
        "--storage-option",
        f"endpoint_url={options['endpoint_url']}",
    )
    assert result.exit_code == 0, result.stderr
    manifest = read_manifest(output, fs)
    assert manifest["rows"]["invalid"] == 3 and manifest["state"] == state_folder(output)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(output)) == [
        "_SUCCESS",
        "part-00000-00000.parquet",
        "part-00001-00000.parquet",
    ]
    polars_options = {
        "aws_endpoint_url": options["endpoint_url"],
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "aws_region": "us-east-1",
        "aws_allow_http": "true",
    }
    for path in (output + "/", f"{output}/*.parquet"):
        assert_scored_rows(pl.read_parquet(path, storage_options=polars_options), scores)
    pattern = f"s3://{bucket}/scores/**/*.parquet"
    assert_scored_rows(
        pl.scan_parquet(pattern, hive_partitioning=True, storage_options=polars_options).collect(), scores, dt=True
    )
