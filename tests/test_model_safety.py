"""Model artifacts are checked before they are loaded: pins, plan digests, skops trust, no-pickle.

A joblib file runs code while it is unpickled, so the malicious-file cases run the real CLI in a
subprocess and look for the file its code would create: a refusal must leave nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import joblib
import pytest
import skops.io

from batchscore.errors import EXIT_MODEL, EXIT_USAGE
from batchscore.sample import FEATURES
from helpers import (
    assert_exact,
    binary_model,
    cli,
    multiclass_model,
    pipeline_model,
    plan_file,
    read_inputs,
    read_manifest,
    read_output,
    receipt_file,
    training_frame,
    write_inputs,
)

TREE = "sklearn.tree._tree.Tree"
TREE_PREDICTOR = "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"


class _TouchOnLoad:
    """Unpickles as a call to ``Path.touch(marker)``: the marker proves the file's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _double(x: Any) -> Any:
    """A custom function: skops cannot know it is harmless, so it must be trusted by name."""
    return x * 2


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def skops_copies(paths: dict[str, Path], folder: Path) -> dict[str, Path]:
    """The same fitted objects saved with skops, as ``<role>.skops`` in ``folder``."""
    copies = {}
    for role, path in paths.items():
        copies[role] = folder / f"{role}.skops"
        skops.io.dump(joblib.load(path), copies[role])
    return copies


def batchscore(*args: Any, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real CLI in its own process, as a scheduler would start it."""
    return subprocess.run(
        [sys.executable, "-m", "batchscore", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_inputs(tmp_path_factory.mktemp("in"), files=2, rows=1_616, row_group_size=404)


@pytest.fixture
def job(tmp_path: Path, inputs: list[Path], binary_model_paths: dict[str, Path]) -> dict[str, Any]:
    """A good model copied where the test may swap it, the malicious file, and its marker."""
    model = tmp_path / "model.joblib"
    shutil.copyfile(binary_model_paths["model"], model)
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.joblib"
    joblib.dump(_TouchOnLoad(marker), evil)
    return {
        "model": model,
        "scaler": binary_model_paths["scaler"],
        "good_sha256": sha256(model),
        "evil": evil,
        "marker": marker,
        "out": tmp_path / "out",
        "plan": plan_file(tmp_path / "out"),
        "common": ["--input", inputs[0].parent],
    }


@pytest.mark.fault
def test_the_malicious_file_runs_code_when_nothing_stops_it(job: dict[str, Any]) -> None:
    """The control for every test below: unpinned, the file's code runs."""
    result = batchscore("inspect", job["evil"])
    assert job["marker"].exists(), result.stderr
    assert result.returncode == EXIT_MODEL  # it then turns out not to be an estimator


@pytest.mark.fault
@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "{evil}"],
        ["validate", "{common}", "--output", "{out}", "--model", "{evil}"],
        ["run", "{common}", "--output", "{out}", "--model", "{evil}"],
        ["plan", "{common}", "--output", "{out}", "--model", "{evil}", "--shards", "2", "--out", "{plan}"],
        ["run", "{common}", "--output", "{out}", "--model", "{evil}", "--shard", "1/2"],
        ["commit", "{common}", "--output", "{out}", "--model", "{evil}", "--shards", "2"],
    ],
    ids=["inspect", "validate", "run", "plan", "run-shard-I/N", "commit-shards-N"],
)
def test_a_pinned_digest_stops_a_swapped_model_before_it_is_unpickled(job: dict[str, Any], command: list[str]) -> None:
    args: list[Any] = []
    for arg in command:
        args += job["common"] if arg == "{common}" else [arg.format(**job)]
    result = batchscore(*args, "--scaler", job["scaler"], "--model-sha256", job["good_sha256"])
    assert result.returncode == EXIT_MODEL, result.stderr
    assert not job["marker"].exists(), "the model's code ran"
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"model artifact {job['evil']} does not match its pinned digest" in result.stderr
    assert f"expected sha256 {job['good_sha256']}, got {sha256(job['evil'])}" in result.stderr
    assert not (job["out"] / "_SUCCESS").exists()


@pytest.mark.fault
def test_a_plan_stops_a_model_swapped_after_it_was_made(job: dict[str, Any]) -> None:
    common = [*job["common"], "--output", job["out"], "--model", job["model"], "--scaler", job["scaler"]]
    plan = plan_file(job["out"])
    assert batchscore("plan", *common, "--shards", "2", "--out", plan).returncode == 0
    shutil.copyfile(job["evil"], job["model"])  # same name, new bytes: no pin given anywhere
    result = batchscore("run", *common, "--plan", plan, "--shard", "0")
    assert result.returncode == EXIT_MODEL, result.stderr
    assert not job["marker"].exists(), "the model's code ran"
    assert f"model artifact {job['model']} changed since the plan was made" in result.stderr
    assert f"expected sha256 {job['good_sha256']}" in result.stderr and "plan again" in result.stderr
    assert not receipt_file(job["out"], 0).exists()


@pytest.mark.fault
def test_a_scaler_pin_is_checked_before_the_model_is_unpickled(job: dict[str, Any]) -> None:
    """Both artifacts pass their checks before either is loaded: a bad scaler stops an unpinned model."""
    result = batchscore(
        "validate",
        *job["common"],
        "--output",
        job["out"],
        "--model",
        job["evil"],
        "--scaler",
        job["scaler"],
        "--scaler-sha256",
        "0" * 64,
    )
    assert result.returncode == EXIT_MODEL and f"scaler artifact {job['scaler']}" in result.stderr
    assert not job["marker"].exists(), "the model's code ran"


@pytest.mark.fault
def test_inspect_sha256_only_hashes_without_unpickling(job: dict[str, Any]) -> None:
    result = batchscore("inspect", job["evil"], "--sha256-only")
    assert result.returncode == 0, result.stderr
    assert not job["marker"].exists(), "the model's code ran"
    info = json.loads(result.stdout)
    digest = sha256(job["evil"])
    assert info["artifacts"] == [
        {
            "role": "model",
            "uri": str(job["evil"]),
            "format": "joblib",
            "sha256": digest,
            "bytes": job["evil"].stat().st_size,
        }
    ]
    assert info["pin"] == f"--model-sha256 {digest}"


@pytest.mark.fault
def test_no_pickle_refuses_joblib_before_unpickling(job: dict[str, Any]) -> None:
    result = batchscore("run", *job["common"], "--output", job["out"], "--model", job["evil"], "--no-pickle")
    assert result.returncode == EXIT_MODEL and "pickles are not allowed" in result.stderr
    assert not job["marker"].exists(), "the model's code ran"


@pytest.mark.fault
def test_a_pickle_named_skops_never_reaches_pickle(job: dict[str, Any]) -> None:
    disguised = job["evil"].with_suffix(".skops")
    shutil.copyfile(job["evil"], disguised)
    result = batchscore("inspect", disguised)
    assert result.returncode == EXIT_MODEL and "is not a readable skops file" in result.stderr
    assert not job["marker"].exists(), "the model's code ran"


def test_a_correct_pin_scores_normally_in_any_case(job: dict[str, Any], inputs: list[Path]) -> None:
    scaler_sha256 = sha256(job["scaler"]).upper()  # hex digits in either case
    result = cli(
        "run",
        *job["common"],
        "--output",
        job["out"],
        "--model",
        job["model"],
        "--scaler",
        job["scaler"],
        "--model-sha256",
        job["good_sha256"],
        "--scaler-sha256",
        scaler_sha256,
    )
    assert result.exit_code == 0, result.stderr
    assert_exact(read_output(job["out"]), read_inputs(inputs), {"model": job["model"], "scaler": job["scaler"]})
    manifest = read_manifest(job["out"])
    assert [(a["role"], a["format"], a["sha256"]) for a in manifest["artifacts"]] == [
        ("model", "joblib", job["good_sha256"]),
        ("scaler", "joblib", scaler_sha256.lower()),
    ]


def test_pins_in_the_job_file_and_their_errors(tmp_path: Path, job: dict[str, Any]) -> None:
    config = tmp_path / "job.yaml"
    base = f"input: {job['common'][1]}\noutput: {job['out']}\nmodel: {job['evil']}\n"
    config.write_text(base + f"model_sha256: {job['good_sha256']}\n")
    result = cli("validate", "--config", config)
    assert result.exit_code == EXIT_MODEL and "does not match its pinned digest" in result.stderr
    assert not job["marker"].exists()
    config.write_text(base + "model_sha256: abc123\n")
    result = cli("validate", "--config", config)
    assert result.exit_code == EXIT_USAGE
    assert "setting 'model_sha256' must be a sha256 digest (64 hex characters), got 'abc123'" in result.stderr
    config.write_text(base + f"scaler_sha256: {'e' * 64}\n")
    result = cli("validate", "--config", config)
    assert result.exit_code == EXIT_USAGE and "'scaler_sha256' pins a scaler but no scaler is given" in result.stderr
    config.write_text(base + "trusted_types: [Tree]\n")
    result = cli("validate", "--config", config)
    assert result.exit_code == EXIT_USAGE and "e.g. sklearn.tree._tree.Tree; got 'Tree'" in result.stderr
    assert not job["marker"].exists()


def test_inspect_prints_the_pin_to_use(job: dict[str, Any]) -> None:
    result = cli("inspect", job["model"], "--scaler", job["scaler"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["pin"] == f"--model-sha256 {job['good_sha256']} --scaler-sha256 {sha256(job['scaler'])}"
    assert [a["format"] for a in info["artifacts"]] == ["joblib", "joblib"]


def test_commit_refuses_a_plan_made_with_another_model_than_pinned(job: dict[str, Any]) -> None:
    common = [*job["common"], "--output", job["out"], "--model", job["model"], "--scaler", job["scaler"]]
    plan = plan_file(job["out"])
    assert cli("plan", *common, "--shards", "1", "--out", plan).exit_code == 0
    assert cli("run", *common, "--plan", plan, "--shard", "0").exit_code == 0
    result = cli("commit", *common, "--plan", plan, "--model-sha256", "f" * 64)
    assert result.exit_code == EXIT_MODEL and f"plan {plan}: model artifact" in result.stderr
    assert not (job["out"] / "_SUCCESS").exists()
    assert cli("commit", *common, "--plan", plan, "--model-sha256", job["good_sha256"]).exit_code == 0


@pytest.mark.parametrize("make, trust", [
    (binary_model, []),                    # LogisticRegression + StandardScaler
    (multiclass_model, [TREE_PREDICTOR]),  # HistGradientBoosting + MinMaxScaler
    (pipeline_model, [TREE]),              # Pipeline(StandardScaler, RandomForest)
], ids=["logistic", "hist-gradient-boosting", "random-forest-pipeline"])  # fmt: skip  # the comments line up, one per case
def test_skops_artifacts_score_exactly_like_joblib(tmp_path: Path, inputs: list[Path], make, trust) -> None:
    joblib_paths = make(tmp_path / "m")
    paths = skops_copies(joblib_paths, tmp_path)
    model_args = ["--model", paths["model"]] + (["--scaler", paths["scaler"]] if "scaler" in paths else [])
    common = ["--input", inputs[0].parent, "--output", tmp_path / "out", *model_args, "--no-pickle"]
    if trust:  # tree structures are loaded only when named: skops cannot check their node indices
        refused = cli("run", *common)
        assert refused.exit_code == EXIT_MODEL, refused.stderr
        assert f"holds type(s) that are not trusted: {trust[0]}" in refused.stderr
        assert f"--trust {trust[0]}" in refused.stderr
    result = cli("run", *common, *[arg for name in trust for arg in ("--trust", name)])
    assert result.exit_code == 0, result.stderr
    assert_exact(read_output(tmp_path / "out"), read_inputs(inputs), joblib_paths)
    manifest = read_manifest(tmp_path / "out")
    assert [(a["role"], a["uri"], a["format"], a["sha256"]) for a in manifest["artifacts"]] == [
        (role, str(path), "skops", sha256(path)) for role, path in paths.items()
    ]


def test_a_skops_type_not_trusted_exits_4_naming_it_until_trusted_by_name(tmp_path: Path, inputs: list[Path]) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    frame = training_frame()
    pipe = make_pipeline(FunctionTransformer(_double), LogisticRegression())
    pipe.fit(frame[list(FEATURES)], frame["churned"])
    joblib.dump(pipe, tmp_path / "model.joblib")
    skops.io.dump(pipe, tmp_path / "model.skops")
    name = f"{_double.__module__}._double"
    common = ["--input", inputs[0].parent, "--output", tmp_path / "out", "--model", tmp_path / "model.skops"]
    result = cli("validate", *common)
    assert result.exit_code == EXIT_MODEL
    assert result.stderr == (
        f"Error: model artifact {tmp_path / 'model.skops'} holds type(s) that are not trusted: "
        f"{name}; if you trust the file's source, allow each by name (--trust {name}, "
        f"or YAML trusted_types)\n"
    )
    assert cli("validate", *common, "--trust", "sklearn.tree._tree.Tree").exit_code == EXIT_MODEL
    result = cli("run", *common, "--trust", name)
    assert result.exit_code == 0, result.stderr
    assert_exact(read_output(tmp_path / "out"), read_inputs(inputs), {"model": tmp_path / "model.joblib"})


def test_pinned_skops_artifacts_on_s3(tmp_path: Path, s3, inputs: list[Path], binary_model_paths) -> None:
    fs, bucket, options = s3
    paths = skops_copies(binary_model_paths, tmp_path)
    for path in paths.values():
        fs.put_file(str(path), f"{bucket}/models/{path.name}")
    common = [
        "--input",
        inputs[0].parent,
        "--output",
        tmp_path / "out",
        "--no-pickle",
        "--model",
        f"s3://{bucket}/models/model.skops",
        "--scaler",
        f"s3://{bucket}/models/scaler.skops",
        "--storage-option",
        f"endpoint_url={options['endpoint_url']}",
    ]
    result = cli("validate", *common, "--model-sha256", sha256(paths["scaler"]))
    assert result.exit_code == EXIT_MODEL
    assert f"model artifact s3://{bucket}/models/model.skops does not match its pinned digest" in result.stderr
    result = cli("run", *common, "--model-sha256", sha256(paths["model"]), "--scaler-sha256", sha256(paths["scaler"]))
    assert result.exit_code == 0, result.stderr
    assert_exact(read_output(tmp_path / "out"), read_inputs(inputs), binary_model_paths)
    manifest = read_manifest(tmp_path / "out")
    assert [(a["uri"], a["format"]) for a in manifest["artifacts"]] == [
        (f"s3://{bucket}/models/model.skops", "skops"),
        (f"s3://{bucket}/models/scaler.skops", "skops"),
    ]
