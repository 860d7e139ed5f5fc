"""Teacher inference over real digit shards with a freshly built small CNN."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cvpipe import models, tables
from cvpipe.inference import (
    Teacher,
    features_url,
    infer_shards,
    predictions_url,
    rejects_url,
    summarize,
)
from cvpipe.shards import read_shard_samples, shard_id, write_shard

CLASSES = [str(i) for i in range(10)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    model = models.build("small_cnn", len(CLASSES))
    info = models.ModelInfo("small_cnn", CLASSES, 16, mean=(0.5,) * 3, std=(0.25,) * 3)
    url = str(tmp_path_factory.mktemp("ckpt") / "teacher.pt")
    models.save_checkpoint(model, info, url)
    return url


@pytest.fixture(scope="module")
def bad_shard(digits_shards, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Five good samples of a real shard, a truncated PNG and bytes that are no image."""
    samples, _ = read_shard_samples(digits_shards["test"][0], decode=False)
    good = [(s.key, {s.ext: s.data, "json": b"{}"}) for s in samples[:5]]
    data = samples[5].data
    bad = [
        ("truncated", {"png": data[: len(data) // 2], "json": b"{}"}),
        ("garbage", {"png": b"not an image at all", "json": b"{}"}),
    ]
    url = str(tmp_path_factory.mktemp("bad") / "shards" / "bad" / "bad-000000.tar")
    write_shard(url, good[:3] + bad + good[3:])
    return url


def _files(root) -> dict[str, float]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            out[os.path.join(d, n)] = os.stat(os.path.join(d, n)).st_mtime_ns
    return out


def test_batch_size_does_not_change_classes(checkpoint, digits_shards, tmp_path):
    urls = digits_shards["unlabeled"][:3]
    one = Teacher(checkpoint, device="cpu", batch_size=1, top_p=3, num_workers=0)
    many = Teacher(checkpoint, device="cpu", batch_size=64, top_p=3, num_workers=2, features=True)
    s1 = one.process(urls, str(tmp_path / "b1"))
    s64 = many.process(urls, str(tmp_path / "b64"))
    assert [s.images for s in s1] == [s.images for s in s64] == [100, 100, 100]
    for url in urls:
        sid = shard_id(url)
        a = tables.read_parquet(predictions_url(str(tmp_path / "b1"), sid))
        b = tables.read_parquet(predictions_url(str(tmp_path / "b64"), sid))
        assert a.schema.remove_metadata() == tables.PREDICTIONS
        # rows in shard order whatever the batching and the worker interleaving
        assert a.column("key").to_pylist() == b.column("key").to_pylist()
        assert a.column("shard").to_pylist() == [sid] * 100
        assert a.column("classes").to_pylist() == b.column("classes").to_pylist()
        sa = np.array(a.column("scores").to_pylist())
        sb = np.array(b.column("scores").to_pylist())
        np.testing.assert_allclose(sa, sb, rtol=1e-4, atol=1e-6)
        assert sa.shape == (100, 3)
        assert (np.diff(sa, axis=1) <= 0).all()  # descending
        assert ((sa > 0) & (sa <= 1)).all()
        lin = tables.read_lineage(predictions_url(str(tmp_path / "b64"), sid))
        assert lin["model_id"] == models.model_id(checkpoint)
        assert lin["top_p"] == 3 and lin["config_hash"]
        feats = tables.read_parquet(features_url(str(tmp_path / "b64"), sid))
        assert feats.schema.remove_metadata() == tables.features_schema(48)
        assert feats.column("key").to_pylist() == a.column("key").to_pylist()
    assert not os.path.exists(features_url(str(tmp_path / "b1"), shard_id(urls[0])))


def test_predictions_match_the_model(checkpoint, digits_shards, tmp_path):
    """The stage's top-P is the model's softmax top-P on the checkpoint's preprocessing."""
    url = digits_shards["labeled"][0]
    Teacher(checkpoint, device="cpu", batch_size=16, top_p=10, num_workers=0).process(
        [url], str(tmp_path)
    )
    model, info = models.load_checkpoint(checkpoint)
    model.eval()
    samples, _ = read_shard_samples(url)
    x = torch.stack([models.preprocess(info)(s.image) for s in samples[:8]])
    with torch.inference_mode():
        probs = torch.softmax(model(x), dim=1)
    table = tables.read_parquet(predictions_url(str(tmp_path), shard_id(url)))
    got = np.array(table.column("scores").to_pylist()[:8])
    classes = np.array(table.column("classes").to_pylist()[:8])
    expect = torch.sort(probs, dim=1, descending=True)
    np.testing.assert_allclose(got, expect.values.numpy(), rtol=1e-4, atol=1e-6)
    assert (classes[:, 0] == probs.argmax(1).numpy()).all()
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)  # P = all classes


def test_rerun_writes_nothing(checkpoint, digits_shards, tmp_path):
    urls = digits_shards["test"][:2]
    out = str(tmp_path / "out")
    first = infer_shards(urls, checkpoint, out, top_p=2, features=True, device="cpu")
    before = _files(out)
    assert len(before) == 6  # predictions, features, rejects per shard
    again = infer_shards(urls, checkpoint, out, top_p=2, features=True, device="cpu")
    assert _files(out) == before
    assert [s.skipped for s in again] == [True, True]
    assert [s.images for s in again] == [s.images for s in first]


def test_rejects_are_counted_not_fatal(checkpoint, bad_shard, digits_shards, tmp_path):
    out = str(tmp_path)
    teacher = Teacher(checkpoint, device="cpu", batch_size=4, top_p=2, num_workers=2)
    stats = teacher.process([bad_shard, digits_shards["test"][0]], out)
    bad = stats[0]
    assert bad.images == 5 and bad.rejected == 2
    assert set(bad.rejects) <= {"truncated_image", "corrupt_image", "not_an_image"}
    rejects = tables.read_parquet(rejects_url(out, shard_id(bad_shard)))
    assert sorted(rejects.column("key").to_pylist()) == ["garbage", "truncated"]
    assert set(rejects.column("stage").to_pylist()) == {"infer"}
    preds = tables.read_parquet(predictions_url(out, shard_id(bad_shard)))
    assert preds.num_rows == 5
    assert stats[1].images == 100 and stats[1].rejected == 0
    summary = summarize(stats)
    assert summary["images"] == 105 and summary["rejected"] == 2
    assert summary["forward_s"] > 0 and summary["write_s"] > 0
    # read back from the committed outputs on a rerun
    again = teacher.process([bad_shard], out)[0]
    assert again.skipped and again.images == 5 and again.rejects == bad.rejects
