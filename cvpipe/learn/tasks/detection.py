"""Detection: torchvision's Faster R-CNN trained on the boxes of each sample's json.

A sample's ``boxes`` are ``[{"bbox": [x1, y1, x2, y2], "label": NAME}, ...]`` in pixels
(the form ingest accepts). Image and boxes go through torchvision.transforms.v2
together, the boxes as ``tv_tensors.BoundingBoxes``, so a flip or a resize moves both;
boxes that end up degenerate are dropped by ``SanitizeBoundingBoxes``, and boxes whose
label is outside the class set are left out. A batch is torchvision's detection form:
a list of images and a list of ``{"boxes", "labels"}`` dicts (collate_fn =
tuple(zip(*batch)), as in torchvision's references). The loss is the sum of the
model's loss dict (RPN objectness and box regression, ROI classifier and box
regression); the epoch metrics are those four parts.

In eval mode the detector gives detections, not losses: the validation row carries no
loss, and mAP (torchmetrics' MeanAveragePrecision) is the detection evaluation's job,
not the loop's. Label 0 is the background: class i of ``info.classes`` is label i + 1.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from cvpipe import models
from cvpipe.data.loader import ShardDataset
from cvpipe.data.shards import Reject, Sample, iter_shard
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.errors import TrainingError
from cvpipe.learn.tasks.base import Built, TaskBatch, TrainTask
from cvpipe.learn.transfer import Parts
from cvpipe.models import (
    DETECTORS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelInfo,
    build_detector,
    detector_head_modules,
    detector_stage_modules,
)

LOSS_PARTS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


def detection_transform(
    train: bool, min_size: int, max_size: int, flip: bool = True, crop: bool = False
) -> Any:
    """Image (PIL) + ``{"boxes": BoundingBoxes, "labels"}`` -> float image in [0, 1]
    with boxes in its pixels: when training, a random IoU crop (SSD's: every kept box
    overlaps the crop enough, boxes cut to it) and a random horizontal flip; then the
    short side resized to ``min_size`` (the long side capped at ``max_size``, as the
    model does), and degenerate boxes removed."""
    from torchvision.transforms import v2

    ops: list[Any] = [v2.ToImage()]
    if train and crop:
        ops.append(v2.RandomIoUCrop())
    if train and flip:
        ops.append(v2.RandomHorizontalFlip())
    ops += [
        v2.Resize(min_size, max_size=max_size, antialias=True),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(),
        v2.ToDtype(torch.float32, scale=True),
    ]
    return v2.Compose(ops)


def parse_boxes(boxes: Any, index: dict[str, int]) -> tuple[list[list[float]], list[int]]:
    """Boxes of a sample json with a label in ``index`` (name -> class label >= 1)."""
    coords, labels = [], []
    for b in boxes or []:
        if isinstance(b, dict) and str(b.get("label")) in index:
            coords.append([float(c) for c in b["bbox"]])
            labels.append(index[str(b["label"])])
    return coords, labels


def discover_box_classes(urls: Sequence[str], boxes_field: str = "boxes") -> list[str]:
    """The sorted distinct box labels of the shards (json only, images not decoded)."""
    found: set[str] = set()
    for url in urls:
        for item in iter_shard(url, decode=False):
            if not isinstance(item, Reject):
                for b in item.meta.get(boxes_field) or []:
                    if isinstance(b, dict) and b.get("label") is not None:
                        found.add(str(b["label"]))
    if not found:
        raise TrainingError(f"no labeled box in {len(urls)} shard(s): nothing to train on")
    return sorted(found)


def _item(field: str, transform: Any, index: dict[str, int], s: Sample) -> dict[str, Any]:
    from torchvision import tv_tensors

    coords, labels = parse_boxes(s.meta.get(field), index)
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor(coords, dtype=torch.float32).reshape(-1, 4),
        format="XYXY",
        canvas_size=(s.image.height, s.image.width),
    )
    image, target = transform(s.image, {"boxes": boxes, "labels": torch.tensor(labels).long()})
    return {
        "image": image.as_subclass(torch.Tensor),
        "target": {
            "boxes": target["boxes"].as_subclass(torch.Tensor),
            "labels": target["labels"],
        },
    }


class LossPartsMeter:
    """The mean of each part of the detector's loss dict over an epoch's images."""

    def __init__(self, device: torch.device) -> None:
        self.n = 0
        self.sums = {k: torch.zeros((), device=device) for k in LOSS_PARTS}

    def update(self, outputs: Any, batch: TaskBatch) -> None:
        if isinstance(outputs, dict):  # training: the loss dict; eval: detections
            for k in LOSS_PARTS:
                self.sums[k] += outputs[k].float() * batch.size
            self.n += batch.size

    def compute(self) -> dict[str, float]:
        return {k: float(s) / self.n for k, s in self.sums.items()} if self.n else {}


class DetectionTask(TrainTask):
    """Faster R-CNN (``TrainConfig.arch`` a key of cvpipe.models.DETECTORS) on boxes."""

    kind: Literal["detection"] = "detection"
    min_size: int = Field(800, ge=32, description="short side of images inside the model")
    max_size: int = Field(1333, ge=32, description="cap of the long side")
    flip: bool = Field(True, description="random horizontal flips in training")
    boxes_field: str = Field("boxes", description="sample json field holding the boxes")
    crop: bool = Field(False, description="random IoU crops in training (SSD-style)")
    # The model's shape (None: torchvision's default), rebuilt from the checkpoint's
    # sidecar at load (cvpipe.models.detection.BUILD_OPTIONS names them).
    anchor_sizes: list[int] | None = Field(
        None, description="anchor sizes in pixels at every FPN level (None: 32..512)"
    )
    box_head_dim: int | None = Field(None, ge=16, description="ROI box head width (None: 1024)")
    returned_layers: list[int] | None = Field(
        None,
        description="backbone stages the FPN reads (None: torchvision's; MobileNetV3: "
        "[4, 5], both stride 32; [2, 3, 4, 5] adds strides 8 and 16 for small objects)",
    )
    rpn_pre_nms_top_n_train: int | None = Field(None, ge=1)
    rpn_post_nms_top_n_train: int | None = Field(None, ge=1, description="proposals per image")
    rpn_pre_nms_top_n_test: int | None = Field(None, ge=1)
    rpn_post_nms_top_n_test: int | None = Field(None, ge=1)
    rpn_batch_size_per_image: int | None = Field(None, ge=1, description="anchors sampled")
    box_batch_size_per_image: int | None = Field(None, ge=1, description="ROIs sampled")
    box_score_thresh: float | None = Field(None, ge=0, le=1, description="eval score floor")
    box_nms_thresh: float | None = Field(None, gt=0, le=1, description="eval per-class NMS IoU")
    box_detections_per_img: int | None = Field(None, ge=1)
    metric_names: ClassVar[tuple[str, ...]] = (*LOSS_PARTS, "map", "map_50")

    def model_options(self) -> dict[str, Any]:
        """The fields that shape the model, as build_detector keywords."""
        return {k: getattr(self, k) for k in models.DETECTION_BUILD_OPTIONS
                if getattr(self, k) is not None}  # fmt: skip

    @model_validator(mode="after")
    def _sizes(self) -> DetectionTask:
        if self.max_size <= self.min_size:
            raise ValueError(f"max_size={self.max_size} must exceed min_size={self.min_size}")
        return self

    def build(
        self, cfg: TrainConfig, train_urls: Sequence[str], init_checkpoint: str | None
    ) -> Built:
        if cfg.arch not in DETECTORS:
            raise TrainingError(f"{cfg.arch} is not a detector; choose from {sorted(DETECTORS)}")
        classes = (
            list(cfg.classes) if cfg.classes else discover_box_classes(train_urls, self.boxes_field)
        )
        torch.manual_seed(cfg.seed)
        model = build_detector(cfg.arch, len(classes), **self.model_options())
        lineage: dict[str, Any] = {}
        if init_checkpoint is not None:
            lineage = self._init_from(model, classes, init_checkpoint)
        info = ModelInfo(
            cfg.arch, classes, self.min_size, IMAGENET_MEAN, IMAGENET_STD, task=self.kind
        )
        parts = Parts(detector_stage_modules(model), detector_head_modules(model))
        return Built(model, info, parts, lineage)

    def _init_from(self, model: nn.Module, classes: list[str], url: str) -> dict[str, Any]:
        """Weights of a detection checkpoint of the same architecture (the box predictor
        starts fresh when the class set differs), or the backbone of a classifier
        checkpoint the pipeline trained (the student): the rest stays random."""
        state, src = models.load_state(url)
        if src.task in models.CLASSIFIER_TASKS:
            try:
                copied = models.transfer_backbone(model, state, src.arch)
            except ValueError as e:
                raise TrainingError(f"backbone from {url}: {e}") from None
            return {
                "backbone_checkpoint": url,
                "backbone_model_id": models.model_id(url),
                "backbone_arch": src.arch,
                "backbone_tensors": len(copied),
            }
        if src.task != self.kind or src.arch != model.arch:
            raise TrainingError(
                f"init checkpoint {url} is a {src.task} {src.arch}, not a {model.arch} detector"
            )
        same = list(src.classes) == classes
        own = model.state_dict()
        take = {k: v for k, v in state.items() if same or "box_predictor" not in k}
        model.load_state_dict({**own, **take})
        return {
            "init_checkpoint": url,
            "init_model_id": models.model_id(url),
            "init_classes_match": same,
        }

    def dataset(
        self, cfg: TrainConfig, urls: Sequence[str], info: ModelInfo, *, stage: str, train: bool
    ) -> ShardDataset:
        tf = detection_transform(train, self.min_size, self.max_size, self.flip, self.crop)
        index = {c: i + 1 for i, c in enumerate(info.classes)}
        return ShardDataset(
            list(urls),
            None,
            stage=stage,
            shuffle_buffer=cfg.shuffle_buffer if train else 0,
            seed=cfg.seed,
            num_streams=cfg.num_streams if train else 1,
            sample_fn=functools.partial(_item, self.boxes_field, tf, index),
        )

    def collate(self, items: list[dict[str, Any]]) -> TaskBatch:
        rejects = [it["reject"] for it in items if "reject" in it]
        samples = [it for it in items if "reject" not in it]
        images = [it["image"] for it in samples]
        targets = [it["target"] for it in samples]
        return TaskBatch(images, targets, len(samples), 0, rejects)

    def forward_loss(
        self, model: nn.Module, batch: TaskBatch, cfg: TrainConfig
    ) -> tuple[torch.Tensor, Any]:
        losses = model(batch.inputs, batch.targets)
        return sum(losses.values()), losses

    def eval_step(self, model: nn.Module, batch: TaskBatch) -> tuple[None, Any]:
        return None, model(batch.inputs)

    def meter(self, split: str, info: ModelInfo, device: torch.device) -> Any:
        """Training: the loss parts; validation: mAP and mAP@.5 (torchmetrics)."""
        if split == "train":
            return LossPartsMeter(device)
        from cvpipe.learn.detect_eval import MAPMeter

        return MAPMeter()

    def load(self, url: str, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
        """The checkpoint's detector, built with the options its training recorded."""
        return models.load_detector(url, device)
