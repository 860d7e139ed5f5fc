"""The teacher stages as flows, through the CLI: infer -> select -> materialize."""

import pytest
from typer.testing import CliRunner

from cvpipe import models
from cvpipe.core import storage, tables
from cvpipe.data import shards


@pytest.fixture
def checkpoint(random_checkpoint):
    return random_checkpoint


def test_infer_select_materialize_cli(prefect_harness, digits_shards, checkpoint, tmp_path):
    from flows.cli import app

    run = CliRunner().invoke
    shard_dir = digits_shards["unlabeled"][0].rsplit("/", 1)[0]
    out = str(tmp_path / "teacher")
    r = run(
        app,
        [
            "infer",
            shard_dir,
            "--model",
            checkpoint,
            "--out",
            out,
            "--top-p",
            "10",
            "--features",
            "--batch-size",
            "64",
            "--device",
            "cpu",
            "--num-workers",
            "0",
            "--shards-per-unit",
            "4",
        ],
    )
    assert r.exit_code == 0, r.output
    preds = storage.list_committed(f"{out}/predictions", ".parquet", recursive=True)
    assert len(preds) == 11  # one per input shard
    first = tables.read_parquet(preds[0])
    assert first.column("shard").to_pylist()[0] == shards.shard_id(digits_shards["unlabeled"][0])
    assert tables.read_lineage(preds[0])["model_id"] == models.model_id(checkpoint)
    assert len(storage.list_committed(f"{out}/features", ".parquet", recursive=True)) == 11

    sel_out = str(tmp_path / "sel")
    # P = all 10 classes: every image is a candidate of every class, so each gets K.
    r = run(
        app, ["select", out, "--top-p", "10", "--top-k", "30", "--out", sel_out, "--fan-in", "4"]
    )
    assert r.exit_code == 0, r.output
    selection = tables.read_parquet(f"{sel_out}/selection.parquet")
    assert selection.num_rows == 300
    assert sorted(set(selection.column("rank").to_pylist())) == list(range(1, 31))
    assert storage.is_committed(f"{sel_out}/selection_report.md")
    before = {
        u: storage.url_to_fs(u)[0].modified(u)
        for u in storage.list_committed(sel_out, recursive=True)
    }
    r = run(app, ["select", out, "--top-p", "10", "--top-k", "30", "--out", sel_out])
    assert r.exit_code == 0, r.output
    assert {
        u: storage.url_to_fs(u)[0].modified(u)
        for u in storage.list_committed(sel_out, recursive=True)
    } == before

    mat_out = str(tmp_path / "student")
    r = run(
        app,
        [
            "materialize",
            f"{sel_out}/selection.parquet",
            "--shards",
            shard_dir,
            "--out",
            mat_out,
            "--model",
            checkpoint,
        ],
    )
    assert r.exit_code == 0, r.output
    written = [
        s
        for u in storage.expand_urls(f"{mat_out}/shards", ".tar")
        for s in shards.read_shard_samples(u, decode=False)[0]
    ]
    assert len(written) == 300
    assert {s.meta["label"] for s in written} == {str(i) for i in range(10)}


def test_infer_with_a_missing_checkpoint_is_a_clear_error(prefect_harness, digits_shards, tmp_path):
    from flows.cli import app

    r = CliRunner().invoke(
        app,
        [
            "infer",
            digits_shards["test"][0],
            "--model",
            str(tmp_path / "nope.pt"),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 1 and "does not exist" in r.output
