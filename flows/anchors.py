"""Anchor stages as flows: build named anchors, then label an unlabeled set by its
distances to them (Nearest-N, CFA, Uniform, Random, Vanilla)."""

from __future__ import annotations

import posixpath
from typing import Any

from prefect import flow, get_run_logger

from cvpipe import models
from cvpipe.core import storage
from cvpipe.data import shards
from cvpipe.infer.config import InferConfig
from cvpipe.label import anchors
from cvpipe.label.config import AnchorsConfig, LabelConfig
from flows.teacher import infer_flow
from tasks.anchors import anchor_merge, anchor_partial, count_sequences, label_file, uniform_rule
from tasks.artifacts import publish_table
from tasks.units import run_units


def _work_dir(config: AnchorsConfig) -> str:
    if config.work:
        return config.work
    parent = posixpath.dirname(config.out.rstrip("/")) or "."
    stem = posixpath.basename(config.out).rsplit(".", 1)[0]
    return storage.join(parent, f"{stem}_work")


@flow(name="anchors-build", flow_run_name="anchors -> {config.out}")
def anchors_build_flow(config: AnchorsConfig) -> list[dict[str, Any]]:
    """Features of each named anchor dataset (teacher inference with --features), partial
    sums per features file, merged into the anchors table. Returns (anchor, count) rows."""
    work = _work_dir(config)
    parts: list[dict[str, Any]] = []
    for name, spec in sorted(config.sources.items()):
        infer_out = storage.join(work, "features", name)
        infer_flow(
            InferConfig(
                shards=spec,
                checkpoint=config.checkpoint,
                out=infer_out,
                top_p=1,
                features=True,
                batch_size=config.batch_size,
                device=config.device,
                num_workers=config.num_workers,
                cpu_threads=config.cpu_threads,
            )
        )
        for url in storage.expand_urls(storage.join(infer_out, "features"), ".parquet"):
            sid = shards.shard_id(url)
            parts.append(
                {
                    "features_url": url,
                    "anchor": name,
                    "out_url": shards.unit_url(work, f"partials/{name}", sid),
                    "kind": config.kind,
                    "checkpoint": config.checkpoint,
                }
            )
    part_urls = run_units(anchor_partial, parts, what="anchor partial sums")
    lineage = {
        "model_id": models.model_id(config.checkpoint),
        "checkpoint": config.checkpoint,
        "kind": config.kind,
        "sources": config.sources,
    }
    anchor_merge(part_urls, config.out, lineage)
    names, _, counts = anchors.read_anchors(config.out)
    rows = [{"anchor": n, "count": int(c)} for n, c in zip(names, counts, strict=True)]
    publish_table(rows, "anchors", f"Anchors ({config.kind}) in `{config.out}`")
    return rows


@flow(name="label", flow_run_name="label {config.method} ({config.metric})")
def label_flow(config: LabelConfig) -> dict[str, Any]:
    """Pseudo-label every features file; Uniform first counts Nearest-3 sequences over
    the whole set (map + merge) and freezes its rule. Returns the label statistics."""
    logger = get_run_logger()
    urls = storage.expand_urls(config.features, ".parquet")
    names, _, _ = anchors.read_anchors(config.anchors)
    n_labels = config.n_labels or len(names)
    rule_url = None
    if config.method == "uniform":
        rule_url = storage.join(config.out, "_uniform_rule.parquet")
        if not storage.is_committed(rule_url):
            counts = run_units(
                count_sequences,
                [{"features_url": u, "config": config} for u in urls],
                what="nearest-3 sequence counts",
            )
            uniform_rule(counts, n_labels, rule_url)
    if config.method == "vanilla" and not config.truth:
        raise ValueError("method vanilla needs --truth: the ingest root holding index/")
    units = [
        {
            "features_url": u,
            "config": config,
            "n_labels": n_labels,
            "rule_url": rule_url,
            "truth_url": shards.unit_url(config.truth, "index", shards.shard_id(u))
            if config.truth
            else None,
        }
        for u in urls
    ]
    results = run_units(label_file, units, what=f"label {config.method}")
    counts = anchors.merge_counts(anchors.label_counts(r["out"]) for r in results)
    stats = {
        "method": config.method,
        "metric": config.metric,
        "files": len(results),
        **anchors.label_stats(counts),
    }
    logger.info("labels: %s", stats)
    publish_table([stats], f"labels-{config.method}", f"Anchor labels in `{config.out}`")
    return stats
