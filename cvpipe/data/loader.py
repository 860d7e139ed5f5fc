"""Torch data loading from shards: an IterableDataset that spreads whole shards over
DataLoader workers, with an optional seeded shuffle buffer for training.

Rejected samples travel through the same stream (as items with a ``reject`` row), so
a DataLoader with workers still reports every reject to the main process, where
:func:`collate` separates them from the batch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from cvpipe.data import images
from cvpipe.data.shards import Reject, Sample, iter_shard

UNKNOWN_LABEL = -1


@dataclass
class Batch:
    images: torch.Tensor  # N x C x H x W (empty when a batch held only rejects)
    labels: torch.Tensor  # N int64, UNKNOWN_LABEL where the sample has no known label
    keys: list[str]
    shards: list[str]
    rejects: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> Batch:
        # DataLoader(pin_memory=True) pins custom batch types only through this method.
        self.images = self.images.pin_memory()
        self.labels = self.labels.pin_memory()
        return self


class ShardDataset(IterableDataset):
    """Samples of ``urls`` as dicts ``{image, label, key, shard}`` (or ``{reject}``).

    - Shards are split over DataLoader workers (and over ``rank``/``world_size``), so
      each worker opens whole shards: memory does not depend on the corpus size.
    - ``shuffle_buffer > 0`` shuffles shard order and samples within a sliding buffer,
      seeded by (``seed``, ``epoch``, worker): the same seed gives the same order.
    - ``classes`` maps the sample json's ``label`` string to an index; samples whose
      label is missing (or not in ``classes``) get ``UNKNOWN_LABEL``.
    - ``sample_fn``, when given, makes each item from the decoded Sample instead (image
      and targets together, e.g. boxes that must follow the image's transforms); the
      item gets ``key`` and ``shard`` added, and ``transform`` is not used.
    """

    def __init__(
        self,
        urls: Sequence[str],
        transform: Callable[[Any], torch.Tensor],
        *,
        classes: Sequence[str] | None = None,
        stage: str = "read",
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_pixels: int = images.DEFAULT_MAX_PIXELS,
        label_field: str = "label",
        sample_fn: Callable[[Sample], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.urls = list(urls)
        self.transform = transform
        self.class_index = {c: i for i, c in enumerate(classes)} if classes is not None else {}
        self.stage = stage
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0
        self.rank, self.world_size = rank, world_size
        self.max_pixels = max_pixels
        self.label_field = label_field
        self.sample_fn = sample_fn

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_urls(self) -> tuple[list[str], int]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        slot, nslots = self.rank * nworkers + wid, self.world_size * nworkers
        urls = list(self.urls)
        if self.shuffle_buffer > 0:
            random.Random(hash((self.seed, self.epoch))).shuffle(urls)
        return urls[slot::nslots], slot

    def _items(self, urls: list[str]) -> Iterator[dict[str, Any]]:
        for url in urls:
            for item in iter_shard(url, stage=self.stage, max_pixels=self.max_pixels):
                if isinstance(item, Reject):
                    yield {"reject": item.row()}
                    continue
                yield self._sample(item)

    def _sample(self, s: Sample) -> dict[str, Any]:
        if self.sample_fn is not None:
            return {**self.sample_fn(s), "key": s.key, "shard": s.shard}
        label = s.meta.get(self.label_field)
        index = self.class_index.get(str(label), UNKNOWN_LABEL) if label is not None else -1
        return {"image": self.transform(s.image), "label": index, "key": s.key, "shard": s.shard}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        urls, slot = self._my_urls()
        items = self._items(urls)
        if self.shuffle_buffer <= 0:
            yield from items
            return
        rng = random.Random(hash((self.seed, self.epoch, slot)))
        buffer: list[dict[str, Any]] = []
        for item in items:
            if "reject" in item:
                yield item
                continue
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], item = item, buffer[i]
            yield item
        rng.shuffle(buffer)
        yield from buffer


def collate(items: list[dict[str, Any]]) -> Batch:
    """DataLoader collate_fn for :class:`ShardDataset`: stacks samples, keeps rejects."""
    samples = [it for it in items if "reject" not in it]
    rejects = [it["reject"] for it in items if "reject" in it]
    x = torch.stack([it["image"] for it in samples]) if samples else torch.empty(0)
    return Batch(
        images=x,
        labels=torch.tensor([it["label"] for it in samples], dtype=torch.int64),
        keys=[it["key"] for it in samples],
        shards=[it["shard"] for it in samples],
        rejects=rejects,
    )


def make_loader(
    dataset: ShardDataset,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    collate_fn: Callable[[list[dict[str, Any]]], Any] = collate,
) -> torch.utils.data.DataLoader:
    """A DataLoader over a :class:`ShardDataset` with cvpipe's collate (or a training
    task's). Workers are capped at the shard count (a worker with no shard would idle)."""
    num_workers = max(0, min(num_workers, len(dataset.urls)))
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["prefetch_factor"] = prefetch_factor or 2
        kwargs["persistent_workers"] = False
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        **kwargs,
    )
