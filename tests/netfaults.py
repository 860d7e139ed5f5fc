"""Network misbehaviour on 127.0.0.1, for tests: a server that never answers, an HTTP
server with chosen failures, and a fault-injecting proxy in front of an S3 endpoint.

Every server runs in a daemon thread of the test process and is stopped by its
context manager (``with ... as url:``).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import random
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from urllib.parse import urlsplit


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """Accepts TCP connections and never sends a byte: ``http://127.0.0.1:PORT``."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = sock.accept()
                held.append(conn)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        sock.close()


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def http_files(
    files: dict[str, bytes],
    failing: set[str] | None = None,
    delays: dict[str, float] | None = None,
) -> Iterator[str]:
    """Serves ``files`` by path; ``/status/NNN`` answers HTTP NNN, ``/drop`` closes the
    connection without an answer, ``/drip`` sends its body a byte every 0.3 s. Paths in
    ``failing`` answer 503 and paths in ``delays`` wait that long first; both may be
    changed while serving (a server that recovers)."""
    failing = set() if failing is None else failing
    delays = {} if delays is None else delays

    class Handler(_Quiet):
        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            import time

            if self.path in delays:
                time.sleep(delays[self.path])
            if self.path in failing:
                self.send_error(503)
            elif self.path.startswith("/status/"):
                self.send_error(int(self.path.rsplit("/", 1)[1]))
            elif self.path == "/drop":
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
            elif self.path == "/drip":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                for _ in range(1000):
                    try:
                        self.wfile.write(b"x")
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(0.3)
            elif self.path in files:
                body = files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        t.join()


class FaultProxy:
    """A reverse proxy to ``upstream`` (an S3 endpoint) that fails a ``rate`` fraction of
    requests, chosen by a seeded generator: HTTP 500 or 503 without forwarding, a dropped
    connection (before or after forwarding), or a response whose body is cut short.
    ``faults`` counts what was injected."""

    KINDS = ("500", "503", "drop_before", "drop_after", "truncate")

    def __init__(self, upstream: str, rate: float, seed: int = 0) -> None:
        self.upstream = urlsplit(upstream)
        self.rate = rate
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.faults: Counter = Counter()
        self.requests = 0
        self.enabled = True

    def _pick(self) -> str | None:
        with self.lock:
            self.requests += 1
            if not self.enabled or self.rng.random() >= self.rate:
                return None
            kind = self.rng.choice(self.KINDS)
            self.faults[kind] += 1
            return kind

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(_Quiet):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = self._read_chunked()
                fault = proxy._pick()
                if fault in ("500", "503"):
                    code = int(fault)
                    payload = (
                        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>"
                        + (b"InternalError" if code == 500 else b"SlowDown")
                        + b"</Code><Message>injected</Message></Error>"
                    )
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault == "drop_before":
                    self._drop()
                    return
                conn = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=30
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers.pop("Transfer-Encoding", None)
                headers["Content-Length"] = str(len(body))
                headers["Host"] = proxy.upstream.netloc
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault == "drop_after":  # the request took effect, its answer is lost
                    self._drop()
                    return
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD answer has no body but tells the object's size: pass it through.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if fault == "truncate" and self.command != "HEAD" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self._drop()
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _read_chunked(self) -> bytes:
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()

            def _drop(self) -> None:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815

        return Handler

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        server.daemon_threads = True
        t = threading.Thread(target=server.serve_forever, daemon=True)
        t.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
            t.join()
