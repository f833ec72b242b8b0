"""Time an incremental run that finds nothing new over many input files on a loopback S3 (moto).

    python bench/incremental_noop.py --files 10000

Starts ``moto_server`` in its own process, uploads FILES small Parquet files under one prefix,
runs ``batchscore run --incremental`` into a Delta table once (scoring them all: the setup), then
times the same command again: that second run lists the prefix, reads the table's log, and must
score and commit nothing. Prints both times and the number of S3 requests of each kind the
second run made (from the server's request log).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=16, help="rows per file")
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import s3fs

    from batchscore.sample import churn_table

    work = Path(tempfile.mkdtemp(prefix="bs-incremental-"))
    port = _port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    env["AWS_DEFAULT_REGION"] = "us-east-1"
    server_log = open(work / "server.log", "w")  # noqa: SIM115 (the server's whole life)
    server = subprocess.Popen(
        [shutil.which("moto_server") or "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=server_log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        for _ in range(100):
            try:
                fs.mkdir("bench")
                break
            except Exception:
                time.sleep(0.1)
        local = work / "in"
        for i in range(args.files):
            folder = local / f"dt=2026-11-{1 + i % 28:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            pq.write_table(churn_table(args.rows, seed=i, first_id=1 + i * args.rows), buffer)
            (folder / f"f{i:05d}.parquet").write_bytes(buffer.getvalue())
        fs.put(str(local) + "/", "bench/in/", recursive=True)
        model = work / "sample" / "model"
        subprocess.run(
            [sys.executable, "-m", "batchscore", "sample", "--out-dir", str(work / "sample")], check=True, env=env
        )
        command = [
            sys.executable, "-m", "batchscore", "run", "--input", "s3://bench/in/", "--output",
            "s3://bench/tables/scores", "--output-format", "delta", "--incremental",
            "--model", str(model / "model.joblib"), "--scaler", str(model / "scaler.joblib"),
            "--storage-option", f"endpoint_url={endpoint}",
        ]  # fmt: skip
        started = time.monotonic()
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first = time.monotonic() - started
        server_log.flush()
        mark = (work / "server.log").stat().st_size
        started = time.monotonic()
        done = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
        second = time.monotonic() - started
        time.sleep(0.5)
        with open(work / "server.log") as fh:
            fh.seek(mark)
            requests = re.findall(r'"([A-Z]+) (\S+) HTTP', fh.read())
        kinds = Counter(
            f"{method} {'input object' if path.startswith('/bench/in/') else 'listing' if 'list-type' in path else 'table/state'}"
            for method, path in requests
        )
        print(f"files: {args.files:,} of {args.rows} rows")
        print(f"first run (scores everything): {first:.1f} s")
        print(f"second run (nothing new): {second:.2f} s: {done.stdout.strip()}")
        print("second run's S3 requests:", dict(sorted(kinds.items())))
    finally:
        server.terminate()
        server.wait(10)
        server_log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
