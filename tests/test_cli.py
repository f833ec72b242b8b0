"""The CLI's help, docs and small commands: what users read must match what the code does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest

from batchscore.cli import main
from batchscore.config import CONFIG_KEYS
from batchscore.errors import EXIT_CODES, EXIT_USAGE
from helpers import REPO, cli, write_inputs

README = (REPO / "README.md").read_text()
DOCS = {name: (REPO / "docs" / f"{name}.md").read_text() for name in ("commands", "configuration")}
COMMANDS = sorted(main.commands)


def test_every_command_and_option_has_help() -> None:
    assert COMMANDS == ["commit", "compile", "inspect", "plan", "report", "run", "sample", "spark", "validate"]
    for name, command in main.commands.items():
        assert command.help, f"{name} has no help"
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts} has no help"


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_help_lists_exit_codes(command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.exit_code == 0
    for code, meaning in EXIT_CODES.items():
        assert f"    {code}  {meaning}\n" in result.output


def test_docs_document_commands_keys_and_exit_codes() -> None:
    for name in COMMANDS:
        assert f"### `batchscore {name}`" in DOCS["commands"], name
    for key in CONFIG_KEYS:
        assert f"| `{key}` |" in DOCS["configuration"], key
    for code, meaning in EXIT_CODES.items():
        assert f"| {code} | {meaning} |" in DOCS["commands"], code
    assert re.search(r"^make run", README, re.M) and re.search(r"^make test", README, re.M)


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_inspect(binary_model_paths) -> None:
    result = cli("inspect", binary_model_paths["model"], "--scaler", binary_model_paths["scaler"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["type"] == "LogisticRegression" and info["scaler"] == "StandardScaler"
    assert info["features"] == ["age", "tenure", "monthly_charges", "total_charges"]
    assert info["classes"] == [False, True] and info["task"] == "classification"
    assert [a["role"] for a in info["artifacts"]] == ["model", "scaler"]
    assert all(len(a["sha256"]) == 64 for a in info["artifacts"])


def test_validate_scores_nothing(tmp_path: Path, binary_model_paths) -> None:
    inputs = write_inputs(tmp_path / "in", files=2, rows=64)
    result = cli(
        "validate",
        "--input",
        tmp_path / "in",
        "--output",
        tmp_path / "out",
        "--model",
        binary_model_paths["model"],
        "--scaler",
        binary_model_paths["scaler"],
    )
    assert result.exit_code == 0, result.stderr
    assert "ok: 2 file(s), 128 rows" in result.output
    assert not (tmp_path / "out").exists()
    del inputs


def test_flags_override_config(tmp_path: Path, binary_model_paths) -> None:
    inputs = write_inputs(tmp_path / "in", files=1, rows=64)
    config = tmp_path / "job.yaml"
    config.write_text(
        f"input: {inputs[0]}\noutput: {tmp_path / 'a'}\nmodel: {binary_model_paths['model']}\n"
        f"scaler: {binary_model_paths['scaler']}\nmodel_version: '1'\n"
    )
    result = cli("run", "--config", config, "--output", tmp_path / "b", "--model-version", "2", "--log-format", "json")
    assert result.exit_code == 0, result.stderr
    assert not (tmp_path / "a").exists()
    summary = json.loads(result.stdout)
    assert summary["rows"] == {"in": 64, "out": 64, "invalid": 0}
    events = [json.loads(line)["event"] for line in result.stderr.splitlines()]
    assert events[0] == "shard_start" and events[-1] == "committed"


def test_storage_option_needs_key_value(tmp_path: Path) -> None:
    result = cli("run", "--storage-option", "endpoint_url", "--output", tmp_path)
    assert result.exit_code == EXIT_USAGE and "key=value" in result.stderr


def test_yaml_keys_without_a_value_count_as_absent(tmp_path: Path, binary_model_paths) -> None:
    """``storage_options:`` or ``keep:`` with nothing after them are YAML nulls: as if not written."""
    inputs = write_inputs(tmp_path / "in", files=1, rows=64)
    config = tmp_path / "job.yaml"
    config.write_text(
        f"input: {inputs[0]}\noutput: {tmp_path / 'out'}\nmodel: {binary_model_paths['model']}\n"
        f"scaler: {binary_model_paths['scaler']}\nmodel_version: '1'\nstorage_options:\nkeep:\n"
        "features:\ntrusted_types:\n"
    )
    result = cli("run", "--config", config, "--storage-option", "auto_mkdir=true", "--log-format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["rows"]["out"] == 64
    import pyarrow.parquet as pq

    # No keep list: every input column is passed through, as when the key is absent.
    scored = pq.read_table(next((tmp_path / "out").glob("part-*.parquet")))
    assert set(pq.read_schema(inputs[0]).names) <= set(scored.column_names)


@pytest.mark.parametrize("written", ["1.10", "2", "yes", "true"])
def test_a_version_yaml_reads_as_a_number_is_refused(tmp_path: Path, written: str) -> None:
    from batchscore.config import build_config
    from batchscore.errors import ConfigError

    config = tmp_path / "job.yaml"
    config.write_text(f"input: in/\noutput: out/\nmodel_version: {written}\n")
    result = cli("validate", "--config", config)
    assert result.exit_code == EXIT_USAGE
    assert "setting 'model_version' must be text" in result.stderr and "quote it" in result.stderr
    config.write_text(f"input: in/\noutput: out/\nmodel_version: '{written}'\n")
    assert build_config(str(config)).model_version == written
    with pytest.raises(ConfigError, match="setting 'output' must be text, but YAML read 2024 as a int"):
        build_config(None, output=2024)


def test_console_script_and_module_entry_point(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "batchscore", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "batchscore" in result.stdout


def test_sample_command_regenerates_the_committed_sample(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    result = cli("sample", "--out-dir", tmp_path)
    assert result.exit_code == 0, result.stderr
    assert pq.read_table(tmp_path / "churn.parquet").equals(pq.read_table(REPO / "sample_data" / "churn.parquet"))
    assert (tmp_path / "model" / "model.joblib").exists() and (tmp_path / "model" / "scaler.joblib").exists()
    skops_only = cli(
        "inspect", tmp_path / "model" / "model.skops", "--scaler", tmp_path / "model" / "scaler.skops", "--no-pickle"
    )
    assert skops_only.exit_code == 0, skops_only.stderr  # the pickle-free copies load with default trust
