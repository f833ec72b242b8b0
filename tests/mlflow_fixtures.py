"""A real MLflow model registry for the tests: a tracking server on 127.0.0.1 (SQLite backend store,
local artifact store, artifacts served through it) and a SQLite registry file with no server.

Models are registered with ``mlflow.sklearn.log_model`` as users do; the server is started and
stopped (its whole process group) by the fixture. MLflow's usage telemetry is off: CI has no network.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

#: How long the server may take to answer /health: it starts uvicorn and creates its tables.
START_SECONDS = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def tracking(uri: str) -> Iterator[Any]:
    """MLflow's fluent API (``start_run``, ``log_model``) pointed at ``uri`` within the block."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        mlflow.set_tracking_uri(before or "")  # "" resets it to the default
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)


def log_sklearn(model: Any, name: str, **options: Any) -> tuple[str, str]:
    """Log ``model`` in a run and register it as a new version of ``name``: (version, run id).
    The requirements are given, so MLflow does not import-trace the model in a subprocess."""
    import mlflow
    import mlflow.sklearn

    with mlflow.start_run() as run:
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            registered_model_name=name,
            pip_requirements=["scikit-learn"],
            await_registration_for=0,
            **options,
        )
    return str(info.registered_model_version), run.info.run_id


class Server:
    """A started ``mlflow server``: its URL, and ``ready()`` to wait until it answers."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, folder: Path, artifacts: str):
        self.process, self.url, self.folder, self.artifacts = process, url, folder, artifacts

    def ready(self) -> str:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self.process.poll() is not None:
                log = (self.folder / "server.log").read_text()
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}: {log}")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).read()
                return self.url
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not answer within {START_SECONDS} s") from None
                time.sleep(0.3)


@contextlib.contextmanager
def mlflow_server(folder: Path, artifacts: str | None = None, s3_endpoint: str | None = None) -> Iterator[Server]:
    """``mlflow server`` started on a free loopback port (``ready()`` waits for it), stopped with
    every process it started at the end. Starting it early lets other work overlap its start.

    It keeps artifacts in ``artifacts`` (a folder, or s3://bucket/path on the S3 API at
    ``s3_endpoint``; by default a folder beside its database) and serves them to clients itself."""
    port = free_port()
    artifacts = artifacts or str(folder / "artifacts")
    s3 = {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint} if s3_endpoint else {}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "server.log", "wb") as log:  # the server writes into its own copy of the descriptor
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{folder / 'mlflow.db'}",
                "--artifacts-destination",
                artifacts,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: uvicorn's workers stop with it
            env={**os.environ, **s3, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"},
        )
    try:
        yield Server(process, f"http://127.0.0.1:{port}", folder, artifacts)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def stalled_server() -> Iterator[str]:
    """A port that accepts connections and never answers: a registry that hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # connections complete in the backlog; nothing ever reads them
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
