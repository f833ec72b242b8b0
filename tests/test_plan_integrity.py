"""A plan can only narrow the job: an edited plan.json is refused by every shard and by commit.

Each attack edits the stored plan the way someone who can write the bucket (but not the job's
own input specs, model pins or the orchestrator's flags) would: with our own code, recomputing every
derived field and the plan id. The plan's lease has expired first, so no lease stands in the way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batchscore.errors import EXIT_INPUT, EXIT_MODEL
from batchscore.io.source import read_footer
from batchscore.job.planning import Plan, PlanFiles, _split
from helpers import FEATURES, assert_exact, cli, plan_file, read_inputs, read_output, save, training_frame, write_inputs

pytestmark = pytest.mark.fault

SHARDS = 2


def forged(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with every derived field (shards, totals, plan id) recomputed to agree with it."""
    files = PlanFiles.from_rows(doc["files"], "forged")
    schema = None if doc["schema"] is None else tuple(doc["schema"])
    plan = Plan(
        files,
        _split(files.row_groups, doc["num_shards"], doc["rows_per_part"]),
        doc["output"],
        tuple(doc["artifacts"]),
        doc["predicted_at"],
        schema=schema,
        model_version=doc["model_version"],
        rows_per_part=doc["rows_per_part"],
    )
    return plan.to_dict()


def record(path: Path | str) -> list[Any]:
    """The plan record an attacker would write for ``path``, from its footer."""
    return PlanFiles.of([read_footer(str(path))]).rows()[0]


class Job:
    """Three input files matched by a glob, a fourth beside them the glob leaves out, and a file
    outside the input folder; planned into two shards under a one-second lease."""

    def __init__(self, tmp_path: Path, model: dict[str, Path]):
        self.folder = tmp_path / "in"
        paths = write_inputs(self.folder, files=4, rows=1_216, row_group_size=400)
        self.inputs, self.excluded = paths[:3], paths[3]
        self.outside = write_inputs(tmp_path / "elsewhere", files=1, rows=1_008, row_group_size=1_008, seed=99)[0]
        self.out, self.model = tmp_path / "out", model
        self.common = [
            "--input",
            str(self.folder / "day-0[0-2].parquet"),
            "--output",
            str(self.out),
            "--model",
            str(model["model"]),
            "--scaler",
            str(model["scaler"]),
            "--lease-seconds",
            "1",
        ]
        result = cli("plan", *self.common, "--shards", str(SHARDS), "--out", plan_file(self.out))
        assert result.exit_code == 0, result.stderr
        self.printed = json.loads(result.stdout)
        self.doc = json.loads(plan_file(self.out).read_text())
        time.sleep(1.2)  # the plan's lease has expired: nothing but the plan's own checks remain

    def write(self, doc: dict[str, Any]) -> None:
        plan_file(self.out).write_text(json.dumps(doc))

    def shard(self, index: int, pin: list[str]) -> Any:
        # batchscore.orchestration.dagrun imports Airflow, which must not load before the DAG tests set its home.
        from batchscore.orchestration.dagrun import shard_arguments

        argv = shard_arguments(self.common, str(plan_file(self.out)), SHARDS, pin)[index]  # as the DAG runs it
        return cli(*argv)

    def commit(self, pin: list[str]) -> Any:
        return cli("commit", *self.common, "--plan", plan_file(self.out), *pin)

    def committed(self) -> bool:
        return (self.out / "_SUCCESS").exists() or any(self.out.parent.rglob("manifest.json"))


def outside_file(job: Job, doc: dict[str, Any]) -> dict[str, Any]:
    doc["files"][1] = record(job.outside)
    return forged(doc)


def outside_file_without_plan_id(job: Job, doc: dict[str, Any]) -> dict[str, Any]:
    doc = outside_file(job, doc)
    del doc["plan_id"]
    return doc


def outside_file_spelled_inside(job: Job, doc: dict[str, Any]) -> dict[str, Any]:
    doc["files"][1] = record(job.outside)
    doc["files"][1][0] = f"{job.folder}/../elsewhere/{job.outside.name}"  # starts with the input folder
    return forged(doc)


def outside_file_as_url(job: Job, doc: dict[str, Any]) -> dict[str, Any]:
    doc["files"][1] = record(job.outside)
    doc["files"][1][0] = f"file://{job.outside}"
    return forged(doc)


def unmatched_file_added(job: Job, doc: dict[str, Any]) -> dict[str, Any]:
    doc["files"].append(record(job.excluded))  # in the input folder, but the glob does not match it
    return forged(doc)


def input_file_named_twice(job: Job, doc: dict[str, Any]) -> dict[str, Any]:
    doc["files"].append(record(job.inputs[0]))
    doc["files"][-1][0] = f"{job.folder}/./{job.inputs[0].name}"
    return forged(doc)


def file_dropped(job: Job, doc: dict[str, Any]) -> dict[str, Any]:
    del doc["files"][2]
    return forged(doc)


def row_counts_edited(job: Job, doc: dict[str, Any]) -> dict[str, Any]:
    doc["files"][0][2] = [n - 7 for n in doc["files"][0][2]]
    return forged(doc)


def row_group_list_edited(job: Job, doc: dict[str, Any]) -> dict[str, Any]:
    groups = doc["files"][0][2]
    doc["files"][0][2] = [groups[0] + groups[1], *groups[2:]]  # same rows, other row groups
    return forged(doc)


def shard_count_edited(job: Job, doc: dict[str, Any]) -> dict[str, Any]:
    doc["num_shards"] = SHARDS + 1
    return forged(doc)


def shard_count_edited_alone(job: Job, doc: dict[str, Any]) -> dict[str, Any]:
    doc["num_shards"] = 1
    return doc


#: Each attack, and the shards that see it without the orchestrator's pin: every shard that names
#: an edited or foreign file, or reads the plan file inconsistent; commit always does.
ATTACKS: dict[str, tuple[Callable[[Job, dict[str, Any]], dict[str, Any]], set[int] | None]] = {
    "outside file, plan id recomputed": (outside_file, {0, 1}),
    "outside file, plan id deleted": (outside_file_without_plan_id, {0, 1}),
    "outside file spelled in/../elsewhere": (outside_file_spelled_inside, {0, 1}),
    "outside file as file:// URL": (outside_file_as_url, {0, 1}),
    "file the glob does not match added": (unmatched_file_added, {0, 1}),
    "input file named twice": (input_file_named_twice, {0, 1}),
    "file dropped": (file_dropped, {0, 1}),
    "row counts edited": (row_counts_edited, {0}),
    "row group list edited": (row_group_list_edited, {0}),
    "shard count edited alone": (shard_count_edited_alone, {0, 1}),
    "shard count edited, split recomputed": (shard_count_edited, None),  # needs the pin to be seen
}


#: Without the plan's digest a consistent re-split of the same input is indistinguishable (and
#: harmless: it scores exactly the job's input): that attack is tried with the pin only.
CASES = [
    (attack, pinned)
    for attack, (_, seen_by) in ATTACKS.items()
    for pinned in (True, False)
    if pinned or seen_by is not None
]


@pytest.mark.parametrize(
    ("attack", "pinned"), CASES, ids=[f"{a} ({'pin from plan (DAG)' if p else 'terminal, no pin'})" for a, p in CASES]
)
def test_an_edited_plan_is_refused_after_its_lease_expired(
    tmp_path: Path, binary_model_paths, attack: str, pinned: bool
) -> None:
    job = Job(tmp_path, binary_model_paths)
    edit, seen_by = ATTACKS[attack]
    job.write(edit(job, json.loads(json.dumps(job.doc))))
    pin = job.printed["pin"] if pinned else []
    for index in range(SHARDS):
        result = job.shard(index, pin)
        if pinned or index in (seen_by or ()):
            assert result.exit_code == EXIT_INPUT, (index, result.stdout, result.stderr)
            assert "plan" in result.stderr or "changed since the plan" in result.stderr
    result = job.commit(pin)
    assert result.exit_code == EXIT_INPUT, result.stderr
    assert not job.committed()
    assert not any(p.name.endswith(".parquet") and "elsewhere" in str(p) for p in job.out.rglob("*"))


@pytest.mark.parametrize("attack", ["outside file, plan id recomputed", "file dropped", "row counts edited"])
def test_what_differs_is_named(tmp_path: Path, binary_model_paths, attack: str) -> None:
    job = Job(tmp_path, binary_model_paths)
    job.write(ATTACKS[attack][0](job, json.loads(json.dumps(job.doc))))
    result = job.commit([])
    assert result.exit_code == EXIT_INPUT
    expected = {
        "outside file, plan id recomputed": f"outside the job's input ({job.folder}/day-0[0-2].parquet), "
        f"e.g. {job.outside}",
        "file dropped": f"the job's input matches 1 file(s) the plan lacks, e.g. {job.inputs[2]}",
        "row counts edited": f"input file {job.inputs[0]} changed since the plan was made (row groups",
    }[attack]
    assert expected in result.stderr, result.stderr


def _swap_model(job: Job) -> dict[str, Any]:
    """Another model written over the job's, and the plan's digest edited to it."""
    import joblib
    from sklearn.linear_model import LogisticRegression

    from batchscore.models.artifacts import fetch_artifact

    frame, scaler = training_frame(seed=11), joblib.load(job.model["scaler"])
    other = LogisticRegression(C=0.013).fit(scaler.transform(frame[list(FEATURES)]), frame["churned"])
    save(job.model["model"].parent, model=other)
    doc = json.loads(json.dumps(job.doc))
    artifact = fetch_artifact("model", str(job.model["model"]), None, None)[1].to_dict()
    for entry in doc["artifacts"]:
        if entry["role"] == "model":
            entry.update(sha256=artifact["sha256"], bytes=artifact["bytes"])
    return forged(doc)


@pytest.mark.parametrize("how", ["pins given", "pin from plan (DAG)"])
def test_a_model_swapped_with_the_plans_digest_is_refused(tmp_path: Path, binary_model, how: str) -> None:
    job = Job(tmp_path, binary_model)
    original = [x for a in job.printed["artifacts"] for x in (f"--{a['role']}-sha256", a["sha256"])]
    job.write(_swap_model(job))
    pin = original if how == "pins given" else job.printed["pin"]
    for index in range(SHARDS):
        result = job.shard(index, pin)
        assert result.exit_code == EXIT_MODEL, result.stderr
        assert "does not match its pinned digest" in result.stderr
    result = job.commit(pin)
    assert result.exit_code == EXIT_MODEL and not job.committed()


def test_the_honest_path_commits_exactly(tmp_path: Path, binary_model_paths) -> None:
    job = Job(tmp_path, binary_model_paths)  # its lease expires: the honest job goes on regardless
    pin = job.printed["pin"]
    assert pin[:2] == ["--plan-sha256", job.printed["plan_sha256"]] and len(job.printed["plan_sha256"]) == 64
    for index in range(SHARDS):
        result = job.shard(index, pin)
        assert result.exit_code == 0, result.stderr
    result = job.commit(pin)
    assert result.exit_code == 0, result.stderr
    assert_exact(read_output(job.out), read_inputs(job.inputs), job.model)
    assert read_output(job.out).num_rows == 3 * 1_216


def test_a_signed_plan_needs_the_key(tmp_path: Path, binary_model_paths, monkeypatch) -> None:
    """With BATCHSCORE_PLAN_KEY set, a plan edited and re-forged without the key is refused."""
    monkeypatch.setenv("BATCHSCORE_PLAN_KEY", "s3cret-kept-by-the-scheduler")
    job = Job(tmp_path, binary_model_paths)
    assert "signature" in job.doc
    job.write(shard_count_edited(job, {k: v for k, v in job.doc.items() if k != "signature"}))
    result = job.shard(0, [])
    assert result.exit_code == EXIT_INPUT and "is not signed with the key in BATCHSCORE_PLAN_KEY" in result.stderr
    assert job.commit([]).exit_code == EXIT_INPUT and not job.committed()


@pytest.fixture
def binary_model(tmp_path: Path, binary_model_paths) -> dict[str, Path]:
    """A copy of the session's model that a test may overwrite."""
    folder = tmp_path / "model"
    folder.mkdir()
    copies = {}
    for role, path in binary_model_paths.items():
        copies[role] = folder / path.name
        copies[role].write_bytes(path.read_bytes())
    return copies


def test_plan_file_is_compact(tmp_path: Path, binary_model_paths) -> None:
    """Files are stored once, one record each; shards as their rows and part counts."""
    job = Job(tmp_path, binary_model_paths)
    assert job.doc["file_fields"] == ["uri", "size", "row_groups", "mtime_ns", "inode", "device", "etag", "version_id"]
    assert [r[0] for r in job.doc["files"]] == [str(p) for p in job.inputs]
    assert [r[2] for r in job.doc["files"]] == [[400, 400, 400, 16]] * 3
    assert [s["index"] for s in job.doc["shards"]] == [0, 1] and set(job.doc["shards"][0]) == {"index", "rows", "parts"}
    assert sum(s["rows"] for s in job.doc["shards"]) == job.doc["total_rows"] == 3 * 1_216
    assert "units" not in json.dumps(job.doc) and "\n" not in plan_file(job.out).read_text().strip()
    assert pq.read_metadata(job.inputs[0]).num_rows == 1_216
