"""The ingest flow under Prefect: artifacts, reruns that write nothing, the CLI, and a
run killed with SIGKILL that a rerun completes byte for byte."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ingest_folder
from typer.testing import CliRunner

from cvpipe.core import storage
from cvpipe.data.config import IngestConfig


def mtimes(root):
    fs, path = storage.url_to_fs(root)
    return {p: fs.modified(p) for p in fs.find(path)}


def test_flow_ingests_publishes_summary_and_rerun_writes_nothing(
    prefect_harness, digits_dir, tmp_path
):
    from prefect.client.orchestration import get_client

    from flows.ingest import ingest_flow
    from tasks.artifacts import artifact_key

    root = str(tmp_path / "root")
    cfg = IngestConfig(
        source=str(digits_dir / "labeled"),
        root=root,
        partition="2026-11-25",
        name="digits",
        shard_size=50,
    )
    summary = ingest_flow(cfg)
    assert summary["shards"] == 4 and summary["written"] == 179 and summary["rejected"] == 0
    assert summary["shards_skipped"] == 0
    with get_client(sync_client=True) as client:
        key = artifact_key("ingest-summary-2026-11-25", location=root)
        arts = [a for a in client.read_artifacts() if a.key == key]
    assert arts and any(
        row["metric"] == "written" and row["value"] == 179 for a in arts for row in _table(a.data)
    )

    before = mtimes(root)
    again = ingest_flow(cfg)
    assert again["shards_skipped"] == 4 and again["written"] == 179
    assert mtimes(root) == before  # nothing rewritten, nothing added


def _table(data):
    import json

    return json.loads(data) if isinstance(data, str) else data


def test_cli_ingest_and_its_errors(prefect_harness, digits_dir, tmp_path):
    from flows.cli import app

    runner = CliRunner()
    root = str(tmp_path / "root")
    ok = runner.invoke(
        app,
        [
            "ingest",
            str(digits_dir / "test"),
            "--out",
            root,
            "--partition",
            "t",
            "--shard-size",
            "200",
            "--name",
            "digits",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "written" in ok.output and "540" in ok.output
    assert len(storage.list_committed(f"{root}/shards/t", ".tar")) == 3

    bad_size = runner.invoke(
        app, ["ingest", str(digits_dir), "--out", root, "--partition", "x", "--shard-size", "0"]
    )
    assert bad_size.exit_code == 2 and bad_size.output.startswith("error: --shard-size")
    missing = runner.invoke(
        app, ["ingest", str(tmp_path / "nope.csv"), "--out", root, "--partition", "y"]
    )
    assert missing.exit_code == 1 and "error:" in missing.output


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_the_uninterrupted_shards(digits_dir, tmp_path):
    source = str(digits_dir / "unlabeled")
    reference = ingest_folder(source, str(tmp_path / "ref"), "d", "digits", 5)
    root = str(tmp_path / "killed")
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "ingest",
        source,
        "--out",
        root,
        "--partition",
        "d",
        "--shard-size",
        "5",
        "--name",
        "digits",
    ]
    # The command starts its own temporary Prefect API: on loaded shared cores that takes
    # longer than Prefect's default 20 s startup timeout.
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard_dir = os.path.join(root, "shards", "d")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(storage.list_committed(shard_dir, ".tar")) >= 3:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(storage.list_committed(shard_dir, ".tar"))
    assert 3 <= done_at_kill < len(reference), "the kill did not land midway"

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = storage.list_committed(shard_dir, ".tar")
    assert [os.path.basename(u) for u in after] == [os.path.basename(u) for u in reference]
    for a, b in zip(after, reference, strict=True):
        assert storage.read_bytes(a) == storage.read_bytes(b)
    leftovers = [n for d, _, files in os.walk(root) for n in files if ".tmp-" in n]
    assert leftovers == []
