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
