"""The embedded Prefect API of a cvpipe command, tied to the command's life.

Without ``PREFECT_API_URL``, Prefect starts a temporary SQLite-backed API server in a
subprocess when the first flow runs; if the command is killed (kill -9 included) that
server lives on as an orphan. cvpipe starts the same server itself instead:

- early, in the background, while the command parses its input and imports its flow
  (the server's ~7-14 s cold start overlaps the command's own start-up);
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
    """A temporary Prefect API server owned by this process."""

    def __init__(self) -> None:
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
        self.process = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            preexec_fn=preexec,  # noqa: PLW1509
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the local Prefect API exited with code {self.process.returncode}; "
                    "set PREFECT_API_URL to a running server, or check PREFECT_HOME"
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
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_API: LocalAPI | None = None


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
        _API = LocalAPI()


@contextlib.contextmanager
def api() -> Iterator[None]:
    """Run a block (a flow run) against the configured API, or the local one, waited for."""
    if _API is None and configured_api_url():
        yield
        return
    owner = _API is None  # nobody started it early (e.g. the app called in-process)
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
        if "prefect.logging.handlers" in sys.modules:  # send buffered run logs first
            from prefect.logging.handlers import APILogWorker

            with contextlib.suppress(Exception):
                APILogWorker.drain_all(timeout=5)
        _API.stop()
        if os.environ.get("PREFECT_API_URL") == _API.url:
            del os.environ["PREFECT_API_URL"]
        _API = None


@contextlib.contextmanager
def owned_api() -> Iterator[None]:
    """Start the local API early and stop it when the block ends."""
    start_early()
    try:
        yield
    finally:
        stop()
