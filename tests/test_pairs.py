"""Pair mining for Siamese training: the positive share holds, hard negatives are the
closest dissimilar pairs, draws are seeded; labels from a table drive a real run."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from cvpipe import models
from cvpipe.core import tables
from cvpipe.learn import loop
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.pairs import mine_pairs, read_labels
from cvpipe.learn.tasks import ContrastiveTask


def _check(labels, pairs):
    assert torch.all(pairs.first < pairs.second)  # no self pairs, each pair once-ordered
    same = labels[pairs.first] == labels[pairs.second]
    assert torch.equal(same, pairs.dissimilar == 0)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_the_positive_share_is_what_was_asked(fraction):
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(8)  # 4 classes x 8 samples
    pairs = mine_pairs(labels, 64, fraction)
    assert len(pairs) == 64 and pairs.positives == round(64 * fraction)
    _check(labels, pairs)


def test_scarce_pairs_are_drawn_again_and_missing_kinds_give_way():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 2, 3, 4])  # one positive pair only
    pairs = mine_pairs(labels, 10, 0.5)
    assert pairs.positives == 5 and len(pairs) == 10  # the ratio holds by repetition
    pos = pairs.dissimilar == 0
    assert set(pairs.first[pos].tolist()) == {0} and set(pairs.second[pos].tolist()) == {1}
    _check(labels, pairs)
    all_distinct = mine_pairs(torch.arange(6), 8, 0.5)
    assert all_distinct.positives == 0 and len(all_distinct) == 8
    one_class = mine_pairs(torch.zeros(6, dtype=torch.int64), 8, 0.5)
    assert one_class.positives == 8
    assert len(mine_pairs(torch.tensor([3]), 4, 0.5)) == 0  # a lone sample: nothing


def test_hard_negatives_are_the_closest_dissimilar_pairs():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    z = torch.tensor([[0.0], [1.0], [2.0], [2.1], [5.0], [9.0]])
    # Dissimilar pairs by distance: (2,3) 0.1, (1,3) 1.1, (0,3) 2.1, (2,4) 3.0, ...
    pairs = mine_pairs(labels, 6, 0.5, hard_negatives=2 / 3, embeddings=z)
    neg = pairs.dissimilar == 1
    got = sorted(zip(pairs.first[neg].tolist(), pairs.second[neg].tolist(), strict=True))
    assert (2, 3) in got and (1, 3) in got and pairs.positives == 3
    with pytest.raises(ValueError, match="embeddings"):
        mine_pairs(labels, 6, 0.5, hard_negatives=0.5)


def test_draws_follow_the_seed():
    labels = torch.arange(5).repeat(6)
    torch.manual_seed(3)
    a = mine_pairs(labels, 40, 0.3)
    torch.manual_seed(3)
    b = mine_pairs(labels, 40, 0.3)
    assert torch.equal(a.first, b.first) and torch.equal(a.second, b.second)


def test_read_labels_drops_keys_with_two_labels(tmp_path):
    url = str(tmp_path / "sel.parquet")
    t = pa.table({"key": ["a", "b", "c", "c"], "label": pa.array([1, 2, 3, 4], pa.int32())})
    tables.write_parquet(t, url, {})
    assert read_labels(url) == {"a": "1", "b": "2"}
    tables.write_parquet(pa.table({"key": ["x"], "label": pa.array([None], pa.string())}), url, {})
    with pytest.raises(ValueError, match="no labeled key"):
        read_labels(url)


def test_a_siamese_run_on_table_labels_with_a_set_ratio(digits_shards, tmp_path):
    """Pseudo-labels from a table (parity of the digit: 2 classes) drive the pairs; the
    embedding net separates them on held-out data."""
    from cvpipe.data.shards import Reject, iter_shard

    keys, labels = [], []
    for url in digits_shards["labeled"]:
        for s in iter_shard(url, decode=False):
            if not isinstance(s, Reject):
                keys.append(s.key)
                labels.append("even" if int(s.meta["label"]) % 2 == 0 else "odd")
    table = str(tmp_path / "parity.parquet")
    tables.write_parquet(pa.table({"key": keys, "label": labels}), table, {})
    task = ContrastiveTask(dim=8, positive_fraction=0.5, hard_negatives=0.25, labels=table)
    cfg = TrainConfig(arch="small_cnn", epochs=8, batch_size=32, lr=0.05, input_size=16,
                      cpu_threads=1, device="cpu")  # fmt: skip
    ckpt = loop.train(task, cfg, digits_shards["labeled"], str(tmp_path / "run"))
    info = models.load_info(ckpt)
    assert info.classes == ["even", "odd"] and info.task == "contrastive"
    assert info.lineage["task"]["positive_fraction"] == 0.5
    model, _ = models.load_model(ckpt)
    assert isinstance(model, models.EmbeddingNet) and model.feature_dim == 8
    rows = tables.read_parquet(str(tmp_path / "run" / "metrics.parquet")).to_pylist()
    last = [r for r in rows if r["split"] == "train"][-1]
    assert last["similar_distance"] < last["dissimilar_distance"]
