"""Parameters of the data stages."""

from __future__ import annotations

from pydantic import Field

from cvpipe.core.config import Strict
from cvpipe.data.images import DEFAULT_MAX_PIXELS


class IngestConfig(Strict):
    """Ingest an image folder tree or a manifest into one partition of shards."""

    source: str = Field(description="image folder tree or manifest (.parquet/.jsonl/.csv)")
    root: str = Field(description="output root: shards/, index/, rejects/ and plans/ go here")
    partition: str = Field(description="partition name, e.g. a date 2026-11-25 or a batch name")
    name: str = Field("shard", pattern=r"^[A-Za-z0-9_-]+$", description="shard file name prefix")
    shard_size: int = Field(10_000, ge=1, description="samples per shard")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="larger images are rejected")
