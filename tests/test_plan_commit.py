"""plan -> run --shard -> commit: the three steps a scheduler runs, and their safety checks."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.errors import EXIT_INPUT, EXIT_MODEL, EXIT_USAGE
from batchscore.io.source import InputFile
from batchscore.job.planning import Plan, make_plan
from helpers import (
    assert_exact,
    cli,
    plan_file,
    read_inputs,
    read_manifest,
    read_output,
    receipt_file,
    rejected_file,
    write_inputs,
)


def job_args(inputs: list[Path], out: Path, model: dict[str, Path]) -> list[str]:
    args = ["--output", out, "--model", model["model"], "--scaler", model["scaler"]]
    for path in inputs:
        args += ["--input", path]
    return [str(a) for a in args]


def test_sharded_job_equals_single_run(tmp_path: Path, binary_model_paths) -> None:
    inputs = write_inputs(tmp_path / "in", files=5, rows=1_600, row_group_size=400)
    out = tmp_path / "out"
    common = job_args(inputs, out, binary_model_paths)
    result = cli("plan", *common, "--shards", "3", "--out", plan_file(out))
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["num_shards"] == 3 and plan["total_rows"] == 8_000
    assert [s["rows"] for s in plan["shards"]] == [2_800, 2_400, 2_800]
    for shard in range(3):
        result = cli("run", *common, "--plan", plan_file(out), "--shard", str(shard))
        assert result.exit_code == 0, result.stderr
        assert not (out / "_SUCCESS").exists()
    result = cli("commit", *common, "--plan", plan_file(out))
    assert result.exit_code == 0, result.stderr
    assert (out / "_SUCCESS").exists()
    single = tmp_path / "single"
    assert cli("run", *job_args(inputs, single, binary_model_paths)).exit_code == 0
    sharded_table = read_output(out)
    assert sharded_table.drop(["predicted_at"]).equals(read_output(single).drop(["predicted_at"]))
    assert_exact(sharded_table, read_inputs(inputs), binary_model_paths)
    assert len(set(sharded_table.column("predicted_at").to_pylist())) == 1  # one timestamp for the job
    assert cli("commit", *common, "--plan", plan_file(out)).exit_code == 0  # idempotent


def test_shard_i_of_n_without_plan_file(tmp_path: Path, binary_model_paths) -> None:
    inputs = write_inputs(tmp_path / "in", files=2, rows=800, row_group_size=200)
    out = tmp_path / "out"
    common = job_args(inputs, out, binary_model_paths)
    for shard in range(2):
        assert cli("run", *common, "--shard", f"{shard}/2").exit_code == 0
    result = cli("commit", *common, "--shards", "2")
    assert result.exit_code == 0, result.stderr
    assert_exact(read_output(out), read_inputs(inputs), binary_model_paths)


def test_retried_shard_overwrites_its_parts_and_commit_drops_strays(tmp_path: Path, binary_model_paths) -> None:
    inputs = write_inputs(tmp_path / "in", files=3, rows=800, row_group_size=200)
    out = tmp_path / "out"
    common = job_args(inputs, out, binary_model_paths)
    assert cli("plan", *common, "--shards", "2", "--out", plan_file(out)).exit_code == 0
    for shard in (0, 1, 1):  # shard 1 runs twice, as after a retry
        assert cli("run", *common, "--plan", plan_file(out), "--shard", str(shard)).exit_code == 0
    (out / "part-00099-00000.parquet").write_bytes(b"left by an earlier failed attempt")
    (out / ".part-00000-00000.parquet.tmp-0123abcd").write_bytes(b"temp")
    assert cli("commit", *common, "--plan", plan_file(out)).exit_code == 0
    assert sorted(p.name for p in out.iterdir() if "part-" in p.name) == [
        "part-00000-00000.parquet",
        "part-00001-00000.parquet",
        "part-00001-00002.parquet",
        "part-00002-00000.parquet",
    ]
    table = read_output(out)
    assert table.num_rows == 2_400 and len(set(table.column("customer_id").to_pylist())) == 2_400
    manifest = read_manifest(out)
    assert manifest["removed_stray_files"] == 2


def test_commit_refuses_missing_or_foreign_receipts(tmp_path: Path, binary_model_paths) -> None:
    inputs = write_inputs(tmp_path / "in", files=3, rows=800, row_group_size=200)
    out = tmp_path / "out"
    common = job_args(inputs, out, binary_model_paths)
    assert cli("plan", *common, "--shards", "3", "--out", plan_file(out)).exit_code == 0
    for shard in (0, 2):
        assert cli("run", *common, "--plan", plan_file(out), "--shard", str(shard)).exit_code == 0
    result = cli("commit", *common, "--plan", plan_file(out))
    assert result.exit_code == EXIT_INPUT
    assert "missing receipts for shard(s) 1" in result.stderr
    assert not (out / "_SUCCESS").exists()

    receipt = receipt_file(out, 2)
    data = json.loads(receipt.read_text())
    receipt.write_text(json.dumps({**data, "plan_id": "0000000000000000"}))
    assert cli("run", *common, "--plan", plan_file(out), "--shard", "1").exit_code == 0
    result = cli("commit", *common, "--plan", plan_file(out))
    assert result.exit_code == EXIT_INPUT
    assert "receipts from another plan for shard(s) 2" in result.stderr
    assert not (out / "_SUCCESS").exists()

    receipt.write_text(json.dumps({**data, "rows_in": data["rows_in"] - 1}))
    result = cli("commit", *common, "--plan", plan_file(out))
    assert result.exit_code == EXIT_INPUT and "inconsistent shard(s): 2" in result.stderr
    assert not (out / "_SUCCESS").exists()

    receipt.write_text(json.dumps(data))
    (out / data["parts"][0]["name"]).unlink()  # a receipt whose part has gone
    result = cli("commit", *common, "--plan", plan_file(out))
    assert result.exit_code == EXIT_INPUT
    assert f"parts listed in receipts are missing: {data['parts'][0]['name']}" in result.stderr
    assert not (out / "_SUCCESS").exists()


def test_shard_refuses_changed_input_or_model(tmp_path: Path, binary_model_paths) -> None:
    inputs = write_inputs(tmp_path / "in", files=2, rows=400, row_group_size=200)
    out = tmp_path / "out"
    common = job_args(inputs, out, binary_model_paths)
    assert cli("plan", *common, "--shards", "2", "--out", plan_file(out)).exit_code == 0
    pq.write_table(pq.read_table(inputs[0]).slice(0, 100), inputs[0])
    result = cli("run", *common, "--plan", plan_file(out), "--shard", "0")
    assert result.exit_code == EXIT_INPUT and f"{inputs[0]} changed since the plan" in result.stderr
    other = dict(binary_model_paths, model=tmp_path / "other.joblib")
    other["model"].write_bytes(binary_model_paths["model"].read_bytes() + b"")
    import joblib

    joblib.dump(joblib.load(binary_model_paths["model"]), other["model"], compress=3)
    result = cli("run", *job_args(inputs, out, other), "--plan", plan_file(out), "--shard", "1")
    assert result.exit_code == EXIT_MODEL and f"model artifact {other['model']} changed since the plan" in result.stderr


def test_plan_errors(tmp_path: Path, binary_model_paths) -> None:
    inputs = write_inputs(tmp_path / "in", files=1, rows=400)
    out = tmp_path / "out"
    common = job_args(inputs, out, binary_model_paths)
    assert cli("plan", *common, "--shards", "2", "--rows-per-shard", "5").exit_code == EXIT_USAGE
    assert cli("plan", *common, "--shards", "0").exit_code == EXIT_USAGE
    assert cli("plan", *common, "--out", plan_file(out)).exit_code == 0
    result = cli("run", *common, "--plan", plan_file(out), "--shard", "4")
    assert result.exit_code == EXIT_USAGE and "shard 4 does not exist" in result.stderr
    edited = json.loads((plan_file(out)).read_text())
    edited["files"][0][2][0] += 1  # the first row group's row count
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    result = cli("run", *common, "--plan", tmp_path / "edited.json", "--shard", "0")
    assert result.exit_code == EXIT_INPUT and "plan inconsistent" in result.stderr
    result = cli(
        "run", *job_args(inputs, tmp_path / "elsewhere", binary_model_paths), "--plan", plan_file(out), "--shard", "0"
    )
    assert result.exit_code == EXIT_USAGE and "is for output" in result.stderr


def _fake_files(sizes: list[list[int]]) -> list[InputFile]:
    schema = pa.schema([("a", pa.int64())])
    return [InputFile(f"f{i}.parquet", 1, tuple(groups), schema) for i, groups in enumerate(sizes)]


def test_plan_balances_whole_row_groups_deterministically() -> None:
    files = _fake_files([[100] * 7, [50, 50], [], [300], [0, 10]])
    plans = [make_plan(files, "out", [], shards=4) for _ in range(2)]
    assert plans[0].to_dict() == plans[1].to_dict()
    covered = [(u.file, rg) for s in plans[0].shards for u in s.units for rg in u.row_groups]
    expected = [(i, rg) for i, f in enumerate(files) for rg in range(len(f.row_groups))]
    assert covered == expected  # every row group exactly once, in order
    assert [s.rows for s in plans[0].shards] == [300, 300, 200, 310]
    assert make_plan(files, "out", [], rows_per_shard=400).num_shards == 3
    assert make_plan(files, "out", [], shards=50).num_shards == 50  # more shards than row groups: some empty


def test_parts_are_equal_slices_of_each_file() -> None:
    files = _fake_files([[100] * 77, [100] * 3, [250, 10, 10]])
    units = make_plan(files, "out", [], rows_per_part=400).shards[0].units
    first = [u.rows for u in units if u.file == 0]
    assert len(first) == 20 and set(first) == {300, 400}  # not 19 x 400 and a 100-row remainder
    assert [u.rows for u in units if u.file == 1] == [300]
    assert [u.row_groups for u in units if u.file == 2] == [(0, 1, 2)]
    assert [(u.file, rg) for u in units for rg in u.row_groups] == [
        (i, rg) for i, f in enumerate(files) for rg in range(len(f.row_groups))
    ]


@pytest.mark.slow
def test_plan_over_a_thousand_files(tmp_path: Path, binary_model_paths) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    table = read_inputs(write_inputs(tmp_path / "seed", files=1, rows=64, row_group_size=16))
    for i in range(1_000):
        pq.write_table(table.slice(0, 16 + 16 * (i % 4)), folder / f"f{i:04d}.parquet", row_group_size=16)
    out = tmp_path / "out"
    result = cli("plan", "--input", folder, *job_args([], out, binary_model_paths), "--shards", "16")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert len(plan["files"]) == 1_000 and plan["file_fields"][:3] == ["uri", "size", "row_groups"]
    assert all(len(record) == len(plan["file_fields"]) for record in plan["files"])  # one compact record a file
    units = Plan.from_dict({k: v for k, v in plan.items() if k not in ("plan_sha256", "pin")}).shards
    covered = [(u.file, rg) for s in units for u in s.units for rg in u.row_groups]
    expected = [(i, rg) for i, f in enumerate(plan["files"]) for rg in range(len(f[2]))]
    assert covered == expected
    rows = [s["rows"] for s in plan["shards"]]
    assert sum(rows) == plan["total_rows"] == sum(16 + 16 * (i % 4) for i in range(1_000))
    assert max(rows) - min(rows) <= 16


def _footers(row_groups: list[int]) -> list[InputFile]:
    schema = pa.schema([("x", pa.float64())])
    return [InputFile(f"/data/{i}.parquet", 10, (1,) * n, schema, {"size": 10}) for i, n in enumerate(row_groups)]


def test_part_names_grow_past_five_digits_and_keep_input_order() -> None:
    """100,001 row groups cut one per part: every name of the output gets six digits, so that
    name order is still input order, and every check that matches part names accepts them."""
    import hashlib

    from batchscore.io.sink import PART_PATTERN

    plan = make_plan(_footers([3, 100_001]), "/out", [], shards=2, rows_per_part=1)
    units = [u for s in plan.shards for u in s.units]
    names = [u.part_name for u in units]
    assert len(names) == 100_004 and len(set(names)) == len(names)
    assert names[0] == "part-000000-000000.parquet" and names[-1] == "part-000001-100000.parquet"
    assert sorted(names) == names
    assert all(PART_PATTERN.match(n) for n in names)
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert [u.part_name for s in again.shards for u in s.units] == names and again.plan_id == plan.plan_id

    small = make_plan(_footers([3, 2]), "/out", [], rows_per_part=1)
    assert [u.part_name for u in small.shards[0].units][:2] == ["part-00000-00000.parquet", "part-00000-00001.parquet"]
    # The id hashes what is read and written, not how wide the part names are.
    body = {"output": small.output, "artifacts": [], "num_shards": 1, "rows_per_part": 1}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for record in small.files.rows():
        digest.update(json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
    assert small.plan_id == digest.hexdigest()[:16]


def test_commit_clean_up_knows_wide_part_names(tmp_path: Path) -> None:
    import fsspec

    from batchscore.io.sink import iter_own_files

    output = tmp_path / "out"
    rejected = rejected_file(output, "part-100000-000007.parquet")
    rejected.parent.mkdir(parents=True)
    output.mkdir()
    for name in [
        "part-123456-000000.parquet",
        "part-00001-00000.parquet",
        ".part-123456-000000.parquet.tmp-0a1b",
        "parts.txt",
        "part-1-2.parquet",
    ]:
        (output / name).write_bytes(b"")
    for name in [rejected.name, "part-100000-000008.parquet", ".part-1-2.parquet.rejected"]:
        (rejected.parent / name).write_bytes(b"")
    found = sorted((kind, Path(path).name) for kind, path in iter_own_files(fsspec.filesystem("file"), str(output)))
    assert found == [
        ("part", ".part-123456-000000.parquet.tmp-0a1b"),
        ("part", "part-00001-00000.parquet"),
        ("part", "part-123456-000000.parquet"),
        ("rejected", "part-100000-000007.parquet.rejected"),
    ]
