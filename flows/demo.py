"""The end-to-end demo on the bundled digits: export -> ingest every split."""

from __future__ import annotations

from typing import Any

from prefect import flow

from cvpipe import storage
from cvpipe.config import IngestConfig
from flows.datasets import export_digits_flow
from flows.ingest import ingest_flow

DEMO_SPLIT = "labeled=0.1,unlabeled=0.6,test=0.3"


@flow(name="demo", flow_run_name="demo -> {out}")
def demo_flow(out: str = "demo", shard_size: int = 100) -> dict[str, Any]:
    """Export the digits (split labeled/unlabeled/test) and ingest each split as a
    partition of ``{out}/data``. Returns the ingest summary of each split."""
    images = storage.join(out, "images")
    export_digits_flow(images, size=32, split=DEMO_SPLIT, seed=0)
    summaries = {}
    for split in ("labeled", "unlabeled", "test"):
        config = IngestConfig(
            source=storage.join(images, split),
            root=storage.join(out, "data"),
            partition=split,
            name="digits",
            shard_size=shard_size,
        )
        summaries[split] = ingest_flow(config)
    return summaries
