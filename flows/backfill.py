"""Backfill: ingest every daily partition of a date range, as one flow run.

The source of each day is a URL pattern with ``{partition}`` in it, e.g.
``s3://incoming/{partition}/manifest.parquet``. Days already committed are skipped shard
by shard, so a backfill over a half-done range finishes it with nothing twice.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow, get_run_logger

from cvpipe.data.config import IngestConfig
from flows.ingest import ingest_flow
from tasks.artifacts import publish_table, run_name


def date_partitions(start: dt.date, end: dt.date) -> list[str]:
    if end < start:
        raise ValueError(f"backfill end {end} is before its start {start}")
    return [(start + dt.timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


@flow(name="backfill-ingest", flow_run_name="backfill {start}..{end}")
def backfill_flow(
    source_pattern: str,
    root: str,
    start: dt.date,
    end: dt.date,
    name: str = "shard",
    shard_size: int = 10_000,
) -> dict[str, Any]:
    """Ingest ``source_pattern.format(partition=day)`` into partition ``day`` for every
    day from ``start`` to ``end`` inclusive. Returns each day's ingest summary."""
    if "{partition}" not in source_pattern:
        raise ValueError("source_pattern must contain {partition}, e.g. /data/{partition}")
    logger = get_run_logger()
    summaries: dict[str, Any] = {}
    for day in date_partitions(start, end):
        config = IngestConfig(
            source=source_pattern.format(partition=day),
            root=root,
            partition=day,
            name=name,
            shard_size=shard_size,
        )
        summaries[day] = ingest_flow(config)
        logger.info("backfill: %s done (%d samples)", day, summaries[day]["samples"])
    publish_table(
        [
            {"partition": d, **{k: v for k, v in s.items() if k != "rejects_by_reason"}}
            for d, s in summaries.items()
        ],
        key=f"backfill-{start}-{end}",
        description=f"Backfill of `{source_pattern}` from {start} to {end}",
        location=root,
    )
    return summaries


@flow(name="daily-ingest", flow_run_name=run_name("daily ingest -> {root}"))
def daily_ingest_flow(
    source_pattern: str,
    root: str,
    days_ago: int = 1,
    name: str = "shard",
    shard_size: int = 10_000,
) -> dict[str, Any]:
    """The scheduled run: ingest the partition of the day ``days_ago`` before the run's
    scheduled time (so a late or retried run still ingests the day it was meant for)."""
    from prefect.runtime import flow_run

    scheduled = flow_run.scheduled_start_time
    today = scheduled.date() if scheduled else dt.datetime.now(dt.timezone.utc).date()
    day = today - dt.timedelta(days=days_ago)
    return backfill_flow(source_pattern, root, day, day, name=name, shard_size=shard_size)
