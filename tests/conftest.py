from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import skip_guard
from airflow_fixtures import airflow_env, airflow_home, moto_s3  # noqa: F401  (fixtures)
from container_fixtures import container_name, docker_engine, scoring_image  # noqa: F401  (fixtures)
from helpers import binary_model, write_inputs

#: The time limit of a test marked slow or fault (real processes, trial after trial) that sets
#: none of its own; every other test has pyproject.toml's.
SLOW_TIMEOUT = 900


def pytest_configure(config: pytest.Config) -> None:
    skip_guard.register(config)  # in CI, a test that did not run fails the run unless allow-listed


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is None and any(item.get_closest_marker(m) for m in ("slow", "fault")):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


@pytest.fixture(scope="session", autouse=True)
def logging_undone_after_the_run() -> Iterator[None]:
    """Commands run in this process (the CLI's, Airflow's ``dag.test()``) leave log handlers on the
    root logger, bound to streams pytest has closed by the time the interpreter exits; a library
    that logs from a finalizer then (py4j's Spark connection) would print a traceback after the
    run's last line. Every handler the run added goes, and the root's level is put back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    from batchscore import logs

    logs.reset()
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def binary_model_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return binary_model(tmp_path_factory.mktemp("binary-model"))


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    return write_inputs(tmp_path / "in")


@pytest.fixture
def s3(moto_s3: str) -> Iterator[tuple[object, str, dict[str, str]]]:
    """A fresh bucket on the loopback S3 server: (s3fs filesystem, bucket, storage options)."""
    import s3fs

    options = {"endpoint_url": moto_s3}
    fs = s3fs.S3FileSystem(**options)
    bucket = f"bs-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield fs, bucket, options
    fs.rm(bucket, recursive=True)


@pytest.fixture(autouse=True, scope="session")
def _quiet_s3_server_log() -> None:
    """One line per request from the loopback S3 server would drown failure reports."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
