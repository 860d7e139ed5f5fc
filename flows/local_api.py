"""The embedded Prefect API of a cvpipe command, tied to the command's life.

Without ``PREFECT_API_URL``, Prefect starts a temporary SQLite-backed API server in a
subprocess when the first flow runs; if the command is killed (kill -9 included) that
server lives on as an orphan. cvpipe starts the same server itself instead:

- early, in the background, once the command's input has passed its preflight, while
  it imports its flow (the server's ~7-14 s cold start overlaps the command's own
  start-up; bad input never starts it);
- with the parent-death signal set (Linux), so the kernel kills it when the command
  dies, however it dies; on a normal exit it is stopped and reaped.

With ``PREFECT_API_URL`` set (a running ``prefect server start``), nothing is started.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("prefect")
    assert spec is not None and spec.origin is not None
    return str(Path(spec.origin).parent.parent)


class LocalAPI:
    """A temporary Prefect API server owned by this process. Its own output (uvicorn's
    lines, the CancelledError tracebacks it prints when stopped) goes to ``log_path``
    when given, never to the terminal."""

    def __init__(self, log_path: str | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        cmd = [
            sys.executable, "-m", "uvicorn", "--app-dir", _prefect_dir(), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1",
            "--port", str(self.port), "--log-level", "error", "--lifespan", "on",
        ]  # fmt: skip
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self.log_path = log_path
        sink = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
                preexec_fn=preexec,  # noqa: PLW1509
            )
        finally:
            if log_path:
                sink.close()  # the child holds its own descriptor

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                where = f" (its output: {self.log_path})" if self.log_path else ""
                raise RuntimeError(
                    f"the local Prefect API exited with code {self.process.returncode}"
                    f"{where}; set PREFECT_API_URL to a running server, or check PREFECT_HOME"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the local Prefect API did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            drain_prefect_workers()
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def drain_prefect_workers(timeout: float = 10.0) -> None:
    """Send the logs and events Prefect still holds before its API goes away. Left to
    Prefect's exit hook, they meet a stopped server, and the log worker retries for a
    minute or more before it prints "Error logging to API"."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)


_API: LocalAPI | None = None
_LOG_PATH: str | None = None
_OWNED = False  # inside owned_api(): the API lives until the block ends


def log_server_output_to(path: str | None) -> None:
    """Where the local API server started from now on writes its output."""
    global _LOG_PATH
    _LOG_PATH = path


def configured_api_url() -> str | None:
    """The API the process would use today: Prefect's settings (a test harness sets them
    in-process) or, before Prefect is imported, the environment."""
    if "prefect.settings" in sys.modules:
        from prefect.settings import PREFECT_API_URL

        return PREFECT_API_URL.value()
    return os.environ.get("PREFECT_API_URL")


def start_early() -> None:
    """Start the local API in the background unless a server is configured."""
    global _API
    if _API is None and not configured_api_url():
        _API = LocalAPI(_LOG_PATH)


@contextlib.contextmanager
def api() -> Iterator[None]:
    """Run a block (a flow run) against the configured API, or the local one, waited for."""
    if _API is None and configured_api_url():
        yield
        return
    # Nobody started it early and no owned_api() block keeps it (e.g. the app called
    # in-process): this block owns it and stops it.
    owner = _API is None and not _OWNED
    start_early()
    assert _API is not None
    try:
        _API.wait_ready()
        os.environ["PREFECT_API_URL"] = _API.url  # for processes this one starts
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: _API.url}):
            yield
    finally:
        if owner:
            stop()


def stop() -> None:
    global _API
    if _API is not None:
        _API.stop()  # buffered run logs and events are sent first
        if os.environ.get("PREFECT_API_URL") == _API.url:
            del os.environ["PREFECT_API_URL"]
        _API = None


@contextlib.contextmanager
def owned_api(start: bool = True) -> Iterator[None]:
    """Start the local API early (or let the block start it: ``start=False``) and stop
    it when the block ends."""
    global _OWNED
    if start:
        start_early()
    _OWNED = True
    try:
        yield
    finally:
        _OWNED = False
        stop()
