"""Weak labels from captions and hashtags: the multi-label task (Joulin et al. 2016) fed
by the word targets of :mod:`cvpipe.label.targets`, with optional resampling.

:class:`WeakTask` is :class:`~cvpipe.learn.tasks.multilabel.MultiLabelTask` (the same
soft targets y_nk = 1/k, the same loss and precision@k) whose words come from the
targets stage's per-shard tables instead of a json field: every rule of
:mod:`cvpipe.label.text` (synonyms included) was applied once, by the stage, and the
loader only looks a sample's word indices up by key. Its checkpoints are multi-label
classifiers (``ModelInfo.task == "multilabel"``) whose classes are the vocabulary.

Resampling: with ``resample_scale`` (the targets summary's ``resample_scale`` for
``resample="sqrt"``), a training epoch draws each sample ``weight x scale`` times in
expectation (the integer part, plus one more with the fractional part as probability,
seeded by seed, epoch and key), each draw augmented from its own seed.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from pydantic import Field

from cvpipe.core.storage import is_committed
from cvpipe.data.loader import ShardDataset
from cvpipe.data.shards import Reject, Sample, iter_shard
from cvpipe.label.targets import read_targets, targets_url
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.errors import TrainingError
from cvpipe.learn.tasks.base import Built
from cvpipe.learn.tasks.classification import image_transform
from cvpipe.learn.tasks.multilabel import MultiLabelTask
from cvpipe.models import ModelInfo


class SampleTargets:
    """A ShardDataset ``sample_fn``: the image through ``transform`` and the sample's
    word indices from its shard's targets table. A few tables are held (the shards the
    loader's streams are reading, each in turn), the least recently used dropped."""

    def __init__(self, folder: str, transform: Any, keep: int = 16) -> None:
        self.folder, self.transform, self.keep = folder, transform, keep
        self.tables: OrderedDict[str, dict[str, tuple[list[int], float]]] = OrderedDict()

    def lookup(self, s: Sample) -> tuple[list[int], float]:
        table = self.tables.get(s.shard)
        if table is None:
            url = targets_url(self.folder, s.shard)
            if not is_committed(url):
                raise TrainingError(f"no word targets for shard {s.shard} ({url}): run targets")
            table = self.tables[s.shard] = read_targets(url)
            if len(self.tables) > self.keep:
                self.tables.popitem(last=False)
        else:
            self.tables.move_to_end(s.shard)
        return table.get(s.key, ([], 0.0))

    def __call__(self, s: Sample) -> dict[str, Any]:
        return {"image": self.transform(s.image), "words": self.lookup(s)[0]}


class ResampledShardDataset(ShardDataset):
    """Each sample drawn ``weight x scale`` times in expectation (see the module)."""

    def __init__(self, *args: Any, scale: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scale = scale

    def draws(self, s: Sample) -> int:
        words, weight = self.sample_fn.lookup(s)
        if not words:
            return 1  # seen once, counted as skipped (no target)
        r = weight * self.scale
        whole = math.floor(r)
        u = random.Random(f"{self.seed}:{self.epoch}:{s.key}").random()
        return whole + (u < r - whole)

    def _items(self, urls: list[str]) -> Iterator[dict[str, Any]]:
        for url in urls:
            for item in iter_shard(url, stage=self.stage, max_pixels=self.max_pixels):
                if isinstance(item, Reject):
                    yield {"reject": item.row()}
                    continue
                for r in range(self.draws(item)):
                    yield self._sample(item) if r == 0 else self._replica(item, r)

    def _replica(self, s: Sample, r: int) -> dict[str, Any]:
        # A sample's augmentation is seeded by its key: a replica draws from its own.
        with self._sample_rng(f"{s.key}#{r}"):
            return {**self.sample_fn(s), "key": s.key, "shard": s.shard}


class WeakTask(MultiLabelTask):
    """Multi-label soft targets from the word targets of captions and hashtags."""

    kind: Literal["weak"] = "weak"  # type: ignore[assignment]
    targets: str = Field(description="the word targets folder (cvpipe.label.targets)")
    vocab: str | None = Field(None, description="the vocabulary Parquet (for its synonyms)")
    resample_scale: float | None = Field(
        None, gt=0, description="draws per unit of sample weight (None: each sample once)"
    )

    def build(
        self, cfg: TrainConfig, train_urls: Sequence[str], init_checkpoint: str | None
    ) -> Built:
        built = super().build(cfg, train_urls, init_checkpoint)
        # The weights are a multi-label classifier whatever fed its targets.
        built.info = dataclasses.replace(built.info, task="multilabel")
        return built

    def dataset(
        self, cfg: TrainConfig, urls: Sequence[str], info: ModelInfo, *, stage: str, train: bool
    ) -> ShardDataset:
        tf = image_transform(cfg, info, train)
        kwargs: dict[str, Any] = {
            "stage": stage,
            "shuffle_buffer": cfg.shuffle_buffer if train else 0,
            "seed": cfg.seed,
            "num_streams": cfg.num_streams if train else 1,
            "sample_fn": SampleTargets(self.targets, tf),
        }
        if train and self.resample_scale is not None:
            return ResampledShardDataset(list(urls), None, scale=self.resample_scale, **kwargs)
        return ShardDataset(list(urls), None, **kwargs)
