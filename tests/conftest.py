"""Shared fixtures: the bundled digits as real shards, and Prefect's test harness."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pytest

from cvpipe.core import storage
from cvpipe.data import ingest
from cvpipe.data.config import IngestConfig
from cvpipe.data.datasets import export_digits

# Keep Prefect quiet and local for every test process (set before prefect is imported).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
# The cvpipe command's log files (flows/terminal.py) go to a temp folder, not ~/.cache.
os.environ.setdefault("CVPIPE_LOG_DIR", tempfile.mkdtemp(prefix="cvpipe-test-logs-"))


def ingest_folder(source: str, root: str, partition: str, name: str, shard_size: int) -> list[str]:
    """Ingest a folder with the library (no Prefect); returns the committed shard URLs."""
    cfg = IngestConfig(
        source=source, root=root, partition=partition, name=name, shard_size=shard_size
    )
    ingest.ingest_partition(cfg)
    return storage.list_committed(storage.join(root, "shards", partition), ".tar")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of small models: on two shared cores, more threads
    only fight other processes. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits exported as PNG, split labeled 10% / unlabeled 60% / test 30%."""
    out = tmp_path_factory.mktemp("digits")
    export_digits(str(out), size=32, split={"labeled": 0.1, "unlabeled": 0.6, "test": 0.3})
    return out


@pytest.fixture(scope="session")
def digits_shards(
    digits_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[str]]:
    """Shard URLs of each split (labeled: 179 samples, unlabeled: 1078, test: 540),
    ingested with 100 samples per shard into one root, partitions named after splits."""
    root = str(tmp_path_factory.mktemp("digits_root"))
    return {
        split: ingest_folder(str(digits_dir / split), root, split, "digits", 100)
        for split in ("labeled", "unlabeled", "test")
    }


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary SQLite-backed Prefect API for flow tests (started once per session)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3 API (moto's server) on 127.0.0.1; s3fs reaches it via AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_root(moto_endpoint):
    """``s3://cvpipe-test`` on a freshly reset moto server."""
    import requests
    import s3fs

    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("cvpipe-test")
    yield "s3://cvpipe-test"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An untrained (seeded) small_cnn over the ten digit classes, saved as a checkpoint:
    enough for the plumbing of inference, selection and anchors."""
    import torch

    from cvpipe import models

    torch.manual_seed(0)
    url = str(tmp_path_factory.mktemp("ckpt") / "random.pt")
    info = models.ModelInfo("small_cnn", [str(i) for i in range(10)], 16, (0.5,) * 3, (0.5,) * 3)
    models.save_checkpoint(models.build("small_cnn", 10), info, url)
    return url


# Processes a test may start (directly or through a library); none may outlive the session.
LEAK_MARKERS = ("prefect.server", "uvicorn", "moto", "raylet", "gcs_server", "ray::",
                "dask", "distributed", "flows.cli")  # fmt: skip


def _cmdline(p) -> str:
    import psutil

    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a Prefect server, moto, Ray, Dask or cvpipe process started under
    it is still alive once every test and fixture is done (and stop it)."""
    import psutil

    suspects = [
        p
        for p in psutil.Process().children(recursive=True)
        if any(m in _cmdline(p) for m in LEAK_MARKERS)
    ]
    _, alive = psutil.wait_procs(suspects, timeout=15)
    if not alive:
        return
    lines = [f"{p.pid}: {_cmdline(p)[:200]}" for p in alive]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = "processes left behind by the tests (now killed):\n  " + "\n  ".join(lines)
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(message, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
