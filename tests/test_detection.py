"""Detection: box-aware transforms, mAP of perfect predictions, backbone transfer from
a classifier checkpoint, pseudo-box threshold and NMS, and a short training run on
canvases (loss goes down; evaluation, pseudo-boxes and box materialize on its output)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ingest_folder

from cvpipe import models
from cvpipe.core import tables
from cvpipe.core.stage import PermanentError, run_stage
from cvpipe.data import canvases
from cvpipe.data.shards import read_shard_samples
from cvpipe.label.config import BoxMaterializeConfig, PseudoBoxConfig
from cvpipe.label.pseudo_boxes import (
    BoxMaterializeStage,
    PseudoBoxStage,
    filter_detections,
    thresholds_by_label,
)
from cvpipe.learn.detect_eval import MAPMeter, evaluate_detector, map_metric
from cvpipe.learn.tasks.base import TaskBatch
from cvpipe.learn.tasks.detection import detection_transform

DIGITS = [str(i) for i in range(10)]


# ----------------------------------------------------------------------- transforms


def _bright_box_image(box: list[int], w: int = 80, h: int = 60):
    from PIL import Image

    img = torch.zeros(h, w, 3, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = 255
    return Image.fromarray(img.numpy())


def _ink_box(image: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _target(box: list[int], w: int = 80, h: int = 60) -> dict:
    from torchvision import tv_tensors

    boxes = tv_tensors.BoundingBoxes(torch.tensor([box], dtype=torch.float32), format="XYXY",
                                     canvas_size=(h, w))  # fmt: skip
    return {"boxes": boxes, "labels": torch.tensor([3])}


@pytest.mark.parametrize("seed", range(4))
def test_flip_resize_and_crop_keep_boxes_on_the_object(seed):
    box = [10, 12, 34, 40]
    tf = detection_transform(train=True, min_size=120, max_size=400, flip=True, crop=True)
    torch.manual_seed(seed)
    image, target = tf(_bright_box_image(box), _target(box))
    assert image.dtype == torch.float32 and min(image.shape[1:]) == 120  # short side resized
    if len(target["boxes"]) == 0:  # the crop missed the object: the box was dropped too
        assert (image[0] > 0.5).sum() < 8
        return
    (got,) = target["boxes"].tolist()
    ink = _ink_box(image)
    # Antialiased resizing blurs edges by a pixel or two; the box follows the object.
    assert all(abs(a - b) <= 2.5 for a, b in zip(got, ink, strict=True)), (got, ink)
    assert target["labels"].tolist() == [3]


def test_flip_mirrors_the_box():
    box = [10, 12, 34, 40]
    flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        tf = detection_transform(train=True, min_size=60, max_size=200, flip=True)
        image, target = tf(_bright_box_image(box), _target(box))
        got = [round(v) for v in target["boxes"][0].tolist()]
        assert got == [round(v) for v in _ink_box(image)]
        flips.add(tuple(got))
    assert flips == {(10, 12, 34, 40), (80 - 34, 12, 80 - 10, 40)}  # both outcomes seen


# ----------------------------------------------------------------------- mAP


def test_map_of_perfect_predictions_is_one_and_of_wrong_ones_zero():
    targets = [
        {
            "boxes": torch.tensor([[10.0, 10, 50, 50], [60, 60, 90, 100]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.tensor([[5.0, 5, 25, 40]]), "labels": torch.tensor([3])},
    ]
    perfect = [{**t, "scores": torch.ones(len(t["labels"]))} for t in targets]
    meter = MAPMeter()
    meter.update(perfect, TaskBatch([None, None], targets, 2))
    assert meter.compute() == {"map": 1.0, "map_50": 1.0}

    shifted = [{**p, "boxes": p["boxes"] + 40} for p in perfect]  # no overlap at all
    m = map_metric()
    m.update(shifted, targets)
    assert float(m.compute()["map_50"]) == 0.0


# ----------------------------------------------------------------------- transfer


@pytest.mark.parametrize(
    ("classifier", "detector"),
    [("mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_fpn"),
     ("resnet50", "fasterrcnn_resnet50_fpn")],
)  # fmt: skip
def test_backbone_transfer_loads_the_students_weights(tmp_path, classifier, detector):
    torch.manual_seed(1)
    student = models.build(classifier, 10)
    url = str(tmp_path / "student.pt")
    models.save_checkpoint(student, models.ModelInfo(classifier, DIGITS, 32), url)
    state, info = models.load_state(url)

    torch.manual_seed(2)
    det = models.build_detector(detector, 10, 64, 96)
    before = {k: v.clone() for k, v in det.state_dict().items()}
    copied = models.transfer_backbone(det, state, info.arch)
    after = det.state_dict()
    assert copied and all(k.startswith("backbone.body.") for k in copied)
    body = [k for k in after if k.startswith("backbone.body.")]
    assert sorted(copied) == sorted(body)  # the whole body came from the student
    if classifier == "resnet50":
        pairs = [
            ("backbone.conv1.weight", "backbone.body.conv1.weight"),
            ("backbone.layer4.2.bn3.running_var", "backbone.body.layer4.2.bn3.running_var"),
        ]
    else:
        pairs = [
            ("backbone.features.0.0.weight", "backbone.body.0.0.weight"),
            ("backbone.features.16.1.running_mean", "backbone.body.16.1.running_mean"),
        ]
    for src, dst in pairs:
        assert torch.equal(after[dst], state[src])
        assert not torch.equal(before[dst], state[src]) or "running" in dst
    # Everything outside the backbone body keeps the detector's own weights.
    for k in after:
        if not k.startswith("backbone.body."):
            assert torch.equal(after[k], before[k]), k

    with pytest.raises(ValueError, match="takes the backbone of"):
        models.transfer_backbone(det, state, "resnet18")


# ----------------------------------------------------------------------- pseudo-boxes


def test_threshold_then_nms_keeps_the_best_box_per_object():
    boxes = torch.tensor(
        [
            [0.0, 0, 10, 10],  # object A, best
            [1.0, 1, 10, 10],  # object A again (IoU 0.81): suppressed
            [20.0, 20, 30, 30],  # object B, below the threshold
            [40.0, 40, 50, 50],  # object C, class 2
            [40.0, 40, 50, 51],  # object C as class 1 (class-wise NMS keeps it)
        ]
    )
    scores = torch.tensor([0.95, 0.9, 0.6, 0.8, 0.75])
    labels = torch.tensor([1, 1, 1, 2, 1])
    keep = filter_detections(boxes, scores, labels, 0.7, nms_iou=0.5)
    assert keep.tolist() == [0, 3, 4]
    agnostic = filter_detections(boxes, scores, labels, 0.7, nms_iou=0.5, class_agnostic=True)
    assert agnostic.tolist() == [0, 3]
    assert filter_detections(boxes, scores, labels, 0.99).tolist() == []
    # Per-class thresholds: class 2 needs 0.85 now, class 1 only 0.5.
    per_class = thresholds_by_label(["a", "b"], 0.5, {"b": 0.85})
    assert per_class.tolist() == [0.5, 0.5, 0.85]
    assert filter_detections(boxes, scores, labels, per_class).tolist() == [0, 4, 2]


# ----------------------------------------------------------------------- a short run

SMALL = {
    "min_size": 96,
    "max_size": 97,
    "anchor_sizes": [16, 32, 48],
    "box_head_dim": 64,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 32,
    "rpn_batch_size_per_image": 64,
    "box_score_thresh": 0.0,
}


@pytest.fixture(scope="module")
def canvas_shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("canvases"))
    canvases.export_canvases(root, {"labeled": 24, "unlabeled": 8, "test": 8}, size=96,
                             objects=(1, 2), digit_px=(28, 44))  # fmt: skip
    return root, {
        split: ingest_folder(canvases.manifest_path(root, split), root, split, "canvases", 12)
        for split in ("labeled", "unlabeled", "test")
    }


def test_short_training_run_loss_goes_down_then_eval_and_pseudo_boxes(tmp_path, canvas_shards):
    from cvpipe.learn import loop
    from cvpipe.learn.config import TrainConfig
    from cvpipe.learn.tasks import DetectionTask

    root, shards = canvas_shards
    task = DetectionTask(**SMALL)
    cfg = TrainConfig(
        arch="fasterrcnn_mobilenet_v3_large_fpn", epochs=4, batch_size=8, lr=0.02,
        weight_decay=1e-4, classes=DIGITS, shuffle_buffer=0, cpu_threads=1,
    )  # fmt: skip
    with models.cpu_threads(1):
        ckpt = loop.train(task, cfg, shards["labeled"], str(tmp_path / "run"),
                          val_urls=shards["test"])  # fmt: skip
    rows = tables.read_parquet(str(tmp_path / "run" / "metrics.parquet")).to_pylist()
    train = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(train) == 4 and train[-1] < train[0] * 0.8, train
    val = [r for r in rows if r["split"] == "val"]
    assert len(val) == 4 and all(0.0 <= r["map_50"] <= 1.0 for r in val)

    # The checkpoint rebuilds with the shape it was trained with.
    model, info = models.load_detector(ckpt)
    assert info.task == "detection" and info.classes == DIGITS
    assert model.roi_heads.box_head.fc7.out_features == 64
    assert model.rpn.anchor_generator.sizes[0] == (16, 32, 48)

    with models.cpu_threads(1):
        res = evaluate_detector(ckpt, shards["test"], str(tmp_path / "eval"), batch_size=4)
    assert res.images == 8 and res.boxes >= 8
    assert 0.0 <= res.map <= res.map_50 <= 1.0 or math.isnan(res.map)
    assert len(res.per_class) == 10 and sum(r["boxes"] for r in res.per_class) == res.boxes
    png = (tmp_path / "eval" / "test_boxes.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    again = evaluate_detector(ckpt, shards["test"], str(tmp_path / "eval"))  # read back
    assert again.map_50 == res.map_50 or math.isnan(res.map_50)

    # Pseudo-boxes over the unlabeled canvases: a Parquet per shard with lineage.
    out = str(tmp_path / "pseudo")
    cfg_pb = PseudoBoxConfig(checkpoint=ckpt, shards=shards["unlabeled"], out=out, threshold=0.05)
    with models.cpu_threads(1):
        stats = run_stage(PseudoBoxStage(cfg_pb))
    assert sum(s.images for s in stats) == 8
    url = f"{out}/pseudo_boxes/unlabeled/canvases-000000.parquet"
    table = tables.read_parquet(url)
    assert table.schema.equals(tables.PSEUDO_BOXES)
    lin = tables.read_lineage(url)
    assert lin["model_id"] == models.model_id(ckpt) and lin["classes"] == DIGITS
    for r in table.to_pylist():
        assert len(r["boxes"]) == len(r["labels"]) == len(r["scores"])
        assert all(s >= 0.05 for s in r["scores"]) and all(0 <= c < 10 for c in r["labels"])
        assert r["scores"] == sorted(r["scores"], reverse=True)
    assert run_stage(PseudoBoxStage(cfg_pb))[0].skipped  # committed: read back
    other = cfg_pb.model_copy(update={"threshold": 0.5})
    with pytest.raises(PermanentError, match="another config"):
        run_stage(PseudoBoxStage(other))  # never taken for the other threshold's boxes

    # Materialized: images with at least one box, the boxes in their json.
    mat = BoxMaterializeConfig(pseudo_boxes=out, shards=shards["unlabeled"],
                               out=str(tmp_path / "boxed"), min_boxes=1)  # fmt: skip
    mstats = run_stage(BoxMaterializeStage(mat))
    boxed = {r["key"]: r for r in table.to_pylist() if r["labels"]}
    assert mstats[0].written == len(boxed)
    samples, _ = read_shard_samples(str(tmp_path / "boxed/shards/unlabeled/canvases-000000.tar"))
    for s in samples:
        row = boxed[s.key]
        assert [b["label"] for b in s.meta["boxes"]] == [DIGITS[c] for c in row["labels"]]
        assert s.meta["pseudo"]["teacher"] == models.model_id(ckpt)


def test_detector_from_the_student_backbone_trains(tmp_path, canvas_shards):
    """The transfer step through the loop: a classifier checkpoint as init gives the
    detector its backbone (tensors equal before training), recorded in the lineage."""
    from cvpipe.learn.config import TrainConfig
    from cvpipe.learn.tasks import DetectionTask

    _, shards = canvas_shards
    torch.manual_seed(0)
    student = models.build("mobilenet_v3_large", 10)
    url = str(tmp_path / "student.pt")
    models.save_checkpoint(student, models.ModelInfo("mobilenet_v3_large", DIGITS, 32), url)
    cfg = TrainConfig(arch="fasterrcnn_mobilenet_v3_large_fpn", classes=DIGITS, freeze_stages=17)
    built = DetectionTask(**SMALL).build(cfg, shards["labeled"], url)
    w = built.model.state_dict()["backbone.body.5.block.0.0.weight"]
    assert torch.equal(w, student.state_dict()["backbone.features.5.block.0.0.weight"])
    assert built.lineage["backbone_model_id"] == models.model_id(url)
    assert built.lineage["backbone_tensors"] > 100
