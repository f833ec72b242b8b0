"""End to end on S3: a moto server on 127.0.0.1, reached through s3fs with endpoint_url."""

from __future__ import annotations

import multiprocessing
import pickle
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from batchscore.config import StorageSettings
from batchscore.errors import EXIT_INPUT, EXIT_MODEL
from batchscore.io.storage import Location, resolve
from helpers import assert_exact, cli, read_inputs, read_manifest, read_output, write_inputs


def _upload(fs, local: Path, remote: str) -> None:
    fs.put_file(str(local), remote)


def test_s3_in_s3_out_with_model_on_s3(tmp_path: Path, s3, binary_model_paths) -> None:
    fs, bucket, options = s3
    inputs = write_inputs(tmp_path / "in", files=3, rows=1_600, row_group_size=400)
    for path in inputs:
        _upload(fs, path, f"{bucket}/daily/2026-11-24/{path.name}")
    _upload(fs, binary_model_paths["model"], f"{bucket}/models/1.2.0/model.joblib")
    _upload(fs, binary_model_paths["scaler"], f"{bucket}/models/1.2.0/scaler.joblib")
    output = f"s3://{bucket}/scores/2026-11-24"
    result = cli(
        "run",
        "--input",
        f"s3://{bucket}/daily/2026-11-24/*.parquet",
        "--output",
        output,
        "--model",
        f"s3://{bucket}/models/1.2.0/model.joblib",
        "--scaler",
        f"s3://{bucket}/models/1.2.0/scaler.joblib",
        "--model-version",
        "1.2.0",
        "--storage-option",
        f"endpoint_url={options['endpoint_url']}",
        "--workers",
        "2",
        "--batch-size",
        "256",
    )
    assert result.exit_code == 0, result.stderr
    assert fs.exists(f"{bucket}/scores/2026-11-24/_SUCCESS")
    assert_exact(read_output(f"{bucket}/scores/2026-11-24", fs), read_inputs(inputs), binary_model_paths)
    manifest = read_manifest(f"{bucket}/scores/2026-11-24", fs)
    assert [i["uri"] for i in manifest["inputs"]] == [f"s3://{bucket}/daily/2026-11-24/{p.name}" for p in inputs]
    assert manifest["artifacts"][0]["uri"] == f"s3://{bucket}/models/1.2.0/model.joblib"
    # no temporary or partial objects left behind
    names = [p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/scores/2026-11-24")]
    assert sorted(n for n in names if n.startswith("part-")) == [f"part-0000{i}-00000.parquet" for i in range(3)]
    assert not [n for n in names if n.startswith(".")]


def test_s3_config_file_with_storage_options(tmp_path: Path, s3, binary_model_paths) -> None:
    fs, bucket, options = s3
    inputs = write_inputs(tmp_path / "in", files=1, rows=480)
    _upload(fs, inputs[0], f"{bucket}/in/a.parquet")
    config = tmp_path / "job.yaml"
    config.write_text(
        f"input: s3://{bucket}/in/\noutput: s3://{bucket}/out\nmodel: {binary_model_paths['model']}\n"
        f"scaler: {binary_model_paths['scaler']}\nstorage_options:\n  endpoint_url: {options['endpoint_url']}\n"
    )
    result = cli("run", "--config", config)
    assert result.exit_code == 0, result.stderr
    assert_exact(read_output(f"{bucket}/out", fs), pq.read_table(inputs[0]), binary_model_paths)


def test_s3_bad_input_and_missing_model(tmp_path: Path, s3, binary_model_paths) -> None:
    fs, bucket, options = s3
    fs.pipe_file(f"{bucket}/in/broken.parquet", b"not parquet" * 20)
    endpoint = f"endpoint_url={options['endpoint_url']}"
    result = cli(
        "run",
        "--input",
        f"s3://{bucket}/in/",
        "--output",
        f"s3://{bucket}/out",
        "--model",
        binary_model_paths["model"],
        "--scaler",
        binary_model_paths["scaler"],
        "--storage-option",
        endpoint,
    )
    assert result.exit_code == EXIT_INPUT
    assert f"s3://{bucket}/in/broken.parquet" in result.stderr
    result = cli(
        "run",
        "--input",
        f"s3://{bucket}/in/",
        "--output",
        f"s3://{bucket}/out",
        "--model",
        f"s3://{bucket}/models/none.joblib",
        "--storage-option",
        endpoint,
    )
    assert result.exit_code == EXIT_MODEL
    assert f"s3://{bucket}/models/none.joblib" in result.stderr
    assert not fs.exists(f"{bucket}/out/_SUCCESS")


def _use_in_child(location: Location, conn: Any) -> None:
    """What a worker does with a location it was handed: use its filesystem."""
    try:
        fs = location.fs
        conn.send(
            (
                fs is location._fs,
                fs.ls(location.path, detail=False),
                (fs.retry_policy.retries, fs.retry_policy.throttle_seconds),
            )
        )
    except Exception as exc:  # e.g. "This class is not fork-safe": the parent's client reused
        conn.send(repr(exc))


def test_a_location_gives_each_process_its_own_filesystem(s3) -> None:
    """A Location is resolved once and handed on, to worker processes too (a shard's output): a
    forked worker must not use the s3fs client of the process that resolved it, and a spawned one
    receives what to resolve it from. Either way the job's storage bounds come along."""
    fs, bucket, options = s3
    fs.pipe_file(f"{bucket}/out/part-a", b"x")
    storage = StorageSettings(options, timeout=4.0, retries=1, throttle_seconds=9.0)
    here = resolve(f"s3a://{bucket}/out/", storage)
    assert (here.uri, here.path) == (f"s3://{bucket}/out", f"{bucket}/out")
    assert here.fs.ls(here.path, detail=False) == [f"{bucket}/out/part-a"]  # this process's client is in use
    for method in ("fork", "spawn"):
        context = multiprocessing.get_context(method)
        ours, theirs = context.Pipe()
        child = context.Process(target=_use_in_child, args=(here, theirs))
        child.start()
        try:
            assert ours.poll(120), f"{method}: no answer from the child"
            # forked: the parent's filesystem is in memory, but not used; spawned: resolved on arrival
            assert ours.recv() == (method == "spawn", [f"{bucket}/out/part-a"], (1, 9.0)), method
        finally:
            child.join(30)
            if child.is_alive():
                child.kill()
    again = pickle.loads(pickle.dumps(here))
    assert again == here and again.fs is here.fs  # in the same process: fsspec's one instance
