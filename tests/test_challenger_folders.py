"""Challengers in folders of their own (``challenger_output: folders``): the output is exactly a
champion-only run's, each challenger's folder exactly that model's own run on the same input,
all committed by the one ``_SUCCESS`` and manifest; a failed challenger leaves no folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from sklearn.linear_model import LogisticRegression

from batchscore.errors import EXIT_MODEL, EXIT_OK, EXIT_USAGE
from batchscore.io import layout
from batchscore.io.sink import ATTEMPT_KEY
from helpers import (
    assert_exact,
    cli,
    no_success,
    read_inputs,
    read_manifest,
    read_output,
    read_run_report,
    save,
    training_frame,
    write_inputs,
)
from test_challengers import FILES, ROWS, _job, models, on_s3  # noqa: F401  (the models fixture)

FOLDERS = {"challenger_output": "folders"}


def folder(output: Path | str, name: str) -> str:
    return layout.challenger_folder(str(output), name)


def part_names(where: str, fs: Any = None) -> list[str]:
    """The parts in a folder, a challenger's named by the output's parts they stand beside."""
    if fs is None:
        names = [n for n in os.listdir(where) if n.startswith("part-")]
    else:
        fs.invalidate_cache(where)
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(where, detail=False) if "/part-" in p]
    return sorted(n.removesuffix(layout.CHALLENGER_SUFFIX) for n in names)


def challenger_files(output: Path | str, name: str) -> list[str]:
    """Every file in a local challenger's folder: its parts, named as the output's, and nothing else."""
    return sorted(os.listdir(folder(output, name)))


def assert_folder_exact(
    output: Path | str, name: str, inputs: pa.Table, paths: dict[str, Path], fs: Any = None
) -> None:
    """The challenger's folder is its own run: its rows equal its model's predict / predict_proba on
    the user's DataFrame, in input order, passthrough columns as the input's; parts named as the
    output's, each with the output's part's rows."""
    where = folder(output, name)
    table = read_output(where, fs)
    assert_exact(table, inputs, paths)
    assert table.column_names[-2:] == ["predicted_at", "model_version"]
    assert set(table.column("model_version").to_pylist()) == {f"{name}-7"}
    assert not any("__" in c for c in table.column_names)
    assert part_names(where, fs) == part_names(str(output), fs)
    for part in part_names(str(output), fs):
        rows = [
            pq.read_metadata(path, filesystem=fs).num_rows
            for path in (f"{output}/{part}", f"{where}/{layout.challenger_part_name(part)}")
        ]
        assert rows[0] == rows[1], part
    # No *.parquet glob picks a challenger's part up; folder readers (pyarrow, pandas) read the folder.
    assert pq.read_table(where, filesystem=fs).num_rows == table.num_rows
    assert fs is not None or not list(Path(where).glob("*.parquet"))


def test_folders_hold_each_challenger_and_the_output_only_the_champion(tmp_path: Path, models) -> None:  # noqa: F811
    """Champion + a forest Pipeline + a ridge regressor with its own scaler: the output folder is
    a champion-only run's (columns, parts, values); folder readers of it see the champion's rows
    only; each challenger's folder is exact; one manifest lists every folder's parts."""
    paths = write_inputs(tmp_path / "in", files=FILES, rows=ROWS, row_group_size=700)
    inputs = read_inputs(paths)
    alone, out = tmp_path / "alone", tmp_path / "out"
    job = _job(tmp_path, models, str(tmp_path / "in"), str(alone), [])
    assert cli("run", "--config", job).exit_code == EXIT_OK
    job = _job(tmp_path, models, str(tmp_path / "in"), str(out), ["forest", "ridge"], **FOLDERS)
    result = cli("run", "--config", job)
    assert result.exit_code == EXIT_OK, result.stderr
    output = read_output(out)
    assert_exact(output, inputs, models["champion"])
    champion_only = read_output(alone)
    assert output.schema == champion_only.schema and part_names(str(out)) == part_names(str(alone))
    assert output.drop(["predicted_at"]).equals(champion_only.drop(["predicted_at"]))
    # Every folder reader of the output, recursive discovery included, sees the champion's rows alone.
    for dataset in (ds.dataset(out, format="parquet"), ds.dataset(out, format="parquet", partitioning="hive")):
        assert dataset.to_table().num_rows == FILES * ROWS and dataset.schema.names == output.column_names
    assert pq.read_table(out).num_rows == FILES * ROWS
    import pandas as pd

    assert pd.read_parquet(out).equals(output.to_pandas())
    assert pd.read_parquet(folder(out, "forest")).equals(read_output(folder(out, "forest")).to_pandas())
    assert sorted(os.listdir(out)) == ["_SUCCESS", *part_names(str(out))]
    for name in ("forest", "ridge"):
        assert_folder_exact(out, name, inputs, models[name])
        assert not Path(folder(out, name), "_SUCCESS").exists()  # the output's _SUCCESS commits it
    ridge = read_output(folder(out, "ridge"))
    assert "probability" not in ridge.column_names and ridge.schema.field("prediction").type == pa.float64()
    manifest = read_manifest(out)
    by_name = {c["name"]: c for c in manifest["challengers"]}
    for name in ("forest", "ridge"):
        entry = by_name[name]
        assert entry["status"] == "ok" and entry["folder"] == folder(out, name)
        listed = [(p["name"], p["rows"]) for p in entry["parts"]]
        beside = [(layout.challenger_part_name(p["name"]), p["rows"]) for p in manifest["parts"]]
        assert listed == beside and entry["rows"] == {
            "in": FILES * ROWS,
            "out": FILES * ROWS,
            "invalid": 0,
        }
        assert {"challenger:forest:model", "challenger:ridge:model", "challenger:ridge:scaler"} <= {
            a["role"] for a in manifest["artifacts"]
        }
    report = {c["name"]: c for c in read_run_report(out)["challengers"]}
    assert report["forest"]["agreement"]["rows_compared"] == FILES * ROWS and "parts" not in report["forest"]


def test_sharded_job_on_s3_commits_every_folder_with_one_success(tmp_path: Path, s3, models) -> None:  # noqa: F811
    """plan / run --shard x3 / commit on S3, champion + 2 challengers in folders: nothing looks
    finished before the commit; then all three are exact and the manifest lists each folder."""
    fs, bucket, options = s3
    paths, remote = on_s3(fs, bucket, tmp_path, models)
    output = f"s3://{bucket}/scores"
    job = _job(tmp_path, remote, f"s3://{bucket}/in/", output, ["forest", "ridge"], storage_options=options, **FOLDERS)
    plan = f"s3://{bucket}/plans/plan.json"
    result = cli("plan", "--config", job, "--shards", "3", "--out", plan)
    assert result.exit_code == 0, result.stderr
    for shard in range(3):
        result = cli("run", "--config", job, "--plan", plan, "--shard", str(shard))
        assert result.exit_code == 0, result.stderr
    where = f"{bucket}/scores"
    assert part_names(layout.challenger_folder(where, "forest"), fs)  # written, but not finished:
    assert not fs.exists(f"{where}/_SUCCESS") and not fs.exists(layout.manifest_path(where))
    left = [  # what an earlier run left: a killed write's leftover, the folder of a challenger since dropped
        f"{layout.challenger_folder(where, 'forest')}/.part-00009-00000.parquet.tmp-0123abcd",
        f"{layout.challenger_folder(where, 'dropped')}/part-00000-00000.parquet",
    ]
    for path in left:
        fs.pipe_file(path, b"stale")
    result = cli("commit", "--config", job, "--plan", plan)
    assert result.exit_code == 0, result.stderr
    inputs = read_inputs(paths)
    output_table = read_output(where, fs)
    assert_exact(output_table, inputs, models["champion"])
    assert not any("__" in c for c in output_table.column_names)
    for name in ("forest", "ridge"):
        assert_folder_exact(where, name, inputs, models[name], fs)
    manifest = read_manifest(where, fs)
    assert len(manifest["parts"]) == FILES
    fs.invalidate_cache()
    assert not any(fs.exists(path) for path in left)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(layout.challengers_folder(where))) == ["forest", "ridge"]
    for entry in manifest["challengers"]:
        assert entry["folder"] == f"s3://{layout.challenger_folder(where, entry['name'])}"
        assert [p["name"] for p in entry["parts"]] == [
            layout.challenger_part_name(p["name"]) for p in manifest["parts"]
        ]
        assert sum(p["rows"] for p in entry["parts"]) == FILES * ROWS


def _with_old_customer(paths: list[Path], row: int, age: float = 250.0) -> None:
    """One customer old enough that the raising challenger raises on its batch."""
    table = read_inputs(paths)
    ages = table.column("age").to_numpy().copy()
    ages[row] = age
    table = table.set_column(table.column_names.index("age"), "age", pa.array(ages))
    rows = table.num_rows // len(paths)
    for f, path in enumerate(paths):
        pq.write_table(table.slice(f * rows, rows), path, row_group_size=700)


@pytest.mark.fault
def test_a_failing_challenger_leaves_no_folder_and_the_champion_commits(tmp_path: Path, models) -> None:  # noqa: F811
    """One challenger's file is missing, one raises in the second file: neither has a folder
    after the commit (the one that raised had written parts), the report says why, the
    champion and the third challenger commit exactly; required, nothing commits (exit 4)."""
    paths = write_inputs(tmp_path / "in", files=FILES, rows=ROWS, row_group_size=700)
    _with_old_customer(paths, ROWS + 1_111)
    local = {**models, "missing": {"model": tmp_path / "nowhere.joblib"}}
    out = tmp_path / "out"
    job = _job(tmp_path, local, str(tmp_path / "in"), str(out), ["missing", "raises", "forest"], workers=1, **FOLDERS)
    plan = tmp_path / "plan.json"
    assert cli("plan", "--config", job, "--shards", "2", "--out", plan).exit_code == EXIT_OK
    for shard in range(2):
        result = cli("run", "--config", job, "--plan", plan, "--shard", str(shard))
        assert result.exit_code == EXIT_OK, result.stderr
    assert part_names(folder(out, "raises"))  # it wrote the first file's part before it raised
    result = cli("commit", "--config", job, "--plan", plan)
    assert result.exit_code == EXIT_OK, result.stderr
    inputs = read_inputs(paths)
    assert_exact(read_output(out), inputs, models["champion"])
    assert_folder_exact(out, "forest", inputs, models["forest"])
    assert sorted(os.listdir(layout.challengers_folder(str(out)))) == ["forest"]  # no folder of either
    report = {c["name"]: c for c in read_run_report(out)["challengers"]}
    assert (
        report["missing"]["status"] == "failed"
        and "failed to load when the job was planned" in report["missing"]["error"]
    )
    assert report["raises"]["status"] == "failed" and "blew up on an old customer" in report["raises"]["error"]
    manifest = {c["name"]: c for c in read_manifest(out)["challengers"]}
    assert manifest["raises"]["folder"] is manifest["missing"]["folder"] is None and manifest["raises"]["parts"] == []
    assert manifest["forest"]["status"] == "ok"

    required = tmp_path / "required"
    job = _job(tmp_path, local, str(tmp_path / "in"), str(required), ["raises"], challengers_required=True, **FOLDERS)
    result = cli("run", "--config", job)
    assert result.exit_code == EXIT_MODEL and "challengers_required" in result.stderr, result.stderr
    assert no_success(required) and not Path(layout.manifest_path(str(required))).exists()


@pytest.mark.fault
def test_a_rerun_removes_stale_parts_and_folders(tmp_path: Path, models) -> None:  # noqa: F811
    """A run over 3 files, then an overwrite over 1 file with another set of challengers: each
    kept folder holds exactly the new parts, a dropped challenger's folder is gone; a killed
    attempt's part left in a folder is removed; back in columns, no folder is left at all."""
    paths = write_inputs(tmp_path / "in", files=FILES, rows=ROWS, row_group_size=700)
    out = tmp_path / "out"
    job = _job(tmp_path, models, str(tmp_path / "in"), str(out), ["forest", "ridge"], **FOLDERS)
    assert cli("run", "--config", job).exit_code == EXIT_OK
    before = part_names(folder(out, "forest"))
    for extra in paths[1:]:
        extra.unlink()
    stale = Path(folder(out, "forest"), ".part-00007-00000.parquet.tmp-0123abcd")  # a killed write's leftover
    stale.write_bytes(b"partial")
    job = _job(tmp_path, models, str(tmp_path / "in"), str(out), ["forest"], overwrite=True, **FOLDERS)
    result = cli("run", "--config", job)
    assert result.exit_code == EXIT_OK, result.stderr
    after = part_names(str(out))
    assert len(after) < len(before) and challenger_files(out, "forest") == [
        layout.challenger_part_name(n) for n in after
    ]
    assert_folder_exact(out, "forest", read_inputs(paths[:1]), models["forest"])
    assert sorted(os.listdir(layout.challengers_folder(str(out)))) == ["forest"]
    job = _job(tmp_path, models, str(tmp_path / "in"), str(out), ["forest"], overwrite=True)
    assert cli("run", "--config", job).exit_code == EXIT_OK
    assert not Path(layout.challengers_folder(str(out))).exists() or not os.listdir(layout.challengers_folder(str(out)))
    assert "prediction__forest" in read_output(out).column_names


def test_folders_are_refused_for_tables_on_every_runner(tmp_path: Path, models) -> None:  # noqa: F811
    """A table output with challenger folders, run, planned, validated or on Spark: exit 2, one
    line naming the setting, nothing written."""
    write_inputs(tmp_path / "in", files=1, rows=ROWS, row_group_size=700)
    job = _job(
        tmp_path, models, str(tmp_path / "in"), str(tmp_path / "table"), ["forest"], output_format="delta", **FOLDERS
    )
    for argv in (("run", "--config", job), ("plan", "--config", job, "--shards", "2"), ("validate", "--config", job)):
        result = cli(*argv)
        assert result.exit_code == EXIT_USAGE, (argv, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "challenger-output" in errors[0] and "delta" in errors[0], result.stderr
    result = cli("spark", "--config", job, "--master", "local[1]")
    assert result.exit_code == EXIT_USAGE, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "challenger-output" in errors[0] and "delta" in errors[0], result.stderr
    assert not (tmp_path / "table").exists()


def test_the_setting_reaches_the_cli(tmp_path: Path) -> None:
    """--challenger-output comes from the declaration; another value is a usage error."""
    result = cli("validate", "--challenger-output", "tables", "--input", str(tmp_path), "--model", "m.joblib")
    assert result.exit_code == EXIT_USAGE and "tables" in result.stderr, result.stderr


def test_each_folder_holds_the_rows_its_own_model_scores(tmp_path: Path, models) -> None:  # noqa: F811
    """on_invalid skip, a challenger reading a subset of the features: rows only the champion
    cannot score (a NaN age) are in that challenger's folder, rows neither can (a NaN charge) in
    none; a challenger with the champion's features leaves out the champion's rows. Each folder
    equals its model's own predict_proba on the user's DataFrame of the rows it scores, in order."""
    frame = training_frame(seed=13)
    subset = save(
        tmp_path / "subset", model=LogisticRegression().fit(frame[["tenure", "monthly_charges"]], frame["churned"])
    )
    paths = write_inputs(tmp_path / "in", files=1, rows=ROWS, row_group_size=700)
    table = read_inputs(paths)
    # 16 rows each (see helpers.assert_exact), some at a batch's or row group's edge.
    bad_ages = [5, 90, 300, 555, 701, 702, 900, 1_100, 1_399, 1_400, 1_650, 1_900, 2_222, 2_300, 2_350, 2_382]
    bad_charges = [7, 100, 233, 400, 699, 700, 999, 1_234, 1_401, 1_500, 1_501, 1_777, 2_003, 2_100, 2_380, 2_383]
    ages = table.column("age").to_numpy().copy()
    ages[bad_ages] = np.nan  # only the champion (and the forest) read age
    charges = table.column("monthly_charges").to_numpy().copy()
    charges[bad_charges] = np.nan  # every model reads monthly_charges
    table = table.set_column(table.column_names.index("age"), "age", pa.array(ages))
    table = table.set_column(table.column_names.index("monthly_charges"), "monthly_charges", pa.array(charges))
    pq.write_table(table, paths[0], row_group_size=700)
    out = tmp_path / "out"
    local = {**models, "subset": subset}
    job = _job(tmp_path, local, str(tmp_path / "in"), str(out), ["subset", "forest"], on_invalid="skip", **FOLDERS)
    result = cli("run", "--config", job)
    assert result.exit_code == EXIT_OK, result.stderr

    def rows_without(bad: list[int]) -> pa.Table:
        kept = np.ones(ROWS, dtype=bool)
        kept[bad] = False
        return table.filter(pa.array(kept))

    both = rows_without(bad_ages + bad_charges)
    assert_exact(read_output(out), both, models["champion"])  # the champion's rows as a run alone
    for name, rows, features in (
        ("forest", both, None),
        ("subset", rows_without(bad_charges), ["tenure", "monthly_charges"]),
    ):
        got = read_output(folder(out, name))
        assert got.column("customer_id").equals(rows.column("customer_id")), name  # its rows, in input order
        model = joblib.load(local[name]["model"])
        x = rows.to_pandas()[features or list(model.feature_names_in_)]
        assert np.array_equal(got.column("probability").to_numpy(), model.predict_proba(x)[:, 1]), name
        assert np.array_equal(got.column("prediction").to_numpy(), model.predict(x)), name
    manifest = {c["name"]: c for c in read_manifest(out)["challengers"]}
    assert manifest["subset"]["rows"] == {"in": ROWS, "out": ROWS - len(bad_charges), "invalid": len(bad_charges)}
    report = {c["name"]: c for c in read_run_report(out)["challengers"]}
    assert report["subset"]["agreement"]["rows_compared"] == both.num_rows  # rows both scored


@pytest.mark.fault
def test_a_challenger_part_not_its_receipts_fails_that_challenger_alone(tmp_path: Path, models) -> None:  # noqa: F811
    """After the shards, one challenger's part is deleted and another's replaced by a part of a
    later attempt (a zombie's): commit fails those two challengers, removes their folders, and
    commits the champion and the untouched challenger; required, it commits nothing (exit 4)."""
    paths = write_inputs(tmp_path / "in", files=2, rows=ROWS, row_group_size=700)
    inputs = read_inputs(paths)
    out = tmp_path / "out"
    names = ["forest", "ridge", "sharing"]
    job = _job(tmp_path, models, str(tmp_path / "in"), str(out), names, **FOLDERS)
    plan = tmp_path / "plan.json"
    assert cli("plan", "--config", job, "--shards", "2", "--out", plan).exit_code == EXIT_OK

    def shards_then_tamper() -> None:
        for shard in range(2):
            result = cli("run", "--config", job, "--plan", plan, "--shard", str(shard))
            assert result.exit_code == EXIT_OK, result.stderr
        last = layout.challenger_part_name(part_names(str(out))[-1])
        Path(folder(out, "forest"), last).unlink()
        replaced = Path(folder(out, "ridge"), last)
        zombie = {ATTEMPT_KEY: "0" * 32}  # same rows, written by an attempt no receipt names
        pq.write_table(pq.read_table(replaced).replace_schema_metadata(zombie), replaced)

    shards_then_tamper()
    required = cli("commit", "--config", job, "--plan", plan, "--challengers-required")
    assert required.exit_code == EXIT_MODEL and "challenger forest" in required.stderr, required.stderr
    assert no_success(out) and not Path(layout.manifest_path(str(out))).exists()
    result = cli("commit", "--config", job, "--plan", plan)
    assert result.exit_code == EXIT_OK, result.stderr
    assert_exact(read_output(out), inputs, models["champion"])
    assert_folder_exact(out, "sharing", inputs, models["sharing"])
    assert sorted(os.listdir(layout.challengers_folder(str(out)))) == ["sharing"]
    report = {c["name"]: c for c in read_run_report(out)["challengers"]}
    assert report["forest"]["status"] == "failed" and "missing" in report["forest"]["error"]
    assert report["ridge"]["status"] == "failed" and "written by attempt" in report["ridge"]["error"]
    assert report["sharing"]["status"] == "ok" and report["sharing"]["folder"] == folder(out, "sharing")


@pytest.mark.fault
def test_a_run_killed_while_writing_folders_then_rerun(tmp_path: Path, models) -> None:  # noqa: F811
    """kill -9 of `run` (its whole process group) as soon as a challenger's part is being written:
    nothing looks finished; the rerun commits the output and both folders exactly, with nothing
    the killed run left behind."""
    paths = write_inputs(tmp_path / "in", files=FILES, rows=ROWS, row_group_size=700)
    out = tmp_path / "out"
    job = _job(
        tmp_path, models, str(tmp_path / "in"), str(out), ["forest", "ridge"], batch_size=200, workers=1, **FOLDERS
    )
    run = subprocess.Popen(
        [sys.executable, "-m", "batchscore", "run", "--config", str(job)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    where = Path(folder(out, "ridge"))
    deadline = time.monotonic() + 60
    try:
        while not (where.exists() and any(where.iterdir())):
            assert run.poll() is None, f"the run ended before it was killed: {run.stderr.read() if run.stderr else ''}"
            assert time.monotonic() < deadline, "no challenger part within 60 s"
            time.sleep(0.005)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        run.communicate(timeout=30)
    assert run.returncode == -signal.SIGKILL
    assert no_success(out) and not Path(layout.manifest_path(str(out))).exists()
    job = _job(tmp_path, models, str(tmp_path / "in"), str(out), ["forest", "ridge"], overwrite=True, **FOLDERS)
    result = cli("run", "--config", job)
    assert result.exit_code == EXIT_OK, result.stderr
    inputs = read_inputs(paths)
    assert_exact(read_output(out), inputs, models["champion"])
    for name in ("forest", "ridge"):
        assert_folder_exact(out, name, inputs, models[name])
        assert challenger_files(out, name) == [layout.challenger_part_name(n) for n in part_names(str(out))]
