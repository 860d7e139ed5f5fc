"""Ingest from folders and manifests with the library: bad inputs become reject rows
with precise reasons, good ones land in deterministic shards, nothing is lost."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from badinputs import jpeg, png
from conftest import ingest_folder
from PIL import Image

from cvpipe.core import storage, tables
from cvpipe.data import ingest, shards


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def bad_folder(tmp_path):
    src = tmp_path / "src"
    write(src / "cat" / "ok.jpg", jpeg())
    write(src / "cat" / "cmyk.jpg", jpeg("CMYK"))
    write(src / "cat" / "zero.jpg", b"")
    write(src / "cat" / "truncated.jpg", jpeg()[:-30])
    write(src / "cat" / "text.jpg", b"hello, I am text")
    write(src / "dog" / "16bit.png", png("I;16"))
    write(src / "dog" / "palette alpha.png", png("P"))
    write(src / "dog" / "huge.png", png("1", size=(10_000, 9_000)))
    write(src / "dog" / "ünïcødé.png", png())
    bmp = io.BytesIO()
    Image.new("RGB", (5, 4), (1, 2, 3)).save(bmp, format="BMP")
    write(src / "dog" / "old.bmp", bmp.getvalue())
    write(src / "dog" / "notes.txt", b"not an image file: not listed")
    return src


def test_bad_inputs_become_reject_rows_and_good_ones_shards(bad_folder, tmp_path):
    root = str(tmp_path / "root")
    urls = ingest_folder(str(bad_folder), root, "day1", "web", shard_size=4)
    assert [shards.shard_id(u) for u in urls] == [
        "day1/web-000000",
        "day1/web-000001",
        "day1/web-000002",
    ]
    rejects = pa.concat_tables(
        tables.read_parquet(u) for u in storage.list_committed(f"{root}/rejects", recursive=True)
    ).to_pylist()
    index = pa.concat_tables(
        tables.read_parquet(u) for u in storage.list_committed(f"{root}/index", recursive=True)
    ).to_pylist()
    assert len(index) + len(rejects) == 10  # every listed image: written or rejected
    by_source = {r["key"].rsplit("-", 1)[0]: r["reason"] for r in rejects}
    assert by_source == {
        "cat_zero": "empty_image",
        "cat_truncated": "truncated_image",
        "cat_text": "not_an_image",
        "dog_huge": "too_many_pixels",
    }
    assert all(r["stage"] == "ingest" and r["detail"] for r in rejects)
    samples = [s for u in urls for s in shards.read_shard_samples(u)[0]]
    assert len(samples) == len(index) == 6
    labels = {s.meta["source"]: s.meta["label"] for s in samples}
    assert labels["cat/ok.jpg"] == "cat" and labels["dog/ünïcødé.png"] == "dog"
    formats = {s.meta["source"]: s.ext for s in samples}
    assert formats["dog/old.bmp"] == "png"  # re-encoded: shards carry jpg/png/webp only
    sixteen = next(s for s in samples if s.meta["source"] == "dog/16bit.png")
    assert np.asarray(sixteen.image.convert("L")).mean() < 200  # not white


def test_same_input_gives_byte_identical_shards(bad_folder, tmp_path):
    a = ingest_folder(str(bad_folder), str(tmp_path / "a"), "d", "web", 3)
    b = ingest_folder(str(bad_folder), str(tmp_path / "b"), "d", "web", 3)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b, strict=True):
        assert storage.read_bytes(x) == storage.read_bytes(y)


def test_keys_are_stable_unique_and_safe():
    k = ingest.make_key("2026-11-25", "cat/a photo.v2.jpg")
    assert k == ingest.make_key("2026-11-25", "cat/a photo.v2.jpg")
    assert k != ingest.make_key("2026-11-26", "cat/a photo.v2.jpg")
    assert k != ingest.make_key("2026-11-25", "cat/a_photo.v2.jpg")
    assert k.startswith("cat_a_photo_v2-")
    assert all(c.isalnum() or c in "_-" for c in k)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_with_captions_boxes_and_bad_rows(tmp_path, fmt):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg())
    (tmp_path / "img" / "b.png").write_bytes(png())
    (tmp_path / "img" / "c.jpg").write_bytes(jpeg())
    rows = [
        {
            "image": "img/a.jpg",
            "caption": "a #cat on a mat",
            "label": "cat",
            "boxes": json.dumps([{"bbox": [1, 2, 5, 6], "label": "cat"}]),
            "hashtags": json.dumps(["cat", "mat"]),
        },
        {"image": "img/b.png", "caption": None, "label": None, "boxes": None, "hashtags": None},
        {
            "image": "img/missing.jpg",
            "caption": None,
            "label": None,
            "boxes": None,
            "hashtags": None,
        },
        {"image": "img/b.png", "caption": "again", "label": None, "boxes": None, "hashtags": None},
        {
            "image": "img/c.jpg",
            "caption": None,
            "label": None,
            "boxes": json.dumps([{"bbox": [5, 5, 1, 1], "label": "cat"}]),
            "hashtags": None,
        },
    ]
    table = pa.Table.from_pylist(rows)
    manifest = tmp_path / f"manifest.{fmt}"
    if fmt == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, manifest)
    elif fmt == "jsonl":
        manifest.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        pq.write_table(table, manifest)
    root = str(tmp_path / "root")
    urls = ingest_folder(str(manifest), root, "m", "man", 10)
    (url,) = urls
    samples, _ = shards.read_shard_samples(url)
    # c.jpg's only box is inverted: the box is dropped (a reject row), the image kept.
    assert [s.meta["source"] for s in samples] == ["img/a.jpg", "img/b.png", "img/c.jpg"]
    a = samples[0].meta
    assert a["caption"] == "a #cat on a mat" and a["label"] == "cat"
    assert a["boxes"] == [{"bbox": [1.0, 2.0, 5.0, 6.0], "label": "cat"}]
    assert a["hashtags"] == ["cat", "mat"] and samples[2].meta["boxes"] == []
    rejects = tables.read_parquet(storage.list_committed(f"{root}/rejects", recursive=True)[0])
    assert rejects.column("reason").to_pylist() == [
        "missing_file", "duplicate_key", "box_negative_size"
    ]  # fmt: skip


def test_manifest_without_image_column_is_a_clear_error(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.jpg,cat\n")
    with pytest.raises(ValueError, match="no 'image' column"):
        ingest.build_plan(str(tmp_path / "m.csv"), "p", 10)


def test_reingesting_a_partition_with_another_config_is_refused(bad_folder, tmp_path):
    root = str(tmp_path / "root")
    ingest_folder(str(bad_folder), root, "d", "web", 4)
    with pytest.raises(ValueError, match="another config"):
        ingest_folder(str(bad_folder), root, "d", "web", 5)


def test_rerun_skips_committed_shards(bad_folder, tmp_path):
    root = str(tmp_path / "root")
    urls = ingest_folder(str(bad_folder), root, "d", "web", 4)
    before = {u: storage.url_to_fs(u)[0].modified(u) for u in urls}
    from cvpipe.data.config import IngestConfig

    cfg = IngestConfig(source=str(bad_folder), root=root, partition="d", name="web", shard_size=4)
    stats = ingest.ingest_partition(cfg)
    assert all(s.skipped for s in stats)
    assert ingest.summarize(stats)["samples"] == 10
    assert {u: storage.url_to_fs(u)[0].modified(u) for u in urls} == before


def test_digit_manifests_ingest_from_a_relative_root(digits_dir, tmp_path, monkeypatch):
    from cvpipe.data import datasets

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").symlink_to(digits_dir)
    n = datasets.class_manifest("rel/labeled", "89", "out/manifests/d89.csv")
    assert n > 0
    urls = ingest_folder("out/manifests/d89.csv", "out/data", "d89", "d", 100)
    samples = [s for u in urls for s in shards.read_shard_samples(u)[0]]
    assert len(samples) == n and {s.meta["label"] for s in samples} == {"8", "9"}
