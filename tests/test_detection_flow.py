"""The detection teacher-student flow end to end on tiny canvases, under Prefect's test
harness: every stage runs, the study table, PNG and per-seed artifacts are written, and
a rerun reads everything back."""

from __future__ import annotations

import pytest
from conftest import ingest_folder

from cvpipe.core import storage, tables
from cvpipe.data import canvases
from cvpipe.experiments.config import DetectionStudyConfig

DETECTOR = {
    "classes": [str(i) for i in range(10)],
    "epochs": 1,
    "batch_size": 8,
    "min_size": 96,
    "max_size": 97,
    "flip": False,
    "anchor_sizes": [16, 32, 48],
    "box_head_dim": 64,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 32,
    "box_score_thresh": 0.0,
    "cpu_threads": 1,
}


@pytest.mark.slow
def test_detection_flow_end_to_end(tmp_path, prefect_harness):
    from flows.detection import detection_flow

    root = str(tmp_path)
    canvases.export_canvases(root, {"labeled": 16, "unlabeled": 8, "test": 8}, size=96,
                             objects=(1, 2), digit_px=(28, 44))  # fmt: skip
    for split in ("labeled", "unlabeled", "test"):
        ingest_folder(canvases.manifest_path(root, split), root, split, "canvases", 8)
    config = DetectionStudyConfig(
        root=storage.join(root, "study"),
        labeled=storage.join(root, "shards", "labeled"),
        unlabeled=storage.join(root, "shards", "unlabeled"),
        test=storage.join(root, "shards", "test"),
        seeds=[0],
        detector=DETECTOR,
        threshold=0.0,
    )
    result = detection_flow(config)
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["supervised", "student_pretrained", "student_finetuned"]
    assert all(r["labeled"] == 16 for r in rows) and rows[0]["pseudo_images"] == 8
    table = tables.read_parquet(result["parquet"])
    assert table.schema.equals(tables.DETECT_STUDY) and table.num_rows == 3
    assert "beats the supervised detector on" in result["markdown"]
    assert storage.read_bytes(result["png"]).startswith(b"\x89PNG")
    seed = tmp_path / "study" / "seed-0"
    assert (seed / "teacher" / "eval" / "test_boxes.png").exists()
    assert (seed / "teacher" / "eval" / "test_per_class.parquet").exists()
    assert len(list(seed.glob("boxed-*/shards/unlabeled/canvases-000000.tar"))) == 1

    again = detection_flow(config)  # everything committed: read back, same table
    assert [(r["method"], r["map_50"]) for r in again["rows"]] == [
        (r["method"], r["map_50"]) for r in rows
    ]
