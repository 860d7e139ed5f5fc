"""Object localization runs: one flat config for ``cvpipe localize train`` and the
evaluation of a localization checkpoint (top-1, mean IoU, IoU >= 0.5 rate) that
``cvpipe localize eval`` writes as ``{out}/{split}_localize.parquet``."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from cvpipe import models
from cvpipe.core import tables
from cvpipe.core.storage import expand_specs, join
from cvpipe.data.loader import make_loader
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.loop import evaluate_epoch
from cvpipe.learn.stages import TrainJob
from cvpipe.learn.tasks import LocalizationTask

# The localization transform is a plain resize: no recipe, crop or flip to choose.
NOT_FOR_LOCALIZATION = {"augmentation", "shift_px", "label_smoothing", "new_head"}


class LocalizeTrainConfig(TrainConfig):
    """Train a localizer (a classifier with a box head) on single-object shards."""

    shards: str | list[str] = Field(description="single-object boxed training shards")
    out: str = Field(description="checkpoints, metrics.parquet and final.pt go here")
    test: str | list[str] | None = Field(None, description="shards scored after training")
    init: str | None = Field(None, description="a classifier checkpoint of the same arch")
    box_weight: float = Field(5.0, ge=0, description="weight of the box loss (L1 + GIoU)")
    arch: str = Field("resnet18", description="a key of cvpipe.models.ARCHITECTURES")
    input_size: int | None = Field(96, ge=8, description="images are resized to this square")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.01, gt=0)
    epochs: int = Field(20, ge=1)

    def job(self) -> TrainJob:
        cfg = TrainConfig(**self.model_dump(include=set(TrainConfig.model_fields)))
        return TrainJob(config=cfg, shards=expand_specs(self.shards, ".tar"), out=self.out,
                        init_checkpoint=self.init,
                        task=LocalizationTask(box_weight=self.box_weight))  # fmt: skip


def localize_url(out: str, split: str) -> str:
    return join(out, f"{split}_localize.parquet")


def evaluate_localizer(
    checkpoint: str,
    urls: Sequence[str],
    out: str | None = None,
    *,
    split: str = "test",
    batch_size: int = 64,
    device: str = "auto",
) -> dict[str, float]:
    """Top-1, mean IoU, IoU >= 0.5 rate and both-right rate of a localization
    checkpoint on single-object shards; with ``out``, one tables.LOCALIZE_METRICS row."""
    dev = models.resolve_device(device)
    task = LocalizationTask()
    model, info = task.load(checkpoint, dev)
    ds = task.dataset(TrainConfig(arch=info.arch), list(urls), info, stage="evaluate",
                      train=False)  # fmt: skip
    loader = make_loader(ds, batch_size, collate_fn=task.collate)
    stats = evaluate_epoch(model, loader, task, task.meter(split, info, dev), dev)
    row = {"split": split, "images": stats.images, **stats.metrics}
    if out is not None:
        lin = tables.lineage(None, stage="evaluate_localizer", checkpoint=checkpoint,
                             model_id=models.model_id(checkpoint), shard_urls=list(urls),
                             skipped=stats.skipped)  # fmt: skip
        tables.write_parquet(tables.from_rows([row], tables.LOCALIZE_METRICS),
                             localize_url(out, split), lin)  # fmt: skip
    return row
