"""The DataLoader worker side of teacher inference: whole shards in, batches out.

Each worker reads whole shards (:meth:`ShardDataset.worker_shards`), decodes and
preprocesses images on the host, or passes baseline JPEG bytes through undecoded for the
device decoder (nvjpeg on CUDA), and assembles batches. A batch carries one end marker
per shard whose last sample it holds, so the main process (:mod:`cvpipe.infer.teacher`)
knows when a shard is complete and can publish it.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image

from cvpipe.data import images
from cvpipe.data.loader import ShardDataset
from cvpipe.data.shards import Reject, Sample, iter_shard, shard_id

STAGE = "infer"
_JPEG_EXTS = ("jpg", "jpeg")
_EXIF_ORIENTATION = 0x0112


def jpeg_for_gpu(data: bytes, max_pixels: int) -> bool:
    """True when nvjpeg can take these bytes as they are: a complete baseline JPEG with
    1 (gray) or 3 (YCbCr) components within the pixel cap and with no EXIF rotation
    (nvjpeg ignores EXIF). Everything else (progressive, CMYK, rotated, PNG, WebP) is
    decoded on the host. Raises :class:`images.RejectedImage` for a bad image (the
    same checks as ingest). The frame header decides; Pillow is only asked about EXIF
    when the file carries an EXIF block."""
    header = images.inspect(data, max_pixels)
    if header.format != "JPEG" or header.components not in (1, 3) or header.progressive:
        return False
    if header.exif:
        try:
            orientation = Image.open(io.BytesIO(data)).getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # a broken EXIF block: let the host decoder decide
            return False
        if orientation != 1:
            return False
    return True


class _Batch:
    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []
        self.image_meta: list[tuple[str, str, int]] = []  # (shard, key, position in shard)
        self.jpegs: list[bytes] = []
        self.jpeg_meta: list[tuple[str, str, int]] = []
        self.rejects: list[dict[str, str]] = []
        self.ends: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.images) + len(self.jpegs)

    def empty(self) -> bool:
        return not (len(self) or self.rejects or self.ends)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": torch.stack(self.images) if self.images else torch.empty(0),
            "image_meta": self.image_meta,
            # One buffer for all JPEGs of the batch: a DataLoader worker hands each
            # tensor to the main process through its own shared-memory segment, and
            # 256 small segments per batch cost more than decoding them (0.18x of the
            # bare forward on an H100 before, with nvjpeg at 20k img/s).
            "jpegs": torch.frombuffer(bytearray(b"".join(self.jpegs)), dtype=torch.uint8)
            if self.jpegs
            else torch.empty(0, dtype=torch.uint8),
            "jpeg_sizes": [len(j) for j in self.jpegs],
            "jpeg_meta": self.jpeg_meta,
            "rejects": self.rejects,
            "ends": self.ends,
        }


class InferenceDataset(ShardDataset):
    """Batches for inference, assembled in the worker: ``{images, image_meta, jpegs,
    jpeg_meta, rejects, ends}``. Each worker reads whole shards in order (the split of
    :class:`ShardDataset`); ``ends`` carries one marker per shard, in the batch holding
    that shard's last sample, so the consumer knows when a shard is complete. With
    ``gpu_jpeg`` JPEG bytes are passed through undecoded for nvjpeg; every other image
    is decoded and preprocessed here."""

    def __init__(
        self,
        urls: Sequence[str],
        transform: Any,
        batch_size: int,
        *,
        gpu_jpeg: bool = False,
        max_pixels: int = images.DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(urls, transform, stage=STAGE, max_pixels=max_pixels)
        self.batch_size = batch_size
        self.gpu_jpeg = gpu_jpeg

    def _add(self, s: Sample, sid: str, position: int, batch: _Batch) -> None:
        try:
            if self.gpu_jpeg and s.ext in _JPEG_EXTS and jpeg_for_gpu(s.data, self.max_pixels):
                batch.jpegs.append(s.data)
                batch.jpeg_meta.append((sid, s.key, position))
                return
            image = self.transform(images.decode(s.data, self.max_pixels))
        except images.RejectedImage as e:
            batch.rejects.append(Reject(s.key, sid, STAGE, e.reason, e.detail).row())
            return
        batch.images.append(image)
        batch.image_meta.append((sid, s.key, position))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        urls = self.worker_shards()
        batch = _Batch()
        for url in urls:
            sid = shard_id(url)
            spent, position = 0.0, 0
            t0 = time.perf_counter()
            for item in iter_shard(url, stage=STAGE, decode=False, max_pixels=self.max_pixels):
                if isinstance(item, Reject):
                    batch.rejects.append(item.row())
                else:
                    self._add(item, sid, position, batch)
                    position += 1
                if len(batch) >= self.batch_size:
                    spent += time.perf_counter() - t0
                    yield batch.to_dict()
                    batch = _Batch()
                    t0 = time.perf_counter()
            spent += time.perf_counter() - t0
            # The end marker rides with this shard's last samples (or the next shard's
            # first ones): the consumer flushes the shard after handling that batch.
            batch.ends.append({"shard": sid, "decode_s": spent})
        if not batch.empty():
            yield batch.to_dict()
