"""Single-label classification: a :class:`~cvpipe.models.Classifier` trained with
cross-entropy on the ``label`` of each sample's json, scored by top-1/top-5.

The model starts random (seeded) or from a checkpoint with the transfer controls of
Yosinski et al. 2014: a fresh head for a new class set, and with ``copy_stages`` only
the first n stages copied (the rest re-initialized).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cvpipe import models
from cvpipe.data.loader import UNKNOWN_LABEL, ShardDataset, collate
from cvpipe.data.shards import Reject, iter_shard
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.errors import TrainingError
from cvpipe.learn.tasks.base import Built, TaskBatch, TrainTask
from cvpipe.learn.transfer import Parts, stage_of_keys
from cvpipe.models import ARCHITECTURES, Classifier, ModelInfo, stage_modules


def build_transform(
    recipe: str,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    shift_px: int = 2,
) -> Any:
    """The training transform of an augmentation recipe (RGB PIL -> normalized tensor).

    ``none`` is exactly the eval transform of :func:`cvpipe.models.preprocess`. ``shift``
    pads by ``shift_px`` and crops back: small translations, which keep a digit's
    identity (the field notes found that stronger recipes erase the semi-supervised gain
    on short schedules). Nothing flips in ``shift`` or ``strong``: a mirrored digit is
    another glyph.
    """
    from torchvision.transforms import v2

    ops: list[Any] = [v2.PILToTensor()]
    if recipe in ("none", "shift"):
        ops += [v2.Resize(input_size, antialias=True), v2.CenterCrop(input_size)]
        if recipe == "shift" and shift_px > 0:
            ops.append(v2.RandomCrop(input_size, padding=shift_px))
    elif recipe == "crop_flip":
        ops += [
            v2.RandomResizedCrop(input_size, scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    elif recipe == "strong":
        ops += [
            v2.RandomResizedCrop(input_size, scale=(0.5, 1.0), antialias=True),
            v2.RandomRotation(15),
            v2.ColorJitter(0.4, 0.4, 0.4),
        ]
    else:
        raise ValueError(f"unknown augmentation recipe {recipe!r}")
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


def image_transform(cfg: TrainConfig, info: ModelInfo, train: bool) -> Any:
    """The transform of an image task: the config's augmentation when training, the
    model's eval preprocessing otherwise."""
    if not train:
        return models.preprocess(info)
    return build_transform(cfg.augmentation, info.input_size, info.mean, info.std, cfg.shift_px)


def image_model_info(cfg: TrainConfig, classes: Sequence[str], task: str) -> ModelInfo:
    """The sidecar of an image model trained with ``cfg``: architecture, classes, input
    size (the architecture's default when the config gives none), normalization, task."""
    return ModelInfo(
        arch=cfg.arch,
        classes=list(classes),
        input_size=cfg.input_size or ARCHITECTURES[cfg.arch].input_size,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        task=task,
    )


def _natural_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def discover_classes(urls: Sequence[str], label_field: str = "label") -> list[str]:
    """The sorted distinct labels of the shards' json metadata (numbers in numeric order).

    Reads every sample's metadata without decoding images; for a large corpus pass
    ``TrainConfig.classes`` instead.
    """
    found: set[str] = set()
    for url in urls:
        for item in iter_shard(url, decode=False):
            if isinstance(item, Reject):
                continue
            label = item.meta.get(label_field)
            if label is not None:
                found.add(str(label))
    if not found:
        raise TrainingError(f"no labeled sample in {len(urls)} shard(s): nothing to train on")
    return sorted(found, key=_natural_key)


def classifier_parts(model: Classifier) -> Parts:
    return Parts(stage_modules(model), [model.head])


def initial_model(
    cfg: TrainConfig, classes: Sequence[str], init_checkpoint: str | None
) -> tuple[Classifier, dict[str, Any]]:
    """The classifier a run starts from, and lineage fields describing how it was made.

    From scratch: a seeded random model. From a checkpoint: its weights, with a fresh
    head when the class set differs (or ``cfg.new_head``), and with every stage from
    ``cfg.copy_stages`` on (plus the head and non-stage parts) re-initialized.
    """
    if cfg.arch not in ARCHITECTURES:
        raise TrainingError(f"{cfg.arch} is not a classifier; choose from {sorted(ARCHITECTURES)}")
    torch.manual_seed(cfg.seed)
    if init_checkpoint is None:
        return models.build(cfg.arch, len(classes)), {}
    model, src = models.load_checkpoint(init_checkpoint)
    if src.arch != cfg.arch:
        raise TrainingError(
            f"init checkpoint {init_checkpoint} is a {src.arch}, the config asks for {cfg.arch}"
        )
    same_classes = list(src.classes) == list(classes)
    if not same_classes or cfg.new_head or cfg.copy_stages is not None:
        model.replace_head(len(classes))
    if cfg.copy_stages is not None:
        copied = set(ARCHITECTURES[cfg.arch].stages[: cfg.copy_stages])
        fresh = models.build(cfg.arch, len(classes)).state_dict()
        owners = stage_of_keys(model, classifier_parts(model))
        state = model.state_dict()
        for k, owner in owners.items():
            if owner not in copied:
                state[k] = fresh[k]
        model.load_state_dict(state)
    return model, {
        "init_checkpoint": init_checkpoint,
        "init_model_id": models.model_id(init_checkpoint),
        "init_classes_match": same_classes,
    }


def resolve_classes(
    cfg: TrainConfig, train_urls: Sequence[str], init_checkpoint: str | None
) -> list[str]:
    """The head's classes: the config's; else, when fine-tuning on the same task (e.g.
    the student on D), the init checkpoint's; else the sorted labels of the data."""
    if cfg.classes is not None:
        return list(cfg.classes)
    if init_checkpoint is not None and not cfg.new_head and cfg.copy_stages is None:
        return models.load_info(init_checkpoint).classes
    return discover_classes(train_urls)


def topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1)


class TopKMeter:
    """Top-1/top-5 (and, when asked, per-class counts), summed on the device."""

    def __init__(self, num_classes: int, device: torch.device, per_class: bool = True) -> None:
        self.k = num_classes
        self.by_class = per_class
        self.n = 0
        self.c1 = torch.zeros((), dtype=torch.int64, device=device)
        self.c5 = torch.zeros((), dtype=torch.int64, device=device)
        self.count = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.correct = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def update(self, logits: torch.Tensor, batch: TaskBatch) -> None:
        y = batch.targets
        hit1 = topk_correct(logits, y, 1)
        self.c1 += hit1.sum()
        self.c5 += topk_correct(logits, y, 5).sum()
        if self.by_class:
            self.count += torch.bincount(y, minlength=self.k)
            self.correct += torch.bincount(y[hit1], minlength=self.k)
        self.n += len(y)

    def compute(self) -> dict[str, float]:
        n = self.n
        return {
            "top1": int(self.c1) / n if n else float("nan"),
            "top5": int(self.c5) / n if n else float("nan"),
        }

    def per_class(self, classes: Sequence[str]) -> tuple[tuple[int, str, int, int, float], ...]:
        count, correct = self.count.tolist(), self.correct.tolist()
        return tuple(
            (i, str(c), count[i], correct[i], correct[i] / count[i] if count[i] else float("nan"))
            for i, c in enumerate(classes)
        )


def labeled_only(batch: Any) -> TaskBatch:
    """A loader Batch as a TaskBatch of its samples with a known label (the others are
    counted in ``skipped``)."""
    keep = batch.labels != UNKNOWN_LABEL
    n_skip = int((~keep).sum())
    x, y = (batch.images, batch.labels) if n_skip == 0 else (batch.images[keep], batch.labels[keep])
    return TaskBatch(inputs=x, targets=y, size=len(y), skipped=n_skip, rejects=batch.rejects)


class ClassificationTask(TrainTask):
    """Single-label classification (today's behaviour of cvpipe train)."""

    kind: Literal["classification"] = "classification"
    metric_names: ClassVar[tuple[str, ...]] = ("top1", "top5")

    def build(
        self, cfg: TrainConfig, train_urls: Sequence[str], init_checkpoint: str | None
    ) -> Built:
        classes = resolve_classes(cfg, train_urls, init_checkpoint)
        model, lineage = initial_model(cfg, classes, init_checkpoint)
        info = image_model_info(cfg, classes, self.kind)
        return Built(model, info, classifier_parts(model), lineage)

    def dataset(
        self, cfg: TrainConfig, urls: Sequence[str], info: ModelInfo, *, stage: str, train: bool
    ) -> ShardDataset:
        tf = image_transform(cfg, info, train)
        if not train:
            return ShardDataset(list(urls), tf, classes=info.classes, stage=stage)
        return ShardDataset(
            list(urls),
            tf,
            classes=info.classes,
            stage=stage,
            shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed,
            num_streams=cfg.num_streams if train else 1,
        )

    def collate(self, items: list[dict[str, Any]]) -> TaskBatch:
        return labeled_only(collate(items))

    def forward_loss(
        self, model: nn.Module, batch: TaskBatch, cfg: TrainConfig
    ) -> tuple[torch.Tensor, Any]:
        logits = model(batch.inputs)
        loss = F.cross_entropy(logits.float(), batch.targets, label_smoothing=cfg.label_smoothing)
        return loss, logits

    def eval_step(self, model: nn.Module, batch: TaskBatch) -> tuple[torch.Tensor, Any]:
        logits = model(batch.inputs).float()
        return F.cross_entropy(logits, batch.targets, reduction="sum"), logits

    def meter(self, split: str, info: ModelInfo, device: torch.device) -> TopKMeter:
        return TopKMeter(info.num_classes, device, per_class=split != "train")

    def load(self, url: str, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
        return models.load_checkpoint(url, device)
