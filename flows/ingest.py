"""The ingest flow: a source folder or manifest -> one partition of WebDataset shards."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.task_runners import ThreadPoolTaskRunner

from cvpipe.core import storage, tables
from cvpipe.data.config import IngestConfig
from cvpipe.data.ingest import IngestStage, prepare_plan
from cvpipe.data.integrity import VerifyConfig, VerifyStage
from cvpipe.data.plan import skipped_url
from cvpipe.data.shards import unit_url
from tasks.artifacts import publish_rejects, publish_table, run_name, summary_rows
from tasks.stage import run_units


# A listing on a hung mount must not hold the flow forever (a million rows plan in ~30 s).
@task(
    name="plan-ingest", cache_policy=NONE, retries=2, retry_delay_seconds=5,
    timeout_seconds=4 * 3600,
)  # fmt: skip
def plan_ingest(config: IngestConfig) -> tuple[str, int]:
    """List the source once and publish the partition's plan (or reuse the committed one)."""
    plan, count = prepare_plan(
        config.source, config.root, config.partition, config.name, config.shard_size, config
    )
    # A killed earlier run may have left hidden temp files or open S3 uploads; only those
    # of writers that are gone (or, on S3, uploads older than a day) are removed.
    shard_dir = storage.join(config.root, "shards", config.partition)
    storage.remove_stale_temps(shard_dir)
    storage.abort_stale_uploads(shard_dir)
    return plan, count


def skipped_files(config: IngestConfig) -> int:
    """Files the folder walk did not list (hidden, not an image suffix): see the table."""
    url = skipped_url(config.root, config.partition, config.name)
    return tables.num_rows(url) if storage.is_committed(url) else 0


@flow(
    name="ingest",
    flow_run_name="ingest {config.partition}",
    task_runner=ThreadPoolTaskRunner(max_workers=4),
)
def ingest_flow(config: IngestConfig) -> dict[str, Any]:
    """Ingest ``config.source`` into ``{root}/shards/{partition}/{name}-NNNNNN.tar``.

    One task run per shard; committed shards are skipped, so a rerun (or a run after a
    crash) finishes the partition with exactly the shards of an uninterrupted run.
    Returns the summary (shards, samples, written, rejects by reason, and the files the
    folder walk skipped, listed with their reason in ``plans/{partition}/{name}.skipped.parquet``).
    """
    logger = get_run_logger()
    _, count = plan_ingest(config)
    logger.info("ingest %s -> %s: %d shard(s) planned", config.source, config.root, count)
    stage = IngestStage(config)
    stats = run_units(stage, what=f"ingest {config.partition}")
    summary = {**stage.summarize(stats), "skipped_files": skipped_files(config)}
    publish_table(
        summary_rows(summary),
        key=f"ingest-summary-{config.partition}",
        location=config.root,
        description=f"Ingest of `{config.source}` into partition `{config.partition}`",
    )
    if summary["rejected"]:
        folder = storage.join(config.root, "rejects", "ingest", config.partition)
        publish_rejects(
            [unit_url(config.root, "rejects/ingest", s.shard) for s in stats if s.rejects],
            f"ingest-rejects-{config.partition}",
            f"{summary['rejected']} file(s) of `{config.source}` rejected (the first 200; "
            f"all in `{folder}`)",
            location=config.root,
        )
        logger.warning("%d file(s) rejected: see %s", summary["rejected"], folder)
    return summary


@flow(name="retry-rejects", flow_run_name="retry-rejects {partition}")
def retry_rejects_flow(
    root: str,
    partition: str,
    reasons: list[str] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Re-ingest the retryable rejects of a finished partition (fetch timeouts, failed
    fetches, transient read errors) into an additional round of shards; committed
    shards are never rewritten. Returns the partition's accounting over all rounds."""
    from cvpipe.data import retry

    logger = get_run_logger()
    config = retry.plan_retry(root, partition, reasons or retry.RETRYABLE_REASONS, name)
    if config is None:
        logger.info("retry-rejects %s: no retryable reject", partition)
    else:
        stage = IngestStage(config)
        stats = run_units(stage, what=f"retry-rejects {partition} ({config.name})")
        logger.info("retry-rejects %s: %s", partition, stage.summarize(stats))
    summary = {
        "round": config.name if config is not None else "",
        **retry.partition_accounting(root, partition, name),
    }
    publish_table(
        summary_rows(summary),
        key=f"retry-rejects-{partition}",
        description=f"Retry of the retryable rejects of `{root}` partition `{partition}`",
        location=root,
    )
    return summary


@flow(name="verify-shards", flow_run_name=run_name("verify {config.shards}"))
def verify_flow(config: VerifyConfig) -> dict[str, Any]:
    """Check every shard (readable, sample count = its index, checksum as ingested)
    before an expensive stage; failed shards are quarantined and named in the summary,
    the others are untouched."""
    stage = VerifyStage(config)
    stats = run_units(stage, what="verify", max_failures=len(stage.units()))
    summary = stage.summarize(stats)
    if summary["failed"]:
        get_run_logger().warning("verify: %s", summary["failures"])
    publish_table(
        summary_rows(summary), "verify-summary", f"Shard checks of `{config.shards}`",
        location=str(config.shards),
    )  # fmt: skip
    return summary
