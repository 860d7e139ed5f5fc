"""The same flow on every task runner gives the same bytes: threads (default), a real
Dask LocalCluster with 2 workers, and a local Ray instance."""

from __future__ import annotations

import os

import pytest

from cvpipe.core import storage
from cvpipe.data.config import IngestConfig


def _tree(root: str) -> dict[str, bytes]:
    """Every committed output file under root with its bytes (Parquet lineage carries a
    created_at time, so tables are compared by their rows, tars byte for byte)."""
    from cvpipe.core import tables

    out = {}
    for url in storage.list_committed(root, recursive=True):
        rel = os.path.relpath(url, root)
        if url.endswith(".parquet"):
            out[rel] = tables.read_parquet(url).to_pylist()
        elif url.endswith(".claim.json"):  # names the config, whose root differs per run
            out[rel] = "claimed"
        else:
            out[rel] = storage.read_bytes(url)
    return out


def _ingest(runner: str, root: str, source: str) -> dict:
    from flows.ingest import ingest_flow
    from flows.runners import with_runner

    cfg = IngestConfig(source=source, root=root, partition="p", name="digits", shard_size=60)
    return with_runner(ingest_flow, runner, workers=None if runner == "threads" else 2)(cfg)


@pytest.fixture(scope="module")
def reference(prefect_harness, digits_dir, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("threads"))
    summary = _ingest("threads", root, str(digits_dir / "labeled"))
    return summary, _tree(root)


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["dask", "ray"])
def test_ingest_is_byte_identical_on_every_runner(runner, reference, digits_dir, tmp_path):
    summary, tree = reference
    root = str(tmp_path / runner)
    got = _ingest(runner, root, str(digits_dir / "labeled"))
    assert got == summary and summary["written"] == 179
    assert _tree(root) == tree and len([k for k in tree if k.endswith(".tar")]) == 3


def test_unknown_runner_is_a_clear_error():
    from flows.runners import task_runner

    with pytest.raises(ValueError, match="unknown runner 'spark'"):
        task_runner("spark")
