"""The anchor stages as flows, through the CLI: anchors build -> infer features -> label."""

import shutil
from collections import Counter

import numpy as np
import pytest
from conftest import ingest_folder
from typer.testing import CliRunner

from cvpipe import models
from cvpipe.core import storage, tables
from cvpipe.label import anchors


@pytest.fixture
def checkpoint(random_checkpoint):
    return random_checkpoint


def test_anchors_build_and_every_labeler(
    prefect_harness, digits_dir, digits_shards, checkpoint, tmp_path
):
    from flows.cli import app

    run = CliRunner().invoke
    root = str(tmp_path / "data")
    sources, sizes = [], {}
    for name, digits in {"low": "012", "mid": "345", "high": "6789"}.items():
        folder = tmp_path / "src" / name
        for d in digits:
            shutil.copytree(digits_dir / "labeled" / d, folder / d)
        sizes[name] = len(list(folder.rglob("*.png")))
        ingest_folder(str(folder), root, name, "a", 20)
        sources.append(f"{name}={root}/shards/{name}")
    anchors_url = str(tmp_path / "anchors.parquet")
    r = run(
        app,
        [
            "anchors",
            "build",
            *sources,
            "--model",
            checkpoint,
            "--out",
            anchors_url,
            "--kind",
            "normalized",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    names, vectors, counts = anchors.read_anchors(anchors_url)
    assert names == ["high", "low", "mid"] and vectors.shape == (3, 48)
    assert counts.tolist() == [sizes[n] for n in names]
    assert tables.read_lineage(anchors_url)["model_id"] == models.model_id(checkpoint)

    feats = str(tmp_path / "test_features")
    test_dir = digits_shards["test"][0].rsplit("/", 1)[0]
    r = run(
        app,
        [
            "infer",
            test_dir,
            "--model",
            checkpoint,
            "--out",
            feats,
            "--features",
            "--top-p",
            "1",
            "--device",
            "cpu",
            "--num-workers",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output
    test_root = test_dir.rsplit("/shards/", 1)[0]
    cases = [
        (["--method", "nearest", "--n", "2"], 6),
        (["--method", "nearest", "--n", "3", "--metric", "kl"], 6),
        (["--method", "cfa", "--metric", "l2"], 6),
        (["--method", "uniform", "--n-labels", "8"], None),
        (["--method", "random", "--n-labels", "5"], 5),
        (["--method", "vanilla", "--truth", test_root], 10),
    ]
    for i, (args, max_labels) in enumerate(cases):
        out = str(tmp_path / f"labels{i}")
        r = run(app, ["label", f"{feats}/features", "--anchors", anchors_url, "--out", out, *args])
        assert r.exit_code == 0, (args, r.output)
        files = [
            u
            for u in storage.list_committed(out, ".parquet", recursive=True)
            if "_uniform_rule" not in u
        ]
        assert len(files) == 6
        labels = {lab for u in files for lab in tables.read_parquet(u).column("label").to_pylist()}
        assert labels and (max_labels is None or len(labels) <= max_labels)
        if args[1] == "uniform":
            assert_uniform(out, [r for u in files for r in tables.read_parquet(u).to_pylist()])
    bad = run(
        app,
        [
            "label",
            f"{feats}/features",
            "--anchors",
            anchors_url,
            "--out",
            str(tmp_path / "bad"),
            "--method",
            "nearest",
            "--n",
            "4",
        ],
    )
    assert bad.exit_code == 1 and "error" in bad.output


def assert_uniform(out, rows):
    """Uniform's labels: each image's Nearest-3 sequence (its anchors column) goes to the
    rule's bucket of that sequence, split by a hash of its key alone; the sizes are more
    even than the raw sequences' and near the rule's target."""
    rule = anchors.read_uniform_rule(f"{out}/_uniform_rule.parquet")
    assert len(rows) == 540 and rule.target == 540 / 8
    assert max(rule.parts.values()) > 1  # some bucket is split by the key hash
    for r in rows:
        bucket, _, part = r["label"].partition("#")
        assert bucket == rule.bucket_of(r["anchors"]) and len(r["anchors"]) == 3
        parts = rule.parts[bucket]
        expect = int(anchors.key_hash([r["key"]], 0)[0] % parts) if parts > 1 else None
        assert (int(part) if part else None) == expect
    sizes = Counter(r["label"] for r in rows)
    raw = Counter(">".join(r["anchors"]) for r in rows)
    assert len(sizes) == sum(rule.parts.values())  # every part of every bucket is used
    split = [n for label, n in sizes.items() if "#" in label]
    assert split and all(0.5 * rule.target <= n <= 2 * rule.target for n in split)

    def cv(c):
        v = np.array(list(c.values()), float)
        return v.std() / v.mean()

    assert cv(sizes) < cv(raw)
