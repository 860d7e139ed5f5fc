"""Learning to transfer through the CLI and flows, on the bundled digits: `cvpipe p2l`
ranks as constructed summaries demand, `cvpipe shallow` scores frozen features, and the
whole study (toy size) writes every table and a report whose choices are its rows'."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cvpipe import models
from cvpipe.core import storage, tables
from cvpipe.data import shards
from cvpipe.learn import training
from cvpipe.learn.config import TrainConfig

TINY = {
    "arch": "small_cnn",
    "input_size": 16,
    "batch_size": 32,
    "lr": 0.05,
    "augmentation": "shift",
    "cpu_threads": 1,
    "keep_checkpoints": 1,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def reference(digits_shards, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("reference"))
    return training.train(TrainConfig(**TINY, epochs=2), digits_shards["labeled"], out)


def invoke(*args: str) -> str:
    from flows.cli import app

    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


def test_p2l_cli_ranks_the_targets_own_data_first(
    prefect_harness, digits_shards, reference, tmp_path
):
    target = digits_shards["test"][0].rsplit("/", 1)[0]  # the folder of the test shards
    other = digits_shards["labeled"][0].rsplit("/", 1)[0]
    cands = tmp_path / "candidates.yaml"
    # "same" is the target set itself (divergence 0); equal sizes: the closest must win.
    cands.write_text(
        "candidates:\n"
        f"  same: {{shards: {target}, size: 100, checkpoint: s.pt}}\n"
        f"  other: {{shards: {other}, size: 100}}\n"
    )
    out = str(tmp_path / "p2l")
    args = ["p2l", target, "--candidates", str(cands), "--reference", reference, "--out", out]
    text = invoke(*args)
    assert "same" in text
    rows = tables.read_parquet(f"{out}/ranking.parquet").to_pylist()
    assert [r["candidate"] for r in rows] == ["same", "other"]
    assert rows[0]["divergence"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["divergence"] > 1e-4
    assert rows[0]["checkpoint"] == "s.pt" and [r["rank"] for r in rows] == [1, 2]
    lin = tables.read_lineage(f"{out}/ranking.parquet")
    assert lin["reference_model"] == models.model_id(reference)
    assert lin["weights"]["metric"] == "kl" and lin["weights"]["kind"] == "normalized"

    # Equal divergence is not available on real data, but a size weight alone ranks by
    # size; summaries are cached (same shards, reference, kind), so this run only ranks.
    summary = f"{out}/summaries/sources-normalized.parquet"
    before = storage.url_to_fs(summary)[0].modified(summary)
    cands.write_text(cands.read_text().replace("size: 100, checkpoint", "size: 10, checkpoint"))
    invoke(*args, "--w-div", "0", "--w-size", "1")
    rows = tables.read_parquet(f"{out}/ranking.parquet").to_pylist()
    assert [r["candidate"] for r in rows] == ["other", "same"]
    assert storage.url_to_fs(summary)[0].modified(summary) == before

    # Another target set under the same output: its summary holds its own images only
    # (not the earlier target's features, which sit in the same output folder).
    invoke(*[other if a == target else a for a in args])
    from cvpipe.label import anchors

    _, _, counts = anchors.read_anchors(f"{out}/summaries/target-normalized.parquet")
    assert counts.tolist() == [179]


def test_shallow_cli_on_features_of_a_checkpoint(
    prefect_harness, digits_shards, reference, tmp_path
):
    from cvpipe.infer.config import InferConfig
    from flows.teacher import infer_flow

    feats = {}
    for split in ("labeled", "test"):
        out = str(tmp_path / f"feat-{split}")
        infer_flow(
            InferConfig(
                shards=digits_shards[split],
                checkpoint=reference,
                out=out,
                top_p=1,
                features=True,
                num_workers=0,
                device="cpu",
            )
        )
        feats[split] = f"{out}/features"
    root = shards.ingest_root(digits_shards["labeled"][0])
    out = str(tmp_path / "svm")
    invoke(
        "shallow",
        feats["labeled"],
        "--truth",
        root,
        "--test",
        feats["test"],
        "--model",
        "svm",
        "--out",
        out,
    )
    [row] = tables.read_parquet(f"{out}/shallow.parquet").to_pylist()
    assert row["model"] == "svm" and 0.5 < row["top1"] <= 1.0
    assert row["train"] == 179 and row["test"] == 540 and row["classes"] == 10
    assert tables.read_lineage(f"{out}/shallow.parquet")["features_model_id"] == models.model_id(
        reference
    )
    from flows.cli import app

    r = CliRunner().invoke(
        app,
        [
            "shallow",
            feats["labeled"],
            "--truth",
            root,
            "--test",
            feats["test"],
            "--model",
            "tree",
            "--out",
            out,
        ],
    )
    assert r.exit_code != 0 and "--model" in r.output


@pytest.mark.slow
def test_transfer_study_at_toy_size(prefect_harness, tmp_path):
    from cvpipe.experiments.config import TransferStudyConfig
    from flows.transfer_study import transfer_flow

    root = str(tmp_path / "study")
    config = TransferStudyConfig(
        root=root,
        seeds=[0],
        digits={
            "sources": {
                "s01": {"classes": "01"},
                "s0123": {"classes": "0123", "per_class": 20},
                "s23": {"classes": "23", "per_class": 30},
            },
            "targets": {"t01": "01", "t23": "23", "t12": "12"},
            "test_per_class": 10,
            "val_per_class": 5,
        },
        reference={**TINY, "epochs": 2},
        source={**TINY, "epochs": 2},
        finetune={**TINY, "epochs": 2, "new_head": True},
        grid_per_class=5,
        target="t12",
        label_counts=[5, None],
        freeze_depths=[0, 3],
        shallow=["logistic"],
        c_grid=[0.1, 1.0],
        curricula={"reference>s23": ["reference", "s23"]},
        cost_batch=8,
    )
    out = transfer_flow(config)
    grid = tables.read_parquet(f"{root}/grid.parquet").to_pylist()
    assert len(grid) == 9 and {r["size"] for r in grid if r["source"] == "s0123"} == {80}
    assert all(0 <= r["test_top1"] <= 1 and r["divergence"] >= 0 for r in grid)
    val = tables.read_parquet(f"{root}/p2l/p2l_validation.parquet").to_pylist()
    assert [r["selector"] for r in val][:3] == ["p2l", "largest", "closest"]
    assert all(r["targets"] == 3 for r in val[:3])
    methods = tables.read_parquet(f"{root}/methods.parquet").to_pylist()
    names = {(r["per_class"], r["method"]) for r in methods}
    for k in (5, None):
        assert {(k, m) for m in ("logistic", "freeze-0", "freeze-3", "lr-mult", "scratch")} <= names
    assert {(5, "curriculum:reference>s23"), (5, "direct:reference")} <= names
    # The curriculum's target run started from the s23 step, which started from the reference.
    chain = [r for r in methods if r["method"] == "curriculum:reference>s23"]
    assert len(chain) == 1
    step = storage.list_committed(
        f"{root}/runs/curricula/reference>s23", "final.pt", recursive=True
    )
    assert len(step) == 1
    reference = f"{root}/reference/final.pt"
    assert models.load_info(step[0]).lineage["init_checkpoint"] == reference
    finals = [
        u
        for u in storage.list_committed(f"{root}/runs/t12", "final.pt", recursive=True)
        if models.load_info(u).lineage.get("init_checkpoint") == step[0]
    ]
    assert len(finals) == 1
    costs = tables.read_parquet(f"{root}/costs.parquet").to_pylist()
    assert [c["model"] for c in costs] == ["small_cnn@16"] and costs[0]["params"] == 19154
    md = storage.read_bytes(out["markdown"]).decode()
    rec = out["recommendation"]
    assert f"**Method: `{rec['method']}`**" in md and f"**Source: `{rec['source']}`**" in md
    assert rec["method"] in {r["method"] for r in methods if r["target"] == "t12"}
    assert storage.read_bytes(out["png"])[:4] == b"\x89PNG"
    assert storage.is_committed(f"{root}/p2l/p2l_weights.parquet")


@pytest.mark.parametrize("case", ["candidates", "reference", "test", "root"])
def test_bad_input_of_the_transfer_commands_is_one_error_line(case, tmp_path, digits_shards):
    """The shared preflight: a missing file or a file that is no checkpoint fails before
    any flow, in one line naming the flag; nothing is written."""
    from flows.cli import app

    shard = digits_shards["test"][0]
    text = tmp_path / "model.pt"
    text.write_text("not a model\n")
    candidates = tmp_path / "candidates.yaml"
    candidates.write_text(f"candidates:\n  a: {{shards: {shard}}}\n")
    config = tmp_path / "study.yaml"
    config.write_text("root: unused\nreference: {}\nsource: {}\nfinetune: {}\ntarget: t_odd\n")
    out = tmp_path / "o"
    nope = str(tmp_path / "nope")
    p2l = ["p2l", shard, "--out", str(out)]
    args, flag, says = {
        "candidates": ([*p2l, "--candidates", nope, "--reference", str(text)],
                       "--candidates", "does not exist"),
        "reference": ([*p2l, "--candidates", str(candidates), "--reference", str(text)],
                      "--reference", "is not a checkpoint"),
        "test": (["shallow", shard, "--truth", str(tmp_path), "--test", nope, "--out", str(out)],
                 "--test", "does not exist"),
        "root": (["transfer", str(config), "--root", "/proc/cvpipe-study"], "--root",
                 "not writable"),
    }[case]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {flag} ") and says in errors[0], (
        r.output
    )
    assert not out.exists()
