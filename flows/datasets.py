"""Flows that export the real datasets bundled inside installed packages."""

from __future__ import annotations

import os

from prefect import flow, get_run_logger

from cvpipe.data import datasets
from cvpipe.data.captions import write_caption_manifests
from cvpipe.data.config import CanvasesConfig, IngestConfig
from tasks.artifacts import run_name


@flow(name="export-digits", flow_run_name=run_name("export digits -> {out}"))
def export_digits_flow(
    out: str,
    size: int = 32,
    split: str | None = None,
    seed: int = 0,
    captions: bool = False,
    caption_q: float = 0.6,
) -> dict[str, int]:
    """scikit-learn's handwritten digits as PNG class folders (optionally split); with
    ``captions``, synthetic caption manifests too (cvpipe.data.captions)."""
    counts = datasets.export_digits(
        out, size=size, split=datasets.parse_split(split) if split else None, seed=seed
    )
    if captions:
        counts.update(write_caption_manifests(out, seed=seed, q=caption_q))
    get_run_logger().info("exported digits to %s: %s", out, counts)
    return counts


@flow(name="export-photos", flow_run_name=run_name("export photos -> {out}"))
def export_photos_flow(out: str, count: int = 1000, size: int = 256, seed: int = 0) -> int:
    """Random JPEG crops of scikit-learn's two sample photographs."""
    n = datasets.export_photos(out, count=count, size=size, seed=seed)
    get_run_logger().info("exported %d photo crops to %s", n, out)
    return n


@flow(name="canvases", flow_run_name=run_name("canvases -> {config.out}"))
def canvases_flow(config: CanvasesConfig) -> dict[str, dict]:
    """Digits on photo canvases (cvpipe.data.canvases) exported, then each split
    ingested through the normal ingest path into ``OUT/shards/<split>/canvases-*.tar``.
    Returns the ingest summary of each split."""
    from cvpipe.data import canvases
    from flows.ingest import ingest_flow

    c = config
    counts = canvases.export_canvases(
        c.out,
        {"labeled": c.labeled, "unlabeled": c.unlabeled, "test": c.test},
        size=c.size,
        objects=(c.min_objects, c.max_objects),
        digit_px=(c.min_digit_px, c.max_digit_px),
        max_overlap=c.max_overlap,
        seed=c.seed,
    )
    get_run_logger().info("exported canvases to %s: %s", c.out, counts)
    summaries = {
        split: ingest_flow(
            IngestConfig(source=canvases.manifest_path(c.out, split), root=c.out,
                         partition=split, name="canvases", shard_size=c.shard_size)
        )
        for split in counts
    }  # fmt: skip
    if c.digits:
        canvases.export_digit_pool(c.out, seed=c.seed)
        summaries["digits"] = ingest_flow(
            IngestConfig(source=os.path.join(c.out, "digits"), root=c.out, partition="digits",
                         name="digits", shard_size=max(c.shard_size, 500))
        )  # fmt: skip
    return summaries
