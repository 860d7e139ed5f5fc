"""Anchors as summaries: partial sums merged in any order or tree equal one pass."""

from __future__ import annotations

import random

import numpy as np
import pytest
from anchor_helpers import write_features

from cvpipe.core import tables
from cvpipe.label import anchors as an


@pytest.fixture
def checkpoint(random_checkpoint):
    return random_checkpoint


@pytest.mark.parametrize("kind", ["mean", "normalized", "softmax"])
def test_anchors_merged_in_any_order_equal_one_pass(tmp_path, kind, checkpoint):
    rng = np.random.default_rng(4)
    data = {}
    urls = []
    for name in ("animal", "plant", "tool"):
        embs = []
        for i in range(3):
            e = rng.normal(loc=rng.normal(), size=(int(rng.integers(1, 40)), 48))
            e = np.maximum(e, 0) if kind != "mean" else e  # ReLU features, some all-zero
            e[0] = 0
            url = str(tmp_path / name / f"f{i}.parquet")
            write_features(url, [f"{name}{i}-{j}" for j in range(len(e))], name, e)
            urls.append((url, name))
            embs.append(e.astype(np.float32))
        data[name] = np.concatenate(embs)
    ck = checkpoint if kind == "softmax" else None
    parts = [an.anchor_partial(u, n, kind, ck, batch_rows=7) for u, n in urls]
    head = an.load_head(checkpoint)
    ref = {n: an.to_space(e, kind, head).astype(np.float64).mean(0) for n, e in data.items()}

    results = []
    for seed in range(3):
        shuffled = parts[:]
        random.Random(seed).shuffle(shuffled)
        # A tree: merge pairs, then the merged pairs.
        level = [an.merge_anchor_sums(shuffled[i : i + 2]) for i in range(0, len(shuffled), 2)]
        results.append(an.merge_anchor_sums(level))
    # Through files too, as separate work units would.
    files = [str(tmp_path / "p" / f"{k}.parquet") for k in range(len(parts))]
    for part, url in zip(parts, files, strict=True):
        an.write_anchor_sums(part, url)
    results.append(an.merge_anchor_files(reversed(files)))
    for k, merged in enumerate(results):
        out = str(tmp_path / f"anchors{k}.parquet")
        an.write_anchors(merged, out)
        names, mat, counts = an.read_anchors(out)
        assert names == ["animal", "plant", "tool"]
        assert counts.tolist() == [len(data[n]) for n in names]
        np.testing.assert_allclose(mat, np.stack([ref[n] for n in names]), rtol=1e-6, atol=1e-7)
        lin = tables.read_lineage(out)
        assert lin["vector_kind"] == kind and lin["model_id"] == "m1"
    if kind != "mean":
        assert np.allclose(mat.sum(axis=1), 1.0, atol=1e-5)  # distributions


def test_merging_sums_of_different_models_is_an_error():
    a = an.AnchorSums("mean", 2, {"x": np.zeros(2)}, {"x": 1}, model="m1")
    b = an.AnchorSums("mean", 2, {"y": np.zeros(2)}, {"y": 1}, model="m2")
    with pytest.raises(ValueError, match="model"):
        an.merge_anchor_sums([a, b])
