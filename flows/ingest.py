"""The ingest flow: a source folder or manifest -> one partition of WebDataset shards."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.task_runners import ThreadPoolTaskRunner

from cvpipe.core import storage
from cvpipe.data.config import IngestConfig
from cvpipe.data.ingest import IngestStage, prepare_plan
from tasks.artifacts import publish_table, summary_rows
from tasks.stage import run_units


@task(name="plan-ingest", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def plan_ingest(config: IngestConfig) -> tuple[str, int]:
    """List the source once and publish the partition's plan (or reuse the committed one)."""
    plan, count = prepare_plan(
        config.source, config.root, config.partition, config.name, config.shard_size, config
    )
    # A killed earlier run may have left hidden temp files; nobody else writes here now.
    storage.remove_stale_temps(storage.join(config.root, "shards", config.partition))
    return plan, count


@flow(
    name="ingest",
    flow_run_name="ingest {config.partition}",
    task_runner=ThreadPoolTaskRunner(max_workers=4),
)
def ingest_flow(config: IngestConfig) -> dict[str, Any]:
    """Ingest ``config.source`` into ``{root}/shards/{partition}/{name}-NNNNNN.tar``.

    One task run per shard; committed shards are skipped, so a rerun (or a run after a
    crash) finishes the partition with exactly the shards of an uninterrupted run.
    Returns the summary (shards, samples, written, rejects by reason).
    """
    logger = get_run_logger()
    _, count = plan_ingest(config)
    logger.info("ingest %s -> %s: %d shard(s) planned", config.source, config.root, count)
    stage = IngestStage(config)
    stats = run_units(stage, what=f"ingest {config.partition}")
    summary = stage.summarize(stats)
    publish_table(
        summary_rows(summary),
        key=f"ingest-summary-{config.partition}",
        location=config.root,
        description=f"Ingest of `{config.source}` into partition `{config.partition}`",
    )
    return summary
