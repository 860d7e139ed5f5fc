"""The shard reader on hostile tars: no crash, a precise reject per bad sample, every
good sample read, nothing unpickled."""

import os

import webdataset as wds
from badinputs import jpeg, pickle_trap, png, tar_bytes

from cvpipe.core import storage
from cvpipe.data import shards


def read(tmp_path, members, name="p/bad-000000.tar"):
    url = str(tmp_path / name)
    storage.write_bytes_atomic(url, tar_bytes(members))
    samples, rejects = shards.read_shard_samples(url)
    return {s.key: s for s in samples}, [(r.key, r.reason) for r in rejects], rejects


def test_pickle_and_torch_members_are_never_loaded(tmp_path):
    trap = str(tmp_path / "UNPICKLED")
    good, rejected, rows = read(
        tmp_path,
        [
            ("a.jpg", jpeg()),
            ("a.json", b'{"label": "cat"}'),
            ("a.pyd", pickle_trap(trap)),
            ("b.pth", pickle_trap(trap)),
            ("c.pickle", pickle_trap(trap)),
            ("c.pkl", pickle_trap(trap)),
        ],
    )
    assert not os.path.exists(trap)
    assert set(good) == {"a"} and good["a"].meta == {"label": "cat"}
    assert good["a"].image.mode == "RGB"
    assert rejected == [
        ("a", "ignored_member"),
        ("b", "ignored_member"),
        ("b", "no_image"),
        ("c", "ignored_member"),
        ("c", "ignored_member"),
        ("c", "no_image"),
    ]
    assert "a.pyd" in rows[0].detail and rows[0].shard == "p/bad-000000"


def test_truncated_tar_rejects_the_member_being_read_and_keeps_the_rest(tmp_path):
    c = png(size=(64, 64))
    data = tar_bytes([("a.png", png()), ("b.png", png()), ("c.png", c)])
    cut = data[: data.index(c) + len(c) // 2]  # halfway through c.png's data
    url = str(tmp_path / "p" / "cut-000000.tar")
    storage.write_bytes_atomic(url, cut)
    samples, rejects = shards.read_shard_samples(url)
    assert [s.key for s in samples] == ["a", "b"]
    assert [(r.key, r.reason) for r in rejects] == [("c", "corrupt_tar")]


def test_duplicates_odd_names_and_bad_images(tmp_path):
    good, rejected, _ = read(
        tmp_path,
        [
            ("dup.png", png()),
            ("other.png", png()),
            ("dup.png", png()),  # the key comes back later: a duplicate key
            ("twice.png", png()),
            ("twice.png", png()),  # same member twice in one sample
            ("with space.png", png()),
            ("ünïcødé.png", png()),
            ("../escape.png", png()),
            ("/abs.png", png()),
            ("empty.jpg", b""),
            ("text.jpg", b"not an image at all"),
            ("cut.jpg", jpeg()[:-30]),
            ("cmyk.jpg", jpeg("CMYK")),
            ("meta.png", png()),
            ("meta.json", b"{not json"),
        ],
    )
    assert set(good) == {"dup", "other", "with space", "ünïcødé", "cmyk"}
    assert dict(rejected) == {
        "dup": "duplicate_key",
        "twice": "duplicate_member",
        "../escape": "unsafe_member",
        "/abs": "unsafe_member",
        "empty": "empty_image",
        "text": "not_an_image",
        "cut": "truncated_image",
        "meta": "bad_metadata",
    }


def test_shard_writer_is_byte_deterministic_and_webdataset_compatible(tmp_path):
    samples = [(f"k{i}", {"png": png(), "json": b'{"label":"x"}'}) for i in range(3)]
    a, b = str(tmp_path / "p" / "a-000000.tar"), str(tmp_path / "p" / "b-000000.tar")
    shards.write_shard(a, samples)
    shards.write_shard(b, samples)
    assert storage.read_bytes(a) == storage.read_bytes(b)
    keys = [s["__key__"] for s in wds.WebDataset(a, shardshuffle=False)]
    assert keys == ["k0", "k1", "k2"]


def test_shard_id_and_unit_url():
    assert shards.shard_id("/data/shards/2026-11-25/web-000042.tar") == "2026-11-25/web-000042"
    assert shards.shard_id("s3://bucket/shards/day/x-000001.tar") == "day/x-000001"
    assert shards.shard_id("/o/predictions/day/x-000001.parquet") == "day/x-000001"
    assert shards.unit_url("s3://b/out", "predictions", "day/x-000001") == (
        "s3://b/out/predictions/day/x-000001.parquet"
    )
