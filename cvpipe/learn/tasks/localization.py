"""Object localization: one object per image, its class and its box (the baseline
before detection), trained through the shared loop.

A usable sample has exactly one box in its json (``boxes``: ``[{"bbox": [x1, y1, x2,
y2], "label": NAME}]``); its class is that box's label. Other samples are skipped and
counted. The image is resized to ``input_size`` squared and the box follows it
(torchvision.transforms.v2 with ``tv_tensors.BoundingBoxes``), then becomes fractions
of the image's sides. The loss is cross-entropy + ``box_weight`` x (L1 + generalized IoU
loss) of the box; the metrics are top-1, mean IoU, the share of images with IoU >= 0.5,
and the share right on both (class and IoU >= 0.5).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cvpipe import models
from cvpipe.data.loader import ShardDataset
from cvpipe.data.shards import Sample
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.errors import TrainingError
from cvpipe.learn.tasks.base import Built, TaskBatch, TrainTask
from cvpipe.learn.tasks.detection import discover_box_classes
from cvpipe.learn.transfer import Parts
from cvpipe.models import ARCHITECTURES, ModelInfo, stage_modules
from cvpipe.models.localization import Localizer, load_localizer

METRICS = ("top1", "mean_iou", "iou_50", "correct_50")


def localization_transform(input_size: int, mean: Sequence[float], std: Sequence[float]) -> Any:
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((input_size, input_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def _item(transform: Any, index: dict[str, int], s: Sample) -> dict[str, Any]:
    from torchvision import tv_tensors

    boxes = s.meta.get("boxes") or []
    one = boxes[0] if len(boxes) == 1 and isinstance(boxes[0], dict) else None
    label = index.get(str(one.get("label"))) if one else None
    if one is None or label is None:
        coords, label = [0.0, 0.0, 1.0, 1.0], -1  # skipped by collate
    else:
        coords = [float(c) for c in one["bbox"]]
    box = tv_tensors.BoundingBoxes(torch.tensor([coords]), format="XYXY",
                                   canvas_size=(s.image.height, s.image.width))  # fmt: skip
    image, box = transform(s.image, box)
    h, w = image.shape[-2:]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    return {
        "image": image.as_subclass(torch.Tensor),
        "label": label,
        "box": (box.as_subclass(torch.Tensor)[0] / scale).clamp(0, 1),
    }


class LocalizationMeter:
    def __init__(self, device: torch.device) -> None:
        self.n = 0
        self.sums = {k: torch.zeros((), device=device) for k in METRICS}

    def update(self, outputs: Any, batch: TaskBatch) -> None:
        from torchvision.ops import box_iou

        logits, boxes = outputs
        y, target = batch.targets["label"], batch.targets["box"]
        iou = box_iou(boxes.float(), target.float()).diagonal()
        right = logits.argmax(1) == y
        self.sums["top1"] += right.sum()
        self.sums["mean_iou"] += iou.sum()
        self.sums["iou_50"] += (iou >= 0.5).sum()
        self.sums["correct_50"] += (right & (iou >= 0.5)).sum()
        self.n += len(y)

    def compute(self) -> dict[str, float]:
        return {k: float(v) / self.n for k, v in self.sums.items()} if self.n else {}


class LocalizationTask(TrainTask):
    """A :class:`~cvpipe.models.localization.Localizer` on single-object images."""

    kind: Literal["localization"] = "localization"
    box_weight: float = Field(5.0, ge=0, description="weight of the box loss (L1 + GIoU)")
    metric_names: ClassVar[tuple[str, ...]] = METRICS

    def build(
        self, cfg: TrainConfig, train_urls: Sequence[str], init_checkpoint: str | None
    ) -> Built:
        if cfg.arch not in ARCHITECTURES:
            raise TrainingError(f"{cfg.arch} is not a classifier backbone")
        classes = list(cfg.classes) if cfg.classes else discover_box_classes(train_urls)
        torch.manual_seed(cfg.seed)
        model = Localizer(cfg.arch, len(classes))
        lineage: dict[str, Any] = {}
        if init_checkpoint is not None:
            state, src = models.load_state(init_checkpoint)
            if src.arch != cfg.arch:
                raise TrainingError(f"{init_checkpoint} is a {src.arch}, not a {cfg.arch}")
            same = list(src.classes) == classes
            own = model.state_dict()
            take = {k: v for k, v in state.items() if k in own and (same or
                    not k.startswith("head."))}  # fmt: skip
            model.load_state_dict({**own, **take})
            lineage = {"init_checkpoint": init_checkpoint,
                       "init_model_id": models.model_id(init_checkpoint),
                       "init_tensors": len(take)}  # fmt: skip
        info = ModelInfo(cfg.arch, classes, cfg.input_size or ARCHITECTURES[cfg.arch].input_size,
                         tuple(cfg.mean), tuple(cfg.std), task=self.kind)  # fmt: skip
        return Built(model, info, Parts(stage_modules(model), [model.head, model.box_head]),
                     lineage)  # fmt: skip

    def dataset(
        self, cfg: TrainConfig, urls: Sequence[str], info: ModelInfo, *, stage: str, train: bool
    ) -> ShardDataset:
        tf = localization_transform(info.input_size, info.mean, info.std)
        index = {c: i for i, c in enumerate(info.classes)}
        return ShardDataset(list(urls), None, stage=stage,
                            shuffle_buffer=cfg.shuffle_buffer if train else 0, seed=cfg.seed,
                            num_streams=cfg.num_streams if train else 1,
                            sample_fn=functools.partial(_item, tf, index))  # fmt: skip

    def collate(self, items: list[dict[str, Any]]) -> TaskBatch:
        rejects = [it["reject"] for it in items if "reject" in it]
        good = [it for it in items if "reject" not in it and it["label"] >= 0]
        skipped = sum(1 for it in items if "reject" not in it and it["label"] < 0)
        if not good:
            return TaskBatch(torch.empty(0), {}, 0, skipped, rejects)
        return TaskBatch(
            torch.stack([it["image"] for it in good]),
            {"label": torch.tensor([it["label"] for it in good]),
             "box": torch.stack([it["box"] for it in good])},
            len(good), skipped, rejects,
        )  # fmt: skip

    def _loss(self, outputs: Any, batch: TaskBatch) -> torch.Tensor:
        from torchvision.ops import generalized_box_iou_loss

        logits, boxes = outputs
        target = batch.targets["box"]
        box_loss = F.l1_loss(boxes.float(), target) + generalized_box_iou_loss(
            boxes.float(), target, reduction="mean"
        )
        return F.cross_entropy(logits.float(), batch.targets["label"]) + self.box_weight * box_loss

    def forward_loss(
        self, model: nn.Module, batch: TaskBatch, cfg: TrainConfig
    ) -> tuple[torch.Tensor, Any]:
        outputs = model(batch.inputs)
        return self._loss(outputs, batch), outputs

    def eval_step(self, model: nn.Module, batch: TaskBatch) -> tuple[torch.Tensor, Any]:
        outputs = model(batch.inputs)
        return self._loss(outputs, batch), outputs

    def meter(self, split: str, info: ModelInfo, device: torch.device) -> LocalizationMeter:
        return LocalizationMeter(device)

    def load(self, url: str, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
        return load_localizer(url, device)  # type: ignore[return-value]
