"""The input is only ever read: every spelling of an output that overlaps it is refused before
anything is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchscore.errors import EXIT_USAGE
from batchscore.storage import location, overlapping
from helpers import assert_exact, cli, read_inputs, read_output, write_inputs


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


SPELLINGS = ["dotdot", "dotdot-sub", "dot-slash", "symlink-folder", "file-url", "glob-relative",
             "input-links-into-output", "previous-output-as-input"]
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
    assert f"output {tmp_path}/lnk/scored (at file://{real}/scored) overlaps input data (at file://{real})" in result.stderr


def test_a_plan_file_is_never_written_into_the_input(tmp_path: Path, binary_model_paths) -> None:
    data = tmp_path / "data"
    write_inputs(data, files=1, rows=160)
    before = snapshot(data)
    result = cli("plan", "--input", data, "--output", tmp_path / "out", *model_args(binary_model_paths),
                 "--out", data / "_plan.json")
    assert result.exit_code == EXIT_USAGE and "overlaps input" in result.stderr
    assert snapshot(data) == before


def test_siblings_sharing_a_prefix_do_not_overlap(tmp_path: Path, binary_model_paths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    inputs = write_inputs(tmp_path / "data", files=2, rows=496, row_group_size=160)
    for output in ("data2", "data-scores", "out/../data.scored"):
        result = cli("run", "--input", "data", "--output", output, *model_args(binary_model_paths))
        assert result.exit_code == 0, (output, result.stderr)
        assert_exact(read_output(tmp_path / os.path.normpath(output)), read_inputs(inputs), binary_model_paths)


def test_locations_compare_places_not_spellings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert location("out/../data") == location("data/./") == location(f"file://{tmp_path}/data") == f"file://{tmp_path}/data"
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
    for spec, output in [(f"s3://{bucket}/x/y", f"s3://{bucket}/x//y/"), (f"s3://{bucket}/x/y", f"s3a://{bucket}/x//y/scores/"),
                         (f"s3://{bucket}/x/y/*.parquet", f"s3://{bucket}//x/y/")]:
        for command in (["validate"], ["run", "--overwrite"], ["run", "--shard", "0/1", "--overwrite"]):
            result = cli(*command, "--input", spec, "--output", output, *model_args(binary_model_paths), *endpoint)
            assert result.exit_code == EXIT_USAGE and "overlaps input" in result.stderr, (command, output, result.stderr)
            assert f"(at s3://{bucket}/x/y" in result.stderr
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/x")) == ["a.parquet"]
    result = cli("validate", "--input", f"s3://{bucket}/x/y", "--output", f"s3://{bucket}/x/y2", *model_args(binary_model_paths), *endpoint)
    assert result.exit_code == 0, result.stderr
