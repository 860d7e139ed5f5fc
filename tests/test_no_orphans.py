"""A killed cvpipe command leaves no process behind: the embedded Prefect API it
started dies with it (kill -9 included), and a normal exit stops it too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest


def _cmd(source: str, root: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "ingest", source, "--out", root,
            "--partition", "d", "--shard-size", "5", "--name", "digits"]  # fmt: skip


def _env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect-home")}


def _wait_for_children(proc: subprocess.Popen, timeout: float = 60) -> list[psutil.Process]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = psutil.Process(proc.pid).children(recursive=True)
        servers = [k for k in kids if "prefect.server.api.server" in " ".join(k.cmdline())]
        if servers:
            return kids
        time.sleep(0.05)
    raise AssertionError("the command never started its local API")


def _gone(procs: list[psutil.Process], timeout: float = 10) -> list[int]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in alive]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_command_leaves_no_process(digits_dir, tmp_path, sig):
    proc = subprocess.Popen(_cmd(str(digits_dir / "unlabeled"), str(tmp_path / "root")),
                            env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        kids = _wait_for_children(proc)
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        assert _gone(kids) == [], "children of the killed command survived"
    finally:
        for p in psutil.Process().children(recursive=True):
            if p.pid != os.getpid() and "flows.cli" in " ".join(p.cmdline()):
                p.kill()


@pytest.mark.slow
def test_a_finished_command_stops_its_api(digits_dir, tmp_path):
    proc = subprocess.Popen(_cmd(str(digits_dir / "labeled"), str(tmp_path / "root")),
                            env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    kids = _wait_for_children(proc)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert _gone(kids) == []
