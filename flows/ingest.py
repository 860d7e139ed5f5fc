"""The ingest flow: a source folder or manifest -> one partition of WebDataset shards."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from cvpipe import ingest as ingest_lib
from cvpipe.config import IngestConfig
from tasks.artifacts import publish_table, summary_rows
from tasks.ingest import ingest_shard, plan_ingest
from tasks.units import run_units


def _describe(stats: ingest_lib.ShardStats) -> str:
    state = "already committed" if stats.skipped else "committed"
    return f"{stats.shard} {state}: {stats.written} written, {sum(stats.rejects.values())} rejected"


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
    plan, count = plan_ingest(config)
    logger.info("ingest %s -> %s: %d shard(s) planned", config.source, config.root, count)
    units = [{"config": config, "plan": plan, "index": i} for i in range(count)]
    stats = run_units(ingest_shard, units, what=f"ingest {config.partition}", describe=_describe)
    summary = ingest_lib.summarize(stats)
    publish_table(
        summary_rows(summary),
        key=f"ingest-summary-{config.partition}",
        description=f"Ingest of `{config.source}` into partition `{config.partition}`",
    )
    return summary
