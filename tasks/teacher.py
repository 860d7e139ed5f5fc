"""Prefect tasks of the teacher stages: inference, top-K selection, materialize."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from cvpipe import models
from cvpipe.infer import teacher as inference
from cvpipe.infer.config import InferConfig
from cvpipe.label import materialize, selection


@task(
    name="infer-shards",
    task_run_name="infer {shard_urls[0]} (+{extra})",
    cache_policy=NONE,
    retries=2,
    retry_delay_seconds=10,
    tags=["gpu"],  # `prefect concurrency-limit create gpu N`: N teachers per GPU host
)
def infer_shards(
    shard_urls: list[str], config: InferConfig, extra: int = 0
) -> list[inference.InferStats]:
    """One unit: a group of shards through one DataLoader. The teacher is loaded once per
    worker process (cached by checkpoint), not once per task."""
    with models.cpu_threads(config.cpu_threads):
        return inference.infer_shards(
            shard_urls,
            config.checkpoint,
            config.out,
            top_p=config.top_p,
            features=config.features,
            batch_size=config.batch_size,
            device=config.device,
            num_workers=config.num_workers,
        )


@task(
    name="select-partial",
    task_run_name="top-k partial {predictions_url}",
    cache_policy=NONE,
    retries=2,
    retry_delay_seconds=5,
)
def select_partial(predictions_url: str, top_p: int, top_k: int, out: str) -> str:
    return selection.partial_unit(predictions_url, top_p, top_k, out)


@task(
    name="select-merge",
    task_run_name="top-k merge -> {out_url}",
    cache_policy=NONE,
    retries=2,
    retry_delay_seconds=5,
)
def select_merge(part_urls: list[str], out_url: str) -> str:
    return selection.merge_unit(part_urls, out_url)


@task(name="select-finalize", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def select_finalize(topk_url: str, out: str) -> dict[str, Any]:
    return selection.finalize_unit(topk_url, out)


@task(
    name="materialize-shard",
    task_run_name="materialize {shard_url}",
    cache_policy=NONE,
    retries=2,
    retry_delay_seconds=5,
    tags=["io"],
)
def materialize_shard(
    selection_url: str, shard_url: str, out: str, checkpoint: str | None
) -> materialize.MaterializeStats:
    return materialize.materialize_shard(selection_url, shard_url, out, checkpoint)
