"""Spark for the tests: a standalone master and two workers on the loopback, and spark-submit against them.

Both are started from pyspark's own installation (``spark-class``), bound in start-up time, and
stopped (then killed) when the tests that use them end. A test skips, saying why, where no Java
runtime is installed (CI installs one: see .ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

#: How long the master and worker may take to come up on a loaded two-core machine.
START_SECONDS = 180
#: How long one spark-submit may take (a JVM driver, executors, the job).
SUBMIT_SECONDS = 300


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def require_java() -> None:
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        pytest.skip("no Java runtime (java not on PATH, JAVA_HOME unset): Spark cannot start here")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spark_env(**extra: str) -> dict[str, str]:
    """What Spark's processes run with: this interpreter for Python, loopback only, quiet."""
    return {
        **os.environ,
        "SPARK_HOME": str(spark_home()),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_NO_DAEMONIZE": "1",
        **extra,
    }


@dataclass
class Cluster:
    master: str  # spark://127.0.0.1:PORT
    logs: Path
    submitted: int = 0

    def submit(
        self,
        args: Sequence[str],
        conf: dict[str, str] | None = None,
        timeout: float = SUBMIT_SECONDS,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``spark-submit`` of batchscore's application to this cluster, in client mode."""
        from batchscore.spark import submit

        settings = {
            "spark.pyspark.python": sys.executable,
            "spark.executor.memory": "512m",
            "spark.driver.memory": "512m",
            "spark.ui.enabled": "false",
            "spark.task.maxFailures": "2",
            "spark.driver.host": "127.0.0.1",
            **(conf or {}),
        }
        command = [str(spark_home() / "bin" / "spark-submit"), "--master", self.master]
        for key, value in settings.items():
            command += ["--conf", f"{key}={value}"]
        command += [submit.__file__, *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=spark_env(**(env or {})))
        self.submitted += 1
        (self.logs / f"submit-{self.submitted}.log").write_text(done.stdout + done.stderr)  # for a failure's reader
        return done

    def batchscore_lines(self, done: subprocess.CompletedProcess[str]) -> str:
        """The driver's batchscore log lines and Spark's lost tasks, for an assertion's message."""
        return "\n".join(
            line for line in (done.stdout + done.stderr).splitlines() if "batchscore" in line or "Lost task" in line
        )


def _wait_for_workers(ui_port: int, processes: Sequence[subprocess.Popen[bytes]], logs: Path, count: int) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"a Spark daemon exited with {process.returncode}; see {logs}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=5) as response:
                if json.load(response).get("aliveworkers", 0) >= count:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the Spark master and workers did not come up within {START_SECONDS} s; see {logs}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def spark_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A standalone master and two workers of one core each, for this module's tests: one on
    127.0.0.1 and one named localhost, two hosts to Spark, which never runs a speculative copy of
    a task on the host of its original attempt."""
    require_java()
    logs = tmp_path_factory.mktemp("spark-cluster")
    port, ui_port = _free_port(), _free_port()
    spark_class = str(spark_home() / "bin" / "spark-class")
    env = spark_env(SPARK_WORKER_DIR=str(logs / "work"))
    started: list[subprocess.Popen[bytes]] = []
    try:
        for name, args in (
            (
                "master",
                [
                    "org.apache.spark.deploy.master.Master",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--webui-port",
                    str(ui_port),
                ],
            ),
            *(
                (
                    f"worker-{host}",
                    [
                        "org.apache.spark.deploy.worker.Worker",
                        f"spark://127.0.0.1:{port}",
                        "--host",
                        host,
                        "--cores",
                        "1",
                        "--memory",
                        "1g",
                        "--webui-port",
                        str(worker_ui),
                        "--work-dir",
                        str(logs / f"work-{host}"),
                    ],
                )
                for host, worker_ui in (("127.0.0.1", _free_port()), ("localhost", _free_port()))
            ),
        ):
            with open(logs / f"{name}.log", "wb") as log:
                started.append(
                    subprocess.Popen(
                        [spark_class, *args], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                    )
                )
        _wait_for_workers(ui_port, started, logs, count=2)
        yield Cluster(f"spark://127.0.0.1:{port}", logs)
    finally:
        for process in reversed(started):
            _stop(process)


@pytest.fixture(scope="module")
def spark_local() -> Iterator[object]:
    """A ``local[2]`` session (task retries allowed: ``local[2,2]``) for this module's tests."""
    require_java()
    saved = os.environ.get("PYSPARK_PYTHON")
    os.environ["PYSPARK_PYTHON"] = sys.executable  # Python workers run this interpreter, with batchscore
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2,2]")
        .appName("batchscore-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    if saved is None:
        os.environ.pop("PYSPARK_PYTHON", None)
    else:
        os.environ["PYSPARK_PYTHON"] = saved
