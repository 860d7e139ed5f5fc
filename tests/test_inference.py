"""Teacher inference over real digit shards with a freshly built small CNN."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cvpipe import models
from cvpipe.core import tables
from cvpipe.data.features import read_matrix
from cvpipe.data.shards import read_shard_samples, shard_id, write_shard
from cvpipe.infer.batches import jpeg_for_gpu
from cvpipe.infer.config import InferConfig
from cvpipe.infer.stage import infer
from cvpipe.infer.teacher import (
    Teacher,
    features_url,
    predictions_url,
    rejects_url,
    summarize,
)

CLASSES = [str(i) for i in range(10)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
        assert feats.schema.remove_metadata() == tables.FEATURES
        assert read_matrix(features_url(str(tmp_path / "b64"), sid)).shape == (100, 48)
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
    config = InferConfig(shards=urls, checkpoint=checkpoint, out=out, top_p=2, features=True,
                         device="cpu", num_workers=0)  # fmt: skip
    first = infer(config)
    before = _files(out)
    assert len(before) == 8  # predictions, features (keys + matrix), rejects per shard
    again = infer(config)
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


# ------------------------------------------------------ the GPU path, run on the CPU


def _jpeg(mode: str, size=(40, 30), **save) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **save)
    return buf.getvalue()


def _rotated_jpeg() -> bytes:
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_jpeg("RGB"), True),
        (_jpeg("L"), True),
        (_jpeg("CMYK"), False),  # nvjpeg's RGB output of CMYK is not Pillow's
        (_jpeg("RGB", progressive=True), False),
        (_rotated_jpeg(), False),  # nvjpeg ignores EXIF orientation
    ],
    ids=["rgb", "gray", "cmyk", "progressive", "exif-rotated"],
)
def test_which_jpegs_go_to_the_device_decoder(data: bytes, expected: bool) -> None:
    assert jpeg_for_gpu(data, 10**8) is expected


def test_jpeg_for_gpu_rejects_bad_images_like_ingest() -> None:
    from cvpipe.data import images

    data = _jpeg("RGB")
    with pytest.raises(images.RejectedImage) as e:
        jpeg_for_gpu(data[: len(data) // 2], 10**8)
    assert e.value.reason == "truncated_image"
    with pytest.raises(images.RejectedImage) as e:
        jpeg_for_gpu(data, 100)  # 40 x 30 > 100 pixels
    assert e.value.reason == "too_many_pixels"


@pytest.fixture(scope="module")
def jpeg_shard(tmp_path_factory: pytest.TempPathFactory) -> str:
    """JPEGs of every kind the device path sorts: baseline RGB and gray (device), CMYK,
    progressive and EXIF-rotated (host), a PNG (host) and a corrupt JPEG (reject)."""
    members = [
        ("rgb-a", _jpeg("RGB", size=(48, 32)), "jpg"),
        ("gray", _jpeg("L", size=(32, 48)), "jpg"),
        ("cmyk", _jpeg("CMYK"), "jpg"),
        ("rgb-b", _jpeg("RGB", size=(48, 32), quality=50), "jpg"),
        ("progressive", _jpeg("RGB", progressive=True), "jpg"),
        ("rotated", _rotated_jpeg(), "jpg"),
        ("broken", _jpeg("RGB")[:200] + b"\xff\xd9", "jpg"),  # cut inside its headers
    ]
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 90, 200)).save(buf, format="PNG")
    members.insert(3, ("png", buf.getvalue(), "png"))
    url = str(tmp_path_factory.mktemp("jpegs") / "shards" / "j" / "jpegs-000000.tar")
    write_shard(url, [(k, {ext: d, "json": b"{}"}) for k, d, ext in members])
    return url


def test_device_jpeg_path_matches_host_decoding(checkpoint: str, jpeg_shard: str, tmp_path) -> None:
    """The CUDA path's code (JPEG bytes batched to the model's device, decoded there,
    resized and normalized as tensors, merged back in shard order) run on the CPU with
    torchvision's decoder: same keys in the same order, same rejects, and scores within
    the resize differences of the two decoders."""
    host = Teacher(checkpoint, device="cpu", batch_size=3, num_workers=0, top_p=3)
    dev = Teacher(checkpoint, device="cpu", batch_size=3, num_workers=0, top_p=3,
                  jpeg_on_device=True)  # fmt: skip
    [h] = host.process([jpeg_shard], str(tmp_path / "host"))
    [d] = dev.process([jpeg_shard], str(tmp_path / "dev"))
    assert (h.images, h.rejects) == (d.images, d.rejects) == (7, {"truncated_image": 1})
    sid = shard_id(jpeg_shard)
    ph = tables.read_parquet(predictions_url(str(tmp_path / "host"), sid)).to_pydict()
    pd = tables.read_parquet(predictions_url(str(tmp_path / "dev"), sid)).to_pydict()
    assert ph["key"] == pd["key"] == ["rgb-a", "gray", "cmyk", "png", "rgb-b", "progressive",
                                      "rotated"]  # fmt: skip
    np.testing.assert_allclose(np.array(ph["scores"]), np.array(pd["scores"]), atol=0.05)
    assert (d.decode_s, d.forward_s) != (0.0, 0.0)  # the clock marks ran on this path too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU hosts)")
def test_cuda_path_matches_cpu(checkpoint: str, jpeg_shard: str, digits_shards, tmp_path) -> None:
    """The real CUDA path (nvjpeg, bf16 autocast, channels_last, pinned one-batch-late
    results) against the CPU path: same keys, same rejects, same top-1 almost always."""
    urls = [jpeg_shard, *digits_shards["test"][:2]]
    cpu = Teacher(checkpoint, device="cpu", batch_size=64, num_workers=0, top_p=3)
    gpu = Teacher(checkpoint, device="cuda", batch_size=64, num_workers=2, top_p=3)
    sc = cpu.process(urls, str(tmp_path / "cpu"))
    sg = gpu.process(urls, str(tmp_path / "gpu"))
    assert [(s.images, s.rejects) for s in sc] == [(s.images, s.rejects) for s in sg]
    agree = total = 0
    for u in urls:
        pc = tables.read_parquet(predictions_url(str(tmp_path / "cpu"), shard_id(u))).to_pydict()
        pg = tables.read_parquet(predictions_url(str(tmp_path / "gpu"), shard_id(u))).to_pydict()
        assert pc["key"] == pg["key"]
        agree += sum(a[0] == b[0] for a, b in zip(pc["classes"], pg["classes"], strict=True))
        total += len(pc["key"])
        np.testing.assert_allclose(np.array(pc["scores"]), np.array(pg["scores"]), atol=0.05)
    assert agree >= 0.98 * total
