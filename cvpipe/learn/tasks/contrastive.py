"""Contrastive pairs (Siamese; Hadsell, Chopra and LeCun 2006).

An embedding net G (a classifier's backbone + a linear projection to ``dim``, optionally
L2-normalized) is trained on pairs (x1, x2) with Y = 0 for a similar pair and Y = 1 for
a dissimilar one, D = ||G(x1) - G(x2)||_2 and margin m:

    L = (1 - Y) 1/2 D^2 + Y 1/2 max(0, m - D)^2

averaged over the pairs of a batch. Pairs are mined inside each batch from the samples'
labels (or pseudo-labels). By default (:meth:`ContrastiveTask.mine`) every sample is
paired with the next sample of its class and the next of another class (in batch order,
wrapping), so a batch gives about one positive per negative. With ``positive_fraction``
or ``hard_negatives`` set, :func:`cvpipe.learn.pairs.mine_pairs` draws
``pairs_per_sample`` pairs per sample with that share of positives, some negatives
being the batch's hardest (mined after the forward pass, from the embeddings).
``labels`` takes the labels from a table (a top-K selection, anchor pseudo-labels)
instead of the shards' metadata.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from cvpipe import models
from cvpipe.data.loader import UNKNOWN_LABEL, ShardDataset, collate
from cvpipe.data.shards import Sample
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.errors import TrainingError
from cvpipe.learn.pairs import mine_pairs, read_labels
from cvpipe.learn.tasks.base import Built, TaskBatch, TrainTask
from cvpipe.learn.tasks.classification import (
    image_model_info,
    image_transform,
    labeled_only,
    resolve_classes,
)
from cvpipe.learn.transfer import Parts
from cvpipe.models import ARCHITECTURES, EmbeddingNet, ModelInfo, stage_modules


def contrastive_loss(
    a: torch.Tensor, b: torch.Tensor, dissimilar: torch.Tensor, margin: float
) -> torch.Tensor:
    """Mean over pairs of (1-Y) 1/2 D^2 + Y 1/2 max(0, m - D)^2, D = ||a - b||_2."""
    sq = (a.float() - b.float()).pow(2).sum(dim=1)
    # sqrt has no gradient at 0: a tiny floor keeps a dissimilar pair of equal
    # embeddings pushing apart instead of producing NaN.
    d = sq.clamp_min(1e-12).sqrt()
    y = dissimilar.float()
    return ((1 - y) * 0.5 * sq + y * 0.5 * (margin - d).clamp_min(0).pow(2)).mean()


def next_pairs(labels: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """(first, second, dissimilar) index lists: each sample with the next sample (in
    order, wrapping) of the same label and the next of a different label, when any."""
    n = len(labels)
    first, second, dissimilar = [], [], []
    for i in range(n):
        same = diff = None
        for step in range(1, n):
            j = (i + step) % n
            if labels[j] == labels[i]:
                same = j if same is None else same
            elif diff is None:
                diff = j
            if same is not None and diff is not None:
                break
        for j, y in ((same, 0), (diff, 1)):
            if j is not None:
                first.append(i)
                second.append(j)
                dissimilar.append(y)
    return first, second, dissimilar


@functools.lru_cache(maxsize=2)
def _labels_of(spec: str | tuple[str, ...]) -> dict[str, str]:
    """A labels table read once per process (build, then every dataset of the run)."""
    return read_labels(spec if isinstance(spec, str) else list(spec))


class TableLabels:
    """A ShardDataset ``sample_fn``: the image through ``transform``, the label looked
    up by key in a labels table (unlabeled keys get UNKNOWN_LABEL and are skipped).

    A materialized copy (D^: key ``{key}_c{class}``, the source's key in the sample's
    ``source_key``) is looked up by its source key when its own key is not in the table:
    a selection or anchor labels name the images they were computed on, not the copies."""

    def __init__(self, transform: Any, table: dict[str, str], index: dict[str, int]) -> None:
        self.transform, self.table, self.index = transform, table, index

    def __call__(self, s: Sample) -> dict[str, Any]:
        label = self.table.get(s.key)
        if label is None and isinstance(s.meta.get("source_key"), str):
            label = self.table.get(s.meta["source_key"])
        return {
            "image": self.transform(s.image),
            "label": self.index.get(label, UNKNOWN_LABEL) if label is not None else UNKNOWN_LABEL,
        }


class DistanceMeter:
    """Mean distance of the similar and of the dissimilar pairs."""

    def __init__(self, device: torch.device) -> None:
        self.sum = torch.zeros(2, device=device)
        self.count = torch.zeros(2, device=device)

    def update(self, outputs: tuple[torch.Tensor, torch.Tensor], batch: TaskBatch) -> None:
        d, y = outputs
        self.sum += torch.bincount(y, weights=d.float(), minlength=2)
        self.count += torch.bincount(y, minlength=2).float()

    def compute(self) -> dict[str, float]:
        s, c = self.sum.tolist(), self.count.tolist()
        mean = [s[i] / c[i] if c[i] else float("nan") for i in (0, 1)]
        return {"similar_distance": mean[0], "dissimilar_distance": mean[1]}


class ContrastiveTask(TrainTask):
    """Siamese training of an :class:`~cvpipe.models.EmbeddingNet` on labeled shards."""

    kind: Literal["contrastive"] = "contrastive"
    margin: float = Field(1.0, gt=0, description="m: dissimilar pairs farther than m cost 0")
    dim: int = Field(128, ge=1, description="embedding dimensions")
    normalize: bool = Field(True, description="L2-normalize the embeddings")
    positive_fraction: float | None = Field(
        None, ge=0, le=1, description="share of similar pairs (None: next-sample pairs)"
    )
    pairs_per_sample: float = Field(
        2.0, gt=0, description="pairs drawn per batch sample (with positive_fraction)"
    )
    hard_negatives: float = Field(
        0.0, ge=0, le=1, description="share of negative pairs that are the batch's closest"
    )
    labels: str | list[str] | None = Field(
        None, description="labels table(s) with key and label columns; None: the shards' labels"
    )
    metric_names: ClassVar[tuple[str, ...]] = ("similar_distance", "dissimilar_distance")

    def mine(self, labels: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        """The pairs of a batch: (first, second, dissimilar) index lists."""
        return next_pairs(labels)

    @property
    def mines_after_forward(self) -> bool:
        """Pairs drawn with a set ratio (and hard negatives) from the batch's labels and
        embeddings, rather than next-sample pairs fixed at collation."""
        return self.positive_fraction is not None or self.hard_negatives > 0

    def _label_table(self) -> dict[str, str] | None:
        if self.labels is None:
            return None
        spec = self.labels if isinstance(self.labels, str) else tuple(self.labels)
        return _labels_of(spec)

    def _model(self, arch: str) -> EmbeddingNet:
        if arch not in ARCHITECTURES:
            raise TrainingError(f"{arch} is not a classifier backbone")
        return EmbeddingNet(arch, self.dim, self.normalize)

    def build(
        self, cfg: TrainConfig, train_urls: Sequence[str], init_checkpoint: str | None
    ) -> Built:
        table = self._label_table()
        if table is not None and cfg.classes is None:
            # Numbers in numeric order, as the shards' labels are discovered.
            classes = sorted(
                set(table.values()), key=lambda c: (0, int(c), "") if c.isdigit() else (1, 0, c)
            )
        else:
            classes = resolve_classes(cfg, train_urls, None)  # the labels pairs are mined from
        torch.manual_seed(cfg.seed)
        model = self._model(cfg.arch)
        lineage: dict[str, Any] = {}
        if init_checkpoint is not None:
            # The backbone of any checkpoint of the same architecture; the projection
            # starts fresh unless the checkpoint is an embedding net of the same dim.
            state, src = models.load_state(init_checkpoint)
            if src.arch != cfg.arch:
                raise TrainingError(
                    f"init checkpoint {init_checkpoint} is a {src.arch}, the config asks "
                    f"for {cfg.arch}"
                )
            own = model.state_dict()
            keep = src.task == self.kind and state["head.weight"].shape == own["head.weight"].shape
            take = {k: v for k, v in state.items() if k.startswith("backbone.") or keep}
            model.load_state_dict({**own, **take})
            lineage = {
                "init_checkpoint": init_checkpoint,
                "init_model_id": models.model_id(init_checkpoint),
            }
        info = image_model_info(cfg, classes, self.kind)
        return Built(model, info, Parts(stage_modules(model), [model.head]), lineage)

    def dataset(
        self, cfg: TrainConfig, urls: Sequence[str], info: ModelInfo, *, stage: str, train: bool
    ) -> ShardDataset:
        tf = image_transform(cfg, info, train)
        table = self._label_table()
        sample_fn = None
        if table is not None:
            index = {c: i for i, c in enumerate(info.classes)}
            sample_fn = TableLabels(tf, table, index)
        return ShardDataset(
            list(urls),
            tf,
            classes=info.classes,
            stage=stage,
            shuffle_buffer=cfg.shuffle_buffer if train else 0,
            seed=cfg.seed,
            num_streams=cfg.num_streams if train else 1,
            sample_fn=sample_fn,
        )

    def collate(self, items: list[dict[str, Any]]) -> TaskBatch:
        """Labeled samples, with the batch's pairs as targets (first, second, Y)."""
        batch = labeled_only(collate(items))
        if self.mines_after_forward:
            return batch  # targets: the labels; pairs come from the embeddings
        pairs = self.mine(batch.targets.tolist())
        batch.targets = tuple(torch.tensor(p, dtype=torch.int64) for p in pairs)
        return batch

    def _pairs_loss(self, z: torch.Tensor, batch: TaskBatch) -> tuple[torch.Tensor, Any]:
        if self.mines_after_forward:
            labels = batch.targets
            pairs = mine_pairs(
                labels,
                max(1, round(self.pairs_per_sample * len(labels))),
                0.5 if self.positive_fraction is None else self.positive_fraction,
                self.hard_negatives,
                embeddings=z.detach(),
            )
            first, second, y = pairs.first, pairs.second, pairs.dissimilar
        else:
            first, second, y = batch.targets
        if len(y) == 0:  # one sample, or one class and no partner: nothing to compare
            return z.sum() * 0.0, (z.new_zeros(0), y)
        a, b = z[first], z[second]
        d = (a.float() - b.float()).pow(2).sum(dim=1).sqrt()
        return contrastive_loss(a, b, y, self.margin), (d, y)

    def forward_loss(
        self, model: nn.Module, batch: TaskBatch, cfg: TrainConfig
    ) -> tuple[torch.Tensor, Any]:
        return self._pairs_loss(model(batch.inputs), batch)

    def eval_step(self, model: nn.Module, batch: TaskBatch) -> tuple[torch.Tensor, Any]:
        loss, outputs = self._pairs_loss(model(batch.inputs), batch)
        return loss * batch.size, outputs

    def meter(self, split: str, info: ModelInfo, device: torch.device) -> DistanceMeter:
        return DistanceMeter(device)

    def load(self, url: str, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
        state, info = models.load_state(url)
        if info.task != self.kind:
            raise models.CheckpointError(f"{url} holds a {info.task} model, not an embedding net")
        model = EmbeddingNet(info.arch, state["head.weight"].shape[0], self.normalize)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise models.CheckpointError(f"{url} does not fit {info.arch}: {e}") from None
        return model.to(device), info
