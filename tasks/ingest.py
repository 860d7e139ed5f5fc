"""Prefect tasks of the ingest stage: plan the partition, write one shard per unit."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from cvpipe import ingest, storage
from cvpipe.config import IngestConfig


@task(name="plan-ingest", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def plan_ingest(config: IngestConfig) -> tuple[str, int]:
    """List the source once and publish the partition's plan (or reuse the committed one)."""
    plan, count = ingest.prepare_plan(
        config.source, config.root, config.partition, config.name, config.shard_size, config
    )
    # A killed earlier run may have left hidden temp files; nobody else writes here now.
    storage.remove_stale_temps(storage.join(config.root, "shards", config.partition))
    return plan, count


@task(
    name="ingest-shard",
    task_run_name="ingest {config.partition}/{config.name}-{index:06d}",
    cache_policy=NONE,
    retries=2,
    retry_delay_seconds=5,
    tags=["io"],
)
def ingest_shard(config: IngestConfig, plan: str, index: int) -> ingest.ShardStats:
    """One work unit: plan row group ``index`` -> one committed shard (skipped if done)."""
    return ingest.ingest_shard(
        config.root, config.partition, config.name, index, plan, config, config.max_pixels
    )
