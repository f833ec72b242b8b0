"""Fixtures for the DAG tests: a throwaway Airflow home, an S3 server on loopback.

Import the fixtures into ``conftest.py`` (``from airflow_fixtures import airflow_env, airflow_home, moto_s3``).
Airflow reads its configuration when first imported, so ``airflow_home`` sets the environment
before anything imports ``airflow``; the test modules import it lazily for that reason.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAGS_FOLDER = REPO / "dags"


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point Airflow at a fresh AIRFLOW_HOME (sqlite) and this repository's dags/; enough for a DagBag."""
    if "airflow" in sys.modules:
        configured = os.environ.get("AIRFLOW_HOME", "")
        if not configured.startswith(str(tmp_path_factory.getbasetemp())):
            pytest.fail("airflow was imported before the airflow_home fixture set its environment")
    home = tmp_path_factory.mktemp("airflow_home")
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def airflow_home(airflow_env: Path) -> Path:
    """``airflow_env`` plus a migrated metadata database, as ``dag.test()`` needs."""
    from airflow.utils import db

    db.initdb()
    return airflow_env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """An S3 API (moto) on 127.0.0.1; yields its endpoint URL. Fake credentials only."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
