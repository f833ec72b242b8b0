"""An output folder is owned: ``--overwrite`` never publishes another tool's files as this run's rows.

Readers read a folder whole, each by its own rules (pandas/pyarrow skip ``.``/``_`` names but descend
into subfolders, Spark reads files without a ``.parquet`` suffix, DuckDB and Polars globs take hidden
files too). So a folder holding anything batchscore did not write is refused (exit 2, naming the
files) and left exactly as it was; a folder holding only batchscore's own files is replaced, and
every reader then reads exactly the scored rows.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from batchscore.io.layout import state_folder
from batchscore.sample import churn_table
from helpers import assert_exact, cli, read_manifest, read_output

ROWS = (1_504, 1_008)  # 2,512 rows scored; a multiple of 16 (see helpers.assert_exact)
FOREIGN_ROWS = 1_003


def _inputs(folder: Path, rows: tuple[int, ...] = ROWS, seed: int = 40) -> pa.Table:
    folder.mkdir(parents=True)
    tables = []
    for i, n in enumerate(rows):
        table = churn_table(n, seed=seed + i, first_id=1 + i * 10_000)
        pq.write_table(table, folder / f"day-{i}.parquet", row_group_size=500)
        tables.append(table)
    return pa.concat_tables(tables)


def _run(inputs: Path | str, output: Path | str, model: dict[str, Path], *extra: str) -> Any:
    return cli(
        "run",
        "--input",
        inputs,
        "--output",
        output,
        "--model",
        model["model"],
        "--scaler",
        model["scaler"],
        "--workers",
        "1",
        *extra,
    )


def _foreign_parquet(path: Path) -> None:
    """Another tool's Parquet: rows a reader would add to the scored ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(churn_table(FOREIGN_ROWS, seed=99), path)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with a digest of its bytes (folders: "dir")."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), folder)] = "dir"
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


def _read_with_every_reader(output: Path) -> dict[str, int]:
    import duckdb

    with duckdb.connect() as con:

        def duck(pattern: str) -> int:
            return con.execute("select count(*) from read_parquet(?)", [pattern]).fetchone()[0]

        return {
            "pandas": len(pd.read_parquet(output)),
            "pyarrow": pq.read_table(output).num_rows,
            "pyarrow dataset": ds.dataset(output).count_rows(),
            "duckdb *.parquet": duck(f"{output}/*.parquet"),
            "duckdb **/*.parquet": duck(f"{output}/**/*.parquet"),
        }


@pytest.fixture
def committed(tmp_path: Path, binary_model_paths: dict[str, Path]) -> dict[str, Any]:
    """A committed batchscore output of three input files, and a fresh two-file input to replace it with."""
    old = _inputs(tmp_path / "old", rows=(1_200, 900, 704), seed=10)
    output = tmp_path / "scores" / "dt=2026-11-24"
    assert _run(tmp_path / "old", output, binary_model_paths).exit_code == 0
    new = _inputs(tmp_path / "new")
    return {"output": output, "old": old, "new_dir": tmp_path / "new", "new": new}


FOREIGN_LAYOUTS = {
    "another tool's part": ["part-00000-3f1c2a.snappy.parquet"],
    "partition subfolder": ["dt=1/part.parquet"],
    "deeper subfolder": ["a/b/c/data.parquet"],
    "hidden parquet": [".hidden.parquet"],
    "snappy hidden": [".snappy.parquet"],
    "no suffix (Spark reads it)": ["part-0000"],
    "parq suffix": ["scores.parq"],
    "underscore file": ["_committed_8012"],
    "stray beside our parts": ["part-00000-00000.parquet.bak", "notes.txt"],
    "many": [f"extra-{i}.parquet" for i in range(7)],
    "empty folder": ["old/"],
}


@pytest.mark.fault
@pytest.mark.parametrize("layout", list(FOREIGN_LAYOUTS), ids=list(FOREIGN_LAYOUTS))
def test_overwrite_refuses_an_output_holding_foreign_files_and_touches_nothing(
    committed: dict[str, Any], binary_model_paths: dict[str, Path], layout: str
) -> None:
    output: Path = committed["output"]
    names = FOREIGN_LAYOUTS[layout]
    for name in names:
        if name.endswith("/"):
            (output / name).mkdir(parents=True)
        elif name.endswith((".parquet", ".parq")) or name == "part-0000":
            _foreign_parquet(output / name)
        else:
            (output / name).write_text("not ours\n")
    before, state_before = _snapshot(output), _snapshot(Path(state_folder(str(output))))
    result = _run(committed["new_dir"], output, binary_model_paths, "--overwrite")
    assert result.exit_code == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "did not write" in error[0], result.stderr
    assert f"holds {len(names)} file(s)" in error[0], error[0]
    for name in sorted(names)[:5]:
        assert name in error[0], (name, error[0])
    if len(names) > 5:
        assert f"and {len(names) - 5} more" in error[0], error[0]
    assert _snapshot(output) == before, "a refused run touches nothing in the output"
    assert _snapshot(Path(state_folder(str(output)))).keys() == state_before.keys()
    assert read_manifest(output)["rows"]["out"] == 2_804, "the previous commit is still whole"


@pytest.mark.fault
def test_overwrite_of_a_folder_holding_only_another_tools_parquet_is_refused(
    tmp_path: Path, binary_model_paths: dict[str, Path]
) -> None:
    _inputs(tmp_path / "in")
    output = tmp_path / "scores"
    _foreign_parquet(output / "part-00000-3f1c2a.snappy.parquet")
    before = _snapshot(output)
    result = _run(tmp_path / "in", output, binary_model_paths, "--overwrite")
    assert result.exit_code == 2 and "part-00000-3f1c2a.snappy.parquet" in result.stderr, result.stderr
    assert _snapshot(output) == before
    assert not os.path.exists(state_folder(str(output))), "nothing was written beside it either"
    assert (
        cli(
            "validate",
            "--input",
            tmp_path / "in",
            "--output",
            output,
            "--model",
            binary_model_paths["model"],
            "--scaler",
            binary_model_paths["scaler"],
            "--overwrite",
        ).exit_code
        == 2
    )


@pytest.mark.fault
def test_overwrite_of_batchscores_own_files_leaves_exactly_the_new_rows_for_every_reader(
    committed: dict[str, Any], binary_model_paths: dict[str, Path]
) -> None:
    output: Path = committed["output"]
    # what an interrupted attempt and a validate leave behind: batchscore's own, hidden files
    (output / ".part-00002-00000.parquet.tmp-0123abcd").write_bytes(b"PAR1 half a part")
    (output / ".batchscore-probe-89ab").write_bytes(b"probe")
    assert _read_with_every_reader(output)["pandas"] == 2_804
    result = _run(committed["new_dir"], output, binary_model_paths, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert sorted(os.listdir(output)) == ["_SUCCESS", "part-00000-00000.parquet", "part-00001-00000.parquet"]
    counts = _read_with_every_reader(output)
    assert set(counts.values()) == {sum(ROWS)}, counts
    assert read_manifest(output)["rows"] == {"in": sum(ROWS), "out": sum(ROWS), "invalid": 0}
    assert_exact(read_output(output), committed["new"], binary_model_paths)


@pytest.mark.fault
def test_a_foreign_file_that_appears_before_commit_stops_the_commit(
    tmp_path: Path, binary_model_paths: dict[str, Path]
) -> None:
    _inputs(tmp_path / "in")
    output = tmp_path / "scores"
    job = [
        "--input",
        tmp_path / "in",
        "--output",
        output,
        "--model",
        binary_model_paths["model"],
        "--scaler",
        binary_model_paths["scaler"],
        "--workers",
        "1",
    ]
    assert cli("run", *job, "--shard", "0/2").exit_code == 0
    assert cli("run", *job, "--shard", "1/2").exit_code == 0
    _foreign_parquet(output / "dt=1" / "part.parquet")  # another tool writes while the shards ran
    result = cli("commit", *job, "--shards", "2")
    assert result.exit_code == 2 and "dt=1/part.parquet" in result.stderr, result.stderr
    assert not (output / "_SUCCESS").exists()
    (output / "dt=1" / "part.parquet").unlink()
    (output / "dt=1").rmdir()
    assert cli("commit", *job, "--shards", "2").exit_code == 0
    assert set(_read_with_every_reader(output).values()) == {sum(ROWS)}


@pytest.mark.fault
def test_s3_output_is_owned_too(
    tmp_path: Path, s3: tuple[Any, str, dict[str, str]], binary_model_paths: dict[str, Path]
) -> None:
    fs, bucket, options = s3
    new = _inputs(tmp_path / "in")
    output = f"s3://{bucket}/scores/dt=2026-11-24"
    flags = ("--storage-option", f"endpoint_url={options['endpoint_url']}")
    assert _run(tmp_path / "in", output, binary_model_paths, *flags).exit_code == 0
    for key in ("dt=1/part.parquet", "part-0000", ".hidden.parquet"):
        with fs.open(f"{bucket}/scores/dt=2026-11-24/{key}", "wb") as fh:
            pq.write_table(churn_table(FOREIGN_ROWS, seed=98), fh)
    fs.invalidate_cache()
    before = {p: fs.info(p)["ETag"] for p in fs.find(f"{bucket}/scores")}
    result = _run(tmp_path / "in", output, binary_model_paths, *flags, "--overwrite")
    assert result.exit_code == 2, result.stderr
    for key in ("dt=1/part.parquet", "part-0000", ".hidden.parquet"):
        assert key in result.stderr, result.stderr
    fs.invalidate_cache()
    assert {p: fs.info(p)["ETag"] for p in fs.find(f"{bucket}/scores")} == before, "a refused run touches nothing"
    for key in ("dt=1/part.parquet", "part-0000", ".hidden.parquet"):
        fs.rm_file(f"{bucket}/scores/dt=2026-11-24/{key}")
    assert _run(tmp_path / "in", output, binary_model_paths, *flags, "--overwrite").exit_code == 0
    fs.invalidate_cache()
    table = pq.read_table(f"{bucket}/scores/dt=2026-11-24", filesystem=fs)
    assert table.num_rows == sum(ROWS)
    assert_exact(read_output(f"{bucket}/scores/dt=2026-11-24", fs), new, binary_model_paths)
