"""Multi-label soft targets (Joulin et al. 2016): every word of an image is a target.

Image n with k_n in-vocabulary words gets y_nk = 1/k_n on each of them, and the loss is
the multi-class logistic loss over the vocabulary of K words

    l = -1/N sum_n sum_k y_nk log softmax(W f(x_n))_k

scored by precision@k of word prediction (the share of the k top-scoring words that
are among the image's words). The model is a :class:`~cvpipe.models.Classifier` whose
head has one output per vocabulary word (``TrainConfig.classes`` is the vocabulary).

Targets travel sparse (rows, columns, weights) from the loader workers and become a
dense N x K matrix on the device, so a large vocabulary costs no host memory per image.
Where the words come from is :meth:`MultiLabelTask.words` (by default a json list field
of the sample, e.g. its hashtags): the weak-label pipeline plugs its tokenizer in there.
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
from cvpipe.learn.tasks.classification import (
    classifier_parts,
    image_model_info,
    image_transform,
    initial_model,
)
from cvpipe.models import ModelInfo

PRECISION_AT = (1, 5, 10)


def soft_targets(
    rows: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor, n: int, k: int
) -> torch.Tensor:
    """The dense N x K target matrix of sparse (row, column, weight) entries."""
    y = torch.zeros(n, k, dtype=torch.float32, device=weights.device)
    return y.index_put_((rows, cols), weights.float(), accumulate=True)


def soft_target_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-1/N sum_n sum_k y_nk log softmax(logits_n)_k (Joulin et al. 2016)."""
    return -(y * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def precision_at_k(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Per image: the share of its top-k predicted words that are among its words."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (y.gather(1, top) > 0).float().sum(dim=1) / k


def _item(task: MultiLabelTask, transform: Any, index: dict[str, int], s: Sample) -> dict[str, Any]:
    words = sorted({index[w] for w in task.words(s.meta) if w in index})
    return {"image": transform(s.image), "words": words}


class PrecisionMeter:
    """Mean precision@k over images, summed on the device."""

    def __init__(self, device: torch.device) -> None:
        self.n = 0
        self.sums = {k: torch.zeros((), device=device) for k in PRECISION_AT}

    def update(self, outputs: tuple[torch.Tensor, torch.Tensor], batch: TaskBatch) -> None:
        logits, y = outputs
        for k in PRECISION_AT:
            self.sums[k] += precision_at_k(logits, y, k).sum()
        self.n += len(logits)

    def compute(self) -> dict[str, float]:
        return {
            f"precision_at_{k}": float(s) / self.n if self.n else float("nan")
            for k, s in self.sums.items()
        }


class MultiLabelTask(TrainTask):
    """Soft multi-label targets over a vocabulary (``TrainConfig.classes``)."""

    kind: Literal["multilabel"] = "multilabel"
    words_field: str = Field("hashtags", description="sample json field with the image's words")
    metric_names: ClassVar[tuple[str, ...]] = tuple(f"precision_at_{k}" for k in PRECISION_AT)

    def words(self, meta: dict[str, Any]) -> list[str]:
        """The words of a sample (before the vocabulary filter)."""
        value = meta.get(self.words_field) or []
        return [str(w) for w in value] if isinstance(value, list) else []

    def build(
        self, cfg: TrainConfig, train_urls: Sequence[str], init_checkpoint: str | None
    ) -> Built:
        if not cfg.classes:
            raise TrainingError("multi-label training needs the vocabulary as `classes`")
        model, lineage = initial_model(cfg, cfg.classes, init_checkpoint)
        info = image_model_info(cfg, cfg.classes, self.kind)
        return Built(model, info, classifier_parts(model), lineage)

    def dataset(
        self, cfg: TrainConfig, urls: Sequence[str], info: ModelInfo, *, stage: str, train: bool
    ) -> ShardDataset:
        tf = image_transform(cfg, info, train)
        index = {w: i for i, w in enumerate(info.classes)}
        return ShardDataset(
            list(urls),
            None,
            stage=stage,
            shuffle_buffer=cfg.shuffle_buffer if train else 0,
            seed=cfg.seed,
            num_streams=cfg.num_streams if train else 1,
            sample_fn=functools.partial(_item, self, tf, index),
        )

    def collate(self, items: list[dict[str, Any]]) -> TaskBatch:
        """Images with at least one vocabulary word; targets as sparse (row, column,
        weight = 1/k) triples."""
        rejects = [it["reject"] for it in items if "reject" in it]
        samples = [it for it in items if "reject" not in it]
        kept = [it for it in samples if it["words"]]
        rows, cols, weights = [], [], []
        for r, it in enumerate(kept):
            rows += [r] * len(it["words"])
            cols += it["words"]
            weights += [1.0 / len(it["words"])] * len(it["words"])
        x = torch.stack([it["image"] for it in kept]) if kept else torch.empty(0)
        targets = (
            torch.tensor(rows, dtype=torch.int64),
            torch.tensor(cols, dtype=torch.int64),
            torch.tensor(weights, dtype=torch.float32),
        )
        return TaskBatch(x, targets, len(kept), len(samples) - len(kept), rejects)

    def _dense(self, logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        rows, cols, weights = batch.targets
        return soft_targets(rows, cols, weights, logits.shape[0], logits.shape[1])

    def forward_loss(
        self, model: nn.Module, batch: TaskBatch, cfg: TrainConfig
    ) -> tuple[torch.Tensor, Any]:
        logits = model(batch.inputs)
        y = self._dense(logits, batch)
        return soft_target_loss(logits, y), (logits, y)

    def eval_step(self, model: nn.Module, batch: TaskBatch) -> tuple[torch.Tensor, Any]:
        logits = model(batch.inputs).float()
        y = self._dense(logits, batch)
        return soft_target_loss(logits, y) * batch.size, (logits, y)

    def meter(self, split: str, info: ModelInfo, device: torch.device) -> PrecisionMeter:
        return PrecisionMeter(device)

    def load(self, url: str, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
        return models.load_checkpoint(url, device)
