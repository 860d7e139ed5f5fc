"""Shared fixtures: the bundled digits as real shards, and Prefect's test harness."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cvpipe import ingest, storage
from cvpipe.config import IngestConfig
from cvpipe.datasets import export_digits

# Keep Prefect quiet and local for every test process (set before prefect is imported).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")


def ingest_folder(source: str, root: str, partition: str, name: str, shard_size: int) -> list[str]:
    """Ingest a folder with the library (no Prefect); returns the committed shard URLs."""
    cfg = IngestConfig(
        source=source, root=root, partition=partition, name=name, shard_size=shard_size
    )
    plan, n = ingest.prepare_plan(source, root, partition, name, shard_size, cfg)
    for i in range(n):
        ingest.ingest_shard(root, partition, name, i, plan, cfg)
    return storage.list_committed(storage.join(root, "shards", partition), ".tar")


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
