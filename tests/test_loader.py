"""The shard loader: the order of samples depends on the seed and the streams, never on
the number of DataLoader workers."""

from __future__ import annotations

import pytest
import torch

from cvpipe.data.loader import ShardDataset, make_loader
from cvpipe.data.shards import read_shard_samples, write_shard

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _to_tensor(image) -> torch.Tensor:
    return torch.zeros(1)  # the order is under test, not the pixels


def _keys(urls, workers: int, *, streams: int, batch_size: int = 16, epoch: int = 0,
          shuffle: int = 50, seed: int = 3) -> list[str]:  # fmt: skip
    ds = ShardDataset(urls, _to_tensor, shuffle_buffer=shuffle, seed=seed, num_streams=streams)
    ds.set_epoch(epoch)
    return [k for batch in make_loader(ds, batch_size, workers) for k in batch.keys]


@pytest.mark.parametrize("streams", [1, 2, 4])
def test_same_seed_same_order_with_0_1_2_workers(digits_shards, streams):
    urls = digits_shards["unlabeled"][:5]  # 5 shards: streams of unequal length
    orders = {w: _keys(urls, w, streams=streams) for w in (0, 1, 2)}
    assert orders[0] == orders[1] == orders[2]
    assert len(orders[0]) == len(set(orders[0])) == 500  # every sample, once
    # the order is shuffled and depends on the seed and epoch, as it should
    assert orders[0] != _keys(urls, 0, streams=streams, seed=4)
    assert orders[0] != _keys(urls, 0, streams=streams, epoch=1)
    assert _keys(urls, 2, streams=streams, epoch=1) == _keys(urls, 0, streams=streams, epoch=1)


def test_workers_that_do_not_divide_the_streams_are_capped(digits_shards):
    """Three workers over four streams read as two would: the order stays the same."""
    urls = digits_shards["unlabeled"][:5]
    ds = ShardDataset(urls, _to_tensor, num_streams=4)
    assert make_loader(ds, 8, 3).num_workers == 2
    assert make_loader(ds, 8, 8).num_workers == 4
    assert make_loader(ShardDataset(urls[:1], _to_tensor, num_streams=4), 8, 4).num_workers == 1
    assert _keys(urls, 3, streams=4, shuffle=0) == _keys(urls, 0, streams=4, shuffle=0)


def test_unshuffled_batches_follow_the_streams(digits_shards):
    """Round r holds batch r of every stream still going, streams in order; a stream is
    its shards in turn. With one stream, the order is the shards' own."""
    urls = digits_shards["unlabeled"][:3]
    own = [s.key for u in urls for s in read_shard_samples(u, decode=False)[0]]
    assert _keys(urls, 2, streams=1, shuffle=0, batch_size=32) == own
    ds = ShardDataset(urls, _to_tensor, num_streams=2)
    batches = [b.keys for b in make_loader(ds, 60, 2)]
    s0 = own[:100] + own[200:300]  # stream 0: shards 0 and 2; stream 1: shard 1
    s1 = own[100:200]
    assert batches == [s0[:60], s1[:60], s0[60:120], s1[60:], s0[120:180], s0[180:]]
    # iterating the dataset interleaves the streams sample by sample
    keys = [it["key"] for it in ds]
    assert keys[:4] == [s0[0], s1[0], s0[1], s1[1]] and sorted(keys) == sorted(own)


def test_rejects_reach_the_main_process_in_order(digits_shards, tmp_path):
    samples, _ = read_shard_samples(digits_shards["test"][0], decode=False)
    members = [(s.key, {s.ext: s.data, "json": b"{}"}) for s in samples[:6]]
    members.insert(2, ("broken", {"png": b"not a png", "json": b"{}"}))
    bad = str(tmp_path / "shards" / "b" / "bad-000000.tar")
    write_shard(bad, members)
    urls = [bad, digits_shards["test"][1]]
    runs = []
    for workers in (0, 2):
        ds = ShardDataset(urls, _to_tensor, num_streams=2)
        batches = list(make_loader(ds, 4, workers))
        runs.append([(b.keys, [r["key"] for r in b.rejects]) for b in batches])
    assert runs[0] == runs[1]
    assert [r for _, rejects in runs[0] for r in rejects] == ["broken"]


def test_training_weights_do_not_depend_on_loader_workers(digits_shards, tmp_path):
    """Same seed and streams, 0 or 2 loader workers: the same weights, bit for bit."""
    import torch

    from cvpipe import models
    from cvpipe.learn import training
    from cvpipe.learn.config import TrainConfig

    weights = []
    for workers in (0, 2):
        cfg = TrainConfig(epochs=1, batch_size=32, input_size=16, cpu_threads=1,
                          num_streams=2, num_workers=workers, shuffle_buffer=64)  # fmt: skip
        final = training.train(cfg, digits_shards["labeled"], str(tmp_path / f"w{workers}"))
        weights.append(models.load_checkpoint(final)[0].state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
