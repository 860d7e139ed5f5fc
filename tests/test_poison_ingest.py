"""Hostile sources, built by the tests: every bad file, folder, manifest row or URL is
one reject row with a precise reason, the rest of its unit is written, nothing hangs,
every written sample is readable, and for every shard samples in = written + rejected."""

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from badinputs import (
    encode,
    float_tiff,
    jpeg,
    jpeg_with_sof,
    jpeg_with_trailer,
    mpo,
    noise,
    png,
)
from netfaults import http_files, silent_server

from cvpipe.core import storage, tables
from cvpipe.data import images, ingest, shards
from cvpipe.data.boxes import REASONS as BOX_REASONS
from cvpipe.data.config import IngestConfig
from cvpipe.data.plan import skipped_url


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class Result:
    """An ingest's outcome by source: samples read back with the reader, reject
    reasons, and the accounting of every shard."""

    def __init__(self, root: str, partition: str, name: str, stats):
        plan = tables.read_parquet(ingest.plan_url(root, partition, name))
        keys, sources = plan.column("key").to_pylist(), plan.column("source").to_pylist()
        source_of = dict(zip(keys, sources, strict=True))
        self.plan_rows = plan.num_rows
        self.stats = stats
        self.samples, self.rejects, self.details = {}, {}, {}
        self.dropped_boxes: dict[str, str] = {}
        for url in storage.list_committed(storage.join(root, "shards", partition), ".tar"):
            for item in shards.iter_shard(url):  # every written sample must be readable
                if isinstance(item, shards.Sample):
                    self.samples[item.meta["source"]] = item
                else:
                    self.rejects[f"READ {item.key}"] = item.reason
        for url in storage.list_committed(storage.join(root, "rejects", "ingest"), recursive=True):
            for r in tables.read_parquet(url).to_pylist():
                if r["reason"] in BOX_REASONS:  # a dropped box of a written image
                    self.dropped_boxes[source_of[r["key"]]] = r["reason"]
                    continue
                self.rejects[source_of[r["key"]]] = r["reason"]
                self.details[source_of[r["key"]]] = r["detail"]
        for s in stats:  # exact accounting, shard by shard
            assert s.samples == s.written + sum(s.rejects.values())
        assert len(self.samples) + len(self.rejects) == self.plan_rows
        self.skipped = {}
        url = skipped_url(root, partition, name)
        if storage.is_committed(url):
            self.skipped = {r["path"]: r["reason"] for r in tables.read_parquet(url).to_pylist()}


def run_ingest(source, tmp_path, shard_size=4, **fields) -> Result:
    root = str(tmp_path / "root")
    cfg = IngestConfig(
        source=str(source), root=root, partition="p", name="s", shard_size=shard_size, **fields
    )
    stats = ingest.ingest_partition(cfg)
    return Result(root, "p", "s", stats)


# ------------------------------------------------------------------------- folders


def test_hostile_folder_tree(tmp_path):
    src = tmp_path / "src"
    write(src / "ok" / "a.jpg", jpeg())
    # names that are not UTF-8: a file, and a class folder (the label)
    write(src / "ok" / os.fsdecode(b"caf\xe9.png"), png())
    write(src / os.fsdecode(b"\xff\xfeclass") / "b.png", png())
    # a FIFO and a broken link with image names
    os.mkfifo(src / "ok" / "pipe.jpg")
    os.symlink(src / "nowhere.jpg", src / "ok" / "dangling.jpg")
    # a symlinked class folder is followed; a link to an ancestor is a loop, not a hang
    write(tmp_path / "elsewhere" / "c.png", png())
    os.symlink(tmp_path / "elsewhere", src / "linked")
    os.symlink(src, src / "ok" / "loop")
    # formats Pillow reads but shards do not carry
    write(src / "fmt" / "photo.avif", encode(noise(), "AVIF"))
    write(src / "fmt" / "scan.tif", float_tiff(np.linspace(-3.0, 900.0, 600).reshape(20, 30)))
    write(src / "fmt" / "nan.tif", float_tiff(np.full((4, 4), np.nan)))
    # camera and phone JPEGs decoders read; coding processes they cannot
    write(src / "cam" / "multi.jpg", mpo())
    write(src / "cam" / "phone.jpg", jpeg_with_trailer())
    write(src / "cam" / "lossless.jpg", jpeg_with_sof(0xC3))
    write(src / "cam" / "hierarchical.jpg", jpeg_with_sof(0xC5))
    # skipped with a reason
    write(src / "ok" / "notes.txt", b"text")
    write(src / ".hidden" / "d.png", png())
    write(src / "ok" / ".e.png", png())

    r = run_ingest(src, tmp_path)
    assert r.rejects == {
        "ok/pipe.jpg": "not_a_regular_file",
        "ok/dangling.jpg": "missing_file",
        "ok/loop": "symlink_loop",
        "fmt/nan.tif": "corrupt_image",
        "cam/lossless.jpg": "unsupported_format",
        "cam/hierarchical.jpg": "unsupported_format",
    }
    assert set(r.samples) == {
        "ok/a.jpg",
        "ok/caf\\xe9.png",
        "\\xff\\xfeclass/b.png",
        "linked/c.png",
        "fmt/photo.avif",
        "fmt/scan.tif",
        "cam/multi.jpg",
        "cam/phone.jpg",
    }
    raw = r.samples["ok/caf\\xe9.png"].meta
    assert bytes.fromhex(raw["source_hex"]) == b"ok/caf\xe9.png" and raw["label"] == "ok"
    assert r.samples["\\xff\\xfeclass/b.png"].meta["label"] == "\\xff\\xfeclass"
    assert r.samples["fmt/photo.avif"].ext == "png"
    scan = r.samples["fmt/scan.tif"]
    assert "rescaled" in scan.meta["note"] and "-3" in scan.meta["note"]
    a = np.asarray(scan.image.convert("L"))
    assert a.min() == 0 and a.max() == 255  # the range kept, not clipped at 0 and 255
    assert r.samples["cam/phone.jpg"].ext == "jpg"
    assert r.skipped == {"ok/notes.txt": "not_an_image_suffix", ".hidden": "hidden",
                         "ok/.e.png": "hidden"}  # fmt: skip


def test_unreadable_subfolder_is_a_reject_row_not_a_silent_gap(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write(src / "a" / "1.png", png())
    write(src / "locked" / "2.png", png())
    locked = str(src / "locked")
    if os.geteuid() != 0:
        os.chmod(locked, 0)
    else:  # root reads any folder: inject the failure where the walk lists it
        real = os.scandir

        def scandir(path="."):
            if isinstance(path, str) and path == locked:
                raise PermissionError(13, "Permission denied", locked)
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        r = run_ingest(src, tmp_path)
    finally:
        os.chmod(locked, 0o755)
    assert set(r.samples) == {"a/1.png"}
    assert r.rejects == {"locked": "unreadable_dir"} and "Permission" in r.details["locked"]


def test_ingest_and_reader_agree_on_every_kind(tmp_path):
    """What ingest writes the reader accepts: the same verdicts from one set of rules."""
    kinds = {
        "mpo": mpo(),
        "trailer": jpeg_with_trailer(),
        "progressive": encode(noise(), "JPEG", progressive=True),
        "cmyk": jpeg("CMYK"),
        "trailer_png": png() + b"appended",
        "lossless": jpeg_with_sof(0xC3),
        "arith_progressive": jpeg_with_sof(0xCA),
        "cut": jpeg()[:-20],
    }
    for name, data in kinds.items():
        try:
            images.inspect(data)
            ingest_ok = True
        except images.RejectedImage:
            ingest_ok = False
        try:
            images.decode(data)
            read_ok = True
        except images.RejectedImage:
            read_ok = False
        assert ingest_ok == read_ok, name


def test_file_over_the_member_cap_is_rejected_at_ingest_not_written(tmp_path):
    src = tmp_path / "src"
    big = png(size=(200, 200))
    write(src / "big.png", big)
    write(src / "small.png", png())
    r = run_ingest(src, tmp_path, max_member_bytes=len(big) - 1)
    assert r.rejects == {"big.png": "file_too_large"} and set(r.samples) == {"small.png"}


def test_decode_verification_catches_what_headers_cannot(tmp_path):
    data = bytearray(png(size=(64, 64)))
    idat = data.index(b"IDAT")
    data[idat + 20 : idat + 60] = bytes(40)  # compressed pixels zeroed; the chunks look fine
    src = tmp_path / "src"
    write(src / "broken.png", bytes(data))
    write(src / "ok.jpg", jpeg())
    header_only = run_ingest(src, tmp_path / "header")
    # Header checks alone write it, and the reader then refuses it:
    assert set(header_only.samples) == {"ok.jpg"}
    assert [(k.split()[0], v) for k, v in header_only.rejects.items()] == [
        ("READ", "truncated_image")
    ]
    r = run_ingest(src, tmp_path / "decode", verify="decode")
    assert set(r.samples) == {"ok.jpg"} and r.rejects == {"broken.png": "truncated_image"}


# ------------------------------------------------------------------------- manifests


def test_hostile_jsonl_manifest_rows(tmp_path):
    write(tmp_path / "img" / "a.jpg", jpeg())
    for i in range(4):
        write(tmp_path / "img" / f"b{i}.png", png())
    lines = [
        json.dumps({"image": "img/a.jpg", "label": "cat", "hashtags": ["x", "y"]}),
        '{"image": "img/b0.png", "label": ',  # a broken line
        json.dumps({"image": "img/b1.png", "caption": "x" * (1 << 20)}),  # a row over 1 MB
        json.dumps({"image": "img/b2.png", "label": ["cat", "dog"]}),  # list-valued label
        json.dumps({"image": 12}),  # mixed types: a number where a path was
        json.dumps({"caption": "no image"}),
        json.dumps(["img/b3.png"]),  # not an object
        '{"image": "img/b3.png", "boxes": [[1, 2, NaN, 4]]}',  # non-standard JSON
        '{"image": "img/b3.png", "hashtags": ' + "[" * 100_000 + "]" * 100_000 + "}",
        json.dumps({"image": "/dev/zero"}),  # a device: once read until memory ran out
        json.dumps({"image": str(tmp_path / "img")}),  # a folder
        json.dumps({"image": "img/b3.png", "label": 3}),  # an integer label is fine
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes("\n".join(lines).encode() + b"\n" + b'{"image": "caf\xe9.jpg"}\n')
    r = run_ingest(manifest, tmp_path)
    assert r.rejects == {
        "m.jsonl:2": "bad_manifest_row",
        "m.jsonl:3": "row_too_large",
        "img/b2.png": "bad_metadata",
        "m.jsonl:5": "bad_manifest_row",
        "m.jsonl:6": "bad_manifest_row",
        "m.jsonl:7": "bad_manifest_row",
        "m.jsonl:8": "bad_manifest_row",
        "m.jsonl:9": "bad_manifest_row",
        "/dev/zero": "not_a_regular_file",
        str(tmp_path / "img"): "not_a_regular_file",
        "m.jsonl:13": "bad_encoding",
    }
    assert set(r.samples) == {"img/a.jpg", "img/b3.png"}
    assert r.samples["img/a.jpg"].meta["hashtags"] == ["x", "y"]
    assert r.samples["img/b3.png"].meta["label"] == "3"
    assert "deeper" in r.details["m.jsonl:9"] and "NaN" in r.details["m.jsonl:8"]


def test_each_bad_value_is_its_own_reject_with_a_precise_reason(tmp_path):
    write(tmp_path / "img" / "a.jpg", jpeg())
    cases = {
        "list label": {"label": ["cat", "dog"]},
        "map label": {"label": {"n": 1}},
        "fractional label": {"label": 7.5},
        "bool label": {"label": True},
        "list caption": {"caption": ["a"]},
        "non-string hashtag": {"hashtags": ["ok", 3]},
        "hashtags not a list": {"hashtags": "cat"},
        "boxes not a list": {"boxes": {"bbox": [1, 2, 3, 4]}},
    }
    for i, (what, fields) in enumerate(cases.items()):
        m = tmp_path / f"m{i}.jsonl"
        m.write_text(json.dumps({"image": "img/a.jpg", **fields}) + "\n")
        r = run_ingest(m, tmp_path / f"run{i}")
        assert r.rejects == {"img/a.jpg": "bad_metadata"}, what
    # A bad box costs the box, not the image: written without it, the reason recorded.
    boxes = {
        "inverted box": ([5, 5, 1, 1], "box_negative_size"),
        "short box": ([1, 2, 3], "box_malformed"),
        "string box": (["1", 2, 3, 4], "box_malformed"),
    }
    for i, (what, (bbox, reason)) in enumerate(boxes.items()):
        m = tmp_path / f"b{i}.jsonl"
        m.write_text(json.dumps({"image": "img/a.jpg", "boxes": [{"bbox": bbox, "label": "x"}]}))
        r = run_ingest(m, tmp_path / f"box{i}")
        assert r.rejects == {} and r.samples["img/a.jpg"].meta["boxes"] == [], what
        assert r.dropped_boxes == {"img/a.jpg": reason}, what
    m = tmp_path / "inf.jsonl"
    m.write_text('{"image": "img/a.jpg", "boxes": [[0, 0, Infinity, 4]]}\n')
    assert run_ingest(m, tmp_path / "inf").rejects == {"inf.jsonl:1": "bad_manifest_row"}


def test_hostile_csv_manifest_rows(tmp_path):
    write(tmp_path / "img" / "a.jpg", jpeg())
    write(tmp_path / "img" / "b.png", png())
    rows = [
        b"image,label,caption",
        b"img/a.jpg,cat,fine",
        b"img/b.png,dog",  # ragged: too few fields
        b"img/b.png,dog,x,extra",  # ragged: too many
        b"img/b.png,dog,caf\xe9",  # Latin-1 in a UTF-8 manifest
        b'img/b.png,dog,"' + b"y" * (1 << 20) + b'"',  # a row over 1 MB
        b'img/b.png,dog,"multi\nline ""quoted"" caption"',  # fine: quotes balance
        b'img/b.png,dog,"unclosed',  # an unbalanced quote runs to the end
    ]
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"\n".join(rows) + b"\n")
    r = run_ingest(manifest, tmp_path)
    assert r.rejects == {
        "m.csv:3": "bad_manifest_row",
        "m.csv:4": "bad_manifest_row",
        "m.csv:5": "bad_encoding",
        "m.csv:6": "row_too_large",
        "m.csv:9": "bad_manifest_row",
    }
    assert set(r.samples) == {"img/a.jpg", "img/b.png"}
    assert r.samples["img/b.png"].meta["caption"] == 'multi\nline "quoted" caption'


def test_a_latin1_manifest_declared_as_such_gives_correct_text(tmp_path):
    write(tmp_path / "img" / "a.jpg", jpeg())
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"image,caption\nimg/a.jpg,caf\xe9 cr\xe8me\n")
    r = run_ingest(manifest, tmp_path, manifest_encoding="latin-1")
    assert r.samples["img/a.jpg"].meta["caption"] == "café crème"  # not "b'caf\\xe9'"


def test_hostile_parquet_manifest_values(tmp_path):
    write(tmp_path / "img" / "a.jpg", jpeg())
    write(tmp_path / "img" / "b.png", png())
    table = pa.table(
        {
            "image": ["img/a.jpg", "img/b.png", None],
            "label": [["cat"], ["dog", "x"], None],  # list-valued labels
            "boxes": [[[1.0, 2.0, 3.0, 4.0]], [[0.0, 0.0, float("nan"), 1.0]], None],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    r = run_ingest(tmp_path / "m.parquet", tmp_path)
    assert r.rejects == {
        "img/a.jpg": "bad_metadata",
        "img/b.png": "bad_metadata",
        "m.parquet:row 3": "bad_manifest_row",
    }
    assert "list" in r.details["img/a.jpg"]
    # No shard JSON holds a non-standard token: NaN boxes never reach a shard.
    for url in storage.list_committed(str(tmp_path / "root" / "shards"), ".tar", recursive=True):
        assert b"NaN" not in storage.read_bytes(url)


def test_one_bad_row_costs_one_row_not_the_manifest(tmp_path):
    write(tmp_path / "img" / "a.jpg", jpeg())
    lines = [json.dumps({"image": "img/a.jpg", "label": str(i)}) for i in range(1)]
    lines += ["{broken"] + [json.dumps({"image": f"img/a.jpg?{i}"}) for i in range(3)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines))
    r = run_ingest(manifest, tmp_path)
    assert r.plan_rows == 5 and len(r.samples) == 1
    assert r.rejects["m.jsonl:2"] == "bad_manifest_row"


# ------------------------------------------------------------------------- network


def test_network_reads_are_bounded_and_say_why_they_failed(tmp_path):
    files = {"/a.jpg": jpeg(), "/b.png": png()}
    with http_files(files) as url, silent_server() as silent:
        lines = [
            {"image": f"{url}/a.jpg"},
            {"image": f"{url}/b.png"},
            {"image": f"{silent}/never.jpg"},  # once ~5 minutes, then "missing_file"
            {"image": f"{url}/status/500"},
            {"image": f"{url}/status/503"},
            {"image": f"{url}/status/404"},
            {"image": f"{url}/drop"},
            {"image": f"{url}/drip"},  # a byte every 0.3 s: the deadline is for the whole read
            {"image": "http://127.0.0.1:9/refused.jpg"},  # nothing listens on port 9
        ]
        manifest = tmp_path / "m.jsonl"
        manifest.write_text("\n".join(json.dumps(line) for line in lines))
        t0 = time.monotonic()
        r = run_ingest(manifest, tmp_path, shard_size=10, fetch_timeout_s=1.0)
        elapsed = time.monotonic() - t0
    assert set(r.samples) == {f"{url}/a.jpg", f"{url}/b.png"}
    assert r.rejects == {
        f"{silent}/never.jpg": "fetch_timeout",
        f"{url}/status/500": "fetch_failed",
        f"{url}/status/503": "fetch_failed",
        f"{url}/status/404": "missing_file",
        f"{url}/drop": "fetch_failed",
        f"{url}/drip": "fetch_timeout",
        "http://127.0.0.1:9/refused.jpg": "fetch_failed",
    }
    assert elapsed < 30  # two 1 s timeouts, not minutes


def test_http_over_the_cap_stops_reading_at_the_cap(tmp_path):
    big = png(size=(300, 300))
    with http_files({"/big.png": big}) as url:
        with pytest.raises(storage.FileTooLarge):
            storage.read_bytes(f"{url}/big.png", max_bytes=1000)
        assert storage.read_bytes(f"{url}/big.png", max_bytes=len(big)) == big


def test_device_and_fifo_reads_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(storage.NotRegularFile):
        storage.read_bytes(str(tmp_path / "fifo"))  # opening a FIFO once blocked forever
    with pytest.raises(storage.NotRegularFile):
        storage.read_bytes("/dev/zero", max_bytes=10)
    with pytest.raises(storage.FileTooLarge):
        storage.read_bytes(__file__, max_bytes=10)


def test_an_object_store_folder_is_walked_like_a_local_one(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    base = "/cvpipe-test-walk"
    for path, data in {
        "src/cat/a.jpg": jpeg(),
        "src/cat/b.avif": encode(noise(), "AVIF"),
        "src/cat/notes.txt": b"text",
        "src/.hidden/c.png": png(),
        "src/dog/d.png": png(),
    }.items():
        fs.pipe(f"{base}/{path}", data)
    try:
        r = run_ingest(f"memory://{base}/src", tmp_path)
        local_src = tmp_path / "local"
        for path in ("cat/a.jpg", "cat/b.avif", "cat/notes.txt", ".hidden/c.png", "dog/d.png"):
            write(local_src / path, fs.cat(f"{base}/src/{path}"))
        local = run_ingest(local_src, tmp_path / "l")
    finally:
        fs.rm(base, recursive=True)
    assert set(r.samples) == set(local.samples) == {"cat/a.jpg", "cat/b.avif", "dog/d.png"}
    assert r.skipped == local.skipped == {"cat/notes.txt": "not_an_image_suffix",
                                          ".hidden": "hidden"}  # fmt: skip
    assert [s.key for s in r.samples.values()] == [s.key for s in local.samples.values()]
