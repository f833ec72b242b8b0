"""The input is only ever read, a rewritten input is caught, and a job writes one schema.

Every spelling of an output that overlaps the input is refused before anything is written; a file
rewritten after the plan (even to the same size) stops the shard that reads it; shards that wrote
another schema or model version are never committed together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.config import JobConfig
from batchscore.errors import EXIT_INPUT, EXIT_USAGE, InputDataError
from batchscore.io.storage import location, overlapping
from batchscore.job import planning
from batchscore.job.preparation import prepare
from batchscore.job.shard import score_shard
from batchscore.sample import churn_table
from helpers import (
    assert_exact,
    cli,
    plan_file,
    planned_file,
    read_inputs,
    read_output,
    receipt_file,
    state,
    write_inputs,
    writing_a_part,
)


def model_args(model: dict[str, Path]) -> list[str]:
    return ["--model", str(model["model"]), "--scaler", str(model["scaler"])]


def snapshot(*folders: Path) -> dict[str, tuple[bytes, int]]:
    """Every file (and symlink target) under ``folders`` with its bytes and mtime."""
    seen = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in files + dirs:
                path = os.path.join(root, name)
                if os.path.islink(path):
                    seen[path] = (os.readlink(path).encode(), os.lstat(path).st_mtime_ns)
                elif os.path.isfile(path):
                    seen[path] = (Path(path).read_bytes(), os.stat(path).st_mtime_ns)
                else:
                    seen[path] = (b"<dir>", os.stat(path).st_mtime_ns)
    return seen


def _spelling(tmp_path: Path, case: str) -> tuple[list[str], str, list[Path]]:
    """(input specs, output as typed, folders that must stay untouched) for one way to overlap."""
    data = tmp_path / "data"
    write_inputs(data, files=2, rows=480, row_group_size=160)
    (tmp_path / "out").mkdir()
    if case == "dotdot":
        return ["data"], "out/../data", [data]
    if case == "dotdot-sub":
        return ["data"], "out/../data/sub", [data]
    if case == "dot-slash":
        return ["data/./"], "data/./", [data]
    if case == "symlink-folder":
        (tmp_path / "lnk").symlink_to(data, target_is_directory=True)
        return ["data"], "lnk/scored", [data]
    if case == "file-url":
        return [str(data)], f"file://{data}", [data]
    if case == "glob-relative":
        return ["data/day-*.parquet"], f"file://{tmp_path}/out/../data/scores", [data]
    if case == "input-links-into-output":
        previous = tmp_path / "scores"
        write_inputs(previous, files=1, rows=160)
        (data / "day-09.parquet").symlink_to(previous / "day-00.parquet")
        return ["data"], "scores", [data, previous]
    if case == "previous-output-as-input":
        for i, path in enumerate(sorted(data.iterdir())):
            path.rename(data / f"part-{i:05d}-00000.parquet")
        (data / "_SUCCESS").write_bytes(b"")
        return ["data"], "out/../data", [data]
    raise AssertionError(case)


SPELLINGS = [
    "dotdot",
    "dotdot-sub",
    "dot-slash",
    "symlink-folder",
    "file-url",
    "glob-relative",
    "input-links-into-output",
    "previous-output-as-input",
]
COMMANDS = {
    "validate": ["validate"],
    "plan": ["plan", "--shards", "2"],
    "run": ["run", "--overwrite"],
    "shard": ["run", "--shard", "0/2", "--overwrite"],
    "commit": ["commit", "--shards", "2", "--overwrite"],
}


@pytest.mark.parametrize("case", SPELLINGS)
def test_every_spelling_of_an_overlapping_output_is_refused(
    tmp_path: Path, binary_model_paths, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    monkeypatch.chdir(tmp_path)
    specs, output, untouched = _spelling(tmp_path, case)
    before = snapshot(*untouched)
    for name, command in COMMANDS.items():
        args = [*command, "--output", output, *model_args(binary_model_paths)]
        for spec in specs:
            args += ["--input", spec]
        result = cli(*args)
        assert result.exit_code == EXIT_USAGE, (name, result.exit_code, result.stderr)
        assert "overlaps input" in result.stderr and "Traceback" not in result.stderr, (name, result.stderr)
        assert snapshot(*untouched) == before, name  # not one byte, name or mtime changed, nothing added
    assert not (tmp_path / "data" / "sub").exists() and not (tmp_path / "data" / "scored").exists()


def test_the_refusal_names_both_locations(tmp_path: Path, binary_model_paths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    specs, output, _ = _spelling(tmp_path, "symlink-folder")
    result = cli("run", "--input", specs[0], "--output", output, *model_args(binary_model_paths))
    assert result.exit_code == EXIT_USAGE
    real = os.path.realpath(tmp_path / "data")
    assert (
        f"output {tmp_path}/lnk/scored (at file://{real}/scored) overlaps input data (at file://{real})"
        in result.stderr
    )


def test_shards_and_commit_check_the_plan_output_again(tmp_path: Path, binary_model_paths) -> None:
    """A symlink repointed into the input after planning stops every later step."""
    data, elsewhere, lnk = tmp_path / "data", tmp_path / "elsewhere", tmp_path / "lnk"
    write_inputs(data, files=2, rows=480, row_group_size=160)
    elsewhere.mkdir()
    lnk.symlink_to(elsewhere, target_is_directory=True)
    common = ["--input", str(data), "--output", str(lnk / "scored"), *model_args(binary_model_paths)]
    assert cli("plan", *common, "--shards", "2", "--out", tmp_path / "plan.json").exit_code == 0
    lnk.unlink()
    lnk.symlink_to(data, target_is_directory=True)
    before = snapshot(data)
    for command in (
        ["run", "--plan", tmp_path / "plan.json", "--shard", "0"],
        ["commit", "--plan", tmp_path / "plan.json"],
    ):
        result = cli(*command, *common)
        assert result.exit_code == EXIT_USAGE and "overlaps input" in result.stderr, (command, result.stderr)
    assert snapshot(data) == before


def test_a_plan_file_is_never_written_into_the_input(tmp_path: Path, binary_model_paths) -> None:
    data = tmp_path / "data"
    write_inputs(data, files=1, rows=160)
    before = snapshot(data)
    result = cli(
        "plan",
        "--input",
        data,
        "--output",
        tmp_path / "out",
        *model_args(binary_model_paths),
        "--out",
        data / "plan.json",
    )
    assert result.exit_code == EXIT_USAGE and "overlaps input" in result.stderr
    assert snapshot(data) == before


def test_a_plan_file_is_never_written_into_the_output(tmp_path: Path, binary_model_paths) -> None:
    """Readers such as Polars refuse a folder with a JSON file in it: the plan goes beside the output."""
    data, out = tmp_path / "data", tmp_path / "out"
    write_inputs(data, files=1, rows=160)
    common = ["--input", data, "--output", out, *model_args(binary_model_paths)]
    result = cli("plan", *common, "--out", out / "plan.json")
    assert result.exit_code == EXIT_USAGE and f"write it to {plan_file(out)}" in result.stderr
    assert not out.exists()
    assert cli("plan", *common, "--out", plan_file(out)).exit_code == 0


@pytest.mark.parametrize("output", ["/", "file:///", "s3://bucket", "s3://bucket/"])
def test_an_output_at_a_root_is_refused(tmp_path: Path, binary_model_paths, output: str) -> None:
    """A root has no folder beside it for the job's state."""
    write_inputs(tmp_path / "data", files=1, rows=160)
    result = cli("validate", "--input", tmp_path / "data", "--output", output, *model_args(binary_model_paths))
    assert result.exit_code == EXIT_USAGE and "is a bucket or filesystem root" in result.stderr, result.stderr


def test_a_state_folder_in_the_input_is_refused(tmp_path: Path, binary_model_paths) -> None:
    """The output's state (plan, receipts, rejected rows) lives beside it: that place must not hold input either."""
    data = tmp_path / "data"
    write_inputs(state(data / "out"), files=1, rows=160)
    before = snapshot(data)
    result = cli("run", "--input", state(data / "out"), "--output", data / "out", *model_args(binary_model_paths))
    assert result.exit_code == EXIT_USAGE and "state folder" in result.stderr and "overlaps input" in result.stderr
    assert snapshot(data) == before


def test_siblings_sharing_a_prefix_do_not_overlap(
    tmp_path: Path, binary_model_paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    inputs = write_inputs(tmp_path / "data", files=2, rows=496, row_group_size=160)
    for output in ("data2", "data-scores", "out/../data.scored"):
        result = cli("run", "--input", "data", "--output", output, *model_args(binary_model_paths))
        assert result.exit_code == 0, (output, result.stderr)
        assert_exact(read_output(tmp_path / os.path.normpath(output)), read_inputs(inputs), binary_model_paths)


def test_locations_compare_places_not_spellings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert (
        location("out/../data")
        == location("data/./")
        == location(f"file://{tmp_path}/data")
        == f"file://{tmp_path}/data"
    )
    assert location("s3://b/x//y/") == location("s3a://b/x/y") == "s3://b/x/y"
    assert overlapping(location("s3://b/x//y/"), location("s3://b/x/y/z"))
    assert not overlapping(location("s3://b/x/y"), location("s3://b/x/y2"))
    assert not overlapping(location("data"), location("data2"))
    assert overlapping(location("/"), location("data"))


def test_s3_spellings_of_one_key_overlap(tmp_path: Path, s3, binary_model_paths) -> None:
    fs, bucket, options = s3
    inputs = write_inputs(tmp_path / "in", files=1, rows=160)
    fs.put_file(str(inputs[0]), f"{bucket}/x/y/a.parquet")
    endpoint = ["--storage-option", f"endpoint_url={options['endpoint_url']}"]
    for spec, output in [
        (f"s3://{bucket}/x/y", f"s3://{bucket}/x//y/"),
        (f"s3://{bucket}/x/y", f"s3a://{bucket}/x//y/scores/"),
        (f"s3://{bucket}/x/y/*.parquet", f"s3://{bucket}//x/y/"),
    ]:
        for command in (["validate"], ["run", "--overwrite"], ["run", "--shard", "0/1", "--overwrite"]):
            result = cli(*command, "--input", spec, "--output", output, *model_args(binary_model_paths), *endpoint)
            assert result.exit_code == EXIT_USAGE and "overlaps input" in result.stderr, (
                command,
                output,
                result.stderr,
            )
            assert f"(at s3://{bucket}/x/y" in result.stderr
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/x")) == ["a.parquet"]
    result = cli(
        "validate",
        "--input",
        f"s3://{bucket}/x/y",
        "--output",
        f"s3://{bucket}/x/y2",
        *model_args(binary_model_paths),
        *endpoint,
    )
    assert result.exit_code == 0, result.stderr


# -- changed input ------------------------------------------------------------------------------


def _write_plain(table: pa.Table, path: Path) -> None:
    """Uncompressed, without statistics or dictionaries: other values give the very same size."""
    pq.write_table(table, path, compression="none", write_statistics=False, use_dictionary=False, row_group_size=160)


def _same_size_other_values(path: Path) -> None:
    """Rewrite ``path`` in place (same inode) with other feature values and exactly its size."""
    table = pq.read_table(path)
    size = path.stat().st_size
    age = pa.compute.add(table.column("age"), 7.5)
    time.sleep(0.02)  # past the file system's timestamp granularity, as any real rewrite is
    _write_plain(table.set_column(table.schema.get_field_index("age"), "age", age), path)
    assert path.stat().st_size == size and not pq.read_table(path).equals(table)


def _plain_inputs(folder: Path, files: int = 2, rows: int = 480) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i in range(files):
        paths.append(folder / f"day-{i:02d}.parquet")
        _write_plain(churn_table(rows, seed=20 + i, first_id=1 + i * rows), paths[-1])
    return paths


def _job(inputs: list[Path], out: Path, model: dict[str, Path], *extra: str) -> list[str]:
    args = ["--output", str(out), *model_args(model), *extra]
    for path in inputs:
        args += ["--input", str(path)]
    return args


def test_same_size_rewrite_after_plan_stops_the_shard(tmp_path: Path, binary_model_paths) -> None:
    inputs = _plain_inputs(tmp_path / "in")
    out = tmp_path / "out"
    common = _job(inputs, out, binary_model_paths)
    assert cli("plan", *common, "--shards", "2", "--out", plan_file(out)).exit_code == 0
    plan = json.loads((plan_file(out)).read_text())
    assert {k for k, v in planned_file(plan).items() if v is not None} == {
        "uri",
        "size",
        "row_groups",
        "mtime_ns",
        "inode",
        "device",
    }
    _same_size_other_values(inputs[0])
    result = cli("run", *common, "--plan", plan_file(out), "--shard", "0")
    assert result.exit_code == EXIT_INPUT, result.stderr
    assert f"input file {inputs[0]} changed since the plan was made (mtime_ns" in result.stderr
    assert not list(out.glob("part-*")) and not receipt_file(out, 0).parent.exists()
    # A replacement by rename that even restores the old mtime is another inode.
    stat = inputs[1].stat()
    replacement = tmp_path / "replacement.parquet"
    replacement.write_bytes(inputs[1].read_bytes())
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, inputs[1])
    result = cli("run", *common, "--plan", plan_file(out), "--shard", "1")
    assert (
        result.exit_code == EXIT_INPUT
        and f"input file {inputs[1]} changed since the plan was made (inode" in result.stderr
    )
    assert cli("commit", *common, "--plan", plan_file(out)).exit_code == EXIT_INPUT
    assert not (out / "_SUCCESS").exists()


def test_same_size_rewrite_between_shards_is_not_committed(tmp_path: Path, binary_model_paths) -> None:
    inputs = _plain_inputs(tmp_path / "in")
    out = tmp_path / "out"
    common = _job(inputs, out, binary_model_paths)
    assert cli("run", *common, "--shard", "0/2").exit_code == 0  # shard 0 reads day-00
    _same_size_other_values(inputs[0])
    # Shard 1 plans again, on the new day-00: another plan, while shard 0's plan holds the output.
    result = cli("run", *common, "--shard", "1/2")
    assert result.exit_code == EXIT_USAGE and "is being written by" in result.stderr, result.stderr
    assert not (out / "_SUCCESS").exists()


def test_same_size_rewrite_seen_by_commit(tmp_path: Path, binary_model_paths) -> None:
    """Once the first plan's lease is gone, commit still refuses receipts that read another file."""
    inputs = _plain_inputs(tmp_path / "in")
    out = tmp_path / "out"
    common = [*_job(inputs, out, binary_model_paths), "--lease-seconds", "1"]
    assert cli("run", *common, "--shard", "0/2").exit_code == 0  # shard 0 reads day-00
    _same_size_other_values(inputs[0])
    time.sleep(1.1)  # shard 0's plan's lease expires
    assert cli("run", *common, "--shard", "1/2").exit_code == 0  # shard 1 plans again, on the new day-00
    result = cli("commit", *common, "--shards", "2")
    assert result.exit_code == EXIT_INPUT, result.stderr
    assert f"input changed since the plan was made: shard 0 read {inputs[0]}" in result.stderr
    assert not (out / "_SUCCESS").exists()


def test_a_file_replaced_after_the_footers_were_read_stops_its_unit(tmp_path: Path, binary_model_paths) -> None:
    """The whole-job run checks each file again when a worker opens it."""
    inputs = _plain_inputs(tmp_path / "in")
    out = tmp_path / "out"
    config = JobConfig(
        input=tuple(map(str, inputs)),
        output=str(out),
        model=str(binary_model_paths["model"]),
        scaler=str(binary_model_paths["scaler"]),
        workers=1,
    )
    prepared = prepare(config)
    the_plan = planning.plan_of(prepared, shards=1)
    _same_size_other_values(inputs[1])
    with pytest.raises(InputDataError, match=f"input file {inputs[1]} changed since the plan was made"):
        with planning.hold(config, the_plan, "run", release="always") as lease:
            score_shard(prepared, the_plan, 0, lease)
    assert not (out / "part-00001-00000.parquet").exists() and not (out / "_SUCCESS").exists()


@pytest.mark.fault
def test_a_file_replaced_while_the_run_scores_is_never_mixed_in(tmp_path: Path, binary_model_paths) -> None:
    """A real run with one worker: day-01 is replaced (same size, other values) while day-00 is
    being scored, so the run either refuses it or, had it already read it, keeps the old rows."""
    folder = tmp_path / "in"
    folder.mkdir()
    _write_plain(churn_table(240_016, seed=31), folder / "day-00.parquet")  # scored first: the biggest
    _write_plain(churn_table(4_816, seed=32, first_id=240_017), folder / "day-01.parquet")
    original = read_inputs([folder / "day-00.parquet", folder / "day-01.parquet"])
    replacement = tmp_path / "day-01.parquet"
    replacement.write_bytes((folder / "day-01.parquet").read_bytes())
    _same_size_other_values(replacement)
    out = tmp_path / "out"
    replaced, swapped = threading.Event(), threading.Event()

    def replace_once_scoring_starts() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not replaced.is_set():
            if writing_a_part(out, ".part-00000"):
                os.replace(replacement, folder / "day-01.parquet")
                swapped.set()  # only here: the swap happened while day-00 was being written
                replaced.set()
            time.sleep(0.002)

    watcher = threading.Thread(target=replace_once_scoring_starts, daemon=True)
    watcher.start()
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "batchscore",
                "run",
                "--input",
                str(folder),
                "--output",
                str(out),
                *model_args(binary_model_paths),
                "--workers",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        replaced.set()
        watcher.join(timeout=5)
    assert swapped.is_set(), f"the file was never replaced while the run scored: {result.stderr}"
    if result.returncode == 0:  # day-01 was read whole before it was replaced: the old rows only
        assert_exact(read_output(out), original, binary_model_paths)
    else:
        assert result.returncode == EXIT_INPUT, result.stderr
        assert f"input file {folder / 'day-01.parquet'} changed since" in result.stderr, result.stderr
        assert not (out / "_SUCCESS").exists() and not (out / "part-00001-00000.parquet").exists()


def test_s3_reupload_after_plan_stops_the_shard(tmp_path: Path, s3, binary_model_paths) -> None:
    fs, bucket, options = s3
    inputs = _plain_inputs(tmp_path / "in", files=1)
    fs.put_file(str(inputs[0]), f"{bucket}/in/a.parquet")
    out = f"s3://{bucket}/out"
    common = [
        "--input",
        f"s3://{bucket}/in/",
        "--output",
        out,
        *model_args(binary_model_paths),
        "--storage-option",
        f"endpoint_url={options['endpoint_url']}",
    ]
    plan_file = tmp_path / "plan.json"
    assert cli("plan", *common, "--out", plan_file).exit_code == 0
    identity = planned_file(json.loads(plan_file.read_text()))
    assert identity["etag"] == fs.info(f"{bucket}/in/a.parquet")["ETag"]
    _same_size_other_values(inputs[0])
    fs.put_file(str(inputs[0]), f"{bucket}/in/a.parquet")
    result = cli("run", *common, "--plan", plan_file, "--shard", "0")
    assert result.exit_code == EXIT_INPUT, result.stderr
    assert f"input file s3://{bucket}/in/a.parquet changed since the plan was made (etag" in result.stderr
    assert not fs.exists(f"{bucket}/out/part-00000-00000.parquet")


def test_s3_object_replaced_after_the_listing_stops_its_unit(tmp_path: Path, s3, binary_model_paths) -> None:
    """The whole-job run checks each object again (its ETag) when a worker opens it."""
    import s3fs

    fs, bucket, options = s3
    inputs = _plain_inputs(tmp_path / "in", files=2)
    for path in inputs:
        fs.put_file(str(path), f"{bucket}/in/{path.name}")
    config = JobConfig(
        input=(f"s3://{bucket}/in/",),
        output=f"s3://{bucket}/out",
        model=str(binary_model_paths["model"]),
        scaler=str(binary_model_paths["scaler"]),
        storage_options=options,
        workers=1,
    )
    prepared = prepare(config)
    the_plan = planning.plan_of(prepared, shards=1)
    _same_size_other_values(inputs[1])
    s3fs.S3FileSystem(skip_instance_cache=True, **options).put_file(str(inputs[1]), f"{bucket}/in/{inputs[1].name}")
    with pytest.raises(
        InputDataError, match=f"input file s3://{bucket}/in/day-01.parquet changed since the plan was made"
    ):
        with planning.hold(config, the_plan, "run", release="always") as lease:
            score_shard(prepared, the_plan, 0, lease)
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/out/part-00001-00000.parquet") and not fs.exists(f"{bucket}/out/_SUCCESS")


def test_an_old_plan_format_is_refused_clearly(tmp_path: Path, binary_model_paths) -> None:
    inputs = write_inputs(tmp_path / "in", files=1, rows=160)
    out = tmp_path / "out"
    common = _job(inputs, out, binary_model_paths)
    assert cli("plan", *common, "--out", plan_file(out)).exit_code == 0
    plan = json.loads((plan_file(out)).read_text())
    (plan_file(out)).write_text(json.dumps({**plan, "format": 1}))
    result = cli("run", *common, "--plan", plan_file(out), "--shard", "0")
    assert result.exit_code == EXIT_INPUT and "unsupported plan format 1" in result.stderr
    plan["files"][0] = plan["files"][0][:3]  # no identity
    (plan_file(out)).write_text(json.dumps(plan))
    result = cli("run", *common, "--plan", plan_file(out), "--shard", "0")
    assert result.exit_code == EXIT_INPUT and "not a batchscore plan (file 0 is not a record" in result.stderr


# -- one schema ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["validate"], ["plan"], ["run"], ["run", "--shard", "0/2"]])
def test_a_passthrough_column_missing_from_a_later_file_is_refused(tmp_path: Path, binary_model_paths, command) -> None:
    inputs = write_inputs(tmp_path / "in", files=3, rows=480, row_group_size=160)
    pq.write_table(pq.read_table(inputs[2]).drop(["region"]), inputs[2])
    out = tmp_path / "out"
    result = cli(*command, *_job(inputs, out, binary_model_paths))
    assert result.exit_code == EXIT_INPUT, result.stderr
    assert (
        f"{inputs[2]}: passthrough column(s) region missing (named by the first input file {inputs[0]})"
        in result.stderr
    )
    assert "Traceback" not in result.stderr and not (out / "_SUCCESS").exists()
    result = cli(*command, *_job(inputs, out, binary_model_paths), "--keep", "customer_id,region")
    assert (
        result.exit_code == EXIT_INPUT
        and f"{inputs[2]}: passthrough column(s) region missing (named by --keep)" in result.stderr
    )
    assert not (out / "_SUCCESS").exists()


def test_a_passthrough_column_of_another_type_is_refused(tmp_path: Path, binary_model_paths) -> None:
    inputs = write_inputs(tmp_path / "in", files=2, rows=480, row_group_size=160)
    table = pq.read_table(inputs[1])
    plan_column = table.column("plan").cast(pa.large_string())
    pq.write_table(table.set_column(table.schema.get_field_index("plan"), "plan", plan_column), inputs[1])
    result = cli("run", *_job(inputs, tmp_path / "out", binary_model_paths))
    assert result.exit_code == EXIT_INPUT
    assert (
        f"{inputs[1]}: column 'plan' has type large_string but the first input file {inputs[0]} has string"
        in result.stderr
    )


def test_plan_records_schema_and_model_version_and_shards_must_match(tmp_path: Path, binary_model_paths) -> None:
    inputs = write_inputs(tmp_path / "in", files=2, rows=480, row_group_size=160)
    out = tmp_path / "out"
    common = _job(inputs, out, binary_model_paths, "--model-version", "1.4.0")
    assert cli("plan", *common, "--shards", "2", "--out", plan_file(out)).exit_code == 0
    plan = json.loads((plan_file(out)).read_text())
    assert plan["model_version"] == "1.4.0"
    assert (
        plan["schema"][0] == {"name": "customer_id", "type": "int64"} and plan["schema"][-1]["name"] == "model_version"
    )
    result = cli(
        "run",
        *_job(inputs, out, binary_model_paths, "--model-version", "1.5.0"),
        "--plan",
        plan_file(out),
        "--shard",
        "1",
    )
    assert result.exit_code == EXIT_INPUT
    assert "shard 1: --model-version '1.5.0' differs from the plan's '1.4.0'" in result.stderr
    for shard in ("0", "1"):
        assert cli("run", *common, "--plan", plan_file(out), "--shard", shard).exit_code == 0
    receipt_path = receipt_file(out, 1)
    receipt = json.loads(receipt_path.read_text())
    tampered = [dict(c, type="float") if c["name"] == "probability" else c for c in receipt["schema"]]
    cases = {
        "model_version": ("2.0.0", "1 (model version '2.0.0' != planned '1.4.0')"),
        "schema": (tampered, "1 (output schema differs from planned: probability float != double)"),
        "artifacts": (["0" * 64, "1" * 64], "1 (scored with model artifacts sha256"),
    }
    for key, (value, message) in cases.items():
        receipt_path.write_text(json.dumps({**receipt, key: value}))
        result = cli("commit", *common, "--plan", plan_file(out))
        assert result.exit_code == EXIT_INPUT and message in result.stderr, (key, result.stderr)
        assert not (out / "_SUCCESS").exists()
    receipt_path.write_text(json.dumps(receipt))
    assert cli("commit", *common, "--plan", plan_file(out)).exit_code == 0
    assert_exact(read_output(out), read_inputs(inputs), binary_model_paths)


def test_shards_planned_on_the_fly_must_agree_on_the_model_version(tmp_path: Path, binary_model_paths) -> None:
    inputs = write_inputs(tmp_path / "in", files=2, rows=480, row_group_size=160)
    out = tmp_path / "out"
    assert cli("run", *_job(inputs, out, binary_model_paths, "--model-version", "a"), "--shard", "0/2").exit_code == 0
    assert cli("run", *_job(inputs, out, binary_model_paths, "--model-version", "b"), "--shard", "1/2").exit_code == 0
    result = cli("commit", *_job(inputs, out, binary_model_paths), "--shards", "2")
    assert result.exit_code == EXIT_INPUT
    assert "inconsistent shard(s): 1 (model version 'b' != shard 0's 'a')" in result.stderr
    assert not (out / "_SUCCESS").exists()


def test_s3_versioned_object_records_its_version(tmp_path: Path, s3, binary_model_paths) -> None:
    fs, bucket, options = s3
    fs.make_bucket_versioned(bucket)
    inputs = _plain_inputs(tmp_path / "in", files=1)
    fs.put_file(str(inputs[0]), f"{bucket}/in/a.parquet")
    common = [
        "--input",
        f"s3://{bucket}/in/a.parquet",
        "--output",
        f"s3://{bucket}/out",
        *model_args(binary_model_paths),
        "--storage-option",
        f"endpoint_url={options['endpoint_url']}",
    ]
    plan_file = tmp_path / "plan.json"
    assert cli("plan", *common, "--out", plan_file).exit_code == 0
    identity = planned_file(json.loads(plan_file.read_text()))
    assert identity["version_id"] == fs.info(f"{bucket}/in/a.parquet")["VersionId"]
    fs.put_file(str(inputs[0]), f"{bucket}/in/a.parquet")  # the same bytes again: same ETag, new version
    result = cli("run", *common, "--plan", plan_file, "--shard", "0")
    assert (
        result.exit_code == EXIT_INPUT
        and f"changed since the plan was made (version_id {identity['version_id']}" in result.stderr
    )
