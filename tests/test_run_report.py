"""The run report: exact counts however the job is sharded, distributions checked against a
direct computation, drift against a reference (local and S3) with exit 5 held until accepted,
and the HTML page as Chromium draws it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from batchscore.errors import EXIT_DRIFT, EXIT_USAGE
from batchscore.observe.drift import PSI_FLOOR
from batchscore.observe.profile import bucket_index, lower_bound
from batchscore.sample import FEATURES
from helpers import (
    cli,
    multiclass_model,
    no_success,
    read_inputs,
    read_manifest,
    read_output,
    read_run_report,
    regressor_model,
    write_inputs,
)

ROWS_PER_FILE = 1_616  # three files: 4_848 rows, a multiple of 16
VOLATILE = ("created_at", "attempts", "plan_id", "output", "predicted_at", "drift", "held", "committed")


def job(inputs: Path, output: Path, model: dict[str, Path], *extra: Any) -> list[str]:
    return [
        "--input",
        str(inputs),
        "--output",
        str(output),
        "--model",
        str(model["model"]),
        "--scaler",
        str(model["scaler"]),
        "--on-invalid",
        "skip",
        *map(str, extra),
    ]


def with_invalid_values(folder: Path, seed: int = 7, shift_age: float = 0.0) -> Path:
    """Three files of churn rows; the second one has nulls, NaNs and an infinity in its features."""
    write_inputs(folder, files=3, rows=ROWS_PER_FILE, row_group_size=404, seed=seed)
    for path in sorted(folder.glob("*.parquet")):
        table = pq.read_table(path)
        age = table.column("age").to_numpy() + shift_age
        if path.name == "day-01.parquet":
            age_mask = np.zeros(table.num_rows, bool)
            age_mask[[5, 17, 33, 1_000]] = True
            charges = table.column("total_charges").to_numpy().copy()
            charges[[8, 17]] = np.nan
            charges[40] = np.inf
            table = table.set_column(table.schema.get_field_index("total_charges"), "total_charges", pa.array(charges))
            table = table.set_column(table.schema.get_field_index("age"), "age", pa.array(age, mask=age_mask))
        else:
            table = table.set_column(table.schema.get_field_index("age"), "age", pa.array(age))
        pq.write_table(table, path, row_group_size=404)
    return folder


def batchscore(*args: Any, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real CLI in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "batchscore", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def direct_counts(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """Rows below the first edge, in each [a, b), and from the last edge up, counted directly."""
    inside = np.searchsorted(np.asarray(edges), values, side="right")
    return np.bincount(inside, minlength=len(edges) + 1)


def direct_psi(expected: np.ndarray, actual: np.ndarray) -> float:
    p = np.maximum(expected / expected.sum(), PSI_FLOOR)
    q = np.maximum(actual / actual.sum(), PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def finite(column: pa.ChunkedArray) -> np.ndarray:
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    return values[np.isfinite(values)]


def test_the_grid_holds_every_value_in_its_bucket() -> None:
    rng = np.random.default_rng(5)
    values = np.concatenate(
        [
            rng.normal(0, 1e3, 4_000),
            rng.uniform(-1, 1, 1_000) * 1e-12,
            [0.0, -0.0, 1.0, -1.0, 32.0, -32.0, 0.75, -0.75, 2.0**-32, -(2.0**-32)],
            np.arange(-300, 300.0),
        ]
    )
    index = bucket_index(values)
    assert np.all(lower_bound(index) <= values) and np.all(values < lower_bound(index + 1))
    assert np.all(np.diff(bucket_index(np.sort(values))) >= 0)  # buckets keep the values' order


def test_shards_merge_exactly_and_match_a_direct_computation(tmp_path: Path, binary_model_paths) -> None:
    """One shard or three, the report is the same, its counts are the manifest's, and every figure
    is what numpy computes from the rows themselves."""
    inputs = with_invalid_values(tmp_path / "in")
    single = tmp_path / "single"
    assert cli("run", *job(inputs, single, binary_model_paths)).exit_code == 0
    sharded, plan = tmp_path / "sharded", tmp_path / "plan.json"
    assert cli("plan", *job(inputs, sharded, binary_model_paths), "--shards", 3, "--out", plan).exit_code == 0
    for index in range(3):
        result = cli("run", *job(inputs, sharded, binary_model_paths), "--plan", plan, "--shard", index)
        assert result.exit_code == 0, result.stderr
    assert cli("commit", *job(inputs, sharded, binary_model_paths), "--plan", plan).exit_code == 0

    one, three = read_run_report(single), read_run_report(sharded)
    assert len(three["attempts"]) == 3
    for report, output in ((one, single), (three, sharded)):
        rows = read_manifest(output)["rows"]
        assert report["rows"] == {
            "read": rows["in"],
            "scored": rows["out"],
            "invalid": rows["invalid"],
            "invalid_by_reason": {"age is null": 4, "total_charges is NaN": 2, "total_charges is infinite": 1},
        }
        assert rows["in"] == 3 * ROWS_PER_FILE and rows["invalid"] == 6  # row 17 has two reasons
        probability = report["scores"]["columns"]["probability"]
        assert probability["count"] == sum(probability["histogram"]["counts"]) == rows["out"]
        assert sum(report["scores"]["classes"].values()) == rows["out"]
        for name in FEATURES:
            column = report["features"][name]
            assert column["count"] + column["nulls"] + column["nan"] + column["inf"] == rows["in"]
            assert sum(column["histogram"]["counts"]) == column["count"]
    strip = lambda r: {k: v for k, v in r.items() if k not in VOLATILE}  # noqa: E731
    for name in FEATURES:  # float sums may round differently when added in another order
        assert one["features"][name].pop("mean") == pytest.approx(three["features"][name].pop("mean"), rel=1e-12)
    assert one["scores"]["columns"]["probability"].pop("mean") == pytest.approx(
        three["scores"]["columns"]["probability"].pop("mean"), rel=1e-12
    )
    assert strip(one) == strip(three)

    table, scored, fresh = read_inputs(sorted(inputs.glob("*.parquet"))), read_output(sharded), read_run_report(sharded)
    columns = {name: (fresh["features"][name], table.column(name)) for name in FEATURES}
    columns["probability"] = (fresh["scores"]["columns"]["probability"], scored.column("probability"))
    for name, (column, raw) in columns.items():
        values = finite(raw)
        assert (column["count"], column["min"], column["max"]) == (values.size, values.min(), values.max()), name
        assert column["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert direct_counts(values, column["histogram"]["edges"])[1:-1].tolist() == column["histogram"]["counts"]
        for key, estimate in column["quantiles"].items():
            exact = np.quantile(values, int(key[1:]) / 100, method="inverted_cdf")
            assert abs(estimate - exact) <= abs(exact) / 128 + 1e-12, (name, key, estimate, exact)
    assert three["features"]["age"]["nulls"] == 4 and three["features"]["total_charges"]["nan"] == 2
    labels = pc.value_counts(scored.column("prediction")).to_pylist()
    assert three["scores"]["classes"] == {str(v["values"]): v["counts"] for v in labels}


@pytest.mark.parametrize("builder", [multiclass_model, regressor_model])
def test_multiclass_and_regression_reports(tmp_path: Path, builder: Any) -> None:
    model = builder(tmp_path / "model")
    write_inputs(tmp_path / "in", files=1, rows=1_616, row_group_size=404)
    assert cli("run", *job(tmp_path / "in", tmp_path / "out", model)).exit_code == 0
    report, scored = read_run_report(tmp_path / "out"), read_output(tmp_path / "out")
    columns = report["scores"]["columns"]
    if builder is multiclass_model:
        assert sorted(columns) == ["probability_basic", "probability_premium", "probability_standard"]
        assert sum(report["scores"]["classes"].values()) == 1_616 and report["scores"]["class_column"] == "prediction"
    else:
        assert list(columns) == ["prediction"] and report["scores"]["classes"] == {}
    for name, column in columns.items():
        values = scored.column(name).to_numpy()
        assert sum(column["histogram"]["counts"]) == column["count"] == 1_616
        assert column["mean"] == pytest.approx(values.mean(), rel=1e-12)


def test_drift_holds_the_output_until_accepted(tmp_path: Path, binary_model_paths) -> None:
    """A shifted feature exits 5 with parts and report but no _SUCCESS; --accept-drift commits it.
    The same distribution (another sample of it) does not drift. PSI and Wasserstein distance
    are those numpy and scipy compute from the rows."""
    from scipy.stats import wasserstein_distance

    reference = tmp_path / "reference"
    inputs = with_invalid_values(tmp_path / "day1")
    assert batchscore("run", *job(inputs, reference, binary_model_paths)).returncode == 0

    same = tmp_path / "same"
    result = batchscore(
        "run",
        *job(with_invalid_values(tmp_path / "day2", seed=99), same, binary_model_paths),
        "--reference",
        reference,
        "--drift-fail",
        0.25,
    )
    assert result.returncode == 0, result.stderr
    drift = read_run_report(same)["drift"]
    assert drift["max_psi"] < 0.05 and drift["drifted"] == [] and "PSI above" not in result.stderr
    assert f"no drift against {reference}: largest PSI" in result.stderr
    assert len(drift["columns"]) == len(FEATURES) + 2  # every feature, the probability and the classes

    shifted, day3 = tmp_path / "shifted", with_invalid_values(tmp_path / "day3", shift_age=12.0)
    args = [*job(day3, shifted, binary_model_paths), "--reference", reference, "--drift-fail", 0.25]
    result = batchscore("run", *args)
    assert result.returncode == EXIT_DRIFT, result.stderr
    assert "PSI above 0.1 in age" in result.stderr and "drift above --drift-fail 0.25" in result.stderr
    assert no_success(shifted) and list(shifted.glob("part-*.parquet"))
    shown = json.loads(batchscore("report", shifted).stdout)
    assert shown["held"] and not shown["committed"] and shown["drift"]["above_fail"] == ["age"]
    assert "sketch" not in shown["features"]["age"]

    # PSI on the reference's edges and Wasserstein distance, computed from the rows themselves
    ref_report, report = read_run_report(reference), read_run_report(shifted)
    ref_rows, rows = read_inputs(sorted(inputs.glob("*.parquet"))), read_inputs(sorted(day3.glob("*.parquet")))
    for name in FEATURES:
        a, b = finite(ref_rows.column(name)), finite(rows.column(name))
        edges = ref_report["features"][name]["histogram"]["edges"]
        [found] = [c for c in report["drift"]["columns"] if c["column"] == name]
        assert found["psi"] == pytest.approx(direct_psi(direct_counts(a, edges), direct_counts(b, edges)), abs=1e-12)
        bound = (np.abs(a).mean() + np.abs(b).mean()) / 256
        assert abs(found["wasserstein"] - wasserstein_distance(a, b)) <= bound, name
    age = next(c for c in report["drift"]["columns"] if c["column"] == "age")
    assert age["psi"] > 1 and age["wasserstein"] == pytest.approx(12.0, rel=0.01)
    assert report["drift"]["max_psi_column"] == "age"

    accept = batchscore("commit", *args, "--shards", 1, "--accept-drift")
    assert accept.returncode == 0, accept.stderr
    assert not no_success(shifted) and read_manifest(shifted)["rows"]["out"] == report["rows"]["scored"]
    accepted = read_run_report(shifted)
    assert not accepted["held"] and accepted["drift"]["accepted_at"] and accepted["drift"]["above_fail"] == ["age"]
    again = batchscore("commit", *args, "--shards", 1, "--accept-drift")
    assert again.returncode == EXIT_USAGE and "nothing to accept" in again.stderr


def held_sharded_job(tmp_path: Path, binary_model_paths) -> tuple[Path, Path, list]:
    """A job of 3 shards, scored, whose commit drift held (exit 5): its output, plan and flags."""
    reference = tmp_path / "reference"
    assert cli("run", *job(with_invalid_values(tmp_path / "day1"), reference, binary_model_paths)).exit_code == 0
    output, plan = tmp_path / "out", tmp_path / "plan.json"
    args = [
        *job(with_invalid_values(tmp_path / "day2", shift_age=-9.0), output, binary_model_paths),
        "--reference",
        reference,
        "--drift-fail",
        0.5,
    ]
    assert cli("plan", *args, "--shards", 3, "--out", plan).exit_code == 0
    for index in range(3):
        assert cli("run", *args, "--plan", plan, "--shard", index).exit_code == 0
    assert cli("commit", *args, "--plan", plan).exit_code == EXIT_DRIFT
    return output, plan, args


def test_a_held_sharded_job_accepts_only_what_was_reviewed(tmp_path: Path, binary_model_paths) -> None:
    """commit under the plan's lease exits 5; a shard run again afterwards drops the held report,
    so --accept-drift refuses until commit has checked the new parts again."""
    output, plan, args = held_sharded_job(tmp_path, binary_model_paths)
    assert no_success(output) and read_run_report(output)["held"]
    assert cli("run", *args, "--plan", plan, "--shard", 1).exit_code == 0  # the parts changed after review
    refused = cli("commit", *args, "--plan", plan, "--accept-drift")
    assert refused.exit_code == EXIT_USAGE and "nothing to accept" in refused.stderr and no_success(output)
    assert cli("commit", *args, "--plan", plan).exit_code == EXIT_DRIFT
    assert cli("commit", *args, "--plan", plan, "--accept-drift").exit_code == 0
    assert not no_success(output)
    # without --drift-fail, drift is only a warning and the output is committed
    warned = cli("commit", *[a for a in args if a not in ("--drift-fail", 0.5)], "--plan", plan)
    assert warned.exit_code == 0 and not read_run_report(output)["held"]
    assert read_run_report(output)["drift"]["drifted"][0] == "age"


def test_reference_on_s3(tmp_path: Path, s3: Any, binary_model_paths) -> None:
    fs, bucket, options = s3
    store = ["--storage-option", f"endpoint_url={options['endpoint_url']}"]
    inputs = with_invalid_values(tmp_path / "in")
    assert cli("run", *job(inputs, f"s3://{bucket}/day1", binary_model_paths), *store).exit_code == 0
    shifted = with_invalid_values(tmp_path / "shifted", shift_age=12.0)
    result = cli(
        "run", *job(shifted, f"s3://{bucket}/day2", binary_model_paths), *store, "--reference", f"s3://{bucket}/day1/"
    )
    assert result.exit_code == 0, result.stderr
    shown = cli("report", f"s3://{bucket}/day2", *store)
    assert shown.exit_code == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["committed"] and report["drift"]["reference"] == f"s3://{bucket}/day1"
    assert report["drift"]["drifted"][0] == "age" and report["rows"]["scored"] == 3 * ROWS_PER_FILE - 6
    missing = cli("report", f"s3://{bucket}/nothing", *store)
    assert missing.exit_code == EXIT_USAGE and "no run report" in missing.stderr


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("headless Chromium is not installed (.ci/run installs the Debian package chromium)")
    return found


def _pixels_of(image: Any, colour: str) -> int:
    rgb = np.asarray(image.convert("RGB")).reshape(-1, 3)
    target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int(np.all(np.abs(rgb.astype(int) - target) <= 2, axis=1).sum())


def test_the_html_page_shows_the_charts_in_chromium(tmp_path: Path, binary_model_paths) -> None:
    """Chromium, offline and without JavaScript, draws the score histogram, the feature sparklines
    and the drift dots in their colours, and the page names the held state and each column."""
    from PIL import Image

    from batchscore.observe.report_html import BAR, FAIL, SPARK

    chromium = _chromium()
    reference = tmp_path / "reference"
    assert cli("run", *job(with_invalid_values(tmp_path / "day1"), reference, binary_model_paths)).exit_code == 0
    output = tmp_path / "out"
    held = cli(
        "run",
        *job(with_invalid_values(tmp_path / "day2", shift_age=12.0), output, binary_model_paths),
        "--reference",
        reference,
        "--drift-fail",
        0.25,
    )
    assert held.exit_code == EXIT_DRIFT
    page, shot = tmp_path / "report.html", tmp_path / "report.png"
    assert cli("report", output, "--html", page).exit_code == 0
    text = page.read_text()
    assert "<script" not in text and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")

    browser = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    env = {**os.environ, "HOME": str(tmp_path)}
    subprocess.run(
        [*browser, f"--screenshot={shot}", "--window-size=1200,1400", page.as_uri()],
        capture_output=True,
        timeout=90,
        check=True,
        env=env,
    )
    image = Image.open(shot)
    assert image.size == (1200, 1400)
    assert _pixels_of(image, BAR) > 5_000  # the probability histogram and the class bars
    assert _pixels_of(image, SPARK) > 500  # four feature sparklines
    assert _pixels_of(image, FAIL) > 50  # the held badge and the dot of the drifted column
    dom = subprocess.run(
        [*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=90, check=True, env=env
    ).stdout
    assert "held for drift" in dom and "Drift" in dom and "above fail" in dom
    for name in (*FEATURES, "probability", "predicted classes"):
        assert name in dom
    assert dom.count("<rect") >= 20 + 2 + 4 * 10


def test_shards_without_rows_leave_the_report_whole(tmp_path: Path, binary_model_paths) -> None:
    """Four shards of two row groups: two shards score nothing, and the report still adds up."""
    write_inputs(tmp_path / "in", files=1, rows=1_616, row_group_size=808)
    output, plan = tmp_path / "out", tmp_path / "plan.json"
    args = job(tmp_path / "in", output, binary_model_paths)
    assert cli("plan", *args, "--shards", 4, "--out", plan).exit_code == 0
    for index in range(4):
        assert cli("run", *args, "--plan", plan, "--shard", index).exit_code == 0
    assert cli("commit", *args, "--plan", plan).exit_code == 0
    report = read_run_report(output)
    assert report["profiled"] and report["scores"]["class_column"] == "prediction"
    assert report["scores"]["columns"]["probability"]["count"] == sum(report["scores"]["classes"].values()) == 1_616
    assert all(report["features"][name]["count"] == 1_616 for name in FEATURES)


def test_the_library_reports_holds_and_accepts_drift(tmp_path: Path, binary_model_paths) -> None:
    """``batchscore.report`` gives the typed report; drift above ``drift_fail`` raises DriftError with
    the output held; ``batchscore.commit(..., accept_drift=True)`` then commits what was reviewed."""
    import batchscore
    from batchscore.errors import DriftError

    model = {
        "model": str(binary_model_paths["model"]),
        "scaler": str(binary_model_paths["scaler"]),
        "on_invalid": "skip",
    }
    reference = tmp_path / "reference"
    ran = batchscore.run(
        batchscore.build_config(
            None, input=(str(with_invalid_values(tmp_path / "day1")),), output=str(reference), **model
        )
    )
    found = batchscore.report(str(reference))
    assert isinstance(found, batchscore.ReportResult) and found.committed and not found.held
    assert (found.rows_scored, found.rows_invalid, found.max_psi) == (ran.rows_out, ran.rows_invalid, None)
    assert '"sketch"' in json.dumps(found.report) and '"sketch"' not in json.dumps(found.to_dict())

    shifted = tmp_path / "shifted"
    config = batchscore.build_config(
        None,
        input=(str(with_invalid_values(tmp_path / "day2", shift_age=12.0)),),
        output=str(shifted),
        reference=str(reference),
        drift_fail=0.25,
        **model,
    )
    with pytest.raises(DriftError) as held:
        batchscore.run(config)
    assert held.value.exit_code == EXIT_DRIFT and no_success(shifted)
    review = batchscore.report(str(shifted), html=str(tmp_path / "review.html"))
    assert review.held and not review.committed and review.max_psi > 0.25
    assert "<svg" in (tmp_path / "review.html").read_text()
    committed = batchscore.commit(config, shards=1, accept_drift=True)
    assert committed.rows_out == review.rows_scored and not no_success(shifted)
    accepted = batchscore.report(str(shifted))
    assert accepted.committed and not accepted.held and accepted.report["drift"]["accepted_at"]


#: What a commit writes in the manifest that a run of the same job need not share: where and when.
MANIFEST_VOLATILE = ("output", "state", "plan_id", "committed_at", "predicted_at", "shards", "seconds", "engine")


def _same_commit(manifest: dict[str, Any], twin: dict[str, Any]) -> None:
    """Two manifests of the same job committed to two outputs: equal but for where and when."""
    assert {k: v for k, v in manifest.items() if k not in MANIFEST_VOLATILE} == {
        k: v for k, v in twin.items() if k not in MANIFEST_VOLATILE
    }


def test_a_held_run_is_accepted_from_its_output_alone(tmp_path: Path, binary_model_paths) -> None:
    """``commit OUTPUT --accept-drift`` with no other flag commits a run held for drift exactly as
    the run would have committed it: its plan, its parts untouched, its settings (on_invalid,
    max_invalid_fraction, model_version) as the run had them; ``batchscore.commit`` likewise."""
    import batchscore as library
    from batchscore.errors import DriftError

    reference = tmp_path / "reference"
    assert cli("run", *job(with_invalid_values(tmp_path / "day1"), reference, binary_model_paths)).exit_code == 0
    day3 = with_invalid_values(tmp_path / "day3", shift_age=12.0)
    settings = ["--model-version", "3.1", "--max-invalid-fraction", 0.01, "--workers", 2]
    twin = tmp_path / "twin"  # the same job without a drift threshold: what the held run would have committed
    assert cli("run", *job(day3, twin, binary_model_paths), *settings).exit_code == 0

    held = tmp_path / "held"
    run = batchscore(
        "run", *job(day3, held, binary_model_paths), *settings, "--reference", reference, "--drift-fail", 0.25
    )
    assert run.returncode == EXIT_DRIFT and no_success(held), run.stderr
    parts = {p.name: p.read_bytes() for p in held.glob("part-*.parquet")}
    report = read_run_report(held)
    assert report["held"] and parts

    accepted = batchscore("commit", held, "--accept-drift")  # nothing else: no input, model or settings
    assert accepted.returncode == 0, accepted.stderr
    manifest = read_manifest(held)
    assert not no_success(held) and {p.name: p.read_bytes() for p in held.glob("part-*.parquet")} == parts
    assert manifest["plan_id"] == report["plan_id"] and manifest["rows"]["out"] == report["rows"]["scored"]
    assert (manifest["on_invalid"], manifest["model_version"]) == ("skip", "3.1")
    assert manifest["predicted_at"] == read_output(held).column("predicted_at")[0].as_py().isoformat()
    _same_commit(manifest, read_manifest(twin))
    after = read_run_report(held)
    assert not after["held"] and after["drift"]["accepted_at"] and after["drift"]["above_fail"] == ["age"]
    assert not (tmp_path / "_batchscore" / "held" / "held.json").exists()
    again = batchscore("commit", held, "--accept-drift")
    assert again.returncode == EXIT_USAGE and "nothing to accept" in again.stderr
    assert "--accept-drift" in again.stderr and read_manifest(held) == manifest

    # The same through the library: a run held, then accepted from the output's name.
    config = library.build_config(
        None,
        input=(str(day3),),
        output=str(tmp_path / "library"),
        model=str(binary_model_paths["model"]),
        scaler=str(binary_model_paths["scaler"]),
        on_invalid="skip",
        model_version="3.1",
        max_invalid_fraction=0.01,
        reference=str(reference),
        drift_fail=0.25,
    )
    with pytest.raises(DriftError):
        library.run(config)
    committed = library.commit(library.build_config(None, output=str(tmp_path / "library")), accept_drift=True)
    assert committed.plan_id == read_run_report(tmp_path / "library")["plan_id"]
    _same_commit(dict(committed.manifest), manifest)
    with pytest.raises(library.ConfigError, match="^accept_drift: .* nothing to accept"):
        library.commit(library.build_config(None, output=str(tmp_path / "library")), accept_drift=True)


def test_a_held_sharded_job_is_accepted_from_its_output_alone(tmp_path: Path, binary_model_paths) -> None:
    """A sharded job's commit held for drift: ``commit OUTPUT --accept-drift`` commits its plan as the
    flag-for-flag form does; a shard run again since the hold leaves nothing to accept until a
    plain commit has checked drift again."""
    output, plan, args = held_sharded_job(tmp_path, binary_model_paths)
    assert cli("run", *args, "--plan", plan, "--shard", 2).exit_code == 0  # the parts changed after review
    refused = cli("commit", output, "--accept-drift")
    assert refused.exit_code == EXIT_USAGE and "nothing to accept" in refused.stderr and no_success(output)

    assert cli("commit", *args, "--plan", plan).exit_code == EXIT_DRIFT
    report = read_run_report(output)
    accepted = cli("commit", output, "--accept-drift")
    assert accepted.exit_code == 0, accepted.stderr
    manifest = read_manifest(output)
    assert manifest["plan_id"] == report["plan_id"] == json.loads(plan.read_text())["plan_id"]
    assert [s["attempt"] for s in manifest["shards"]] == list(report["attempts"].values())
    again = cli("commit", *args, "--plan", plan)  # the flag-for-flag form checks it again: the same commit
    assert again.exit_code == EXIT_DRIFT and read_run_report(output)["held"]


@pytest.mark.fault
@pytest.mark.parametrize("tamper", ["edited plan", "other output", "unsigned", "not json", "gone"])
def test_a_held_record_that_is_not_the_held_commit_is_refused(
    tmp_path: Path, binary_model_paths, monkeypatch: pytest.MonkeyPatch, tamper: str
) -> None:
    """The record beside a held output is held to what a plan file is: consistent, for this output,
    signed where a key is set. Refused with nothing committed; the output stays held."""
    monkeypatch.setenv("BATCHSCORE_PLAN_KEY", "held-key")
    reference = tmp_path / "reference"
    assert cli("run", *job(with_invalid_values(tmp_path / "day1"), reference, binary_model_paths)).exit_code == 0
    output = tmp_path / "out"
    args = [
        *job(with_invalid_values(tmp_path / "day2", shift_age=12.0), output, binary_model_paths),
        "--reference",
        reference,
        "--drift-fail",
        0.25,
    ]
    assert cli("run", *args).exit_code == EXIT_DRIFT
    record = tmp_path / "_batchscore" / "out" / "held.json"
    data = json.loads(record.read_text())
    assert data["plan"]["signature"]
    if tamper == "edited plan":
        data["plan"]["files"][0][2] = [404, 404, 404, 403]  # a row group one row short
        expected = (3, "plan inconsistent")
    elif tamper == "other output":
        data["plan"]["output"] = str(tmp_path / "elsewhere")
        expected = (3, "plan was edited after it was made")
    elif tamper == "unsigned":
        del data["plan"]["signature"]
        expected = (3, "is not signed with the key in BATCHSCORE_PLAN_KEY")
    if tamper == "not json":
        record.write_text("{")
        expected = (3, "is not valid JSON")
    elif tamper == "gone":
        record.unlink()
        expected = (2, "no commit held for drift recorded beside it")
    else:
        record.write_text(json.dumps(data))
    refused = cli("commit", output, "--accept-drift")
    assert (refused.exit_code, expected[1] in refused.stderr) == (expected[0], True), refused.stderr
    assert no_success(output) and read_run_report(output)["held"] and not (tmp_path / "elsewhere").exists()
    assert cli("commit", *args, "--shards", 1, "--accept-drift").exit_code == 0  # the flag-for-flag form still works
