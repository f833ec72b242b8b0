"""Champion and challengers in one pass: every model exact, agreement as numpy computes it on the
full outputs, a challenger's failure recorded but never the champion's (unless required)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pyarrow as pa
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from batchscore.errors import EXIT_MODEL, EXIT_OK, EXIT_USAGE
from batchscore.io import layout
from batchscore.observe import agreement as agreements
from batchscore.observe.agreement import Agreement, row_keys
from batchscore.observe.drift import PSI_FLOOR
from batchscore.observe.profile import histogram_edges
from batchscore.sample import FEATURES
from helpers import (
    assert_exact,
    binary_model,
    cli,
    no_success,
    pipeline_model,
    read_inputs,
    read_manifest,
    read_output,
    read_run_report,
    save,
    training_frame,
    write_inputs,
)
from test_metrics import pushed, pushgateway, value  # noqa: F401  (the real Pushgateway fixture)

#: 3 files of this many rows: a multiple of 16 (see helpers.assert_exact), not a round number.
ROWS = 2_384
FILES = 3


class RaisingClassifier(LogisticRegression):
    """Raises for any batch holding a customer whose scaled age is above ``limit`` (ages in the data
    are at most 90, about 3.2 when scaled; 250 is about 14.5): a challenger that fails mid-run."""

    limit = 8.0

    def predict_proba(self, X: Any) -> Any:
        if (np.asarray(X)[:, 0] > self.limit).any():
            raise RuntimeError("challenger blew up on an old customer")
        return super().predict_proba(X)


class CountingScaler(StandardScaler):
    """Writes the rows of every ``transform`` call to ``log``: which batches were scaled, how often."""

    log = ""

    def transform(self, X: Any, copy: Any = None) -> Any:
        with open(self.log, "a") as fh:
            fh.write(f"{np.shape(X)[0]}\n")
        return super().transform(X, copy=copy)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """The champion (scaler + logistic regression), a random-forest Pipeline, a ridge regressor
    with a scaler of its own (other bytes than the champion's), and a challenger sharing the
    champion's scaler file."""
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import MinMaxScaler

    root = tmp_path_factory.mktemp("models")
    champion = binary_model(root / "champion")
    forest = pipeline_model(root / "forest")
    frame = training_frame(seed=11)
    scaler = MinMaxScaler().fit(frame[list(FEATURES)])
    ridge = save(
        root / "ridge",
        model=Ridge().fit(scaler.transform(frame[list(FEATURES)]), frame["total_charges"]),
        scaler=scaler,
    )
    champion_scaler = joblib.load(champion["scaler"])
    sharing = save(
        root / "sharing",
        model=LogisticRegression(C=0.05).fit(champion_scaler.transform(frame[list(FEATURES)]), frame["churned"]),
    )
    sharing["scaler"] = champion["scaler"]
    raising = RaisingClassifier().fit(champion_scaler.transform(frame[list(FEATURES)]), frame["churned"])
    raises = save(root / "raises", model=raising)
    raises["scaler"] = champion["scaler"]
    return {"champion": champion, "forest": forest, "ridge": ridge, "sharing": sharing, "raises": raises}


def _job(
    tmp_path: Path, models: dict[str, dict[str, Path]], inputs: str, output: str, challengers: list[str], **keys: Any
) -> Path:
    entries = [
        {
            "name": "champ",
            "role": "champion",
            "model": str(models["champion"]["model"]),
            "scaler": str(models["champion"]["scaler"]),
            "model_version": "1.2.0",
        }
    ]
    for name in challengers:
        entry = {"name": name, "model": str(models[name]["model"]), "model_version": f"{name}-7"}
        if "scaler" in models[name]:
            entry["scaler"] = str(models[name]["scaler"])
        entries.append(entry)
    settings = {"input": inputs, "output": output, "models": entries, "batch_size": 1_000, "workers": 2, **keys}
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(settings))  # JSON is YAML
    return path


def expected_columns(paths: dict[str, Path], inputs: pa.Table) -> dict[str, np.ndarray]:
    """What the model's own predict / predict_proba give on the user's DataFrame, one call."""
    model = joblib.load(paths["model"])
    frame = inputs.to_pandas()[list(FEATURES)]
    x = joblib.load(paths["scaler"]).transform(frame) if "scaler" in paths else frame
    found = {"prediction": model.predict(x)}
    if hasattr(model, "predict_proba"):
        found["probability"] = model.predict_proba(x)[:, 1]
    return found


def assert_challenger_exact(output: pa.Table, inputs: pa.Table, paths: dict[str, Path], name: str) -> None:
    for column, expected in expected_columns(paths, inputs).items():
        got = output.column(f"{column}__{name}").to_numpy(zero_copy_only=False)
        assert np.array_equal(got, expected), f"{column}__{name} differs from the model's own"


def numpy_agreement(output: pa.Table, name: str, classifier: bool) -> dict[str, Any]:
    """The agreement measures from the full output, with numpy and scipy."""
    from scipy.stats import spearmanr

    a = output.column("probability").to_numpy()
    b = output.column(f"probability__{name}" if classifier else f"prediction__{name}").to_numpy()
    n = a.size
    keys = np.concatenate([row_keys(f, 0, np.arange(ROWS)) for f in range(FILES)])  # input order = output order
    m = math.ceil(0.01 * n)
    top_a = set(keys[np.lexsort((keys, -a))[:m]].tolist())
    top_b = set(keys[np.lexsort((keys, -b))[:m]].tolist())
    found: dict[str, Any] = {"spearman": spearmanr(a, b).statistic, "top1_overlap": len(top_a & top_b) / m}
    if classifier:
        delta = np.abs(a - b)
        edges = np.asarray(histogram_edges(float(a.min()), float(a.max())))
        counts = [np.bincount(np.searchsorted(edges, s, side="right"), minlength=edges.size + 1) for s in (a, b)]
        p, q = (np.maximum(c / c.sum(), PSI_FLOOR) for c in counts)
        found.update(
            class_agreement=float(
                np.mean(output.column("prediction").to_numpy() == output.column(f"prediction__{name}").to_numpy())
            ),
            abs_delta_mean=float(delta.mean()),
            abs_delta_max=float(delta.max()),
            abs_delta_p95=float(np.quantile(delta, 0.95)),
            psi=float(np.sum((q - p) * np.log(q / p))),
        )
    return found


def assert_agreement(report: dict[str, Any], output: pa.Table, name: str, classifier: bool) -> None:
    (entry,) = [c for c in report["challengers"] if c["name"] == name]
    assert entry["status"] == "ok" and entry["error"] is None
    got, want = entry["agreement"], numpy_agreement(output, name, classifier)
    assert got["rows_compared"] == output.num_rows and not got["sampled"]
    assert got["spearman"] == pytest.approx(want["spearman"], rel=1e-12)
    assert got["top1_overlap"] == want["top1_overlap"]
    if classifier:
        assert got["class_agreement"] == want["class_agreement"]
        assert got["abs_delta_mean"] == pytest.approx(want["abs_delta_mean"], rel=1e-12)
        assert got["abs_delta_max"] == want["abs_delta_max"]
        assert abs(got["abs_delta_p95"] - want["abs_delta_p95"]) <= 0.008 * want["abs_delta_p95"] + 1e-9
        assert got["psi"] == pytest.approx(want["psi"], rel=1e-9)
    else:  # a regressor against a classifier: no classes or differences to compare
        assert got["class_agreement"] is got["abs_delta_mean"] is got["psi"] is None


def test_champion_and_challengers_in_one_pass_each_exact(tmp_path: Path, models) -> None:
    """Champion + a forest Pipeline + a ridge regressor with its own scaler + a model sharing the
    champion's scaler: every column equals its own model's, agreement equals numpy's."""
    paths = write_inputs(tmp_path / "in", files=FILES, rows=ROWS, row_group_size=700)
    out = tmp_path / "out"
    job = _job(tmp_path, models, str(tmp_path / "in"), str(out), ["forest", "ridge", "sharing"])
    result = cli("run", "--config", job, "--challenger", f"extra={models['forest']['model']}")
    assert result.exit_code == EXIT_OK, result.stderr
    output, inputs = read_output(out), read_inputs(paths)
    champion_columns = [c for c in output.column_names if "__" not in c]
    assert_exact(output.select(champion_columns), inputs, models["champion"])  # the champion's columns as today
    assert champion_columns == [*inputs.column_names, "prediction", "probability", "predicted_at", "model_version"]
    for name in ("forest", "ridge", "sharing"):
        assert_challenger_exact(output, inputs, models[name], name)
        assert set(output.column(f"model_version__{name}").to_pylist()) == {f"{name}-7"}
    assert_challenger_exact(output, inputs, models["forest"], "extra")  # given by --challenger NAME=URI
    assert (
        output.schema.field("prediction__ridge").type == pa.float64()
        and "probability__ridge" not in output.column_names
    )
    report = read_run_report(out)
    assert [c["name"] for c in report["challengers"]] == ["forest", "ridge", "sharing", "extra"]
    assert_agreement(report, output, "forest", classifier=True)
    assert_agreement(report, output, "sharing", classifier=True)
    assert_agreement(report, output, "ridge", classifier=False)
    manifest = read_manifest(out)
    roles = {a["role"]: a["sha256"] for a in manifest["artifacts"]}
    assert roles["challenger:ridge:scaler"] != roles["scaler"] == roles["challenger:sharing:scaler"]
    assert {"challenger:forest:model", "challenger:extra:model", "challenger:ridge:model"} <= set(roles)
    assert report["model_version"] == "1.2.0" and manifest["challengers"][0]["model_version"] == "forest-7"
    html = tmp_path / "report.html"
    assert cli("report", str(out), "--html", str(html)).exit_code == 0
    page = html.read_text()
    assert "<h2>Challengers</h2>" in page and "Spearman" in page and "top 1% overlap" in page


def on_s3(
    fs: Any, bucket: str, tmp_path: Path, models: dict[str, dict[str, Path]]
) -> tuple[list[Path], dict[str, Any]]:
    """The job's input files and the three models put in the bucket: (local inputs, each model's
    roles by their s3:// URIs)."""
    paths = write_inputs(tmp_path / "in", files=FILES, rows=ROWS, row_group_size=500)
    for path in paths:
        fs.put_file(str(path), f"{bucket}/in/{path.name}")
    remote: dict[str, Any] = {}
    for name in ("champion", "forest", "ridge"):
        remote[name] = {}
        for role, local in models[name].items():
            fs.put_file(str(local), f"{bucket}/models/{name}/{role}.joblib")
            remote[name][role] = f"s3://{bucket}/models/{name}/{role}.joblib"
    return paths, remote


def test_sharded_champion_and_two_challengers_on_s3_exact(tmp_path: Path, s3, models) -> None:
    """plan pins every model's digests; each shard scores exactly them; commit adds the agreements up."""
    fs, bucket, options = s3
    paths, remote = on_s3(fs, bucket, tmp_path, models)
    output = f"s3://{bucket}/scores"
    job = _job(tmp_path, remote, f"s3://{bucket}/in/", output, ["forest", "ridge"], storage_options=options)
    plan = f"s3://{bucket}/plans/plan.json"
    result = cli("plan", "--config", job, "--shards", "3", "--out", plan)
    assert result.exit_code == 0, result.stderr
    planned = json.loads(result.stdout)
    roles = [a["role"] for a in planned["artifacts"]]
    assert roles == ["model", "scaler", "challenger:forest:model", "challenger:ridge:model", "challenger:ridge:scaler"]
    for shard in range(3):
        result = cli("run", "--config", job, "--plan", plan, "--shard", str(shard))
        assert result.exit_code == 0, result.stderr
    result = cli("commit", "--config", job, "--plan", plan)
    assert result.exit_code == 0, result.stderr
    output_table, inputs = read_output(f"{bucket}/scores", fs), read_inputs(paths)
    assert_exact(
        output_table.select([c for c in output_table.column_names if "__" not in c]), inputs, models["champion"]
    )
    assert_challenger_exact(output_table, inputs, models["forest"], "forest")
    assert_challenger_exact(output_table, inputs, models["ridge"], "ridge")
    report = json.loads(fs.cat_file(layout.report_path(f"{bucket}/scores")))
    assert_agreement(report, output_table, "forest", classifier=True)
    assert_agreement(report, output_table, "ridge", classifier=False)
    manifest = read_manifest(f"{bucket}/scores", fs)
    assert [a["sha256"] for a in manifest["artifacts"]] == [a["sha256"] for a in planned["artifacts"]]


def test_a_shard_refuses_a_challenger_changed_since_the_plan(tmp_path: Path, models) -> None:
    """The plan pins the challenger: a changed file is that challenger's failure, recorded, and
    the champion's output still commits; required, the shard fails with exit 4."""
    paths = write_inputs(tmp_path / "in", files=1, rows=ROWS, row_group_size=700)
    swapped = tmp_path / "forest.joblib"
    swapped.write_bytes(Path(models["forest"]["model"]).read_bytes())
    local = {**models, "forest": {"model": swapped}}
    out = tmp_path / "out"
    job = _job(tmp_path, local, str(tmp_path / "in"), str(out), ["forest"])
    plan = tmp_path / "plan.json"
    assert cli("plan", "--config", job, "--shards", "1", "--out", plan).exit_code == 0
    swapped.write_bytes(Path(models["sharing"]["model"]).read_bytes())  # another model under the same name
    result = cli("run", "--config", job, "--plan", plan, "--shard", "0", "--challengers-required")
    assert result.exit_code == EXIT_MODEL and "challenger:forest:model" in result.stderr, result.stderr
    assert "changed since the plan was made" in result.stderr
    assert cli("run", "--config", job, "--plan", plan, "--shard", "0").exit_code == 0
    assert cli("commit", "--config", job, "--plan", plan).exit_code == 0
    output = read_output(out)
    assert_exact(
        output.select([c for c in output.column_names if "__" not in c]), read_inputs(paths), models["champion"]
    )
    assert output.column("probability__forest").null_count == output.num_rows  # the planned columns, null
    (entry,) = read_run_report(out)["challengers"]
    assert entry["status"] == "failed" and "changed since the plan was made" in entry["error"]


@pytest.mark.fault
def test_failing_challengers_never_fail_the_champion(tmp_path: Path, models, pushgateway) -> None:  # noqa: F811
    """One challenger's file is missing, another raises mid-run: the champion commits exactly,
    the report and the Pushgateway say which failed and why; exit 0."""
    paths = write_inputs(tmp_path / "in", files=FILES, rows=ROWS, row_group_size=700)
    table = read_inputs(paths)
    old = int(np.flatnonzero(table.column("age").to_numpy() > 0)[ROWS + 123])  # in the second file
    ages = table.column("age").to_numpy().copy()
    ages[old] = 250.0  # the raising challenger's trigger (a valid value for the champion)
    table = table.set_column(table.column_names.index("age"), "age", pa.array(ages))
    import pyarrow.parquet as pq

    for f, path in enumerate(paths):
        pq.write_table(table.slice(f * ROWS, ROWS), path, row_group_size=700)
    missing = {"model": tmp_path / "nowhere.joblib"}
    local = {**models, "missing": missing}
    out = tmp_path / "out"
    job = _job(
        tmp_path,
        local,
        str(tmp_path / "in"),
        str(out),
        ["missing", "raises", "forest"],
        pushgateway=pushgateway,
        job_name="challenged",
        workers=1,
    )
    result = cli("run", "--config", job)
    assert result.exit_code == EXIT_OK, result.stderr
    assert "challenger missing" in result.stderr and "challenger raises" in result.stderr
    output, inputs = read_output(out), read_inputs(paths)
    assert_exact(output.select([c for c in output.column_names if "__" not in c]), inputs, models["champion"])
    assert "prediction__missing" not in output.column_names
    raised = output.column("probability__raises")
    assert raised.null_count > 0 and raised.null_count < output.num_rows  # null from the failing batch on
    assert raised.slice(0, ROWS).null_count == 0  # the first file scored before it raised
    assert_challenger_exact(output, inputs, models["forest"], "forest")
    report = {c["name"]: c for c in read_run_report(out)["challengers"]}
    assert report["missing"]["status"] == "failed" and "not found" in report["missing"]["error"]
    assert report["raises"]["status"] == "failed" and "blew up on an old customer" in report["raises"]["error"]
    assert report["forest"]["status"] == "ok"
    samples = pushed(pushgateway, "challenged")
    assert value(samples, "batchscore_challenger_ok", challenger="missing", model_version="missing-7") == 0
    assert value(samples, "batchscore_challenger_ok", challenger="raises", model_version="raises-7") == 0
    assert value(samples, "batchscore_challenger_ok", challenger="forest", model_version="forest-7") == 1
    forest = report["forest"]["agreement"]
    for measure in agreements.MEASURES:
        got = value(samples, "batchscore_challenger_agreement", challenger="forest", measure=measure)
        assert got == pytest.approx(forest[measure], rel=1e-12), measure


@pytest.mark.fault
@pytest.mark.parametrize("failing", ["missing", "raises"])
def test_required_challengers_fail_the_job_and_commit_nothing(tmp_path: Path, models, failing: str) -> None:
    paths = write_inputs(tmp_path / "in", files=1, rows=ROWS, row_group_size=700)
    if failing == "raises":
        import pyarrow.parquet as pq

        table = read_inputs(paths)
        ages = table.column("age").to_numpy().copy()
        ages[1_500] = 300.0
        pq.write_table(
            table.set_column(table.column_names.index("age"), "age", pa.array(ages)), paths[0], row_group_size=700
        )
    local = {**models, "missing": {"model": tmp_path / "nowhere.joblib"}}
    out = tmp_path / "out"
    job = _job(tmp_path, local, str(tmp_path / "in"), str(out), ["forest", failing], challengers_required=True)
    result = cli("run", "--config", job)
    assert result.exit_code == EXIT_MODEL, result.stderr
    assert f"challenger {failing}" in result.stderr and "challengers_required" in result.stderr
    assert no_success(out) and not Path(layout.report_path(str(out))).exists()


def test_challenger_settings_are_checked(tmp_path: Path, models) -> None:
    base = [
        "validate",
        "--input",
        str(tmp_path),
        "--output",
        str(tmp_path / "o"),
        "--model",
        str(models["champion"]["model"]),
    ]
    for flag, words in (
        ("bad name=x.joblib", "must start with a letter"),
        ("noequals", "NAME=URI"),
    ):
        result = cli(*base, "--challenger", flag)
        assert result.exit_code == EXIT_USAGE and words in result.stderr, result.stderr
    result = cli(*base, "--challenger", "a=x.joblib", "--challenger", "a=y.joblib")
    assert result.exit_code == EXIT_USAGE and "names a more than once" in result.stderr
    job = tmp_path / "job.yaml"
    job.write_text(
        json.dumps({"model": "m.joblib", "models": [{"name": "c", "role": "champion", "model": "n.joblib"}]})
    )
    result = cli("validate", "--config", job, "--input", str(tmp_path), "--output", str(tmp_path / "o"))
    assert result.exit_code == EXIT_USAGE and "given twice" in result.stderr


def test_agreement_adds_up_exactly_however_rows_are_split() -> None:
    """Merged in any grouping, the sketch is the one of all rows; its sample is the rows of smallest key."""
    rng = np.random.default_rng(5)
    n = 3 * agreements.SAMPLE_ROWS + 1_237
    a = rng.random(n)
    b = np.clip(a + rng.normal(0, 0.1, n), 0, 1)
    keys = row_keys(2, 0, np.arange(n))
    whole = Agreement()
    whole.add(keys, (a > 0.5, b > 0.5), (a, b), True)
    pieces = []
    for start, stop in ((0, 17), (17, 40_000), (40_000, n)):
        piece = Agreement()
        piece.add(keys[start:stop], (a[start:stop] > 0.5, b[start:stop] > 0.5), (a[start:stop], b[start:stop]), True)
        pieces.append(piece.to_dict())
    merged = agreements.merge_agreements(reversed(pieces))
    got, expected = json.loads(json.dumps(merged)), whole.to_dict()
    for column in ("delta", "champion", "challenger"):  # a float sum rounds by the order it is added in
        assert got[column].pop("sum") == pytest.approx(expected[column].pop("sum"), rel=1e-12)
    assert got == expected  # counts, extremes, sketches and the sample: exactly
    sample = merged["sample"]
    smallest = np.sort(keys)[: agreements.SAMPLE_ROWS]
    assert sample["keys"] == smallest.tolist()
    summary = Agreement.from_dict(merged).summary()
    assert summary["sampled"] and summary["sample_rows"] == agreements.SAMPLE_ROWS
    from scipy.stats import spearmanr

    assert abs(summary["spearman"] - spearmanr(a, b).statistic) < 0.02  # a sample's estimate
    assert summary["abs_delta_mean"] == pytest.approx(np.abs(a - b).mean(), rel=1e-12)


def test_a_challenger_with_other_features_scores_the_champions_rows(tmp_path: Path, models) -> None:
    """A challenger reading other columns (a subset) gets its own matrix and scores exactly the
    rows the champion writes: rows set aside by the champion (on_invalid skip) are no one's."""
    import pyarrow.parquet as pq

    frame = training_frame(seed=13)
    subset = save(
        tmp_path / "subset", model=LogisticRegression().fit(frame[["tenure", "monthly_charges"]], frame["churned"])
    )
    paths = write_inputs(tmp_path / "in", files=1, rows=ROWS, row_group_size=700)
    table = read_inputs(paths)
    bad_ages, bad_charges = (
        [5, 90, 700, 701, 900, 1_399, 1_400, 2_000, 2_222, 2_383],
        [7, 8, 1_234, 1_500, 1_501, 2_380],
    )
    ages = table.column("age").to_numpy().copy()
    ages[bad_ages] = np.nan  # only the champion reads age
    charges = table.column("monthly_charges").to_numpy().copy()
    charges[bad_charges] = np.nan  # both read monthly_charges
    table = table.set_column(table.column_names.index("age"), "age", pa.array(ages))
    table = table.set_column(table.column_names.index("monthly_charges"), "monthly_charges", pa.array(charges))
    pq.write_table(table, paths[0], row_group_size=700)
    out = tmp_path / "out"
    job = _job(tmp_path, {**models, "subset": subset}, str(tmp_path / "in"), str(out), ["subset"], on_invalid="skip")
    result = cli("run", "--config", job)
    assert result.exit_code == EXIT_OK, result.stderr
    output = read_output(out)
    kept = np.ones(ROWS, dtype=bool)
    kept[bad_ages + bad_charges] = False
    assert output.num_rows == ROWS - 16  # a multiple of 16 rows still (see helpers.assert_exact)
    written = table.filter(pa.array(kept))
    model = joblib.load(subset["model"])
    expected = model.predict_proba(written.to_pandas()[["tenure", "monthly_charges"]])[:, 1]
    assert np.array_equal(output.column("probability__subset").to_numpy(), expected)
    (entry,) = read_run_report(out)["challengers"]
    assert entry["agreement"]["rows_compared"] == ROWS - 16


def test_a_scaler_shared_by_sha256_is_applied_once_per_batch(tmp_path: Path) -> None:
    """Champion and a challenger with the same scaler file: one transform per batch, not two; a
    challenger with another scaler file (same class, other bytes) has its own."""
    frame = training_frame(seed=17)
    log, other_log = tmp_path / "shared.log", tmp_path / "other.log"
    scaler = CountingScaler().fit(frame[list(FEATURES)])
    scaler.log = str(log)
    other = CountingScaler().fit(frame[list(FEATURES)])
    other.log = str(other_log)
    x = scaler.transform(frame[list(FEATURES)])
    champion = save(tmp_path / "champion", model=LogisticRegression().fit(x, frame["churned"]), scaler=scaler)
    challenger = save(tmp_path / "challenger", model=LogisticRegression(C=0.1).fit(x, frame["churned"]))
    third = save(tmp_path / "third", model=LogisticRegression(C=0.3).fit(x, frame["churned"]), scaler=other)
    log.unlink()
    paths = write_inputs(tmp_path / "in", files=1, rows=ROWS, row_group_size=700)
    out = tmp_path / "out"
    models = {"champion": champion, "shared": {**challenger, "scaler": champion["scaler"]}, "third": third}
    job = _job(tmp_path, models, str(tmp_path / "in"), str(out), ["shared", "third"])
    result = cli("run", "--config", job)
    assert result.exit_code == EXIT_OK, result.stderr
    # Feature matrices are padded to 16 rows; 1 row: the loader's probes. How the reader cuts batches
    # (rows, bytes) is its own business: each batch is transformed once by each scaler file.
    scaled = sorted(int(n) for n in log.read_text().split() if int(n) > 1)
    assert 0 <= sum(scaled) - ROWS < 16 * len(scaled) and all(n % 16 == 0 for n in scaled), scaled
    assert sorted(int(n) for n in other_log.read_text().split() if int(n) > 1) == scaled  # not twice
    output = read_output(out)
    inputs = read_inputs(paths).to_pandas()[list(FEATURES)]
    for name, paths_of in (("shared", models["shared"]), ("third", third)):
        model, its_scaler = joblib.load(paths_of["model"]), joblib.load(paths_of["scaler"])
        its_scaler.log = str(tmp_path / "reference.log")
        assert np.array_equal(
            output.column(f"probability__{name}").to_numpy(), model.predict_proba(its_scaler.transform(inputs))[:, 1]
        )


def test_the_dag_passes_every_model_to_its_containers() -> None:
    """A job file whose champion is a models: entry reaches the container's CLI as the same job:
    champion as --model/--scaler/pins/version, each challenger as one --challenger."""
    from batchscore import schema
    from batchscore.config import FIELDS, build_config
    from batchscore.orchestration.dagspec import common_args

    digest = "ab" * 32
    job = {
        "input": "in/",
        "output": "out/",
        "models": [
            {"name": "lr", "role": "champion", "model": "m/lr.joblib", "scaler": "m/s.joblib", "model_sha256": digest},
            {"name": "gbm", "model": "m/gbm.skops", "model_version": "2.0.0"},
            {"name": "lr2", "model": "m/lr2.joblib", "scaler": "m/s2.joblib"},
        ],
    }
    argv = list(common_args(job, "jobs/nightly.yaml"))
    assert argv[argv.index("--model") + 1] == "m/lr.joblib" and argv[argv.index("--model-sha256") + 1] == digest
    assert argv.count("--challenger") == 2
    from batchscore.cli import main

    with main.commands["run"].make_context("run", argv) as ctx:
        params = dict(ctx.params)
    got = build_config(None, **schema.from_click(FIELDS, FIELDS, params))
    assert got == build_config(None, **job, overwrite=True, job_name="nightly")
