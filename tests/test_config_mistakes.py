"""Configuration mistakes that used to pass: each is a one-line usage error naming file, key and value.

- a key named twice in a job file, at any depth, names the key and both lines;
- a template (``{{ ds }}``) left where nothing renders it names the setting (the DAG still takes them);
- every number the job, its ``dag:`` section and its commands take has an upper bound with its
  reason, read from the declarations: a new number without one fails ``test_every_number_*``;
- ``validate`` fails wherever ``run`` would on what it writes or reads, with the same exit code,
  naming the same path (checked as a process without root's permission override).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import batchscore
from batchscore import api, schema
from batchscore.config import COMMAND_FIELDS, FIELDS, build_config
from batchscore.errors import EXIT_FAILURE, EXIT_MODEL, EXIT_USAGE, ConfigError
from batchscore.orchestration.dagspec import DAG_FIELDS, DagConfigError, parse_job
from helpers import REPO, binary_model, cli, multiclass_model, write_inputs

pytestmark = pytest.mark.fault

DAG = {"schedule": None, "start_date": "2024-06-01", "runner": "local"}


def one_error_line(stderr: str) -> str:
    """The one ``Error:`` line of a failed command, with no traceback before it."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, stderr
    return lines[0]


# --------------------------------------------------------------------------- every number is bounded


def sections(fields: dict[str, Any], prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """A declaration and every section nested in it (``dag.sensor``, ``dag.drift`` ...), by reading the types."""
    found = [(prefix, fields)]
    for key, info in fields.items():
        kind = schema._plain_type(info.annotation)
        nested = getattr(kind, "model_fields", None)
        if nested:
            found += sections(nested, f"{prefix}{key}.")
    return found


DECLARATIONS = [
    ("job", "", FIELDS),
    ("command", "", COMMAND_FIELDS),
    *[("dag", prefix, fields) for prefix, fields in sections(DAG_FIELDS)],
]
NUMBERS = [
    (where, prefix + key, info)
    for where, prefix, fields in DECLARATIONS
    for key, info in fields.items()
    if schema.is_number(info)
]


def test_every_number_has_an_upper_bound_and_says_why() -> None:
    """The class test: a number setting added without ``le``/``lt`` and ``why`` fails here."""
    assert len(NUMBERS) >= 25
    for where, prefix, fields in DECLARATIONS:
        assert schema.unbounded(fields) == [], f"{where} {prefix}: numbers without an upper bound or its reason"


def past(info: Any) -> Any:
    """The smallest value past a setting's upper bound (bound + 1, or the bound itself when excluded)."""
    bounds = schema._bounds(info)
    value = bounds["le"] + 1 if "le" in bounds else bounds["lt"]
    return float(value) if schema._plain_type(info.annotation) is float else int(value)


def absurd(info: Any) -> Any:
    return 1e30 if schema._plain_type(info.annotation) is float else 10**23


def bound_text(info: Any) -> str:
    return schema._number(schema.upper_bound(info))


JOB_NUMBERS = [(key, info) for where, key, info in NUMBERS if where == "job"]
DAG_NUMBERS = [(key, info) for where, key, info in NUMBERS if where == "dag"]


@pytest.mark.parametrize("make", [past, absurd], ids=["bound+1", "absurd"])
@pytest.mark.parametrize("key,info", JOB_NUMBERS, ids=[k for k, _ in JOB_NUMBERS])
def test_job_numbers_past_their_bound_are_usage_errors(tmp_path: Path, key: str, info: Any, make: Callable) -> None:
    value = make(info)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"input": "in/", "output": str(tmp_path / "out"), key: value}))
    for args in (["--config", job], ["--input", "in/", "--output", tmp_path / "out", schema.flag_of(key, info), value]):
        result = cli("validate", *args)
        assert result.exit_code == EXIT_USAGE, result.output
        line = one_error_line(result.stderr)
        assert f"'{key}'" in line and bound_text(info) in line and schema.extra(info)["why"] in line, line
        assert (str(job) in line) == (args[0] == "--config"), line
    with pytest.raises(DagConfigError, match=rf"job\.yaml: {key} must be .*{bound_text(info)}"):
        parse_job("job.yaml", {"input": "in/", "output": "out/x", key: value, "dag": DAG})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make", [past, absurd], ids=["bound+1", "absurd"])
@pytest.mark.parametrize("key,info", DAG_NUMBERS, ids=[k for k, _ in DAG_NUMBERS])
def test_dag_numbers_past_their_bound_fail_when_the_dags_are_parsed(
    tmp_path: Path, key: str, info: Any, make: Callable
) -> None:
    section: dict[str, Any] = dict(DAG)
    head, _, leaf = key.rpartition(".")
    (section.setdefault(head, {}) if head else section)[leaf] = make(info)
    with pytest.raises(DagConfigError) as refused:
        parse_job(str(tmp_path / "job.yaml"), {"input": "in/", "output": "out/x", "dag": section})
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'job.yaml'}: dag.{key} must be") and "\n" not in message
    assert bound_text(info) in message and schema.extra(info)["why"] in message


@pytest.mark.parametrize("amount", ["9Ei", "9223372036854775808", "10E", "1e19"])
def test_resource_amounts_past_what_kubernetes_holds_are_refused(amount: str) -> None:
    """Quantities are text, but numbers all the same: Kubernetes keeps them in 64 bits."""
    section = {**DAG, "resources": {"limits": {"memory": amount}}}
    with pytest.raises(
        DagConfigError,
        match=r"dag\.resources\.limits\.memory must be a Kubernetes quantity of at most "
        r"9223372036854775807 \(Kubernetes keeps a quantity in 64 bits\)",
    ):
        parse_job("job.yaml", {"input": "in/", "output": "out/x", "dag": section})
    assert parse_job(
        "job.yaml", {"input": "in/", "output": "out/x", "dag": {**DAG, "resources": {"limits": {"memory": "7Ei"}}}}
    )


#: How each command-only number is given on the command line; a new one needs its case here.
COMMAND_CASES: dict[str, list[Callable[[Any], list[str]]]] = {
    "shards": [
        lambda v: ["plan", "--shards", v],
        lambda v: ["commit", "--shards", v],
        lambda v: ["run", "--shard", f"0/{v}"],
    ],
    "rows_per_shard": [lambda v: ["plan", "--rows-per-shard", v]],
    "shard": [lambda v: ["run", "--shard", v], lambda v: ["run", "--shard", f"{v}/3"]],
    "rows": [lambda v: ["sample", "--rows", v]],
}


def test_every_command_number_has_cases() -> None:
    assert set(COMMAND_CASES) == set(COMMAND_FIELDS)


@pytest.mark.parametrize("make", [past, absurd], ids=["bound+1", "absurd"])
@pytest.mark.parametrize("key", sorted(COMMAND_CASES))
def test_command_numbers_past_their_bound_are_usage_errors(tmp_path: Path, key: str, make: Callable) -> None:
    info = COMMAND_FIELDS[key]
    job = ["--input", tmp_path / "in", "--output", tmp_path / "out", "--model", tmp_path / "model.joblib"]
    for case in COMMAND_CASES[key]:
        argv = case(make(info))
        argv += ["--out-dir", tmp_path / "sample"] if argv[0] == "sample" else job
        result = cli(*argv)
        assert result.exit_code == EXIT_USAGE, (argv, result.output)
        line = one_error_line(result.stderr)
        assert schema.flag_of(key, info) in line and bound_text(info) in line, line
        assert schema.extra(info)["why"] in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "sample").exists()


def test_numbers_at_their_bound_are_accepted(tmp_path: Path) -> None:
    """The bound itself is a value, not an error (the largest one is refused only past it)."""
    at = {key: schema.upper_bound(info) for key, info in JOB_NUMBERS if "le" in schema._bounds(info)}
    config = build_config(None, input=("in/",), output=str(tmp_path / "out"), **at)
    assert config.batch_size == 2**24 and config.lease_seconds == 86_400
    section = {**DAG, **{k: schema.upper_bound(i) for k, i in DAG_NUMBERS if "." not in k and k != "rows_per_shard"}}
    assert parse_job("job.yaml", {"input": "in/", "output": "out/x", "dag": section}).dag.shards == 10_000


# --------------------------------------------------------------------------- keys named twice


@pytest.mark.parametrize(
    "text,key,lines",
    [
        ("input: in/\noutput: out/\nbatch_size: 100\nkeep: [id]\nbatch_size: 200\n", "batch_size", (3, 5)),
        (
            "input: in/\noutput: out/\ndag:\n  schedule: '@daily'\n  start_date: 2024-06-01\n  schedule: null\n",
            "schedule",
            (4, 6),
        ),
        ("input: in/\ndag:\n  resources:\n    limits:\n      cpu: 1\n      memory: 1Gi\n      cpu: 2\n", "cpu", (5, 7)),
        ("input: in/\ndag:\n  sensor: {marker: _SUCCESS, timeout: 60, marker: _DONE}\n", "marker", (3, 3)),
        ("input: in/\nstorage_options:\n  endpoint_url: http://a\n  endpoint_url: http://b\n", "endpoint_url", (3, 4)),
        (
            "input: in/\ndag:\n  secrets:\n    - {secret: s3, key: id, env: A}\n    - secret: s3\n      secret: gcs\n",
            "secret",
            (5, 6),
        ),
        ("input: in/\ninput: other/\n", "input", (1, 2)),
    ],
)
def test_a_key_named_twice_names_the_key_and_both_lines(
    tmp_path: Path, text: str, key: str, lines: tuple[int, int]
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(text)
    expected = f"{job}: key '{key}' appears twice (lines {lines[0]} and {lines[1]})"
    for command in ("validate", "run", "plan"):
        result = cli(command, "--config", job)
        assert result.exit_code == EXIT_USAGE and expected in one_error_line(result.stderr), result.stderr
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "job.yaml").write_text(text + ("" if "dag:" in text else "dag:\n  schedule: null\n"))
    from batchscore.orchestration.dagspec import load_jobs

    with pytest.raises(DagConfigError, match=f"key '{key}' appears twice \\(lines {lines[0]} and {lines[1]}\\)"):
        load_jobs(dags)


def test_merge_keys_and_repeated_values_are_not_duplicates(tmp_path: Path) -> None:
    """``<<: *defaults`` then a key of its own overrides the merged one, as YAML means it to."""
    job = tmp_path / "job.yaml"
    job.write_text("input: in/\noutput: out/\nstorage_options: {anon: true, region_name: eu}\nkeep: [id, id]\n")
    assert build_config(str(job)).storage_options["anon"] is True
    from batchscore.config import load_yaml

    assert load_yaml("a: &d {x: 1, y: 2}\nb:\n  <<: *d\n  x: 3\n") == {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}}


def test_a_storage_option_given_twice_on_the_command_line_is_refused() -> None:
    result = cli(
        "validate",
        "--input",
        "in/",
        "--output",
        "out/",
        "--storage-option",
        "anon=true",
        "--storage-option",
        "anon=false",
    )
    assert result.exit_code == EXIT_USAGE
    assert "--storage-option gives 'anon' twice" in one_error_line(result.stderr)


# --------------------------------------------------------------------------- templates


TEMPLATES = ["out/dt={{ ds }}", "out/{% if true %}x{% endif %}", "out/{# note #}x", "s3://b/{{params.day}}/"]
TEXT_KEYS = ["input", "output", "model", "scaler", "compiled_cache", "reference", "job_name", "model_version"]


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("key", TEXT_KEYS + ["storage_options"])
def test_a_template_nothing_renders_is_refused_naming_the_setting(tmp_path: Path, key: str, template: str) -> None:
    value: Any = {"endpoint_url": template} if key == "storage_options" else template
    settings = {"input": "in/", "output": str(tmp_path / "out"), "model": "m.joblib", key: value}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(settings))
    info = FIELDS[key]
    flag_value = f"endpoint_url={template}" if key == "storage_options" else template
    for command in ("validate", "run"):
        for args in (["--config", job], ["--config", job, schema.flag_of(key, info), flag_value]):
            result = cli(command, *args)
            assert result.exit_code == EXIT_USAGE, result.output
            line = one_error_line(result.stderr)
            shown = (
                template.split(" #")[0] if len(args) > 2 and key == "storage_options" else template
            )  # YAML: " #" is a comment
            assert f"setting '{key}' holds the template" in line and shown in line, line
    with pytest.raises(ConfigError, match=f"setting '{key}' holds the template") as refused:
        build_config(None, **{k: (tuple([v]) if k == "input" else v) for k, v in settings.items()})
    assert refused.value.exit_code == EXIT_USAGE
    with pytest.raises(ConfigError, match=f"setting '{key}' holds the template"):
        batchscore.JobConfig(**{k: (tuple([v]) if k == "input" else v) for k, v in settings.items()})  # type: ignore[arg-type]  # mixed types
    assert not any("{" in p.name for p in tmp_path.rglob("*")), "a folder named after a template"


def test_templates_in_command_only_paths_are_refused(tmp_path: Path) -> None:
    config = build_config(None, input=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model="m.joblib")
    for call, key in [
        (lambda: api.plan(config, out="plans/{{ ds }}.json"), "out"),
        (lambda: api.run_shard(config, 0, plan="plans/{{ ds }}.json"), "plan"),
        (lambda: api.commit(config, plan="plans/{{ ds }}.json"), "plan"),
        (lambda: api.load_plan("plans/{{ ds }}.json", config), "plan"),
        (lambda: api.report("out/dt={{ ds }}"), "output"),
        (lambda: api.compile_model(config, out="cache/{{ ds }}"), "out"),
    ]:
        with pytest.raises(ConfigError, match=f"setting '{key}' holds the template"):
            call()
    result = cli(
        "plan",
        "--input",
        tmp_path / "in",
        "--output",
        tmp_path / "out",
        "--model",
        "m.joblib",
        "--out",
        "plans/{{ ds }}.json",
    )
    assert result.exit_code == EXIT_USAGE and "setting 'out' holds the template" in one_error_line(result.stderr)
    result = cli("report", "out/dt={{ ds }}")
    assert result.exit_code == EXIT_USAGE and "setting 'output' holds the template" in one_error_line(result.stderr)


def test_the_dag_takes_templates_where_airflow_renders_them() -> None:
    job = {
        "input": ["in/dt={{ ds }}/", "in/{% if params.x %}x{% endif %}/"],
        "output": "out/dt={{ ds }}/",
        "model": "models/{{ params.version }}.joblib",
        "storage_options": {"endpoint_url": "{{ var.value.s3 }}"},
        "job_name": "churn_{{ ds_nodash }}",
        "dag": {
            **DAG,
            "env": {"RUN_DATE": "{{ ds }}"},
            "sensor": {"path": "in/dt={{ ds }}/", "marker": "_{{ ds }}"},
            "drift": {"reference": "out/dt={{ macros.ds_add(ds, -7) }}/"},
        },
    }
    settings = parse_job("job.yaml", job)
    assert "--output" in settings.common_args and "out/dt={{ ds }}/" in settings.common_args
    assert "models/{{ params.version }}.joblib" in settings.common_args
    assert settings.dag.env == {"RUN_DATE": "{{ ds }}"} and settings.dag.sensor.marker == "_{{ ds }}"  # type: ignore[union-attr]  # it has one


@pytest.mark.parametrize(
    "key,value",
    [
        ("image", "repo/batchscore:{{ ds }}"),
        ("namespace", "{{ params.ns }}"),
        ("description", "scores of {{ ds }}"),
        ("tags", ["{{ ds }}"]),
        ("service_account", "{% if 1 %}sa{% endif %}"),
        ("node_selector", {"pool": "{{ ds }}"}),
    ],
)
def test_the_dag_refuses_templates_in_keys_nothing_renders(key: str, value: Any) -> None:
    job = {"input": "in/", "output": "out/x", "dag": {**DAG, key: value}}
    with pytest.raises(DagConfigError, match=rf"^job\.yaml: dag\.{key}: .* is a template, but the DAG does not render"):
        parse_job("job.yaml", job)


# --------------------------------------------------------------------------- validate == run


def _without_root_override() -> None:
    """In the child: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set before it
    runs Python, so that root obeys permission bits like any user (a non-root user already does)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP; fails harmlessly without CAP_SETPCAP


def batchscore_process(cwd: Path, *args: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(cwd / "home"), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("BATCHSCORE_COMPILED_CACHE", None)
    return subprocess.run(
        [sys.executable, "-m", "batchscore", *map(str, args)],
        cwd=cwd,
        env=env,
        text=True,
        capture_output=True,
        timeout=240,
        preexec_fn=_without_root_override,
    )


#: One process runs ``validate`` then ``run`` with the same flags (Python starts once) and prints
#: each one's exit code and stderr.
VALIDATE_THEN_RUN = """
import json, sys
from click.testing import CliRunner
from batchscore.cli import main
results = []
for command in ("validate", "run"):
    result = CliRunner().invoke(main, [command, *sys.argv[1:]])
    results.append((result.exit_code, result.stderr))
print(json.dumps(results))
"""


def validate_then_run(cwd: Path, *args: Any, privileged: bool) -> list[tuple[int, str]]:
    """Exit code and stderr of ``validate`` and of ``run``; without root's permission override
    unless ``privileged`` (the case needs no permission bits: it runs in this process)."""
    if privileged:
        return [(r.exit_code, r.stderr) for r in (cli("validate", *args), cli("run", *args))]
    env = {**os.environ, "HOME": str(cwd / "home"), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("BATCHSCORE_COMPILED_CACHE", None)
    child = subprocess.run(
        [sys.executable, "-c", VALIDATE_THEN_RUN, *map(str, args)],
        cwd=cwd,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
        preexec_fn=_without_root_override,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    import json

    return [tuple(item) for item in json.loads(child.stdout.splitlines()[-1])]


def read_only(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    return path


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    models = binary_model(root / "model")
    (write_inputs(root / "in", files=1, rows=1_203, row_group_size=400))
    return {"root": root, "input": root / "in", **models}


def _lease_of_another_job(output: Path) -> None:
    from batchscore.io.layout import lease_path
    from batchscore.io.lease import LeaseRecord

    now = time.time()
    record = LeaseRecord(
        "plan 0123456789abcdef",
        "0123456789abcdef",
        "plan",
        socket.gethostname(),
        os.getpid(),
        None,
        False,
        now,
        now + 3600,
    )
    path = Path(lease_path(str(output)))
    path.parent.mkdir(parents=True)
    path.write_bytes(record.to_bytes())


def _unreadable_reference(case: Path) -> list[str]:
    ref = case / "refs" / "ref"
    ref.mkdir(parents=True)
    (ref / "_SUCCESS").write_text("")
    report = case / "refs" / "_batchscore" / "ref" / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text("{}")
    report.chmod(0o000)
    return ["--reference", str(ref)]


def _unreadable_model(case: Path, parity: dict[str, Path]) -> list[str]:
    model = case / "model.joblib"
    shutil.copy(parity["model"], model)
    model.chmod(0o000)
    return ["--model", str(model)]


def _unwritable_cache(case: Path, parity: dict[str, Path]) -> list[str]:
    models = multiclass_model(case / "trees")
    return [
        "--model",
        str(models["model"]),
        "--scaler",
        str(models["scaler"]),
        "--engine",
        "compiled",
        "--compiled-cache",
        str(read_only(case / "cache")),
    ]


def _existing_output(case: Path) -> list[str]:
    (case / "out").mkdir()
    (case / "out" / "part-00000-00000.parquet").write_text("x")
    return []


#: name -> (what to spoil, given the case's folder; the exit code; the path both must name).
PARITY_CASES: dict[str, tuple[Callable[..., list[str] | None], int, str]] = {
    "output parent read-only": (lambda c, p: read_only(c) and None, EXIT_FAILURE, "{case}/_batchscore/out"),
    "output folder read-only": (lambda c, p: read_only(c / "out") and ["--overwrite"], EXIT_FAILURE, "{case}/out"),
    "state root is a file": (
        lambda c, p: (c / "_batchscore").write_text("x") and None,
        EXIT_USAGE,
        "{case}/_batchscore/out",
    ),
    "state folder read-only": (
        lambda c, p: read_only(c / "_batchscore" / "out") and None,
        EXIT_FAILURE,
        "{case}/_batchscore/out",
    ),
    "receipts read-only": (
        lambda c, p: read_only(c / "_batchscore" / "out" / "receipts") and None,
        EXIT_FAILURE,
        "{case}/_batchscore/out/receipts",
    ),
    "rejected read-only (quarantine)": (
        lambda c, p: read_only(c / "_batchscore" / "out" / "rejected") and ["--on-invalid", "quarantine"],
        EXIT_FAILURE,
        "{case}/_batchscore/out/rejected",
    ),
    "rejected is a file (quarantine)": (
        lambda c, p: (
            (c / "_batchscore" / "out").mkdir(parents=True),
            (c / "_batchscore" / "out" / "rejected").write_text("x"),
            ["--on-invalid", "quarantine"],
        )[-1],
        EXIT_USAGE,
        "{case}/_batchscore/out/rejected",
    ),
    "output held by another job": (lambda c, p: _lease_of_another_job(c / "out"), EXIT_USAGE, "{case}/out"),
    "output exists": (lambda c, p: _existing_output(c), EXIT_USAGE, "{case}/out"),
    "output is a file": (lambda c, p: (c / "out").write_text("x") and ["--overwrite"], EXIT_USAGE, "{case}/out"),
    "output overlaps the input": (lambda c, p: ["--output", str(p["input"] / "scores")], EXIT_USAGE, "scores"),
    "model unreadable": (lambda c, p: _unreadable_model(c, p), EXIT_FAILURE, "{case}/model.joblib"),
    "reference unreadable": (
        lambda c, p: _unreadable_reference(c),
        EXIT_FAILURE,
        "{case}/refs/_batchscore/ref/report.json",
    ),
    "compiled cache read-only": (lambda c, p: _unwritable_cache(c, p), EXIT_MODEL, "{case}/cache"),
}


#: Cases that need no permission bits (a file in the way, a lease, an existing output): they run in
#: this process; the others run in a child without root's permission override.
NO_PERMISSION_BITS = {
    "state root is a file",
    "rejected is a file (quarantine)",
    "output held by another job",
    "output exists",
    "output is a file",
    "output overlaps the input",
}


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_validate_fails_where_run_fails_with_the_same_code_and_path(parity: dict[str, Path], name: str) -> None:
    spoil, code, where = PARITY_CASES[name]
    case = parity["root"] / name.replace(" ", "-").replace("(", "").replace(")", "")
    case.mkdir()
    (case.parent / "home").mkdir(exist_ok=True)
    extra = spoil(case, parity) or []
    args = [
        "--input",
        parity["input"],
        "--output",
        case / "out",
        "--model",
        parity["model"],
        "--scaler",
        parity["scaler"],
        "--workers",
        "1",
        "--batch-size",
        "333",
        *extra,
    ]
    path = where.format(case=case)
    try:
        (checked, checked_err), (ran, ran_err) = validate_then_run(
            case.parent, *args, privileged=name in NO_PERMISSION_BITS
        )
    finally:
        for folder in [case, *case.rglob("*")]:  # let the next test (and pytest) remove it
            if not folder.is_symlink():
                folder.chmod(0o777 if folder.is_dir() else 0o666)
    assert (checked, ran) == (code, code), (checked_err[-2000:], ran_err[-2000:])
    validate_line, run_line = one_error_line(checked_err), one_error_line(ran_err)
    assert path in validate_line and path in run_line, (validate_line, run_line)
    assert not list((case / "out").glob("part-*")) or name == "output exists", "run scored before it failed"


def test_validate_and_run_succeed_as_an_unprivileged_process(parity: dict[str, Path]) -> None:
    """The control for the cases above: nothing spoiled, both succeed, and validate leaves nothing."""
    case = parity["root"] / "clean"
    case.mkdir()
    args = [
        "--input",
        parity["input"],
        "--output",
        case / "out",
        "--model",
        parity["model"],
        "--scaler",
        parity["scaler"],
        "--workers",
        "1",
        "--on-invalid",
        "quarantine",
    ]
    (checked, checked_err), (ran, ran_err) = validate_then_run(parity["root"], *args, privileged=False)
    assert (checked, ran) == (0, 0), (checked_err[-2000:], ran_err[-2000:])
    assert sorted(p.name for p in case.iterdir()) == ["_batchscore", "out"]
    assert (case / "out" / "_SUCCESS").exists()
    case = parity["root"] / "validated"
    case.mkdir()
    args[3] = case / "out"
    checked_in_process = cli("validate", *args)
    assert checked_in_process.exit_code == 0, checked_in_process.stderr
    assert list(case.iterdir()) == [], "validate left something behind"


def test_plan_out_that_cannot_be_written_fails_before_the_lease_is_taken(parity: dict[str, Path]) -> None:
    case = parity["root"] / "plan-out"
    case.mkdir()
    plans = read_only(case / "plans")
    args = [
        "--input",
        parity["input"],
        "--output",
        case / "out",
        "--model",
        parity["model"],
        "--scaler",
        parity["scaler"],
        "--shards",
        "2",
        "--out",
        plans / "plan.json",
    ]
    try:
        planned = batchscore_process(parity["root"], "plan", *args)
    finally:
        plans.chmod(0o777)
    assert planned.returncode == EXIT_FAILURE and str(plans) in one_error_line(planned.stderr), planned.stderr
    assert not (case / "_batchscore").exists(), "the lease was taken by a plan that could not be written"


def test_docs_say_what_is_checked_before_anything_runs() -> None:
    text = (REPO / "docs" / "safety.md").read_text()
    start = text.index("Every setting is checked before anything runs")
    paragraph = text[start : text.index("\n\n", start)]
    for words in ("twice", "template", "upper bound", "validate"):
        assert words in paragraph, words
