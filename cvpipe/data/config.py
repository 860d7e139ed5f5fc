"""Parameters of the data stages."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cvpipe.core.config import Strict
from cvpipe.data.images import DEFAULT_MAX_PIXELS
from cvpipe.data.shards import DEFAULT_MAX_MEMBER_BYTES

DEFAULT_FETCH_TIMEOUT_S = 30.0


class IngestConfig(Strict):
    """Ingest an image folder tree or a manifest into one partition of shards."""

    source: str = Field(description="image folder tree or manifest (.parquet/.jsonl/.csv)")
    root: str = Field(description="output root: shards/, index/, rejects/ and plans/ go here")
    partition: str = Field(description="partition name, e.g. a date 2026-11-25 or a batch name")
    name: str = Field("shard", pattern=r"^[A-Za-z0-9_-]+$", description="shard file name prefix")
    shard_size: int = Field(10_000, ge=1, description="samples per shard")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="larger images are rejected")
    max_member_bytes: int = Field(
        DEFAULT_MAX_MEMBER_BYTES, ge=1, description="larger files are rejected (the reader's cap)"
    )
    fetch_timeout_s: float = Field(
        DEFAULT_FETCH_TIMEOUT_S,
        gt=0,
        description="an http(s) image not fetched in this time is a fetch_timeout",
    )
    verify: Literal["header", "decode"] = Field(
        "header", description="header: check structure only (fast); decode: decode every image"
    )
    manifest_encoding: str = Field("utf-8", description="text encoding of a CSV/JSONL manifest")
    coco: str | None = Field(
        None, description="a COCO annotation JSON: SOURCE is then its images folder"
    )
    box_labels: list[str] | None = Field(
        None, description="the known box labels (a box with another is dropped); None: any"
    )


class CanvasesConfig(Strict):
    """Detection demo data: real digit scans on real photo canvases, with exact boxes
    (cvpipe.data.canvases), exported and ingested into OUT/shards/<split>/."""

    out: str = Field(description="output root: canvases/ (images, manifests) and shards/")
    labeled: int = Field(200, ge=0, description="canvases with boxes, for training")
    unlabeled: int = Field(600, ge=0, description="canvases without boxes, for pseudo-boxes")
    test: int = Field(100, ge=0, description="canvases with boxes, from held-out digit scans")
    size: int = Field(160, ge=32, description="canvas side in pixels")
    min_objects: int = Field(1, ge=1, description="fewest digits on a canvas")
    max_objects: int = Field(4, ge=1, description="most digits on a canvas (1: localization)")
    min_digit_px: int = Field(22, ge=8, description="smallest digit height in pixels")
    max_digit_px: int = Field(44, ge=8, description="largest digit height in pixels")
    max_overlap: float = Field(0.2, ge=0, le=1, description="largest IoU between two digits")
    seed: int = Field(0, description="seed of everything drawn")
    shard_size: int = Field(100, ge=1, description="samples per shard at ingest")
    digits: bool = Field(
        False,
        description="also the training pool's digit scans as OUT/shards/digits/ (class "
        "labels): a backbone classifier trained on them never sees a test digit",
    )
