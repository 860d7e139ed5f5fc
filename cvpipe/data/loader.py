"""Torch data loading from shards: an IterableDataset that deals whole shards to a fixed
number of streams (each with an optional seeded shuffle buffer for training), and a
loader whose batch order does not depend on its number of DataLoader workers.

Rejected samples travel through the same stream (as items with a ``reject`` row), so
a DataLoader with workers still reports every reject to the main process, where
:func:`collate` separates them from the batch.
"""

from __future__ import annotations

import contextlib
import logging
import random
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from cvpipe.data import images
from cvpipe.data.shards import Reject, Sample, iter_shard

UNKNOWN_LABEL = -1
log = logging.getLogger(__name__)


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

    - The order is fixed by the data, not by the machine: the shards (shuffled per epoch
      when ``shuffle_buffer > 0``) are dealt to ``rank``/``world_size``, then to
      ``num_streams`` streams; each stream reads whole shards in turn through its own
      shuffle buffer of ``shuffle_buffer`` samples, seeded by (``seed``, ``epoch``,
      stream). Iterating the dataset interleaves its streams sample by sample;
      :func:`make_loader` interleaves them batch by batch, whatever its number of
      DataLoader workers (each worker takes whole streams). The same seed and
      ``num_streams`` give the same order; memory does not depend on the corpus size.
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
        num_streams: int = 1,
        sample_fn: Callable[[Sample], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if num_streams < 1:
            raise ValueError(f"num_streams must be >= 1, got {num_streams}")
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
        self.num_streams = num_streams
        self.sample_fn = sample_fn

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_urls(self) -> list[str]:
        urls = list(self.urls)
        if self.shuffle_buffer > 0:
            random.Random(hash((self.seed, self.epoch))).shuffle(urls)
        return urls[self.rank :: self.world_size]

    def worker_shards(self) -> list[str]:
        """Whole shards of this DataLoader worker (and rank), for readers whose output
        is per shard and so does not depend on the order (inference)."""
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        return self._rank_urls()[wid::nworkers]

    def _items(self, urls: list[str]) -> Iterator[dict[str, Any]]:
        for url in urls:
            for item in iter_shard(url, stage=self.stage, max_pixels=self.max_pixels):
                if isinstance(item, Reject):
                    yield {"reject": item.row()}
                    continue
                yield self._sample(item)

    def _sample(self, s: Sample) -> dict[str, Any]:
        with self._sample_rng(s.key):
            if self.sample_fn is not None:
                return {**self.sample_fn(s), "key": s.key, "shard": s.shard}
            image = self.transform(s.image)
        label = s.meta.get(self.label_field)
        index = self.class_index.get(str(label), UNKNOWN_LABEL) if label is not None else -1
        return {"image": image, "label": index, "key": s.key, "shard": s.shard}

    @contextlib.contextmanager
    def _sample_rng(self, key: str) -> Iterator[None]:
        """Random augmentations of a sample drawn from its own seed (seed, epoch, key):
        they then do not depend on the worker that made the sample or on what it made
        before. The process's torch RNG is left as it was."""
        state = torch.get_rng_state()
        torch.manual_seed(
            zlib.crc32(key.encode()) ^ ((self.seed * 1_000_003 + self.epoch) & 0xFFFFFFFF)
        )
        try:
            yield
        finally:
            torch.set_rng_state(state)

    def stream(self, s: int) -> Iterator[dict[str, Any]]:
        """The items of stream ``s``: its shards in turn, through its shuffle buffer."""
        items = self._items(self._rank_urls()[s :: self.num_streams])
        if self.shuffle_buffer <= 0:
            yield from items
            return
        rng = random.Random(hash((self.seed, self.epoch, self.rank * self.num_streams + s)))
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

    def _my_streams(self) -> list[int]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        return list(range(wid, self.num_streams, nworkers))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Inside a plain DataLoader's worker, each worker takes whole streams (no sample
        # twice); make_loader also puts the workers' output back in order.
        for group in _round_robin([_groups(self.stream(s), 1) for s in self._my_streams()]):
            yield from group


_END = "end"  # a stream has no more batches


def _groups(items: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Groups of ``size`` samples; rejects ride with the group they were met in."""
    group: list[dict[str, Any]] = []
    n = 0
    for item in items:
        group.append(item)
        if "reject" not in item:
            n += 1
            if n == size:
                yield group
                group, n = [], 0
    if group:
        yield group


def _round_robin(streams: list[Iterator[Any]]) -> Iterator[Any]:
    live = list(streams)
    while live:
        for it in list(live):
            try:
                yield next(it)
            except StopIteration:
                live.remove(it)


class _StreamBatches(IterableDataset):
    """What a DataLoader worker of :class:`OrderedLoader` yields: ``(round, stream,
    batch)`` for each of its streams in every round, ``_END`` once a stream is done and
    ``None`` for a done stream until all of the worker's streams are, so every worker
    yields the same number of items per round and the main process holds at most a
    round or two of batches while it puts them back in order."""

    def __init__(self, dataset: ShardDataset, batch_size: int, collate_fn: Callable) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.collate_fn = dataset, batch_size, collate_fn

    def __iter__(self) -> Iterator[tuple[int, int, Any]]:
        mine = self.dataset._my_streams()
        groups = {s: _groups(self.dataset.stream(s), self.batch_size) for s in mine}
        done: set[int] = set()
        r = 0
        while len(done) < len(mine):
            for s in mine:
                if s in done:
                    yield r, s, None
                    continue
                group = next(groups[s], None)
                if group is None:
                    done.add(s)
                    yield r, s, _END
                else:
                    yield r, s, self.collate_fn(group)
            r += 1


def _keep(item: Any) -> Any:
    return item


def _workers_for(num_workers: int, num_streams: int, num_urls: int) -> int:
    """The most workers, up to ``num_workers`` and the shard count, that divide the
    streams evenly (0: read in the main process)."""
    cap = min(num_workers, num_streams, num_urls)
    return max((d for d in range(1, cap + 1) if num_streams % d == 0), default=0)


class OrderedLoader:
    """Batches of a :class:`ShardDataset` in stream order: round ``r`` holds batch ``r``
    of every stream not yet done, streams in order. DataLoader workers each read whole
    streams; the batches are put back in that order here, so the sequence does not
    depend on the number of workers."""

    def __init__(
        self,
        dataset: ShardDataset,
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = _workers_for(num_workers, dataset.num_streams, len(dataset.urls))
        if 0 < self.num_workers < num_workers:
            log.info(
                "loader: %d worker(s), not %d: workers read whole streams (num_streams=%d, "
                "%d shard(s))", self.num_workers, num_workers, dataset.num_streams,
                len(dataset.urls),
            )  # fmt: skip
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor or 2
        self.collate_fn = collate_fn or collate

    def _tagged(self) -> Iterator[tuple[int, int, Any]]:
        source = _StreamBatches(self.dataset, self.batch_size, self.collate_fn)
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False}
        return iter(
            torch.utils.data.DataLoader(
                source,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_keep,
                pin_memory=self.pin_memory,
                **kwargs,
            )
        )

    def __iter__(self) -> Iterator[Any]:
        tagged = self._tagged()
        live = list(range(self.dataset.num_streams))
        pending: dict[tuple[int, int], Any] = {}
        r = 0
        while live:
            for s in list(live):
                while (r, s) not in pending:
                    item = next(tagged, None)
                    if item is None:
                        raise RuntimeError(f"loader: stream {s} ended without its end marker")
                    rr, ss, batch = item
                    if batch is not None:  # None: a done stream keeping its worker in step
                        pending[(rr, ss)] = batch
                batch = pending.pop((r, s))
                if isinstance(batch, str) and batch == _END:
                    live.remove(s)
                else:
                    yield batch
            r += 1


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
    collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None,
) -> OrderedLoader:
    """Batches of a :class:`ShardDataset` (collated by ``collate_fn``, default
    :func:`collate`), in an order that depends on the dataset's seed, epoch and
    ``num_streams`` and on ``batch_size``, never on ``num_workers``. Workers are capped
    at the shard count and at a divisor of ``num_streams`` (a worker reads whole
    streams)."""
    return OrderedLoader(dataset, batch_size, num_workers, pin_memory, prefetch_factor,
                         collate_fn)  # fmt: skip
