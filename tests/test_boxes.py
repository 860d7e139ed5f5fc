"""Box validation (cvpipe/data/boxes.py) and the COCO reader (cvpipe/data/coco.py)."""

from __future__ import annotations

import json
import math

import pytest

from cvpipe.data import boxes, coco


def test_good_boxes_are_kept_in_canonical_form():
    checked = boxes.validate_boxes(
        [{"bbox": [1, 2, 30, 40], "label": "cat"}, {"bbox": [0, 0, 64, 48], "label": 7}],
        width=64,
        height=48,
    )
    assert checked.dropped == []
    assert checked.boxes == [
        {"bbox": [1.0, 2.0, 30.0, 40.0], "label": "cat"},
        {"bbox": [0.0, 0.0, 64.0, 48.0], "label": "7"},  # edges of the image are inside
    ]


@pytest.mark.parametrize(
    ("box", "reason"),
    [
        ({"bbox": [10, 10, 5, 20], "label": "a"}, boxes.NEGATIVE_SIZE),
        ({"bbox": [10, 10, 10, 20], "label": "a"}, boxes.NEGATIVE_SIZE),  # zero width
        ({"bbox": [10, 30, 20, 20], "label": "a"}, boxes.NEGATIVE_SIZE),
        ({"bbox": [-1, 0, 5, 5], "label": "a"}, boxes.OUTSIDE_IMAGE),
        ({"bbox": [0, 0, 65, 5], "label": "a"}, boxes.OUTSIDE_IMAGE),
        ({"bbox": [0, 0, 5, 49], "label": "a"}, boxes.OUTSIDE_IMAGE),
        ({"bbox": [math.nan, 0, 5, 5], "label": "a"}, boxes.NOT_FINITE),
        ({"bbox": [0, 0, math.inf, 5], "label": "a"}, boxes.NOT_FINITE),
        ({"bbox": [0, 0, 5, 5], "label": "zebra"}, boxes.UNKNOWN_LABEL),
        ({"bbox": [0, 0, 5, 5]}, boxes.UNKNOWN_LABEL),
        ({"bbox": [0, 0, 5, 5], "label": ""}, boxes.UNKNOWN_LABEL),
        ({"bbox": [0, 0, 5, 5], "label": ["a"]}, boxes.UNKNOWN_LABEL),
        ({"bbox": [0, 0, 5], "label": "a"}, boxes.MALFORMED),
        ({"bbox": [0, 0, "5", 5], "label": "a"}, boxes.MALFORMED),
        ({"bbox": [0, 0, True, 5], "label": "a"}, boxes.MALFORMED),
        ([0, 0, 5, 5], boxes.MALFORMED),
        ("box", boxes.MALFORMED),
    ],
)
def test_each_bad_box_is_dropped_with_its_reason_and_the_good_ones_stay(box, reason):
    good = {"bbox": [1, 1, 9, 9], "label": "a"}
    checked = boxes.validate_boxes([good, box, good], 64, 48, labels={"a", "b"})
    assert [b["bbox"] for b in checked.boxes] == [[1.0, 1.0, 9.0, 9.0]] * 2
    assert [(d.index, d.reason) for d in checked.dropped] == [(1, reason)]
    assert checked.dropped[0].detail  # a precise message for the reject row


def test_nan_from_json_text_is_caught():
    # Python's json reads NaN and Infinity; the box must still be dropped.
    parsed = json.loads(
        '[{"bbox": [NaN, 0, 4, 4], "label": "a"}, {"bbox": [0, 0, 4, 4], "label": "a"}]'
    )
    checked = boxes.validate_boxes(parsed, 8, 8)
    assert [d.reason for d in checked.dropped] == [boxes.NOT_FINITE]
    assert len(checked.boxes) == 1


def test_without_image_size_or_label_set_only_shape_is_checked():
    checked = boxes.validate_boxes([{"bbox": [0, 0, 5000, 5000], "label": "anything"}])
    assert len(checked.boxes) == 1 and checked.dropped == []
    assert boxes.validate_boxes(None).boxes == []
    bad = boxes.validate_boxes({"bbox": [0, 0, 1, 1]})
    assert [d.reason for d in bad.dropped] == [boxes.MALFORMED]


def test_to_arrays_keeps_labels_of_the_class_set():
    coords, classes = boxes.to_arrays(
        [{"bbox": [0, 0, 1, 1], "label": "a"}, {"bbox": [1, 1, 2, 2], "label": "z"}], {"a": 1}
    )
    assert coords == [[0.0, 0.0, 1.0, 1.0]] and classes == [1]


# ----------------------------------------------------------------------------- COCO


def _coco(tmp_path, data) -> str:
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_coco_rows_convert_xywh_and_name_categories(tmp_path):
    ann = _coco(
        tmp_path,
        {
            "images": [
                {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
                {"id": 2, "file_name": "sub/b.jpg"},
                {"id": 3, "file_name": "empty.jpg"},
            ],
            "annotations": [
                {"id": 10, "image_id": 1, "category_id": 5, "bbox": [2, 3, 10, 20]},
                {"id": 11, "image_id": 1, "category_id": 6, "bbox": [0, 0, 4, 4]},
                {"id": 12, "image_id": 2, "category_id": 5, "bbox": [1, 1, 1, 1]},
                {"id": 13, "image_id": 2, "category_id": 99, "bbox": [1, 1, 2, 2]},
                {"id": 14, "image_id": 2, "category_id": 5, "bbox": [0, 0, 9, 9], "iscrowd": 1},
                {"id": 15, "image_id": 42, "category_id": 5, "bbox": [0, 0, 9, 9]},
                {"id": 16, "image_id": 1, "category_id": 5, "bbox": [0, 0, 9]},
            ],
            "categories": [{"id": 5, "name": "cat"}, {"id": 6, "name": "dog"}],
        },
    )
    rows, summary = coco.manifest_rows(ann, str(tmp_path / "imgs"))
    assert [r["source"] for r in rows] == ["a.jpg", "sub/b.jpg", "empty.jpg"]
    assert rows[1]["image"] == str(tmp_path / "imgs" / "sub" / "b.jpg")
    a = json.loads(rows[0]["boxes"])
    assert a[0] == {"bbox": [2, 3, 12, 23], "label": "cat"}
    assert a[1] == {"bbox": [0, 0, 4, 4], "label": "dog"}
    assert a[2] == {"bbox": [0, 0, 9], "label": "cat"}  # left for validation to reject
    b = json.loads(rows[1]["boxes"])
    assert b == [
        {"bbox": [1, 1, 2, 2], "label": "cat"},
        {"bbox": [1, 1, 3, 3], "label": None, "category_id": 99},
    ]
    assert json.loads(rows[2]["boxes"]) == []
    assert (summary.images, summary.annotations, summary.crowd, summary.orphans) == (3, 5, 1, 1)
    assert summary.categories == ["cat", "dog"]

    # What ingest then does with them: the unknown category and the malformed box drop.
    checked = boxes.validate_boxes(a + b, 64, 48, labels=summary.categories)
    assert sorted(d.reason for d in checked.dropped) == [boxes.MALFORMED, boxes.UNKNOWN_LABEL]
    assert len(checked.boxes) == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        (json.dumps({"annotations": []}), "no 'images' list"),
        (json.dumps({"images": [], "categories": [{"id": 1}]}), "bad category"),
        (
            json.dumps(
                {"images": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "a"}]}
            ),
            "not unique",
        ),
        (json.dumps({"images": [{"id": 1}]}), "bad image entry"),
    ],
)
def test_coco_file_problems_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(coco.CocoError, match=message):
        coco.manifest_rows(str(path), str(tmp_path))


def test_missing_coco_file(tmp_path):
    with pytest.raises(coco.CocoError, match="does not exist"):
        coco.manifest_rows(str(tmp_path / "nope.json"), str(tmp_path))


# ----------------------------------------------------------------------------- ingest


def test_ingest_from_coco_keeps_good_boxes_and_counts_dropped_ones(tmp_path):
    from PIL import Image

    from cvpipe.core import storage, tables
    from cvpipe.data import ingest
    from cvpipe.data.config import IngestConfig
    from cvpipe.data.shards import read_shard_samples

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30), (90, 120, 150)).save(images / name)
    ann = _coco(
        tmp_path,
        {
            "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
            "annotations": [
                {"image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 10]},  # good
                {"image_id": 1, "category_id": 1, "bbox": [35, 5, 10, 10]},  # leaves the image
                {"image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5]},  # unknown category
                {"image_id": 2, "category_id": 2, "bbox": [0, 0, 0, 8]},  # zero width
                {"image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 20]},  # good
            ],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        },
    )
    root = str(tmp_path / "root")
    cfg = IngestConfig(source=str(images), coco=ann, root=root, partition="p", name="c")
    stats = ingest.ingest_partition(cfg)
    (url,) = storage.list_committed(storage.join(root, "shards", "p"), ".tar")
    samples, _ = read_shard_samples(url)
    assert [s.meta["boxes"] for s in samples] == [
        [{"bbox": [2.0, 3.0, 12.0, 13.0], "label": "cat"}],
        [{"bbox": [5.0, 5.0, 25.0, 25.0], "label": "dog"}],
    ]
    summary = ingest.summarize(stats)
    assert (summary["samples"], summary["written"], summary["rejected"]) == (2, 2, 0)
    assert summary["dropped_boxes_by_reason"] == {
        boxes.NEGATIVE_SIZE: 1, boxes.OUTSIDE_IMAGE: 1, boxes.UNKNOWN_LABEL: 1
    }  # fmt: skip
    rejects = tables.read_parquet(storage.list_committed(f"{root}/rejects", recursive=True)[0])
    assert sorted(rejects.column("detail").to_pylist())[0].startswith("box ")
    # Read back from the committed tables: the same accounting.
    again = ingest.summarize(ingest.ingest_partition(cfg))
    assert again["shards_skipped"] == 1
    assert {k: again[k] for k in ("samples", "written", "rejected", "dropped_boxes")} == {
        k: summary[k] for k in ("samples", "written", "rejected", "dropped_boxes")
    }
