"""The scoring image built by ``scripts/build-image`` and run for real through podman (no fakes).

One image per test run (the session fixture in ``container_fixtures.py``), built as ``make image``
builds it, the compiled engine's ``[compiled]`` extra included. Each container is named per test and
removed when the test ends; each test is bounded in time. The same jobs run on the host are the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from batchscore.errors import EXIT_DRIFT, EXIT_INPUT, EXIT_MODEL, EXIT_USAGE
from container_fixtures import TEST_LABEL, podman
from helpers import binary_model, read_manifest, read_output, write_inputs

pytestmark = pytest.mark.slow

HOST = [sys.executable, "-m", "batchscore"]
#: A container as the scheduler would start one: read-only root, a tmpfs /tmp, the image's own user.
LOCKED_DOWN = ["--read-only", "--tmpfs", "/tmp:rw,size=256m", "--label", TEST_LABEL]


def run_container(
    image: str, name: str, *args: str, options: tuple[str, ...] = (), timeout: float = 300, check: bool = False
) -> subprocess.CompletedProcess:
    return podman("run", "--rm", "--name", name, *LOCKED_DOWN, *options, image, *args, check=check, timeout=timeout)


def host(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*HOST, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def same_rows(left: pa.Table, right: pa.Table) -> None:
    """Same rows, same order, same values; only the scoring timestamp differs between two runs."""
    assert left.num_rows == right.num_rows and left.num_rows > 0
    assert left.drop_columns(["predicted_at"]).equals(right.drop_columns(["predicted_at"]))


def writable(folder: Path) -> Path:
    """A host folder the image's user (uid 10001) may write into, as a bind mount."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chown(folder, 10001, 10001)
    return folder


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three Parquet files (several row groups each) and a fitted scaler + model, under one folder."""
    root = tmp_path_factory.mktemp("image-job")
    write_inputs(root / "in", files=3, rows=2_345, row_group_size=500)
    paths = binary_model(root / "model")
    os.chmod(root, 0o755)
    return {"root": root, "input": root / "in", **paths}


def job_args(root: str, output: str, *extra: str) -> list[str]:
    return [
        "run",
        "--input",
        f"{root}/in",
        "--output",
        output,
        "--model",
        f"{root}/model/model.joblib",
        "--scaler",
        f"{root}/model/scaler.joblib",
        "--model-version",
        "test-1",
        "--workers",
        "2",
        *extra,
    ]


# --------------------------------------------------------------------------- the image itself


def test_image_is_non_root_read_only_and_reports_its_version(scoring_image: str, container_name: str) -> None:
    config = json.loads(podman("image", "inspect", scoring_image).stdout)[0]["Config"]
    assert config["User"] == "10001:10001" and config["Entrypoint"] == ["batchscore"]
    expected = host("--version").stdout.strip()
    assert run_container(scoring_image, container_name, "--version", check=True).stdout.strip() == expected
    who = run_container(
        scoring_image,
        container_name,
        "-c",
        "import os; print(os.getuid(), os.getgid())",
        options=("--entrypoint", "python"),
        check=True,
    )
    assert who.stdout.split() == ["10001", "10001"]
    # The root filesystem is read-only for the scorer; /tmp is the only place it may write.
    probe = "import pathlib; pathlib.Path('/tmp/ok').write_text('x'); pathlib.Path('/opt/batchscore/x').write_text('x')"
    denied = run_container(scoring_image, container_name, "-c", probe, options=("--entrypoint", "python"))
    assert denied.returncode == 1 and "Read-only file system" in denied.stderr
    # No compiler, no pip, no Airflow, no package test suites in the runtime image.
    bare = run_container(
        scoring_image,
        container_name,
        "-c",
        "import shutil, importlib.util as u; print([shutil.which(t) for t in ('gcc', 'cc', 'pip')],"
        " u.find_spec('pip'), u.find_spec('airflow'), u.find_spec('pandas.tests'),"
        " u.find_spec('sklearn.tests'))",
        options=("--entrypoint", "python"),
        check=True,
    )
    assert bare.stdout.split() == ["[None,", "None,", "None]", "None", "None", "None", "None"]


def test_the_proxy_ca_bundle_is_not_in_any_layer(scoring_image: str) -> None:
    """The build used this machine's CA bundle (a secret mount): no file in the image holds it."""
    bundle = Path(os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
    assert bundle.is_file(), "the build is given this machine's CA bundle"
    history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", scoring_image).stdout
    assert "BEGIN CERTIFICATE" not in history and "secrets" not in history  # the install ran in the build stage
    config = json.loads(podman("image", "inspect", scoring_image).stdout)[0]["Config"]
    assert not [e for e in config.get("Env", []) if "CERT" in e or "secrets" in e]
    root = Path(podman("image", "mount", scoring_image).stdout.strip())
    try:
        # Public roots are in many files; the certificates this machine added to its bundle (a proxy's) are not.
        own = "".join(p.read_text() for p in Path("/usr/share/ca-certificates").rglob("*.crt"))
        certificates = [
            "-----BEGIN CERTIFICATE-----" + c for c in bundle.read_text().split("-----BEGIN CERTIFICATE-----")[1:]
        ]
        foreign = [
            c.split("-----END CERTIFICATE-----")[0].strip()
            for c in certificates
            if c.split("-----END CERTIFICATE-----")[0].strip() not in own
        ]
        size, content = bundle.stat().st_size, bundle.read_bytes()
        assert not (root / "run/secrets/ca").exists()
        for folder, _, files in os.walk(root):
            for name in files:
                path = Path(folder) / name
                if path.is_symlink() or not path.is_file():
                    continue
                assert not (path.stat().st_size == size and path.read_bytes() == content), path
                if foreign and path.suffix in ("", ".crt", ".pem", ".cer") and path.stat().st_size < 2_000_000:
                    text = path.read_bytes()
                    assert not any(c.encode() in text for c in foreign), f"{path} holds a certificate of {bundle}"
    finally:
        podman("image", "unmount", scoring_image, check=False)


# --------------------------------------------------------------------------- jobs in the container


def test_job_from_a_mounted_folder_matches_the_host(scoring_image: str, container_name: str, job, tmp_path) -> None:
    """Input and model mounted read-only, the output folder read-write: the rows the host scores."""
    assert host(*job_args(str(job["root"]), str(tmp_path / "host"))).returncode == 0
    out = writable(tmp_path / "mounted")
    done = run_container(
        scoring_image,
        container_name,
        *job_args("/job", "/out/scores"),
        options=("-v", f"{job['root']}:/job:ro", "-v", f"{out}:/out"),
    )
    assert done.returncode == 0, done.stderr
    assert (out / "scores" / "_SUCCESS").exists()
    same_rows(read_output(out / "scores"), read_output(tmp_path / "host"))
    manifest, reference = read_manifest(out / "scores"), read_manifest(tmp_path / "host")
    assert manifest["rows"] == reference["rows"]
    assert [p.name for p in sorted((out / "scores").glob("part-*"))] == [
        p.name for p in sorted((tmp_path / "host").glob("part-*"))
    ]


def test_job_on_s3_through_the_hosts_network(
    scoring_image: str, container_name: str, job, moto_s3, s3, tmp_path
) -> None:
    """Input, model and output in a bucket of the moto server on the host's 127.0.0.1 (--network host)."""
    fs, bucket, _ = s3
    fs.put(str(job["input"]), f"{bucket}/in", recursive=True)
    fs.put(str(job["model"]), f"{bucket}/model/model.joblib")
    fs.put(str(job["scaler"]), f"{bucket}/model/scaler.joblib")
    storage = ["--storage-option", f"endpoint_url={moto_s3}"]
    assert host(*job_args(f"s3://{bucket}", str(tmp_path / "host"), *storage)).returncode == 0
    credentials = [f"--env=AWS_{k}" for k in ("ACCESS_KEY_ID", "SECRET_ACCESS_KEY", "DEFAULT_REGION")]
    done = run_container(
        scoring_image,
        container_name,
        *job_args(f"s3://{bucket}", f"s3://{bucket}/scores", *storage),
        options=("--network", "host", *credentials),
    )
    assert done.returncode == 0, done.stderr
    assert fs.exists(f"{bucket}/scores/_SUCCESS")
    same_rows(read_output(f"{bucket}/scores", fs), read_output(tmp_path / "host"))


def test_exit_codes_come_out_of_the_container_unchanged(scoring_image: str, container_name: str, job, tmp_path) -> None:
    """2 usage, 3 input data, 4 model, 5 drift: what the scheduler sees is what batchscore exited with."""
    data = writable(tmp_path / "data")
    table = pq.read_table(job["input"] / "day-00.parquet")
    age = table.column("age").to_numpy().astype(float)
    age[777] = np.nan  # one invalid feature value, with on_invalid fail (the default)
    pq.write_table(table.set_column(table.schema.get_field_index("age"), "age", pa.array(age)), data / "nan.parquet")
    shifted = table.set_column(table.schema.get_field_index("age"), "age", pc.add(table.column("age"), 25.0))
    pq.write_table(shifted, data / "shifted.parquet")
    (data / "broken.joblib").write_bytes(b"not a model")
    for path in data.iterdir():
        os.chmod(path, 0o644)
    mounts = ("-v", f"{job['root']}:/job:ro", "-v", f"{data}:/data")
    model = ["--model", "/job/model/model.joblib", "--scaler", "/job/model/scaler.joblib"]
    assert (
        run_container(
            scoring_image,
            container_name,
            "run",
            "--input",
            "/job/in",
            "--output",
            "/data/reference",
            *model,
            options=mounts,
        ).returncode
        == 0
    )
    cases = {
        EXIT_USAGE: ["run", "--input", "/job/in", "--output", "/data/o2", *model, "--batch-size", "0"],
        EXIT_INPUT: ["run", "--input", "/data/nan.parquet", "--output", "/data/o3", *model],
        EXIT_MODEL: ["run", "--input", "/job/in", "--output", "/data/o4", "--model", "/data/broken.joblib"],
        EXIT_DRIFT: [
            "run",
            "--input",
            "/data/shifted.parquet",
            "--output",
            "/data/o5",
            *model,
            "--reference",
            "/data/reference",
            "--drift-fail",
            "0.2",
        ],
    }
    for code, args in cases.items():
        done = run_container(scoring_image, container_name, *args, options=mounts)
        assert done.returncode == code, (code, done.stderr[-2000:])
        assert not (data / f"o{code}" / "_SUCCESS").exists()
    assert (data / "o5").is_dir() and list((data / "o5").glob("part-*"))  # drift: parts written, not published


@pytest.mark.fault
def test_stop_mid_run_commits_nothing_and_leaves_no_process(scoring_image: str, container_name: str, tmp_path) -> None:
    """``podman stop`` (SIGTERM) while parts are written: no _SUCCESS, the container ends by itself well
    before the SIGKILL deadline, and a retry of the same job commits what the host scores."""
    root = tmp_path / "big"
    write_inputs(root / "in", files=8, rows=40_013, row_group_size=2_000)
    binary_model(root / "model")
    for folder, dirs, _files in os.walk(root):
        for name in dirs:
            os.chmod(Path(folder) / name, 0o755)
    out = writable(tmp_path / "out")
    args = job_args("/job", "/out/scores", "--batch-size", "500")
    mounts = ("-v", f"{root}:/job:ro", "-v", f"{out}:/out")
    podman("run", "--detach", "--name", container_name, *LOCKED_DOWN, *mounts, scoring_image, *args)
    deadline = time.monotonic() + 120
    while not list((out / "scores").glob("part-*")) and not list(out.rglob("*.parquet*")):
        state = podman("inspect", "--format", "{{.State.Status}}", container_name).stdout.strip()
        assert state == "running", f"the job ended before it could be stopped: {podman('logs', container_name).stderr}"
        assert time.monotonic() < deadline, "no part written within 120 s"
        time.sleep(0.1)
    started = time.monotonic()
    podman("stop", "--time", "30", container_name, timeout=90)
    stopped_in = time.monotonic() - started
    state = json.loads(podman("inspect", container_name).stdout)[0]["State"]
    assert state["Status"] == "exited" and state["Pid"] == 0
    assert state["ExitCode"] not in (0, 137) and stopped_in < 25, (state["ExitCode"], stopped_in)
    assert not (out / "scores" / "_SUCCESS").exists()
    assert not podman("ps", "--quiet", "--filter", f"name={container_name}").stdout.strip()
    podman("rm", container_name)

    retry = run_container(scoring_image, container_name, *args, "--overwrite", options=mounts)
    assert retry.returncode == 0, retry.stderr
    assert host(*job_args(str(root), str(tmp_path / "host"))).returncode == 0
    same_rows(read_output(out / "scores"), read_output(tmp_path / "host"))


def test_compiled_engine_loads_a_library_built_on_the_host(
    scoring_image: str, container_name: str, job, tmp_path: Path
) -> None:
    """``batchscore compile`` where gcc is; the image (no compiler) loads that library and scores with it."""
    import joblib
    from sklearn.ensemble import HistGradientBoostingClassifier

    from batchscore.sample import FEATURES

    work = tmp_path / "work"
    (work / "cache").mkdir(parents=True)
    table = pq.read_table(job["input"]).to_pandas()
    model = HistGradientBoostingClassifier(max_iter=15, max_depth=3, random_state=0)
    joblib.dump(model.fit(table[list(FEATURES)], table["churned"]), work / "hgb.joblib")
    built = host("compile", work / "hgb.joblib", "--out", work / "cache")
    assert built.returncode == 0, built.stderr
    library = json.loads(built.stdout)
    for folder, dirs, files in os.walk(work):
        for name in [*dirs, *files]:
            os.chmod(Path(folder) / name, 0o755)
    os.chmod(work, 0o755)
    out = writable(tmp_path / "out")
    mounts = ("-v", f"{job['root']}:/job:ro", "-v", f"{work}:/work:ro", "-v", f"{out}:/out")
    args = [
        "run",
        "--input",
        "/job/in",
        "--output",
        "/out/scores",
        "--model",
        "/work/hgb.joblib",
        "--engine",
        "compiled",
        "--compiled-cache",
        "/work/cache",
        "--model-version",
        "test-1",
    ]
    no_compiler = run_container(
        scoring_image,
        container_name,
        "-c",
        "import shutil; print(shutil.which('gcc'), shutil.which('cc'))",
        options=("--entrypoint", "python"),
        check=True,
    )
    assert no_compiler.stdout.split() == ["None", "None"]
    done = run_container(scoring_image, container_name, *args, options=mounts)
    assert done.returncode == 0, done.stderr
    engine = read_manifest(out / "scores")["engine"]
    assert engine["used"] == "compiled" and engine["library_sha256"] == library["library_sha256"]
    assert all(shard["compiled_now"] is False for shard in engine["shards"])
    reference = host(
        "run",
        "--input",
        job["input"],
        "--output",
        tmp_path / "host",
        "--model",
        work / "hgb.joblib",
        "--model-version",
        "test-1",
        "--engine",
        "compiled",
        "--compiled-cache",
        work / "cache",
    )
    assert reference.returncode == 0, reference.stderr
    assert read_manifest(tmp_path / "host")["engine"]["library_sha256"] == library["library_sha256"]
    same_rows(read_output(out / "scores"), read_output(tmp_path / "host"))
