"""A row group larger than a part is scored and written in slices: parts hold at most the
configured rows whatever the input's row groups, in input order, exactly as scikit-learn scores.

Memory itself is measured by ``bench/big_row_group.py`` (no timed or memory assertions here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.io.sink import PART_PATTERN, REJECTED_PATTERN
from batchscore.job import planning
from batchscore.job.planning import Plan, make_plan
from batchscore.sample import churn_table
from helpers import assert_exact, binary_model, cli, plan_file, read_inputs, read_output, read_rejected

ROWS_PER_PART = 1_000


def _float_tenure(table: pa.Table) -> pa.Table:
    """The table with ``tenure`` as float64, so that it can hold NaN (every file shares one schema)."""
    return table.set_column(table.schema.get_field_index("tenure"), "tenure", table.column("tenure").cast(pa.float64()))


def _inputs(folder: Path, float_tenure: bool = False) -> list[Path]:
    """One file that is a single row group of 5,008 rows; one with row groups 700, 2,900, 300, 452."""
    folder.mkdir(parents=True, exist_ok=True)
    single, mixed = folder / "a-single.parquet", folder / "b-mixed.parquet"
    convert = _float_tenure if float_tenure else (lambda table: table)
    pq.write_table(convert(churn_table(5_008, seed=21, first_id=1)), single, row_group_size=5_008)
    table = convert(churn_table(4_352, seed=22, first_id=10_000))
    with pq.ParquetWriter(mixed, table.schema) as writer:
        start = 0
        for size in (700, 2_900, 300, 452):
            writer.write_table(table.slice(start, size), row_group_size=size)
            start += size
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in (single, mixed)] == [1, 4]
    return [single, mixed]


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planning, "DEFAULT_ROWS_PER_PART", ROWS_PER_PART)


def _parts(output: Path) -> list[tuple[str, int]]:
    names = sorted(p.name for p in output.iterdir() if p.name.startswith("part-"))
    return [(n, pq.ParquetFile(output / n).metadata.num_rows) for n in names]


def test_a_big_row_group_is_written_as_bounded_slices(tmp_path: Path, small_parts: None) -> None:
    inputs = _inputs(tmp_path / "in")
    model = binary_model(tmp_path / "model")
    out = tmp_path / "out"
    args = ["run", "--output", out, "--model", model["model"], "--scaler", model["scaler"], "--batch-size", "384"]
    for path in inputs:
        args += ["--input", path]
    result = cli(*args, "--workers", "2")
    assert result.exit_code == 0, result.output + result.stderr
    parts = _parts(out)
    assert [n for n, _ in parts] == [
        "part-00000-00000-00000.parquet",
        "part-00000-00000-00001.parquet",
        "part-00000-00000-00002.parquet",
        "part-00000-00000-00003.parquet",
        "part-00000-00000-00004.parquet",
        "part-00000-00000-00005.parquet",
        "part-00001-00000.parquet",  # 700 rows alone: the next row group is sliced
        "part-00001-00001-00000.parquet",
        "part-00001-00001-00001.parquet",
        "part-00001-00001-00002.parquet",
        "part-00001-00002.parquet",  # 300 + 452 rows together
    ]
    assert all(PART_PATTERN.match(n) for n, _ in parts)
    assert max(rows for _, rows in parts) <= ROWS_PER_PART
    assert [rows for n, rows in parts if n.startswith("part-00000-")] == [834, 835, 835, 834, 835, 835]
    assert_exact(read_output(out), read_inputs(inputs), model)


def test_slices_survive_plans_shards_and_quarantine(tmp_path: Path, small_parts: None) -> None:
    """A plan file records the slices; shards score them anywhere; invalid rows inside a slice are
    named by their row in the file and quarantined beside the slice's part."""
    inputs = _inputs(tmp_path / "in", float_tenure=True)
    bad = tmp_path / "in" / "a-single.parquet"
    table = pq.read_table(bad)
    tenure = table.column("tenure").to_numpy().astype(np.float64)
    tenure[[1, 2_504, 5_007]] = np.nan  # in the first, third and last slice
    pq.write_table(
        table.set_column(table.schema.get_field_index("tenure"), "tenure", pa.array(tenure)), bad, row_group_size=5_008
    )
    model = binary_model(tmp_path / "model")
    out = tmp_path / "out"
    sources = [arg for path in inputs for arg in ("--input", path)] + ["--keep", "customer_id"]
    common = [
        *sources,
        "--output",
        out,
        "--model",
        model["model"],
        "--scaler",
        model["scaler"],
        "--batch-size",
        "500",
        "--on-invalid",
        "quarantine",
    ]
    planned = cli("plan", *common, "--shards", "2", "--out", plan_file(out))
    assert planned.exit_code == 0, planned.output + planned.stderr
    plan = Plan.from_dict(json.loads(plan_file(out).read_text()))
    units = [u for s in plan.shards for u in s.units]
    assert [u.slice for u in units][:6] == [0, 1, 2, 3, 4, 5] and units[2].start == 1_669
    for shard in (1, 0):
        ran = cli("run", *common, "--plan", plan_file(out), "--shard", str(shard))
        assert ran.exit_code == 0, ran.output + ran.stderr
    committed = cli("commit", *common, "--plan", plan_file(out))
    assert committed.exit_code == 0, committed.output + committed.stderr
    rejected = read_rejected(out)
    assert rejected.column("customer_id").to_pylist() == [2, 2_505, 5_008]
    names = sorted(p.name for p in (out.parent / "_batchscore" / out.name / "rejected").iterdir())
    assert names == [
        "part-00000-00000-00000.parquet.rejected",
        "part-00000-00000-00003.parquet.rejected",
        "part-00000-00000-00005.parquet.rejected",
    ]
    assert all(REJECTED_PATTERN.match(n) for n in names)
    output = read_output(out)
    assert output.num_rows == 5_008 + 4_352 - 3
    ids = [i for p in inputs for i in pq.read_table(p, columns=["customer_id"]).column(0).to_pylist()]
    assert output.column("customer_id").to_pylist() == [i for i in ids if i not in (2, 2_505, 5_008)]

    failed = cli(
        "run",
        *sources,
        "--output",
        tmp_path / "failed",
        "--model",
        model["model"],
        "--scaler",
        model["scaler"],
        "--batch-size",
        "500",
    )
    # Workers score slices at once: the job stops at whichever invalid row a worker meets first.
    assert failed.exit_code == 3 and any(f"{bad}: row {row} " in failed.stderr for row in (1, 2_504, 5_007))


def test_plans_slice_only_row_groups_larger_than_a_part() -> None:
    from batchscore.io.source import InputFile

    schema = pa.schema([("x", pa.float64())])
    files = [InputFile("/data/0.parquet", 10, (3_001, 10, 20, 2_000), schema, {"size": 10})]
    units = make_plan(files, "/out", [], rows_per_part=1_000).shards[0].units
    assert [(u.row_groups, u.slice, u.start, u.rows) for u in units] == [
        ((0,), 0, 0, 750),
        ((0,), 1, 750, 750),
        ((0,), 2, 1_500, 750),
        ((0,), 3, 2_250, 751),
        ((1, 2), None, 0, 30),
        ((3,), 0, 0, 1_000),
        ((3,), 1, 1_000, 1_000),
    ]
    again = Plan.from_dict(json.loads(json.dumps(make_plan(files, "/out", [], rows_per_part=1_000).to_dict())))
    assert again.shards[0].units == units
