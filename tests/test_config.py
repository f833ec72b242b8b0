"""The job's one declaration (config.JobConfig) and its faces: flags, YAML checks, argv, docs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from batchscore import schema
from batchscore.cli import _config, job_options, main
from batchscore.config import CONFIG_KEYS, FIELDS, build_config
from batchscore.errors import EXIT_USAGE, ConfigError
from batchscore.reference import job_keys
from helpers import REPO, cli

#: A value other than the default for every job key.
EVERY_KEY: dict[str, Any] = {
    "input": ("s3://b/in/dt=2024-06-01/", "extra.parquet"),
    "output": "s3://b/out/",
    "model": "model.skops",
    "scaler": "scaler.skops",
    "registry_uri": "http://127.0.0.1:5000",
    "model_sha256": "a" * 64,
    "scaler_sha256": "b" * 64,
    "trusted_types": ("sklearn.tree._tree.Tree", "numpy.float64"),
    "allow_pickle": False,
    "model_version": "1.10",
    "features": ("age", "tenure"),
    "keep": ("customer_id",),
    "batch_size": 4_816,
    "max_batch_bytes": 12_582_917,
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
    "storage_options": {"endpoint_url": "http://127.0.0.1:9000", "use_ssl": False, "max_pool": 4},
    "storage_timeout": 2.5,
    "storage_retries": 5,
    "storage_throttle_seconds": 30.0,
    "log_format": "json",
    "lease_seconds": 30.0,
    "lock_timeout": 1.5,
    "engine": "auto",
    "compiled_cache": "/compiled",
    "pushgateway": "http://127.0.0.1:9091",
    "job_name": "nightly_churn",
    "reference": "s3://b/out/dt=2024-05-31/",
    "drift_warn": 0.2,
    "drift_fail": 0.5,
    "models": (
        {
            "name": "gbm",
            "model": "s3://m/gbm/3/model.skops",
            "scaler": "s3://m/gbm/3/scaler.skops",
            "model_version": "3",
        },
        "ridge=ridge.joblib",
    ),
    "challengers_required": True,
    "challenger_output": "folders",
}


def test_every_key_differs_from_its_default() -> None:
    assert tuple(EVERY_KEY) == CONFIG_KEYS, "give every declared key a value here"
    for key, value in EVERY_KEY.items():
        assert value != FIELDS[key].get_default(call_default_factory=True), key


def parse_flags(argv: list[str]) -> Any:
    """The JobConfig the CLI builds from these flags alone."""

    @click.command()
    @job_options
    def probe(**kw: Any) -> None:
        click.echo(repr(_config(kw)))
        assert not kw, f"options left unread: {sorted(kw)}"

    result = CliRunner().invoke(probe, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output.strip()


def test_argv_from_the_declaration_gives_the_same_job_on_the_command_line() -> None:
    """What a scheduler passes to the container: the same settings, every key, through the real options."""
    argv = schema.to_argv(FIELDS, EVERY_KEY)
    assert argv[:4] == ["--input", "s3://b/in/dt=2024-06-01/", "--input", "extra.parquet"]
    assert "--no-pickle" in argv and "--overwrite" in argv and "use_ssl=false" in argv
    assert argv[argv.index("--features") + 1] == "age,tenure"
    assert parse_flags(argv) == repr(build_config(None, **EVERY_KEY))
    # Defaults give no flag at all, so the container's own defaults stand.
    assert schema.to_argv(FIELDS, {"allow_pickle": True, "overwrite": False, "keep": None, "storage_options": {}}) == []


def test_every_key_has_a_flag_whose_help_shows_its_default() -> None:
    helps = {p.name: p.help for p in main.commands["run"].params if isinstance(p, click.Option)}
    for command in ("run", "plan", "commit", "validate", "spark"):
        names = {p.name for p in main.commands[command].params}
        assert set(CONFIG_KEYS) <= names, command
    assert helps["batch_size"].endswith("[default: 65536]")
    assert helps["storage_timeout"].endswith("[default: 10]")
    assert helps["model_version"].endswith("[default: unversioned]")
    assert "Repeatable." in helps["input"] and "[default" not in helps["output"]


def test_docs_key_table_is_the_declaration() -> None:
    """Same keys, flags, bounds, defaults and meanings as JobConfig (``make docs`` writes it)."""
    expected = job_keys()
    assert expected in (REPO / "docs" / "configuration.md").read_text(), "run `make docs`\n" + expected
    rows = {line.split(" | ")[0].strip("| `"): line.split(" | ")[2:4] for line in expected.splitlines()[2:]}
    assert rows["batch_size"] == ["an integer from 1 to 16777216", "65536"]
    assert rows["model_version"] == ["text", "`unversioned`"] and rows["input"][1] == "required"
    assert list(rows) == [*CONFIG_KEYS, "dag"]


def test_yaml_errors_name_the_file_the_key_and_the_value(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("input: in/\noutput: out/\nbatch_size: -3\nstorage_timeout: 0\non_invalid: maybe\n")
    result = cli("validate", "--config", config, "--lease-seconds", "0.5")
    assert result.exit_code == EXIT_USAGE
    error = result.stderr.strip()
    assert f"config file {config}: setting 'batch_size' must be an integer from 1 to 16777216, got -3" in error
    assert f"config file {config}: setting 'storage_timeout' must be a number of seconds from 0 to 3600, got 0" in error
    assert "setting 'on_invalid' must be one of fail, skip, quarantine, got 'maybe'" in error
    # A flag's value was not written in the file, so the file is not blamed for it.
    assert "; setting 'lease_seconds' must be a number of seconds from 1 to 86400, got 0.5" in error
    for bad, message in [
        ("workers: true", "setting 'workers' must be an integer from 1 to 1024, got True"),
        ("batch_size: '100'", "setting 'batch_size' must be an integer from 1 to 16777216, got '100'"),
        ("lease_seconds: .inf", "setting 'lease_seconds' must be a number of seconds from 1 to 86400, got inf"),
        ("storage_options: [a]", "setting 'storage_options' must be a mapping, got ['a']"),
        ("keep: 3", "setting 'keep' must be a string or a list of strings, got 3"),
        ("overwrite: 'yes'", "setting 'overwrite' must be true or false, got 'yes'"),
    ]:
        config.write_text(f"input: in/\n{bad}\n")
        with pytest.raises(ConfigError, match=re.escape(f"config file {config}: {message}")):
            build_config(str(config))


def test_yaml_values_are_read_as_declared(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(
        "input: a.parquet\nfeatures: 'age, tenure'\nkeep: [id]\nstorage_timeout: 3\n"
        "model_sha256: " + "A" * 64 + "\nstorage_options: {anon: true}\ndag: {anything: 1}\n"
    )
    job = build_config(str(config), storage_options={"endpoint_url": "http://x"})
    assert job.input == ("a.parquet",) and job.features == ("age", "tenure") and job.keep == ("id",)
    assert job.storage_timeout == 3.0 and isinstance(job.storage_timeout, float) and job.model_sha256 == "a" * 64
    assert job.storage_options["anon"] is True and job.storage_options["endpoint_url"] == "http://x"


def test_workers_default_to_the_cores_this_process_may_use() -> None:
    """One core of affinity means one worker, whatever the machine has (joblib.cpu_count)."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    probe = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from batchscore import JobConfig; "
        "print(JobConfig().worker_count, JobConfig(workers=5).worker_count)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split() == ["1", "5"]


def test_the_version_is_pyprojects() -> None:
    declared = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    result = cli("--version")
    assert result.exit_code == 0 and result.output.strip().endswith(f"version {declared}")
    import batchscore

    assert batchscore.__version__ == declared
