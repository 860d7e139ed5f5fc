"""Prefect tasks of the anchor stages: per-file partial sums, labels, sequence counts."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from cvpipe.label import anchors, materialize
from cvpipe.label.config import LabelConfig

RETRY = {"cache_policy": NONE, "retries": 2, "retry_delay_seconds": 5}


@task(name="anchor-partial", task_run_name="anchor {anchor}: {features_url}", **RETRY)
def anchor_partial(
    features_url: str, anchor: str, out_url: str, kind: str, checkpoint: str | None
) -> str:
    return anchors.anchor_partial_file(features_url, anchor, out_url, kind, checkpoint)


@task(name="anchor-merge", **RETRY)
def anchor_merge(part_urls: list[str], out_url: str, lineage: dict[str, Any]) -> str:
    anchors.write_anchors(anchors.merge_anchor_files(part_urls), out_url, lineage)
    return out_url


@task(name="count-sequences", task_run_name="nearest-3 counts {features_url}", **RETRY)
def count_sequences(features_url: str, config: LabelConfig) -> dict[str, int]:
    return anchors.count_sequences_file(
        features_url,
        config.anchors,
        metric=config.metric,
        kl_direction=config.kl_direction,
        eps=config.eps,
        checkpoint=config.checkpoint,
    )


@task(name="uniform-rule", **RETRY)
def uniform_rule(parts: list[dict[str, int]], n_labels: int, url: str) -> str:
    anchors.write_uniform_rule(anchors.merge_counts(parts), n_labels, url)
    return url


@task(name="label-file", task_run_name="label {features_url}", **RETRY)
def label_file(
    features_url: str,
    config: LabelConfig,
    n_labels: int,
    rule_url: str | None,
    truth_url: str | None,
) -> dict[str, Any]:
    return anchors.label_file(
        features_url,
        config.anchors,
        anchors.labels_url(config.out, features_url),
        config.method,
        n=config.n,
        metric=config.metric,
        ordered=config.ordered,
        rule_url=rule_url,
        n_labels=n_labels,
        seed=config.seed,
        truth_url=truth_url,
        kl_direction=config.kl_direction,
        eps=config.eps,
        checkpoint=config.checkpoint,
    )


@task(name="relabel-shard", task_run_name="relabel {shard_url}", tags=["io"], **RETRY)
def relabel_shard(labels_url: str, shard_url: str, out: str) -> materialize.MaterializeStats:
    return materialize.relabel_shard(labels_url, shard_url, out)
