"""The canvases generator (cvpipe/data/canvases.py): seeded, exact boxes, held-out test
digits, and ingest of its manifests with the boxes in each sample's json."""

from __future__ import annotations

import json
import os

import numpy as np
from conftest import ingest_folder
from PIL import Image

from cvpipe.data import canvases
from cvpipe.data.shards import read_shard_samples


def _rows(out, split):
    with open(canvases.manifest_path(str(out), split)) as f:
        return [json.loads(line) for line in f]


def test_canvases_are_seeded_and_boxes_hug_the_ink(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    counts = {"labeled": 6, "unlabeled": 3, "test": 4}
    assert canvases.export_canvases(str(a), counts, size=96, digit_px=(20, 36)) == counts
    canvases.export_canvases(str(b), counts, size=96, digit_px=(20, 36))
    for split in counts:
        assert _rows(a, split) == _rows(b, split)
    same = (a / "canvases/labeled/00003.jpg").read_bytes()
    assert same == (b / "canvases/labeled/00003.jpg").read_bytes()

    for row in _rows(a, "labeled") + _rows(a, "test"):
        assert 1 <= len(row["boxes"]) <= 4
        assert row.get("label") == (row["boxes"][0]["label"] if len(row["boxes"]) == 1 else None)
        for box in row["boxes"]:
            x1, y1, x2, y2 = box["bbox"]
            assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96
            assert box["label"] in [str(i) for i in range(10)]
    # The unlabeled manifest hides its boxes; the truth file keeps them.
    assert all("boxes" not in r for r in _rows(a, "unlabeled"))
    with open(a / "canvases" / "unlabeled_truth.jsonl") as f:
        assert len([json.loads(line) for line in f]) == 3


def test_a_digit_box_is_the_tight_box_of_its_ink():
    rng = np.random.default_rng(0)
    scan = np.zeros((8, 8))
    scan[2:6, 3:5] = 1.0  # a bar: ink in rows 2-5, columns 3-4
    flat = [np.full((64, 64, 3), 100, dtype=np.uint8)]
    image, boxes = canvases.render_canvas(
        rng, flat, scan[None], np.array([1]), size=64, objects=(1, 1), digit_px=(32, 32),
        max_overlap=0.0,
    )  # fmt: skip
    (box,) = boxes
    x1, y1, x2, y2 = map(int, box["bbox"])
    changed = np.abs(np.asarray(image, dtype=np.float32) - 100).max(axis=2) > 40
    ys, xs = np.nonzero(changed)
    # Strong ink lies inside the box and reaches (within a pixel) each of its edges.
    assert x1 <= xs.min() and xs.max() < x2 and y1 <= ys.min() and ys.max() < y2
    assert xs.min() - x1 <= 1 and x2 - 1 - xs.max() <= 1
    assert ys.min() - y1 <= 1 and y2 - 1 - ys.max() <= 1
    assert box["label"] == "1"


def test_canvases_ingest_with_their_boxes(tmp_path):
    canvases.export_canvases(str(tmp_path), {"labeled": 5, "test": 2}, size=64, digit_px=(16, 30))
    shards = ingest_folder(canvases.manifest_path(str(tmp_path), "labeled"), str(tmp_path),
                           "labeled", "canvases", 3)  # fmt: skip
    assert len(shards) == 2
    samples = [s for url in shards for s in read_shard_samples(url)[0]]
    by_source = {s.meta["source"]: s for s in samples}
    for row in _rows(tmp_path, "labeled"):
        meta = by_source[row["image"]].meta
        assert [b["bbox"] for b in meta["boxes"]] == [b["bbox"] for b in row["boxes"]]
        assert (meta["width"], meta["height"]) == (64, 64)
    img = Image.open(os.path.join(tmp_path, "canvases", "labeled", "00000.jpg"))
    assert img.size == (64, 64)
