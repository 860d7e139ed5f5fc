"""Train, fine-tune and evaluate classifiers streamed from WebDataset shards: the
classification face of the task-agnostic loop (:mod:`cvpipe.learn.loop`).

One public call per stage, with small hashable arguments (URLs and a
:class:`~cvpipe.learn.config.TrainConfig`), wrapped as stages in
:mod:`cvpipe.learn.stages`:

- :func:`train` trains from scratch or fine-tunes from a checkpoint with the transfer
  controls of Yosinski et al. 2014 (copy the first n stages, freeze them, per-stage
  learning-rate multipliers, a new head for a new class set) and returns the URL of
  the final checkpoint; the loop's layout, resume and skip rules apply.
- :func:`evaluate` scores a checkpoint on labeled shards: top-1/top-5 and per class.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch

from cvpipe import models
from cvpipe.core import tables
from cvpipe.core.storage import is_committed, join
from cvpipe.data.loader import ShardDataset, make_loader
from cvpipe.learn import loop
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.errors import TrainingError
from cvpipe.learn.resume import final_url, last_epoch, metrics_url, state_url
from cvpipe.learn.tasks.base import TaskBatch
from cvpipe.learn.tasks.classification import ClassificationTask, TopKMeter

__all__ = [
    "EvalResult",
    "TrainingError",
    "evaluate",
    "evaluate_model",
    "final_url",
    "last_epoch",
    "metrics_url",
    "state_url",
    "train",
]

CLASSIFICATION = ClassificationTask()


def train(
    cfg: TrainConfig,
    train_urls: Sequence[str],
    out: str,
    val_urls: Sequence[str] | None = None,
    init_checkpoint: str | None = None,
) -> str:
    """Train a classifier (or fine-tune ``init_checkpoint``) on ``train_urls``; returns
    the URL of ``out/final.pt``. See :func:`cvpipe.learn.loop.train`."""
    return loop.train(CLASSIFICATION, cfg, train_urls, out, val_urls, init_checkpoint)


@dataclass(frozen=True)
class EvalResult:
    """Scores of one checkpoint on labeled shards. ``per_class`` rows follow
    ``tables.PER_CLASS``; samples whose label is outside the class set are counted in
    ``unknown`` and scored nowhere."""

    checkpoint: str
    n: int
    loss: float
    top1: float
    top5: float
    images_per_s: float
    unknown: int = 0
    rejects: int = 0
    per_class: tuple[tuple[int, str, int, int, float], ...] = ()
    per_class_url: str | None = None
    metrics_url: str | None = None

    def per_class_table(self) -> pa.Table:
        cols = list(zip(*self.per_class, strict=True)) if self.per_class else [[]] * 5
        return pa.Table.from_arrays(
            [pa.array(c, type=f.type) for c, f in zip(cols, tables.PER_CLASS, strict=True)],
            schema=tables.PER_CLASS,
        )


def evaluate_model(
    model: torch.nn.Module,
    batches: Iterable[TaskBatch],
    device: torch.device,
    classes: Sequence[str],
    *,
    amp: bool = True,
    channels_last: bool = True,
    checkpoint: str = "",
) -> EvalResult:
    """Top-1/top-5, mean loss and per-class accuracy of ``model`` over ``batches``."""
    meter = TopKMeter(len(classes), device)
    stats = loop.evaluate_epoch(
        model, batches, CLASSIFICATION, meter, device, amp=amp, channels_last=channels_last
    )
    return EvalResult(
        checkpoint=checkpoint,
        n=stats.images,
        loss=stats.loss,
        top1=stats.metrics["top1"],
        top5=stats.metrics["top5"],
        images_per_s=stats.images_per_s,
        unknown=stats.skipped,
        rejects=len(stats.rejects),
        per_class=meter.per_class(classes),
    )


def eval_urls(out: str, split: str) -> tuple[str, str]:
    """The per-class table and the metrics row (the commit: written last) of a split."""
    return join(out, f"{split}_per_class.parquet"), join(out, f"{split}_metrics.parquet")


def evaluated(checkpoint_url: str, urls: Sequence[str], out: str, split: str = "test") -> bool:
    """Whether ``out`` holds this split's committed scores of these weights on these
    shards (a rerun reads them back)."""
    pc_url, m_url = eval_urls(out, split)
    if not (is_committed(pc_url) and is_committed(m_url)):
        return False
    lin = tables.read_lineage(m_url)
    return lin.get("model_id") == models.model_id(checkpoint_url) and lin.get("shard_urls") == list(
        urls
    )


def evaluate(
    checkpoint_url: str,
    urls: Sequence[str],
    out: str | None = None,
    *,
    split: str = "test",
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int = 0,
) -> EvalResult:
    """Score a checkpoint on labeled shards with its own eval transform.

    With ``out``, publishes ``{out}/{split}_per_class.parquet`` (tables.PER_CLASS) and
    ``{out}/{split}_metrics.parquet`` (one tables.METRICS row); when both are committed
    for the same weights and shards, a rerun reads them back instead of evaluating.
    """
    if out is not None and evaluated(checkpoint_url, urls, out, split):
        return read_eval(checkpoint_url, out, split)
    dev = models.resolve_device(device)
    model, info = models.load_checkpoint(checkpoint_url, dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    ds = ShardDataset(list(urls), models.preprocess(info), classes=info.classes, stage="evaluate")
    loader = make_loader(
        ds,
        batch_size,
        num_workers,
        pin_memory=dev.type == "cuda",
        collate_fn=CLASSIFICATION.collate,
    )
    result = evaluate_model(model, loader, dev, info.classes, checkpoint=checkpoint_url)
    if out is None:
        return result
    pc_url, m_url = eval_urls(out, split)
    lin = tables.lineage(
        None,
        stage="evaluate",
        split=split,
        model_id=models.model_id(checkpoint_url),
        checkpoint=checkpoint_url,
        shard_urls=list(urls),
        n=result.n,
        unknown=result.unknown,
        rejects=result.rejects,
    )
    epochs = int(info.lineage.get("train_config", {}).get("epochs", 0) or 0)
    row = {
        "epoch": epochs,
        "split": split,
        "loss": float(result.loss),
        "top1": float(result.top1),
        "top5": float(result.top5),
        "images_per_s": float(result.images_per_s),
    }
    tables.write_parquet(result.per_class_table(), pc_url, lin)
    tables.write_parquet(tables.from_rows([row], tables.METRICS), m_url, lin)
    return EvalResult(**{**result.__dict__, "per_class_url": pc_url, "metrics_url": m_url})


def read_eval(checkpoint_url: str, out: str, split: str = "test") -> EvalResult:
    """The committed scores of :func:`evaluate` under ``out``, without evaluating."""
    pc_url, m_url = eval_urls(out, split)
    m = tables.read_parquet(m_url).to_pylist()[0]
    lin = tables.read_lineage(m_url)
    pc = tables.read_parquet(pc_url).to_pylist()
    per_class = tuple(
        (r["class_index"], r["class_name"], r["count"], r["correct"], r["top1"]) for r in pc
    )
    return EvalResult(
        checkpoint=checkpoint_url,
        n=int(lin.get("n", sum(r["count"] for r in pc))),
        loss=m["loss"],
        top1=m["top1"],
        top5=m["top5"],
        images_per_s=m["images_per_s"],
        unknown=int(lin.get("unknown", 0)),
        rejects=int(lin.get("rejects", 0)),
        per_class=per_class,
        per_class_url=pc_url,
        metrics_url=m_url,
    )
