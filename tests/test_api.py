"""The library API: every step, called again and again in one process, in every order the CLI allows."""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

import batchscore
from batchscore.errors import EXIT_INPUT, EXIT_USAGE
from helpers import REPO, assert_exact, cli, no_success, read_inputs, read_output, write_inputs

ROWS = 4_816  # per file; a multiple of 16 (see helpers.assert_exact), not a round number


def _job(tmp_path: Path, model_paths: dict[str, Path], output: Path) -> dict[str, object]:
    inputs = write_inputs(tmp_path / "in", files=3, rows=ROWS, row_group_size=1_204)
    return dict(
        input=tuple(str(p) for p in inputs),
        output=str(output),
        model=str(model_paths["model"]),
        scaler=str(model_paths["scaler"]),
        model_version="7",
        batch_size=1_204,
        workers=2,
    )


def _scores(output: Path) -> pa.Table:
    table = read_output(output)
    return table.drop_columns(["predicted_at"])


def test_every_step_again_and_again_in_one_process(tmp_path: Path, binary_model_paths: dict[str, Path]) -> None:
    out = tmp_path / "out"
    settings = _job(tmp_path, binary_model_paths, out)
    config = batchscore.JobConfig(**settings, overwrite=True)  # type: ignore[arg-type]  # values of mixed types
    inputs = read_inputs(sorted((tmp_path / "in").iterdir()))
    freeze, pool, method = (
        gc.get_freeze_count(),
        pa.default_memory_pool().backend_name,
        multiprocessing.get_start_method(True),
    )

    checked = batchscore.validate(config)
    assert (checked.files, checked.rows, checked.output) == (3, 3 * ROWS, str(out))
    assert "prediction" in checked.output_columns and "customer_id" in checked.output_columns
    assert not out.exists()  # validate writes nothing

    first = batchscore.run(config)
    assert isinstance(first, batchscore.RunResult)
    assert (first.rows_in, first.rows_out, first.rows_invalid) == (3 * ROWS, 3 * ROWS, 0) and first.seconds > 0
    assert first.state == str(tmp_path / "_batchscore" / "out") == first.manifest["state"]  # beside the output
    assert_exact(read_output(out), inputs, binary_model_paths)
    reference = _scores(out)
    # What a run leaves the calling process as it found it: collector, memory pool, start method.
    assert gc.get_freeze_count() == freeze and pa.default_memory_pool().backend_name == pool
    assert multiprocessing.get_start_method(True) == method

    again = batchscore.run(config)  # --overwrite: the same output again, under a new plan id
    assert again.parts == first.parts and _scores(out).equals(reference)
    with pytest.raises(batchscore.ConfigError, match="already exists") as refused:
        batchscore.run(batchscore.JobConfig(**settings))  # type: ignore[arg-type]  # values of mixed types
    assert refused.value.exit_code == EXIT_USAGE and _scores(out).equals(reference)

    info = batchscore.inspect(config)
    assert info.description is not None and info.description["features"] == list(checked.features)
    assert info.pin.startswith("--model-sha256 ") and batchscore.inspect(config, sha256_only=True).pin == info.pin

    # plan -> run_shard x N -> commit, by the plan file and by the Plan itself, twice over.
    for round_ in range(2):
        plan_file = str(tmp_path / f"plan-{round_}.json")
        the_plan = batchscore.plan(config, shards=3, out=plan_file)
        assert the_plan.num_shards == 3 and the_plan.total_rows == 3 * ROWS and no_success(out)
        assert batchscore.load_plan(plan_file, config) == the_plan
        shards = [batchscore.run_shard(config, i, plan=plan_file if i % 2 else the_plan) for i in range(3)]
        assert [s.shard for s in shards] == [0, 1, 2] and {s.plan_id for s in shards} == {the_plan.plan_id}
        assert sum(s.rows_out for s in shards) == 3 * ROWS and no_success(out)
        assert batchscore.inspect(config).pin == info.pin  # inspect between steps changes nothing
        committed = batchscore.commit(config, plan=plan_file if round_ else the_plan)
        assert committed.plan_id == the_plan.plan_id and committed.rows_out == 3 * ROWS
        assert committed.parts == tuple(p for s in shards for p in s.parts)
        assert (out / "_SUCCESS").exists() and _scores(out).equals(reference)
        assert batchscore.commit(config, plan=plan_file).manifest["plan_id"] == the_plan.plan_id  # safe to repeat

    # --shard I/N shards, then commit --shards N, which plans again without the model.
    for _ in range(2):
        done = [batchscore.run_shard(config, i, count=2) for i in (1, 0)]
        assert sum(d.rows_in for d in done) == 3 * ROWS
        committed = batchscore.commit(config, shards=2)
        assert committed.rows_out == 3 * ROWS and _scores(out).equals(reference)
    with pytest.raises(batchscore.InputDataError, match="missing receipts") as incomplete:
        batchscore.run_shard(config, 0, count=3)
        batchscore.commit(config, shards=3)
    assert incomplete.value.exit_code == EXIT_INPUT
    with pytest.raises(batchscore.BatchscoreError, match="being written by sharded job") as busy:
        batchscore.run(config)  # the sharded job holds the output until it commits
    assert busy.value.exit_code == EXIT_USAGE
    for index in (2, 1):
        batchscore.run_shard(config, index, count=3)
    assert batchscore.commit(config, shards=3).rows_out == 3 * ROWS and _scores(out).equals(reference)
    with pytest.raises(batchscore.ConfigError, match="has 3 shards, not 2"):
        batchscore.run_shard(config, 0, plan=str(tmp_path / "plan-0.json"), count=2)
    with pytest.raises(batchscore.ConfigError, match="^commit needs plan, or shards to plan again"):
        batchscore.commit(config)

    # The whole job once more, then validate on what is there: the same rows as the first run.
    assert batchscore.run(config).rows_out == 3 * ROWS and _scores(out).equals(reference)
    assert batchscore.validate(config).rows == 3 * ROWS
    assert gc.get_freeze_count() == freeze and pa.default_memory_pool().backend_name == pool


def test_api_names_stay_functions_whatever_is_imported() -> None:
    """Importing a submodule binds it on the package: none may be named like a function of the API.

    Checked in a fresh interpreter: some modules import Airflow, which must not load in this one
    before the DAG tests set its environment."""
    script = (
        "import importlib, pkgutil, batchscore\n"
        "for m in pkgutil.walk_packages(batchscore.__path__, 'batchscore.'):\n"
        "    if m.name != 'batchscore.__main__':\n"
        "        importlib.import_module(m.name)\n"
        "for name in ('validate', 'plan', 'run', 'run_shard', 'commit', 'inspect', 'load_plan',\n"
        "             'compile_model'):\n"
        "    assert getattr(batchscore, name) is getattr(batchscore.api, name), name\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_docs_library_examples_run(tmp_path: Path) -> None:
    """The README's Python example, then each example of docs/library.md, run in order in one
    process from a copy of the repository's sample job."""
    readme = (REPO / "README.md").read_text().split("## From Python", 1)[1].split("\n## ", 1)[0]
    first = re.findall(r"```python\n(.*?)```", readme, re.S)
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "library.md").read_text(), re.S)
    assert len(first) == 1 and len(blocks) >= 6, "one example per function"
    for name in ("validate(", "plan(", "run(", "run_shard(", "commit(", "inspect("):
        assert any(name in block for block in blocks), name
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    assert cli("sample", "--out-dir", tmp_path / "sample_data", "--rows", "4816").exit_code == 0
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        register_sample_model("churn", "champion", f"sqlite:///{tmp_path / 'mlruns.db'}")
        namespace: dict[str, object] = {}
        for name, block in [("README.md", first[0])] + [("docs/library.md", block) for block in blocks]:
            exec(compile(block, name, "exec"), namespace)  # noqa: S102 - the docs' own examples
    finally:
        os.chdir(cwd)
    assert (tmp_path / "out" / "churn-scores" / "_SUCCESS").exists()


def register_sample_model(name: str, alias: str, uri: str) -> None:
    """The sample model, logged and registered in the registry at ``uri`` under ``name@alias``
    (a SQLite registry keeps its artifacts in ./mlruns), as the docs' registry example expects."""
    import joblib

    from mlflow_fixtures import log_sklearn, tracking

    with tracking(uri) as client:
        version, _ = log_sklearn(joblib.load("sample_data/model/model.joblib"), name)
        client.set_registered_model_alias(name, alias, version)


def test_modules_import_each_other_without_a_cycle() -> None:
    """Each module's imports of the package's other modules (at import time, not inside functions)
    form no cycle, so any module can be imported first."""
    import ast

    package = Path(batchscore.__file__).parent
    imports: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        imports[path.stem] = {
            (node.module or "").split(".")[0] or alias.name
            for node in tree.body
            if isinstance(node, ast.ImportFrom) and node.level == 1
            for alias in node.names
        }
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join(path + (module,))}"
        if module in done:
            return
        for other in sorted(imports.get(module, ())):
            visit(other, path + (module,))
        done.add(module)

    for module in sorted(imports):
        visit(module, ())


def _invalid_inputs(folder: Path) -> Path:
    """Two files of 4,816 rows; the second's first row group has 37 rows whose age is NaN, more than
    a fraction of 0.003 of the input (28 rows) allows: the worker scoring it stops there."""
    import numpy as np
    import pyarrow.parquet as pq

    from batchscore.sample import churn_table

    write_inputs(folder, files=1, rows=ROWS, row_group_size=1_204)
    table = churn_table(ROWS, seed=23, first_id=1 + ROWS)
    age = table.column("age").to_numpy().copy()
    age[:1_204:31][:37] = np.nan
    pq.write_table(
        table.set_column(table.schema.get_field_index("age"), "age", pa.array(age)),
        folder / "day-01.parquet",
        row_group_size=1_204,
    )
    return folder


#: Each mistake made through the library and through the CLI: the library's error names the
#: parameters and settings as the caller passed them, the CLI's names its flags, the rest alike.
ERROR_CASES = {
    "shard without a plan": (
        lambda config, **_: batchscore.run_shard(config, 0),
        ["run", "--shard", "0"],
        "index needs plan, or count to plan the shards on the fly",
        "--shard I needs --plan, or --shard I/N to plan the shards on the fly",
        EXIT_USAGE,
    ),
    "plan digest without a plan": (
        lambda config, **_: batchscore.commit(config, shards=2, plan_sha256="a" * 64),
        ["commit", "--shards", "2", "--plan-sha256", "a" * 64],
        "plan_sha256 needs plan",
        "--plan-sha256 needs --plan",
        EXIT_USAGE,
    ),
    "shards and rows per shard": (
        lambda config, **_: batchscore.plan(config, shards=2, rows_per_shard=1_000),
        ["plan", "--shards", "2", "--rows-per-shard", "1000"],
        "give shards or rows_per_shard, not both",
        "give --shards or --rows-per-shard, not both",
        EXIT_USAGE,
    ),
    "shard out of range": (
        lambda config, **_: batchscore.run_shard(config, 3, count=0),
        ["run", "--shard", "3/0"],
        "count must be an integer from 1 to 10000",
        "--shard 3/0: --shards must be an integer from 1 to 10000",
        EXIT_USAGE,
    ),
    "no model": (
        lambda config, **_: batchscore.validate(batchscore.JobConfig(input=config.input, output=config.output)),
        ["validate"],
        "missing required setting model (YAML key 'model')",
        "missing required setting --model (YAML key 'model')",
        EXIT_USAGE,
    ),
    "too many invalid rows": (  # raised in a worker process, and handed over to the parent
        lambda config, invalid, **_: batchscore.run(dataclasses.replace(config, **invalid)),
        ["run", "--on-invalid", "skip", "--max-invalid-fraction", "0.003", "--input", "{invalid}"],
        "more invalid rows than max_invalid_fraction allows",
        "more invalid rows than --max-invalid-fraction allows",
        EXIT_INPUT,
    ),
    "output exists": (
        lambda config, existing, **_: batchscore.run(dataclasses.replace(config, output=existing)),
        ["run", "--output", "{existing}"],
        "; pass overwrite to replace it",
        "; pass --overwrite to replace it",
        EXIT_USAGE,
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_name_parameters_in_the_library_and_flags_in_the_cli(
    tmp_path: Path, binary_model_paths: dict[str, Path], case: str
) -> None:
    call, argv, library, command_line, exit_code = ERROR_CASES[case]
    settings = _job(tmp_path, binary_model_paths, tmp_path / "out")
    settings["input"] = (str(tmp_path / "in"),)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "part-00000-00000.parquet").write_bytes(b"")
    places = {"invalid": str(_invalid_inputs(tmp_path / "invalid")), "existing": str(existing)}
    config = batchscore.JobConfig(**settings)  # type: ignore[arg-type]

    with pytest.raises(batchscore.BatchscoreError) as raised:
        call(
            config,
            invalid={"input": (places["invalid"],), "on_invalid": "skip", "max_invalid_fraction": 0.003},
            existing=places["existing"],
        )
    assert library in str(raised.value) and "--" not in str(raised.value), str(raised.value)
    assert raised.value.exit_code == exit_code

    job = [
        "--output",
        tmp_path / "cli-out",
        "--scaler",
        settings["scaler"],
        "--workers",
        "2",
        *(["--input", settings["input"][0]] if "--input" not in argv else []),
        *(["--model", settings["model"]] if argv[0] != "validate" else []),
    ]
    result = cli(argv[0], *job, *[arg.format(**places) for arg in argv[1:]])
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.exit_code == exit_code and len(errors) == 1, result.stderr
    assert command_line in errors[0] and str(raised.value).replace(library, command_line) in errors[0], errors[0]
    assert not (tmp_path / "out" / "_SUCCESS").exists() and not (tmp_path / "cli-out" / "_SUCCESS").exists()
