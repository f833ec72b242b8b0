"""Models from an MLflow registry: resolved once, pinned for every step, loaded by batchscore's rules.

A real ``mlflow server`` (SQLite backend store, artifacts in a bucket on the loopback S3 API,
served to clients through the server) and a SQLite registry file
with no server; models registered with ``mlflow.sklearn.log_model``; aliases moved as teams move them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import pyarrow.compute as pc
import pytest

from batchscore.errors import EXIT_FAILURE, EXIT_MODEL, EXIT_USAGE
from batchscore.sample import FEATURES
from helpers import assert_exact, cli, read_inputs, read_manifest, read_output, training_frame, write_inputs
from mlflow_fixtures import Server, free_port, log_sklearn, mlflow_server, stalled_server, tracking

TREE = "sklearn.tree._tree.Tree"


def pipeline(c: float = 1.0) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    frame = training_frame()
    return make_pipeline(StandardScaler(), LogisticRegression(C=c)).fit(frame[list(FEATURES)], frame["churned"])


class Registry:
    """A registry the tests use: its URI, client, and a joblib copy of each registered model (the reference)."""

    def __init__(self, uri: str, client: Any, folder: Path, store: Any = None, artifacts: str = ""):
        self.uri, self.client, self.folder = uri, client, folder
        self.store, self.artifacts = store, artifacts  # the server's artifact store: s3fs, bucket/path
        self.references: dict[str, Path] = {}
        self.runs: dict[str, str] = {}

    def register(self, name: str, model: Any, **options: Any) -> str:
        version, run_id = log_sklearn(model, name, **options)
        self.references[f"{name}/{version}"] = path = self.folder / f"{name}-{version}.joblib"
        self.runs[f"{name}/{version}"] = run_id
        joblib.dump(model, path)
        return version


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory, moto_s3: str) -> Iterator[Server]:
    """The server, its artifacts in a bucket on the loopback S3 API; started by this module's first
    test (which needs a registry but not this one), so the tests before the server's run while it starts."""
    import s3fs

    s3fs.S3FileSystem(endpoint_url=moto_s3).mkdir("mlflow-artifacts")
    folder = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(folder, "s3://mlflow-artifacts/store", s3_endpoint=moto_s3) as server:
        yield server


@pytest.fixture(scope="module")
def server(started: Server, moto_s3: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """churn v1 (skops, MLflow's default) and v2 (cloudpickle), alias champion on v1; forest v1, a tree
    ensemble whose MLmodel trusts the tree type; pyfn v1, a pyfunc model that is not scikit-learn."""
    import mlflow.pyfunc
    import s3fs
    from sklearn.ensemble import RandomForestClassifier

    with tracking(started.ready()) as client:
        store = s3fs.S3FileSystem(endpoint_url=moto_s3)
        registry = Registry(started.url, client, tmp_path_factory.mktemp("references"), store, started.artifacts)
        registry.register("churn", pipeline())
        registry.register("churn", pipeline(c=0.02), serialization_format="cloudpickle")
        client.set_registered_model_alias("churn", "champion", "1")
        frame = training_frame()
        forest = RandomForestClassifier(n_estimators=4, max_depth=4, random_state=0)
        registry.register("forest", forest.fit(frame[list(FEATURES)], frame["churned"]), skops_trusted_types=[TREE])

        class Constant(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
            def predict(self, context: Any, model_input: Any, params: Any = None) -> Any:
                return [0.5] * len(model_input)

        with mlflow.start_run():
            mlflow.pyfunc.log_model(
                name="model",
                python_model=Constant(),
                registered_model_name="pyfn",
                pip_requirements=["mlflow"],
                await_registration_for=0,
            )
        yield registry


@pytest.fixture(scope="module")
def churn_inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_inputs(tmp_path_factory.mktemp("in"), files=2, rows=1_616, row_group_size=404)


def job(registry: Registry, inputs: list[Path], output: Path, model: str, *extra: str) -> list[str]:
    return [
        "--input",
        str(inputs[0].parent),
        "--output",
        str(output),
        "--model",
        model,
        "--registry-uri",
        registry.uri,
        *extra,
    ]


def one_error(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
def test_a_sqlite_registry_with_no_server(
    started: Server, churn_inputs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry file named by MLFLOW_TRACKING_URI: a model by alias, its scaler a run's plain file."""
    import mlflow
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    frame = training_frame()
    scaler = StandardScaler().fit(frame[list(FEATURES)])
    model = LogisticRegression().fit(scaler.transform(frame[list(FEATURES)]), frame["churned"])
    paths = {"model": tmp_path / "model.joblib", "scaler": tmp_path / "scaler.joblib"}
    joblib.dump(model, paths["model"])
    joblib.dump(scaler, paths["scaler"])
    crafted = {"outside": "flavors:\n  sklearn:\n    pickled_model: ../../model.joblib\n", "no_mlmodel": None}
    for name, mlmodel in crafted.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.joblib").write_bytes(paths["model"].read_bytes())
        if mlmodel:
            (tmp_path / name / "MLmodel").write_text(mlmodel)
    monkeypatch.chdir(tmp_path)  # a SQLite registry keeps artifacts in ./mlruns
    with tracking(uri) as client:
        version, run_id = log_sklearn(model, "churn_lr")
        with mlflow.start_run(run_id=run_id):
            mlflow.log_artifact(str(paths["scaler"]), artifact_path="prep")
            for name in crafted:
                mlflow.log_artifacts(str(tmp_path / name), artifact_path=name)
        client.set_registered_model_alias("churn_lr", "champion", version)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "out"
    argv = ["--input", str(churn_inputs[0].parent), "--output", str(out), "--model", "models:/churn_lr@champion"]
    result = cli("run", *argv, "--scaler", f"runs:/{run_id}/prep/scaler.joblib")
    assert result.exit_code == 0, result.stderr
    assert_exact(read_output(out), read_inputs(churn_inputs), paths)
    artifacts = {a["role"]: a for a in read_manifest(out)["artifacts"]}
    assert artifacts["scaler"]["registry"]["run_id"] == run_id and artifacts["scaler"]["format"] == "joblib"
    missing = cli("run", *argv, "--output", str(tmp_path / "o2"), "--registry-uri", f"sqlite:///{tmp_path / 'no.db'}")
    assert missing.exit_code == EXIT_USAGE and "no.db" in one_error(missing.stderr)
    for name, needle in (("outside", "../../model.joblib"), ("no_mlmodel", "without an MLmodel")):
        refused = cli("run", *argv, "--output", str(tmp_path / name / "out"), "--model", f"runs:/{run_id}/{name}")
        assert refused.exit_code == EXIT_MODEL, refused.stderr
        one_error(refused.stderr, needle)


def test_a_malformed_or_unregistered_uri_is_a_usage_error(
    churn_inputs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = ["--input", str(churn_inputs[0].parent), "--output", str(tmp_path / "out")]
    for model, needle in (
        ("models:/churn", "models:/NAME@ALIAS"),
        ("models:/churn@", "models:/NAME@ALIAS"),
        ("runs:/abc/../model", "runs:/RUN_ID/PATH"),
        ("models:/churn@champion", "MLFLOW_TRACKING_URI"),
    ):
        result = cli("run", *argv, "--model", model)
        assert result.exit_code == EXIT_USAGE, (model, result.stderr)
        one_error(result.stderr, needle)


@pytest.mark.fault
@pytest.mark.timeout(120)
def test_a_registry_down_or_stalled_fails_in_bounded_time(churn_inputs: list[Path], tmp_path: Path) -> None:
    """Nothing listening (refused at once), then a server that accepts and never answers: exit 1,
    one Error: line, within the bound the storage settings give each request."""
    down = Registry(f"http://team:s3cret@127.0.0.1:{free_port()}", None, tmp_path)
    with stalled_server() as url:
        stalled = Registry(url, None, tmp_path)
        for registry, bounds in ((down, ()), (stalled, ("--storage-timeout", "1", "--storage-retries", "1"))):
            started = time.monotonic()
            result = cli("run", *job(registry, churn_inputs, tmp_path / "out", "models:/churn@champion", *bounds))
            took = time.monotonic() - started
            assert result.exit_code == EXIT_FAILURE, result.stderr
            one_error(result.stderr, registry.uri.replace("team:s3cret@", ""), "models:/churn@champion")
            assert "s3cret" not in result.stderr
            assert took < 30, f"{registry.uri}: {took:.1f} s"
            assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_alias_scores_its_version_exactly_and_the_manifest_names_it(
    server: Registry, churn_inputs: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = cli("run", *job(server, churn_inputs, out, "models:/churn@champion"))
    assert result.exit_code == 0, result.stderr
    output = read_output(out)
    assert_exact(output, read_inputs(churn_inputs), {"model": server.references["churn/1"]})
    manifest = read_manifest(out)
    assert manifest["model_version"] == "1"
    assert pc.all(pc.equal(output.column("model_version"), "1")).as_py()
    (model,) = manifest["artifacts"]
    record = model["registry"]
    assert model["uri"] == "models:/churn@champion" and model["format"] == "skops"
    assert (record["name"], record["alias"], record["version"]) == ("churn", "champion", "1")
    assert record["run_id"] == server.runs["churn/1"] and record["source"].startswith("models:/")
    assert {"MLmodel", "model.skops"} <= set(record["files"]) and record["file"] == "model.skops"
    assert record["files"]["model.skops"] == model["sha256"]
    inspected = cli("inspect", "models:/churn@champion", "--registry-uri", server.uri, "--sha256-only")
    assert inspected.exit_code == 0, inspected.stderr
    assert json.loads(inspected.stdout)["pin"] == f"--model-sha256 {model['sha256']}"


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.usefixtures("airflow_env")  # the DAG's own shard arguments: Airflow is imported
def test_an_alias_moved_mid_job_does_not_split_the_output(
    server: Registry, churn_inputs: list[Path], tmp_path: Path
) -> None:
    """plan resolves champion to v1; the alias moves to v2 before shard 1 runs and before shard 0
    is retried: every shard (given the flags the DAG gives them) and the commit score v1."""
    from batchscore.orchestration.dagrun import shard_arguments

    out, plan_path = tmp_path / "out", tmp_path / "plan.json"
    common = job(server, churn_inputs, out, "models:/churn@champion")
    planned = cli("plan", *common, "--shards", "2", "--out", str(plan_path))
    assert planned.exit_code == 0, planned.stderr
    document = json.loads(planned.stdout)
    assert document["artifacts"][0]["registry"]["version"] == "1" and document["model_version"] == "1"
    shards = shard_arguments(common, str(plan_path), 2, document["pin"])
    try:
        assert cli(*shards[0]).exit_code == 0
        server.client.set_registered_model_alias("churn", "champion", "2")
        for argv in (shards[1], shards[0]):  # shard 1 after the move, then a retry of shard 0
            result = cli(*argv)
            assert result.exit_code == 0, result.stderr
        committed = cli("commit", *common, "--plan", str(plan_path), *document["pin"])
        assert committed.exit_code == 0, committed.stderr
    finally:
        server.client.set_registered_model_alias("churn", "champion", "1")
    assert_exact(read_output(out), read_inputs(churn_inputs), {"model": server.references["churn/1"]})
    assert read_manifest(out)["model_version"] == "1"


@pytest.mark.slow
def test_a_version_and_a_run_are_models_too(server: Registry, churn_inputs: list[Path], tmp_path: Path) -> None:
    """models:/NAME/VERSION (cloudpickle, read as a pickle) and runs:/RUN_ID/model score their model exactly."""
    for reference, key in (("models:/churn/2", "churn/2"), (f"runs:/{server.runs['churn/1']}/model", "churn/1")):
        out = tmp_path / key.replace("/", "-")
        result = cli("run", *job(server, churn_inputs, out, reference))
        assert result.exit_code == 0, result.stderr
        assert_exact(read_output(out), read_inputs(churn_inputs), {"model": server.references[key]})
    assert read_manifest(tmp_path / "churn-2")["artifacts"][0]["format"] == "joblib"
    refused = cli("run", *job(server, churn_inputs, tmp_path / "np", "models:/churn/2", "--no-pickle"))
    assert refused.exit_code == EXIT_MODEL and "pickle" in one_error(refused.stderr)


@pytest.mark.slow
def test_a_missing_alias_model_or_version_is_a_model_error_naming_it(
    server: Registry, churn_inputs: list[Path], tmp_path: Path
) -> None:
    for reference, needle in (
        ("models:/churn@retired", "retired"),
        ("models:/ghost@champion", "ghost"),
        ("models:/churn/99", "99"),
        ("runs:/0123456789abcdef0123456789abcdef/model", "0123456789abcdef0123456789abcdef"),
    ):
        result = cli("run", *job(server, churn_inputs, tmp_path / "out", reference))
        assert result.exit_code == EXIT_MODEL, (reference, result.stderr)
        one_error(result.stderr, reference, needle)
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_mlflows_own_trusted_types_are_never_trusted(
    server: Registry, churn_inputs: list[Path], tmp_path: Path
) -> None:
    """forest's MLmodel lists the tree type as trusted; only --trust makes batchscore load it."""
    refused = cli("run", *job(server, churn_inputs, tmp_path / "refused", "models:/forest/1"))
    assert refused.exit_code == EXIT_MODEL
    one_error(refused.stderr, "not trusted", TREE)
    out = tmp_path / "out"
    trusted = cli("run", *job(server, churn_inputs, out, "models:/forest/1", "--trust", TREE))
    assert trusted.exit_code == 0, trusted.stderr
    assert_exact(read_output(out), read_inputs(churn_inputs), {"model": server.references["forest/1"]})


@pytest.mark.slow
def test_a_pyfunc_model_is_refused(server: Registry, churn_inputs: list[Path], tmp_path: Path) -> None:
    result = cli("run", *job(server, churn_inputs, tmp_path / "out", "models:/pyfn/1"))
    assert result.exit_code == EXIT_MODEL
    one_error(result.stderr, "models:/pyfn/1", "python_function", "not scikit-learn")


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.usefixtures("airflow_env")  # the DAG's own shard arguments: Airflow is imported
def test_a_version_whose_files_changed_since_the_plan_is_refused(
    server: Registry, churn_inputs: list[Path], tmp_path: Path
) -> None:
    """Every file of the planned version is pinned, not only the estimator: a requirements.txt
    edited in the artifact store after the plan stops the shard (exit 4, naming it) before loading."""
    from batchscore.orchestration.dagrun import shard_arguments

    out, plan_path = tmp_path / "out", tmp_path / "plan.json"
    common = job(server, churn_inputs, out, "models:/churn@champion")
    planned = cli("plan", *common, "--out", str(plan_path))
    assert planned.exit_code == 0, planned.stderr
    document = json.loads(planned.stdout)
    model_id = document["artifacts"][0]["registry"]["source"].rsplit("/", 1)[-1]
    store = server.store
    found = store.find(server.artifacts.removeprefix("s3://"))
    (edited,) = [key for key in found if f"/{model_id}/" in key and key.endswith("/requirements.txt")]
    original = store.cat_file(edited)
    try:
        store.pipe_file(edited, original + b"numpy\n")
        result = cli(*shard_arguments(common, str(plan_path), 1, document["pin"])[0])
    finally:
        store.pipe_file(edited, original)
    assert result.exit_code == EXIT_MODEL
    one_error(result.stderr, "requirements.txt", "changed since the plan was made")
    assert not list(out.glob("part-*"))


def rival(server: Registry) -> tuple[str, str]:
    """rival v1 and v2 (two more logistic regressions), registered once per module; alias challenger on v1."""
    if "rival/1" not in server.references:
        server.register("rival", pipeline(c=0.3))
        server.register("rival", pipeline(c=9.0), serialization_format="cloudpickle")
    server.client.set_registered_model_alias("rival", "challenger", "1")
    return "1", "2"


def challenger_record(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    (entry,) = [c for c in manifest["challengers"] if c["name"] == name]
    return entry


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.usefixtures("airflow_env")  # the DAG's own job flags and shard arguments: Airflow is imported
def test_a_sharded_champion_and_two_registry_challengers_stay_pinned_when_their_aliases_move(
    server: Registry, churn_inputs: list[Path], s3: Any, tmp_path: Path
) -> None:
    """Champion churn@champion (v1), challengers rival@challenger (v1) and churn@next (v2), input and
    output on S3. plan (from the YAML models: list) pins all three; every alias then moves before
    shard 1 and a retry of shard 0 (given the DAG's flags: each challenger a --challenger
    NAME=models:/...): all three models are exact for their planned version, and the manifest says so."""
    from batchscore.orchestration.dagrun import shard_arguments
    from batchscore.orchestration.dagspec import common_args
    from test_challengers import assert_challenger_exact

    fs, bucket, options = s3
    for path in churn_inputs:
        fs.put_file(str(path), f"{bucket}/in/{path.name}")
    rival(server)
    server.client.set_registered_model_alias("churn", "next", "2")
    output = f"s3://{bucket}/scores"
    job = {
        "input": f"s3://{bucket}/in/",
        "output": output,
        "storage_options": options,
        "registry_uri": server.uri,
        "models": [
            {"name": "churn", "role": "champion", "model": "models:/churn@champion"},
            {"name": "rival", "model": "models:/rival@challenger"},
            {"name": "next", "model": "models:/churn@next"},
        ],
    }
    config = tmp_path / "nightly.yaml"
    config.write_text(json.dumps(job))  # JSON is YAML
    common = list(common_args(job, str(config)))
    assert common.count("--challenger") == 2 and "rival=models:/rival@challenger" in common
    plan = f"s3://{bucket}/plans/plan.json"
    planned = cli("plan", *common, "--shards", "2", "--out", plan)
    assert planned.exit_code == 0, planned.stderr
    document = json.loads(planned.stdout)
    versions = {a["role"]: a["registry"]["version"] for a in document["artifacts"]}
    assert versions == {"model": "1", "challenger:rival:model": "1", "challenger:next:model": "2"}
    shards = shard_arguments(common, plan, 2, document["pin"])
    try:
        assert cli(*shards[0]).exit_code == 0
        for name, alias, version in (("churn", "champion", "2"), ("rival", "challenger", "2"), ("churn", "next", "1")):
            server.client.set_registered_model_alias(name, alias, version)
        for argv in (shards[1], shards[0]):  # shard 1 after the moves, then a retry of shard 0
            result = cli(*argv)
            assert result.exit_code == 0, result.stderr
        committed = cli("commit", "--config", str(config), "--plan", plan, *document["pin"])
        assert committed.exit_code == 0, committed.stderr
    finally:
        server.client.set_registered_model_alias("churn", "champion", "1")
        server.client.set_registered_model_alias("rival", "challenger", "1")
    table, inputs = read_output(f"{bucket}/scores", fs), read_inputs(churn_inputs)
    assert_exact(
        table.select([c for c in table.column_names if "__" not in c]), inputs, {"model": server.references["churn/1"]}
    )
    assert_challenger_exact(table, inputs, {"model": server.references["rival/1"]}, "rival")
    assert_challenger_exact(table, inputs, {"model": server.references["churn/2"]}, "next")
    assert set(table.column("model_version__rival").to_pylist()) == {"1"}  # the registry version, by default
    assert set(table.column("model_version__next").to_pylist()) == {"2"}
    manifest = read_manifest(f"{bucket}/scores", fs)
    assert manifest["model_version"] == "1"
    for name, registered, alias, version in (("rival", "rival", "challenger", "1"), ("next", "churn", "next", "2")):
        entry = challenger_record(manifest, name)
        assert entry["status"] == "ok" and entry["model_version"] == version and not entry["failed_shards"]
        (artifact,) = entry["artifacts"]
        record = artifact["registry"]
        assert (record["name"], record["alias"], record["version"]) == (registered, alias, version)
        assert record["run_id"] == server.runs[f"{registered}/{version}"]
        assert record["files"][record["file"]] == artifact["sha256"] and "MLmodel" in record["files"]


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_registry_challenger_that_fails_never_fails_a_file_champion_unless_required(
    server: Registry, churn_inputs: list[Path], tmp_path: Path
) -> None:
    """An alias that does not exist, and a registry that is down while the champion is a file: the
    challenger's failure, recorded (exit 0, the champion exact); required, exit 4 for the alias
    and exit 1 (a retry may pass) for the registry, one Error: line naming the challenger, nothing
    committed. A registry down only at commit time does not stop a planned job's commit."""
    from helpers import binary_model, no_success
    from test_challengers import assert_challenger_exact

    champion = binary_model(tmp_path / "champion")
    rival(server)
    down = f"http://127.0.0.1:{free_port()}"
    bounds = ("--storage-timeout", "1", "--storage-retries", "1")
    cases = (
        ("ghost", "models:/churn@retired", server.uri, EXIT_MODEL, "retired"),
        ("rival", "models:/rival@challenger", down, EXIT_FAILURE, "did not answer"),
    )
    inputs = read_inputs(churn_inputs)
    for name, reference, registry, required_exit, needle in cases:
        base = [
            "--input",
            str(churn_inputs[0].parent),
            "--model",
            str(champion["model"]),
            "--scaler",
            str(champion["scaler"]),
            "--registry-uri",
            registry,
            "--challenger",
            f"{name}={reference}",
            *bounds,
        ]
        out = tmp_path / f"{name}-out"
        started = time.monotonic()
        result = cli("run", *base, "--output", str(out))
        assert result.exit_code == 0, result.stderr
        assert time.monotonic() - started < 60
        table = read_output(out)
        assert_exact(table.select([c for c in table.column_names if "__" not in c]), inputs, champion)
        entry = challenger_record(read_manifest(out), name)
        assert entry["status"] == "failed" and reference in entry["error"] and needle in entry["error"]
        assert entry["artifacts"] == []
        refused = tmp_path / f"{name}-required"
        required = cli("run", *base, "--output", str(refused), "--challengers-required")
        assert required.exit_code == required_exit, required.stderr
        one_error(required.stderr, f"challenger {name}", reference, "challengers_required")
        assert no_success(refused)
    out, plan_path = tmp_path / "planned", tmp_path / "plan.json"
    common = ["--input", str(churn_inputs[0].parent), "--output", str(out), "--model", str(champion["model"])]
    common += ["--scaler", str(champion["scaler"]), "--challenger", "rival=models:/rival@challenger"]
    common += ["--challenger", "ghost=models:/churn@retired"]  # fails in plan: recorded, never scored
    up = ["--registry-uri", server.uri]
    assert cli("plan", *common, *up, "--out", str(plan_path)).exit_code == 0
    assert cli("run", *common, *up, "--plan", str(plan_path), "--shard", "0").exit_code == 0
    committed = cli("commit", *common, "--registry-uri", down, *bounds, "--plan", str(plan_path))
    assert committed.exit_code == 0, committed.stderr
    assert_challenger_exact(read_output(out), inputs, {"model": server.references["rival/1"]}, "rival")
    manifest = read_manifest(out)
    assert challenger_record(manifest, "rival")["artifacts"][0]["registry"]["version"] == "1"
    ghost = challenger_record(manifest, "ghost")
    assert ghost["status"] == "failed" and "models:/churn@retired" in ghost["error"]
