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
from tasks.artifacts import publish_table


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


def _ingest_run_name() -> str:
    from prefect.runtime import flow_run

    return f"ingest {_run_partition(flow_run.parameters, flow_run.scheduled_start_time)}"


@flow(name="daily-ingest", flow_run_name=_ingest_run_name)
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

    day = dt.date.fromisoformat(partition_of(flow_run.scheduled_start_time, days_ago))
    return backfill_flow(source_pattern, root, day, day, name=name, shard_size=shard_size)


# ------------------------------------------------------------- the pipeline, per partition


def partition_of(scheduled: dt.datetime | None, days_ago: int = 1) -> str:
    """The partition a scheduled run processes: the day ``days_ago`` before its
    scheduled time (UTC), so a late or retried run still takes the day it was meant for."""
    when = scheduled or dt.datetime.now(dt.timezone.utc)
    return (when.astimezone(dt.timezone.utc).date() - dt.timedelta(days=days_ago)).isoformat()


def _run_partition(parameters: dict[str, Any], scheduled: dt.datetime | None) -> str:
    return parameters.get("partition") or partition_of(scheduled, parameters.get("days_ago", 1))


def _pipeline_run_name() -> str:
    from prefect.runtime import flow_run

    return f"pipeline {_run_partition(flow_run.parameters, flow_run.scheduled_start_time)}"


def load_pipeline_config(config_url: str, **overrides: Any) -> Any:
    """A PipelineConfig from a YAML file (a local path or any fsspec URL)."""
    import yaml

    from cvpipe.core.storage import read_bytes
    from flows.pipeline_config import PipelineConfig

    raw = yaml.safe_load(read_bytes(config_url)) or {}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return PipelineConfig.model_validate(raw)


@flow(name="pipeline-partition", flow_run_name=_pipeline_run_name)
def partition_pipeline_flow(
    config_url: str,
    partition: str | None = None,
    days_ago: int = 1,
    stages: list[str] | None = None,
    root: str | None = None,
) -> dict[str, Any]:
    """The pipeline for one partition, as a deployment runs it: the partition is given
    (a backfill) or derived from the run's scheduled time (the daily schedule). The run
    is named after its partition."""
    from prefect.runtime import flow_run

    from flows.pipeline import pipeline_flow

    day = partition or partition_of(flow_run.scheduled_start_time, days_ago)
    config = load_pipeline_config(config_url, partition=day, root=root)
    return pipeline_flow(config, stages)


# ------------------------------------------------------------- backfill through the API

_ACTIVE = {"SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "PAUSED", "CANCELLING"}


def backfill_deployment(
    deployment: str,
    start: dt.date,
    end: dt.date,
    stages: list[str] | None = None,
    extra_parameters: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One flow run per partition of ``deployment`` (``FLOW/DEPLOYMENT``), created
    through the API and named after its partition; the deployment's concurrency limit
    bounds how many run at once. A partition that already has a scheduled, running or
    completed run is left alone, so rerunning a half-done backfill creates runs only
    for the partitions that failed or never ran (idempotency keys make a retried call
    of this function create nothing twice)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterTags,
    )
    from prefect.deployments import run_deployment

    rows = []
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        for day in date_partitions(start, end):
            tag = f"partition:{day}"
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])),
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
            )
            live = [r for r in runs if r.state and r.state.type.value in _ACTIVE]
            if live:
                rows.append({"partition": day, "flow_run": live[0].name,
                             "state": live[0].state.type.value, "created": False})  # fmt: skip
                continue
            attempt = len(runs)  # earlier runs of this partition that failed or crashed
            run = run_deployment(
                deployment,
                parameters={**(extra_parameters or {}), "partition": day, "stages": stages},
                scheduled_time=dt.datetime.combine(
                    dt.date.fromisoformat(day) + dt.timedelta(days=1), dt.time(),
                    tzinfo=dt.timezone.utc,
                ),
                flow_run_name=f"pipeline {day}",
                tags=[tag, "backfill"],
                idempotency_key=f"{deployment}/{day}/{','.join(stages or [])}/{attempt}",
                timeout=0,
            )  # fmt: skip
            state = run.state.type.value if run.state else ""
            rows.append({"partition": day, "flow_run": run.name, "state": state, "created": True})
    return rows


@flow(name="backfill-pipeline", flow_run_name="backfill {start}..{end}")
def backfill_pipeline_flow(
    config_url: str,
    start: dt.date,
    end: dt.date,
    stages: list[str] | None = None,
    root: str | None = None,
) -> dict[str, Any]:
    """The embedded default (no server, no deployment): every partition of the range
    runs here, one after the other; committed work is skipped."""
    from flows.pipeline import pipeline_flow

    out = {}
    for day in date_partitions(start, end):
        config = load_pipeline_config(config_url, partition=day, root=root)
        out[day] = pipeline_flow(config, stages)
    return out
