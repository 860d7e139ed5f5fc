"""Teacher inference over shards, the model side: top-P classes (and optionally
embeddings) per image.

A group of shards is handled by one :class:`Teacher` with one DataLoader. DataLoader
workers (:mod:`cvpipe.infer.batches`) split whole shards between them, read and decode,
and assemble batches; the main process runs the model and keeps, per shard, a buffer of
results that is published when the worker signals the end of that shard. Per input
shard:

- ``OUT/predictions/<partition>/<stem>.parquet`` (:data:`tables.PREDICTIONS`), the commit;
- ``OUT/features/<partition>/<stem>.{npy,parquet}`` (:mod:`cvpipe.data.features`) when asked;
- ``OUT/rejects/infer/<partition>/<stem>.parquet`` (:data:`tables.REJECTS`).

A shard whose outputs are all committed is skipped (its stats are read back). The
stage that runs groups of shards as work units is :class:`cvpipe.infer.stage.InferStage`.

On CUDA the stage uses pinned memory, non-blocking copies, channels_last, bf16 autocast,
and decodes JPEG on the GPU (nvjpeg, batched) in a thread of its own, one batch ahead of
the model; results come back one batch late so the GPU always has the next batch queued
while the host handles the previous one.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cvpipe.core import tables
from cvpipe.core.storage import is_committed, url_to_fs
from cvpipe.data import images
from cvpipe.data.features import write_features
from cvpipe.data.ingest import reject_summary, shard_summary
from cvpipe.data.shards import Reject, shard_id, unit_url
from cvpipe.infer.batches import STAGE, InferenceDataset
from cvpipe.models import cudnn_autotune, load_model, model_id, preprocess, resolve_device

# Batches decoded ahead of the model when JPEGs are decoded on the device: two keep the
# model fed while bounding the decoded images held in device memory.
_DECODE_AHEAD = 2


def predictions_url(out: str, sid: str) -> str:
    return unit_url(out, "predictions", sid)


def features_url(out: str, sid: str) -> str:
    return unit_url(out, "features", sid)


def rejects_url(out: str, sid: str) -> str:
    return unit_url(out, "rejects/infer", sid)


@dataclass
class InferStats:
    """What one shard cost and produced. Times are seconds; ``decode_s`` is the workers'
    read + decode + preprocess time (it overlaps the model when workers > 0); batch-level
    times are split over the shards of a batch in proportion to their images."""

    shard: str
    images: int = 0
    rejects: dict[str, int] = field(default_factory=dict)
    skipped: bool = False
    decode_s: float = 0.0
    h2d_s: float = 0.0
    forward_s: float = 0.0
    write_s: float = 0.0

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rejected": self.rejected}


def committed_outputs(out: str, sid: str, features: bool) -> list[str]:
    """The outputs of one shard, in the order they are published (predictions last:
    they are the commit)."""
    return [rejects_url(out, sid), *([features_url(out, sid)] if features else []),
            predictions_url(out, sid)]  # fmt: skip


def committed_stats(out: str, sid: str) -> InferStats:
    """Stats of a shard an earlier run committed, read back from its tables (the
    predictions footer and the rejects' reasons): nothing is inferred again."""
    fs, path = url_to_fs(predictions_url(out, sid))
    rows = pq.ParquetFile(path, filesystem=fs).metadata.num_rows
    reasons = tables.read_parquet(rejects_url(out, sid), columns=["reason"])
    counts = Counter(reasons.column("reason").to_pylist())
    return InferStats(sid, images=rows, rejects=dict(counts), skipped=True)


def summarize(stats: Sequence[InferStats]) -> dict[str, Any]:
    return {
        **shard_summary(stats),
        "images": sum(s.images for s in stats),
        **reject_summary(stats),
        **{
            k: round(sum(getattr(s, k) for s in stats), 4)
            for k in ("decode_s", "h2d_s", "forward_s", "write_s")
        },
    }


class _ShardBuffer:
    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.positions: list[np.ndarray] = []
        self.keys: list[str] = []
        self.classes: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.embeddings: list[np.ndarray] = []
        self.rejects: list[dict[str, str]] = []
        self.stats = InferStats(sid)


class _Clock:
    """Marks between the steps of one batch: CUDA events on a GPU (read once the batch
    is done, so the host never waits), wall time on a CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks (waits for the last CUDA event)."""
        m = self.marks
        if self.cuda:
            m[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(m, m[1:], strict=False)]
        return [b - a for a, b in zip(m, m[1:], strict=False)]


@dataclass
class _Inflight:
    """A batch whose results may still be on their way from the GPU."""

    meta: list[tuple[str, str, int]]
    rejects: list[dict[str, str]]
    ends: list[dict[str, Any]]
    top_scores: torch.Tensor | None = None
    top_classes: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    x: torch.Tensor | None = None  # the model's input, until the model has run
    ready: torch.cuda.Event | None = None  # recorded once x is on the device (CUDA)
    # marks: start, host images on device, JPEGs decoded, model started, done
    clock: _Clock | None = None


class Teacher:
    """The model side of inference. Build it once per process (it loads the model),
    then call :meth:`process` on groups of shards."""

    def __init__(
        self,
        checkpoint_url: str,
        device: str = "auto",
        batch_size: int = 256,
        top_p: int = 5,
        features: bool = False,
        num_workers: int = 2,
        prefetch_factor: int = 4,
        jpeg_on_device: bool | None = None,
        max_pixels: int = images.DEFAULT_MAX_PIXELS,
    ) -> None:
        if batch_size < 1 or top_p < 1:
            raise ValueError("batch_size and top_p must be >= 1")
        self.checkpoint_url = checkpoint_url
        self.device = resolve_device(device)
        self.cuda = self.device.type == "cuda"
        # A classifier, or an embedding net (no class scores, its embeddings as features).
        self.model, self.info = load_model(checkpoint_url, self.device)
        if self.info.task == "contrastive" and not features:
            raise ValueError(
                f"{checkpoint_url} is an embedding net: run it with features on "
                "(its embeddings are its only output)"
            )
        self.model.eval()
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model_id = model_id(checkpoint_url)
        self.batch_size = batch_size
        scores = 0 if self.info.task == "contrastive" else self.info.num_classes
        self.top_p = min(top_p, scores)
        self.features = features
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        # JPEGs decoded where the model runs (nvjpeg on CUDA). Default: on with CUDA
        # only; forcing it on a CPU runs the same code path with libjpeg (for tests).
        self.jpeg_on_device = self.cuda if jpeg_on_device is None else jpeg_on_device
        self.max_pixels = max_pixels
        self.transform = preprocess(self.info)
        self.config = {
            "stage": STAGE,
            "model_id": self.model_id,
            "top_p": self.top_p,
            "features": features,
            "input_size": self.info.input_size,
        }
        mean = torch.tensor(self.info.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.info.std, dtype=torch.float32).view(1, 3, 1, 1)
        self._mean, self._std = mean.to(self.device), std.to(self.device)

    # ------------------------------------------------------------------ bookkeeping

    def lineage(self, sid: str) -> dict[str, Any]:
        return tables.lineage(
            self.config,
            stage=STAGE,
            shard=sid,
            model_id=self.model_id,
            checkpoint=self.checkpoint_url,
            arch=self.info.arch,
            num_classes=self.info.num_classes,
            top_p=self.top_p,
        )

    def done(self, sid: str, out: str) -> bool:
        return all(is_committed(u) for u in committed_outputs(out, sid, self.features))

    # ------------------------------------------------------------------ the model

    def _gpu_images(self, jpegs: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """nvjpeg-decode a batch and preprocess it on the GPU (resize the short side,
        center crop, normalize), the same steps as :func:`models.preprocess`. Returns the
        tensor and the indices of images that failed to decode (tried one by one)."""
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional as F

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the decoders' deprecation notice
            try:
                decoded: list[torch.Tensor | None] = list(
                    decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device)
                )
            except RuntimeError:
                decoded = []
                for j in jpegs:
                    try:
                        decoded.append(decode_jpeg(j, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        decoded.append(None)
        failed = [i for i, d in enumerate(decoded) if d is None]
        size = self.info.input_size
        out: list[torch.Tensor | None] = [None] * len(decoded)
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, d in enumerate(decoded):
            if d is not None:
                by_shape[tuple(d.shape)].append(i)
        for idx in by_shape.values():  # web crops often share a size: resize them together
            x = torch.stack([decoded[i] for i in idx])
            x = F.center_crop(F.resize(x, [size], antialias=True), [size, size])
            for j, i in enumerate(idx):
                out[i] = x[j]
        kept = [t for t in out if t is not None]
        if not kept:
            return torch.empty(0, device=self.device), failed
        x = torch.stack(kept).float().div_(255.0).sub_(self._mean).div_(self._std)
        return x, failed

    def _host_fallback(
        self, jpegs: list[torch.Tensor], meta: list[tuple[str, str, int]], fl: _Inflight
    ) -> list[torch.Tensor]:
        """JPEGs the device decoder refused, decoded on the host as the CPU path would:
        used when the host can read them, else rejected with the host decoder's reason,
        so both paths count the same images and the same rejects."""
        kept = []
        for data, (sid, key, position) in zip(jpegs, meta, strict=True):
            try:
                kept.append(self.transform(images.decode(data.numpy().tobytes(), self.max_pixels)))
            except images.RejectedImage as e:
                fl.rejects.append(Reject(key, sid, STAGE, e.reason, e.detail).row())
                continue
            fl.meta.append((sid, key, position))
        return [torch.stack(kept).to(self.device)] if kept else []

    def _prepare(self, batch: dict[str, Any]) -> _Inflight:
        """Put one batch's images on the device: host-decoded images copied, JPEGs
        decoded there (:meth:`_gpu_images`), refused JPEGs decoded on the host. On CUDA
        this runs in the decode thread, on its own stream (:meth:`_prepared`)."""
        fl = _Inflight(
            meta=list(batch["image_meta"]), rejects=list(batch["rejects"]), ends=list(batch["ends"])
        )
        jpegs = list(torch.split(batch["jpegs"], batch["jpeg_sizes"]))  # views, no copies
        jpeg_meta = batch["jpeg_meta"]
        if not fl.meta and not jpegs:
            return fl
        clock = fl.clock = _Clock(self.cuda)
        clock.mark()
        parts = [batch["images"].to(self.device, non_blocking=True)] if fl.meta else []
        clock.mark()
        if jpegs:
            y, failed = self._gpu_images(jpegs)
            bad = set(failed)
            fl.meta += [m for i, m in enumerate(jpeg_meta) if i not in bad]
            if len(y):
                parts.append(y)
            if failed:
                parts += self._host_fallback([jpegs[i] for i in failed],
                                             [jpeg_meta[i] for i in failed], fl)  # fmt: skip
        if parts:
            x = torch.cat(parts) if len(parts) > 1 else parts[0]
            if self.cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            fl.x = x
        clock.mark()
        if self.cuda:
            fl.ready = torch.cuda.Event()
            fl.ready.record()
        return fl

    def _prepared(self, loader: Iterable[dict[str, Any]]) -> Iterator[_Inflight]:
        """Batches with their images on the device, in loader order.

        With JPEGs decoded on the device, decoding batch i+1 overlaps the model on batch
        i: a thread reads the loader and decodes on a stream of its own, at most
        ``_DECODE_AHEAD`` batches ahead; the model's stream waits for each batch's decode
        event. Without it (host decoding in the loader's workers) batches are prepared
        inline."""
        if not self.jpeg_on_device:
            yield from (self._prepare(b) for b in loader)
            return
        ready: queue.Queue[_Inflight | BaseException | None] = queue.Queue(_DECODE_AHEAD)
        stop = threading.Event()
        stream = torch.cuda.Stream(self.device) if self.cuda else None

        def put(item: _Inflight | BaseException | None) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def decode() -> None:
            try:
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    for batch in loader:
                        if not put(self._prepare(batch)):
                            return
            except BaseException as e:  # handed to the consumer, raised there
                put(e)
            else:
                put(None)

        thread = threading.Thread(target=decode, name="cvpipe-decode", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if item.ready is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(item.ready)
                    if item.x is not None:  # allocated on the decode stream, used on this one
                        item.x.record_stream(current)
                yield item
        finally:
            stop.set()
            thread.join()

    def _launch(self, fl: _Inflight) -> _Inflight:
        """Run the model on a prepared batch. On CUDA nothing here waits for the GPU:
        results are copied to pinned memory asynchronously and read by :meth:`_finish`
        one batch later."""
        if fl.x is None:
            return fl
        x, fl.x = fl.x, None
        assert fl.clock is not None
        fl.clock.mark()
        # cuDNN autotuning for this model only: the flag is restored afterwards, so
        # other code in the process (training, evaluation) keeps its own setting.
        with (
            torch.inference_mode(),
            cudnn_autotune(self.cuda),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda),
        ):
            logits, feats = self.model.forward_with_features(x)
            top = torch.softmax(logits.float(), dim=1).topk(self.top_p, dim=1)
        fl.top_scores = _to_host(top.values)
        fl.top_classes = _to_host(top.indices.int())
        if self.features:
            fl.embeddings = _to_host(feats.float())
        fl.clock.mark()
        return fl

    # ------------------------------------------------------------------ results

    def _finish(self, fl: _Inflight, buffers: dict[str, _ShardBuffer], out: str) -> None:
        h2d_s = decode_s = forward_s = 0.0
        if fl.clock is not None and len(fl.clock.marks) == 5:
            h2d_s, decode_s, _queued, forward_s = fl.clock.intervals()
        if fl.meta and fl.top_classes is not None:
            classes = fl.top_classes.numpy()
            scores = fl.top_scores.numpy()
            embeddings = fl.embeddings.numpy() if fl.embeddings is not None else None
            shards = np.array([m[0] for m in fl.meta], dtype=object)
            n = len(fl.meta)
            for sid in dict.fromkeys(shards.tolist()):
                rows = np.flatnonzero(shards == sid)
                buf = buffers[sid]
                buf.positions.append(np.array([fl.meta[i][2] for i in rows], dtype=np.int64))
                buf.keys += [fl.meta[i][1] for i in rows]
                buf.classes.append(classes[rows])
                buf.scores.append(scores[rows])
                if embeddings is not None:
                    buf.embeddings.append(embeddings[rows])
                share = len(rows) / n
                buf.stats.h2d_s += h2d_s * share
                buf.stats.forward_s += forward_s * share
                buf.stats.decode_s += decode_s * share
        for row in fl.rejects:
            buffers[row["shard"]].rejects.append(row)
        for end in fl.ends:
            buf = buffers.pop(end["shard"])
            buf.stats.decode_s += end["decode_s"]
            self._write(buf, out)

    def _write(self, buf: _ShardBuffer, out: str) -> None:
        t0 = time.perf_counter()
        sid = buf.sid
        p = self.top_p
        if buf.keys:
            order = np.argsort(np.concatenate(buf.positions), kind="stable")
            keys = [buf.keys[i] for i in order]
            classes = np.concatenate(buf.classes)[order].astype(np.int32)
            scores = np.concatenate(buf.scores)[order].astype(np.float32)
        else:
            keys, classes, scores = [], np.empty((0, p), np.int32), np.empty((0, p), np.float32)
        n = len(keys)
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * p)  # p = 0: embedding nets
        shard_col = pa.array([sid] * n, pa.string())
        key_col = pa.array(keys, pa.string())
        lineage = self.lineage(sid)
        tables.write_parquet(
            tables.from_rows(buf.rejects, tables.REJECTS), rejects_url(out, sid), lineage
        )
        if self.features:
            dim = self.model.feature_dim
            emb = (
                np.concatenate(buf.embeddings)[order].astype(np.float32)
                if buf.keys
                else np.empty((0, dim), np.float32)
            )
            write_features(features_url(out, sid), key_col, shard_col, emb, lineage)
        table = pa.Table.from_arrays(
            [
                key_col,
                shard_col,
                pa.ListArray.from_arrays(offsets, pa.array(classes.reshape(-1), pa.int32())),
                pa.ListArray.from_arrays(offsets, pa.array(scores.reshape(-1), pa.float32())),
            ],
            schema=tables.PREDICTIONS,
        )
        # Predictions last: they are the commit that makes a rerun skip this shard.
        tables.write_parquet(table, predictions_url(out, sid), lineage)
        buf.stats.images = n
        buf.stats.rejects = dict(Counter(r["reason"] for r in buf.rejects))
        buf.stats.write_s += time.perf_counter() - t0

    def process(self, shard_urls: Sequence[str], out: str) -> list[InferStats]:
        """Run the teacher over a group of shards (one DataLoader for all of them) and
        publish each shard's outputs as soon as the shard is complete. Returns one
        :class:`InferStats` per input shard, in input order."""
        urls = list(dict.fromkeys(shard_urls))
        sids = {u: shard_id(u) for u in urls}
        if len(set(sids.values())) != len(urls):
            raise ValueError("two shard URLs map to the same shard id (partition/stem)")
        results: dict[str, InferStats] = {}
        todo = []
        for u in urls:
            if self.done(sids[u], out):
                results[u] = committed_stats(out, sids[u])
            else:
                todo.append(u)
        if todo:
            buffers = {sids[u]: _ShardBuffer(sids[u]) for u in todo}
            stats = {sids[u]: buffers[sids[u]].stats for u in todo}
            dataset = InferenceDataset(
                todo,
                self.transform,
                self.batch_size,
                gpu_jpeg=self.jpeg_on_device,
                max_pixels=self.max_pixels,
            )
            workers = max(0, min(self.num_workers, len(todo)))
            kwargs: dict[str, Any] = {}
            if workers:
                kwargs = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False}
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=None,
                num_workers=workers,
                pin_memory=self.cuda,
                **kwargs,
            )
            pending: _Inflight | None = None
            for prepared in self._prepared(loader):
                fl = self._launch(prepared)
                if pending is not None:
                    self._finish(pending, buffers, out)
                pending = fl
                if not self.cuda:  # nothing to overlap on CPU
                    self._finish(pending, buffers, out)
                    pending = None
            if pending is not None:
                self._finish(pending, buffers, out)
            if buffers:
                raise RuntimeError(f"shards never completed: {sorted(buffers)}")
            for u in todo:
                results[u] = stats[sids[u]]
        return [results[u] for u in urls]


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Start a device -> pinned host copy without waiting for it."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
