"""Fixtures for the container tests: the scoring image built once per test run, and a Docker Engine API.

Import them into ``conftest.py``. Everything runs through podman (CI has no Docker engine) with the
project's ``containers/containers.conf`` (runc, cgroupfs, ulimits a host allows). Each container a
test starts is named by ``container_name`` and removed (``podman rm -f``) when the test ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTAINERS_CONF = REPO / "containers" / "containers.conf"
IMAGE = "localhost/batchscore:test"
#: Labels every test container carries, so a run's leftovers can be found and removed.
TEST_LABEL = "batchscore-test"


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF") or str(CONTAINERS_CONF)}


def podman(*args: str, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """One podman command, bounded in time; its output as text."""
    result = subprocess.run(
        ["podman", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=podman_env(), **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(map(str, args))} exited {result.returncode}: {result.stderr[-2000:]}")
    return result


def _require_podman() -> None:
    missing = [tool for tool in ("podman", "buildah") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: the container tests need them (.ci/run installs them)")


def build(tag: str) -> float:
    """``scripts/build-image`` into podman's storage; returns the seconds it took."""
    start = time.monotonic()
    env = {**podman_env(), "BATCHSCORE_BUILDER": "buildah", "BATCHSCORE_IMAGE": tag}
    if os.environ.get("BATCHSCORE_BASE_CACHE"):
        env["BATCHSCORE_BASE_CACHE"] = os.environ["BATCHSCORE_BASE_CACHE"]
    result = subprocess.run(
        [str(REPO / "scripts" / "build-image")], env=env, capture_output=True, text=True, timeout=1200, cwd=REPO
    )
    assert result.returncode == 0, f"scripts/build-image failed:\n{result.stderr[-4000:]}"
    assert result.stdout.strip().splitlines()[-1] == tag
    return time.monotonic() - start


@pytest.fixture(scope="session")
def scoring_image() -> str:
    """The image as ``make image`` builds it (the compiled engine included, no compiler), once per test run."""
    _require_podman()
    seconds = build(IMAGE)
    print(f"\nscoring image {IMAGE} built in {seconds:.0f} s")
    return IMAGE


@pytest.fixture
def container_name() -> Iterator[str]:
    """A fresh container name; whatever runs under it is removed when the test ends."""
    name = f"bs-test-{uuid.uuid4().hex[:10]}"
    yield name
    podman("rm", "--force", "--time", "0", name, check=False, timeout=60)


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Docker Engine API, served by ``podman system service`` on a unix socket; yields its URL.

    The ``docker`` client (what Airflow's DockerOperator uses) talks to it as to a Docker engine.
    Test containers left behind (label ``batchscore-test``) are removed, then the service is stopped
    and its socket deleted; the DAG tests remove their shards' containers by job label.
    """
    _require_podman()
    folder = tmp_path_factory.mktemp("docker-engine")
    socket = folder / "podman.sock"
    url = f"unix://{socket}"
    with open(folder / "service.log", "wb") as log:  # the service holds its own copy
        service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", url], env=podman_env(), stdout=subprocess.DEVNULL, stderr=log
        )
    try:
        import docker

        deadline = time.monotonic() + 60
        while True:
            try:
                if socket.exists() and docker.DockerClient(base_url=url, timeout=10).ping():
                    break
            except Exception:
                pass
            if service.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"podman system service did not answer: {(folder / 'service.log').read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        ids = podman("ps", "--all", "--quiet", "--filter", f"label={TEST_LABEL}", check=False).stdout.split()
        if ids:
            podman("rm", "--force", "--time", "0", *ids, check=False, timeout=120)
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait(timeout=30)
        socket.unlink(missing_ok=True)
