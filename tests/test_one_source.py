"""Each fact stated once: the flags, exit codes and rules that the CLI, the API and the DAG share
come from one declaration, so a second copy that drifts from it fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import click
import pytest

from batchscore import schema
from batchscore.cli import main
from batchscore.config import (
    COMMAND_FIELDS,
    FIELDS,
    PLAN_FIELDS,
    build_config,
    check_numbers,
    shard_size_conflict,
)
from batchscore.errors import EXIT_CODES, EXIT_OK, EXITS, PERMANENT_EXIT_CODES, BatchscoreError
from batchscore.orchestration.dagspec import DagConfigError, common_args, parse_job
from helpers import REPO

#: A value for every job setting, none of them its default: each must reach the container as written.
EVERY_SETTING: dict[str, Any] = {
    "input": ("in/day-01.parquet", "in/more/"),
    "output": "out/scores",
    "model": "models/model.skops",
    "scaler": "models/scaler.skops",
    "registry_uri": "http://mlflow:5000",
    "model_sha256": "ab" * 32,
    "scaler_sha256": "cd" * 32,
    "trusted_types": ("sklearn.tree._tree.Tree", "numpy.float64"),
    "allow_pickle": False,
    "model_version": "1.10",
    "features": ("tenure_months", "monthly_spend"),
    "keep": ("customer_id",),
    "batch_size": 1_234,
    "max_batch_bytes": 3_145_739,
    "on_invalid": "quarantine",
    "max_invalid_fraction": 0.25,
    "overwrite": True,
    "output_format": "delta",
    "table_mode": "replace",
    "partition": "dt=2024-06-01",
    "incremental": True,
    "full_refresh": True,
    "iceberg_catalog": "warehouse",
    "iceberg_table": "scores.churn",
    "workers": 3,
    "storage_options": {"anon": True, "endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": 0}},
    "storage_timeout": 7.5,
    "storage_retries": 4,
    "storage_throttle_seconds": 33.0,
    "log_format": "json",
    "lease_seconds": 61.0,
    "lock_timeout": 2.5,
    "engine": "auto",
    "compiled_cache": "/var/cache/compiled",
    "pushgateway": "http://pushgateway:9091",
    "job_name": "nightly_churn",
    "reference": "out/yesterday",
    "drift_warn": 0.2,
    "drift_fail": 0.7,
    "models": (
        {"name": "gbm", "model": "models/gbm.skops", "scaler": "models/gbm_scaler.skops", "scaler_sha256": "ef" * 32},
        "ridge=models/ridge.joblib",
    ),
    "challengers_required": True,
    "challenger_output": "folders",
}

PACKAGE_SOURCES = sorted([*(REPO / "batchscore").rglob("*.py"), *(REPO / "dags").glob("*.py")])


def parsed(command: str, argv: list[str]) -> dict[str, Any]:
    """The parameters the CLI's own parser makes of ``argv`` for ``command`` (nothing runs)."""
    with main.commands[command].make_context(command, [str(a) for a in argv]) as ctx:
        return dict(ctx.params)


def config_from_cli(command: str, argv: list[str]) -> Any:
    """The JobConfig the CLI builds from ``argv``, through the same steps as a command's ``_config``."""
    params = parsed(command, argv)
    return build_config(params["config_path"], **schema.from_click(FIELDS, FIELDS, params))


def test_every_setting_has_a_value_unlike_its_default() -> None:
    """A new setting must be added here, so the round trip below covers it."""
    assert list(EVERY_SETTING) == list(FIELDS)
    for key, info in FIELDS.items():
        assert EVERY_SETTING[key] != info.get_default(call_default_factory=True), key


@pytest.mark.parametrize("command", ["run", "plan", "commit", "validate"])
def test_dag_argv_of_every_setting_is_the_same_job_to_the_cli(command: str) -> None:
    """The container has only its arguments: what the DAG derives from a job file, the CLI's parser
    reads back into the same JobConfig, for every declared setting."""
    argv = list(common_args(EVERY_SETTING, "jobs/nightly_churn.yaml"))
    assert config_from_cli(command, argv) == build_config(None, **EVERY_SETTING)


def test_every_flag_of_a_declared_setting_comes_from_its_declaration() -> None:
    """No command writes its own option for a declared setting: its help, type and repetition are
    the declaration's. ``run --shard`` takes I or I/N (an index and a count), and ``compile --out``
    is where a compiled library goes, not a plan, and ``spark --shards`` defaults to the cluster's
    parallelism: each is its own."""
    declared = {
        schema.flag_of(key, info): (fields, key)
        for fields in (FIELDS, COMMAND_FIELDS, PLAN_FIELDS)
        for key, info in fields.items()
    }
    own = {("run", "--shard"), ("compile", "--out"), ("spark", "--shards")}
    checked = 0
    for name, command in main.commands.items():
        for param in command.params:
            if not isinstance(param, click.Option) or (name, param.opts[0]) in own or param.opts[0] not in declared:
                continue
            fields, key = declared[param.opts[0]]
            (expected,) = [p for p in click.command()(schema.click_options(fields, [key])[0](lambda **kw: None)).params]
            assert (param.name, param.help, param.multiple, param.type.to_info_dict(), param.metavar) == (
                expected.name,
                expected.help,
                expected.multiple,
                expected.type.to_info_dict(),
                expected.metavar,
            ), (name, param.opts)
            checked += 1
    assert checked >= len(FIELDS) * 4  # the job options of four commands, and the rest


def test_inspect_and_report_read_options_as_the_job_commands_do(tmp_path: Path) -> None:
    """``--storage-option`` and ``--features`` mean one thing on every command."""
    options = ["--storage-option", "anon=true", "--storage-option", "config_kwargs={retries: 0}"]
    for command, argv in (
        ("inspect", ["m.skops", "--features", "a, b", *options]),
        ("report", ["out", *options]),
        ("compile", ["m.skops", *options]),
    ):
        params = parsed(command, argv)
        got = schema.from_click(FIELDS, [k for k in ("features", "storage_options") if k in params], params)
        assert got["storage_options"] == {"anon": True, "config_kwargs": {"retries": 0}}, command
        if command == "inspect":
            assert build_config(None, **got).features == ("a", "b")


def test_plan_pin_and_shard_flags_are_read_back_by_run_and_commit() -> None:
    """What the plan prints as its pin and what the DAG adds for each shard, the CLI reads back."""
    from batchscore.job.planning import make_plan

    artifacts = [{"role": "model", "sha256": "ab" * 32}, {"role": "scaler", "sha256": "cd" * 32}]
    plan = make_plan([], "out/scores", artifacts, shards=2)
    for command in ("run", "commit"):
        params = parsed(command, [*plan.pin(), "--plan", "p.json"])
        assert (params["plan_sha256"], params["model_sha256"], params["scaler_sha256"], params["plan"]) == (
            plan.sha256,
            "ab" * 32,
            "cd" * 32,
            "p.json",
        )


def test_dag_size_and_shard_flags_are_read_back_by_the_cli(airflow_env: Path) -> None:
    """The flags the DAG's tasks add (a run's size, each shard's plan and index) parse as meant."""
    from batchscore.orchestration.dagrun import shard_arguments, size_args

    dag = {"schedule": "@daily", "start_date": "2024-01-01", "runner": "local", "rows_per_shard": 5_003}
    settings = parse_job("job.yaml", {"input": "in/", "output": "out/x", "dag": dag})
    assert parsed("plan", size_args(settings, {}))["rows_per_shard"] == 5_003
    params = parsed("plan", size_args(settings, {"shards": 7}))
    assert (params["shards"], params["rows_per_shard"]) == (7, None)
    with pytest.raises(ValueError, match="give the 'shards' param or the 'rows_per_shard' param, not both"):
        size_args(settings, {"shards": 2, "rows_per_shard": 3})
    pin = ["--plan-sha256", "ef" * 32]
    for index, argv in enumerate(shard_arguments(list(settings.common_args), "state/plan.json", 3, pin)):
        params = parsed(argv[0], argv[1:])
        assert (params["plan"], params["shard"], params["plan_sha256"]) == ("state/plan.json", str(index), "ef" * 32)


def test_one_rule_for_shards_or_rows_per_shard(tmp_path: Path) -> None:
    """Stated once (config.shard_size_conflict): the CLI, the API and the ``dag:`` section refuse
    both, each naming the two as its user writes them (flags, parameters, ``dag:`` keys)."""
    from batchscore import api
    from batchscore.errors import ConfigError
    from helpers import cli

    assert shard_size_conflict(None, None) is None and shard_size_conflict(3, None) is None
    assert shard_size_conflict(None, 7) is None
    message = "give --shards or --rows-per-shard, not both"
    in_python = "give shards or rows_per_shard, not both"  # the library names its parameters
    with pytest.raises(ConfigError, match=in_python):
        check_numbers(shards=2, rows_per_shard=10)
    config = build_config(None, input=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model="m.skops")
    with pytest.raises(ConfigError, match=in_python):
        api.plan(config, shards=2, rows_per_shard=10)
    result = cli(
        "plan",
        "--input",
        tmp_path / "in",
        "--output",
        tmp_path / "out",
        "--model",
        "m.skops",
        "--shards",
        "2",
        "--rows-per-shard",
        "10",
    )
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    dag = {"schedule": "@daily", "start_date": "2024-01-01", "runner": "local", "shards": 2, "rows_per_shard": 10}
    with pytest.raises(DagConfigError, match="give dag.shards or dag.rows_per_shard, not both"):
        parse_job("job.yaml", {"input": "in/", "output": "out/x", "dag": dag})
    assert not (tmp_path / "out").exists()
    stated = [p.relative_to(REPO) for p in PACKAGE_SOURCES if "not both" in p.read_text()]
    assert stated == [Path("batchscore/config.py")], stated


def test_permanent_exit_codes_are_the_declared_ones() -> None:
    """Whether a retry can fix an exit code is declared beside it (errors.EXITS), nowhere else."""
    assert {code: e.summary for code, e in EXITS.items() if code and not e.retry_can_fix} == PERMANENT_EXIT_CODES
    assert set(PERMANENT_EXIT_CODES) == {2, 3, 4, 5} and EXIT_OK not in PERMANENT_EXIT_CODES
    assert all(EXIT_CODES[code].startswith(summary + ": ") for code, summary in PERMANENT_EXIT_CODES.items())
    classes, todo = [], [BatchscoreError]
    while todo:
        classes.append(todo.pop())
        todo += classes[-1].__subclasses__()
    assert {cls.exit_code for cls in classes} <= set(EXITS)


def test_no_module_but_errors_lists_exit_codes() -> None:
    """A dict or set of several exit codes written out anywhere but errors.py is a second list."""
    codes = set(EXITS) - {EXIT_OK}
    found = []
    for path in PACKAGE_SOURCES:
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            items = node.keys if isinstance(node, ast.Dict) else node.elts if isinstance(node, ast.Set) else []
            numbers = {item.value for item in items if isinstance(item, ast.Constant) and type(item.value) is int}
            if len(numbers & codes) >= 2 and numbers <= codes:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == []


def test_dag_docstrings_say_which_codes_are_permanent() -> None:
    """The DAG factory's words about exit codes no retry can fix name the declared ones, or none."""
    text = (REPO / "dags" / "batchscore_dagfactory.py").read_text() + (
        REPO / "batchscore" / "orchestration" / "dagrun.py"
    ).read_text()
    for listed in re.findall(r"exits? (\d(?:, \d)*,? (?:or|and) \d)", text):
        assert {int(n) for n in re.findall(r"\d", listed)} == set(PERMANENT_EXIT_CODES), listed


def test_output_file_names_are_spelled_only_by_the_layout() -> None:
    """Every name in an output's folder and its state folder comes from io/layout.py: a string that
    is one of those names, or an f-string building a part or receipt name, anywhere else is a copy."""
    from batchscore.io import layout

    names = {
        layout.STATE_ROOT,
        layout.SUCCESS_FILE,
        layout.MANIFEST_FILE,
        layout.REPORT_FILE,
        layout.PLAN_FILE,
        layout.LEASE_FILE,
        layout.REJECTED_SUFFIX,
    }
    found = []
    for path in PACKAGE_SOURCES:
        if path.name == "layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            pieces = (
                [v.value for v in node.values if isinstance(v, ast.Constant)] if isinstance(node, ast.JoinedStr) else []
            )
            if (isinstance(node, ast.Constant) and node.value in names) or any(
                str(p).startswith(("part-", "shard-")) for p in pieces
            ):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == []
    name = layout.part_name(12, 345_678, slice=3, digits=6)
    assert name == "part-000012-345678-000003.parquet" and layout.PART_PATTERN.match(name)
    assert layout.REJECTED_PATTERN.match(layout.rejected_name(layout.part_name(1, 2)))
    assert layout.receipt_path("out/x", 7).endswith("/" + layout.receipt_name(7))
