"""An HTTP proxy on 127.0.0.1 in front of an S3 server, for tests that need a misbehaving store.

It forwards every request to the real (moto) server, except that it can answer a seeded-random
share of requests as a throttling store does (``503 SlowDown`` or ``429``), and hold requests that
match a pattern without answering (a stall) until released. It counts what it saw, so a test can
wait for a request to arrive before acting.
"""

from __future__ import annotations

import http.client
import random
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (503, "SlowDown", "Please reduce your request rate.")
SERVICE_UNAVAILABLE = (503, "ServiceUnavailable", "Service is unable to handle request.")
TOO_MANY_REQUESTS = (429, "TooManyRequests", "Too many requests, please slow down.")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class S3Proxy:
    def __init__(self, upstream: str, seed: int = 0) -> None:
        self.upstream = urlsplit(upstream)
        self.throttle_fraction = 0.0
        self.throttle_answer = SLOW_DOWN
        self.stall_pattern: re.Pattern[str] | None = None
        self.requests = 0
        self.throttled = 0
        self.stalled = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                decision = proxy._decide(self.command, self.path)
                if decision == "stall":
                    proxy._release.wait()
                    self.close_connection = True
                    return
                if decision == "throttle":
                    status, code, message = proxy.throttle_answer
                    payload = (
                        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                        f"<Message>{message}</Message><RequestId>proxy</RequestId></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    if status in (429, 503):
                        self.send_header("Retry-After", "1")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                    self.send_response(answer.status, answer.reason)
                    for key, value in answer.getheaders():
                        if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    length = answer.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length if length is not None else str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="s3-proxy", daemon=True)
        self._thread.start()

    def _decide(self, method: str, path: str) -> str:
        with self._lock:
            self.requests += 1
            if self.stall_pattern is not None and self.stall_pattern.search(f"{method} {path}"):
                self.stalled += 1
                return "stall"
            if self.throttle_fraction and self._rng.random() < self.throttle_fraction:
                self.throttled += 1
                return "throttle"
            return "forward"

    def throttle(self, fraction: float, answer: tuple[int, str, str] = SLOW_DOWN) -> None:
        self.throttle_fraction, self.throttle_answer = fraction, answer

    def stall(self, pattern: str | None) -> None:
        """Hold every request whose ``METHOD /path?query`` matches ``pattern`` (None: stop stalling
        new ones; held ones stay held until ``release``)."""
        self.stall_pattern = re.compile(pattern) if pattern else None

    def release(self) -> None:
        self.stall_pattern = None
        self._release.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


def proxies(upstream: str, seed: int = 0) -> Iterator[S3Proxy]:
    proxy = S3Proxy(upstream, seed)
    try:
        yield proxy
    finally:
        proxy.close()
