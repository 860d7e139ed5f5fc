"""The deployments work as the README says, against a real `prefect server start` on
127.0.0.1: create the work pool, deploy every deployment of deployments/prefect.yaml
from the clone's root, start a worker, backfill a partition through the API, wait for
its run, check its outputs and its name; a second backfill creates nothing. The test
stops the worker and the server."""

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
from pathlib import Path

import pytest
import yaml

from cvpipe.core import storage

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def server(tmp_path):
    """A real Prefect server on 127.0.0.1 (its own PREFECT_HOME), stopped afterwards."""
    port = _port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port",
                                 str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            _wait_http(f"http://127.0.0.1:{port}/api/health", 240)
            api = f"http://127.0.0.1:{port}/api"
            quiet = {"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_LOGGING_LEVEL": "WARNING"}
            yield {**env, "PREFECT_API_URL": api, **quiet}
        finally:
            _stop(proc)


def _run(args: list[str], env: dict, cwd: Path = REPO, timeout: float = 300) -> str:
    out = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_deploy_all_then_backfill_a_partition_through_the_api(server, tmp_path):
    env = server
    _run([*PREFECT, "work-pool", "create", "cvpipe", "--type", "process"], env)
    _run([*PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file",
          "deployments/prefect.yaml"], env)  # fmt: skip
    deployed = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    names = json.loads(_run([sys.executable, "-c", (
        "import json; from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "    print(json.dumps(sorted(d.name for d in c.read_deployments())))")], env))  # fmt: skip
    assert names == sorted(d["name"] for d in deployed["deployments"])

    config = tmp_path / "pipeline.yaml"
    raw = yaml.safe_load((REPO / "flows" / "examples" / "pipeline.yaml").read_text())
    raw["data"]["digits"]["shard_size"] = 400
    config.write_text(yaml.safe_dump(raw))
    root = tmp_path / "root"
    worker = subprocess.Popen([*PREFECT, "worker", "start", "--pool", "cvpipe", "--limit", "1"],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        backfill = [sys.executable, "-m", "flows.cli", "backfill", "--from", "2026-11-20",
                    "--to", "2026-11-20", "--deployment", "pipeline-partition/pipeline",
                    "--config", str(config), "--root", str(root), "--stages", "ingest"]  # fmt: skip
        first = _run(backfill, env)
        assert "pipeline 2026-11-20" in first and "True" in first
        state = _wait_for_run(env, "pipeline 2026-11-20", timeout=600)
        assert state == "COMPLETED"
        assert storage.list_committed(str(root / "shards" / "2026-11-20"), ".tar")
        assert storage.is_committed(str(root / "reports" / "2026-11-20.md"))
        again = _run(backfill, env)  # done partitions are left alone
        assert "False" in again and "True" not in again
    finally:
        _stop(worker)
    shutil.rmtree(root, ignore_errors=True)


def _wait_for_run(env: dict, name: str, timeout: float) -> str:
    code = (
        "import sys; from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName\n"
        f"f = FlowRunFilter(name=FlowRunFilterName(any_=[{name!r}]))\n"
        "with get_client(sync_client=True) as c:\n"
        "    runs = c.read_flow_runs(flow_run_filter=f)\n"
        "    print(runs[0].state.type.value if runs else 'NONE')\n"
    )  # fmt: skip
    deadline, state = time.time() + timeout, "NONE"
    while time.time() < deadline:
        state = _run([sys.executable, "-c", code], env).strip()
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(3)
    return state
