"""Anchor stages as flows: build named anchors, then label an unlabeled set by its
distances to them (Nearest-N, CFA, Uniform, Random, Vanilla).

Each phase is a stage (cvpipe/label/anchor_stages.py) run through the one generic task;
phases hand each other URLs: features -> partial sums -> anchors; for Uniform,
features -> sequence counts -> the frozen rule -> labels.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from cvpipe.infer.config import InferConfig
from cvpipe.label.anchor_stages import (
    AnchorMergeStage,
    AnchorSumsStage,
    LabelStage,
    UniformCountsStage,
    UniformRuleStage,
    anchor_features_dir,
)
from cvpipe.label.config import AnchorsConfig, LabelConfig
from flows.teacher import infer_flow
from tasks.artifacts import publish_table, run_name
from tasks.stage import run_units


@flow(name="anchors-build", flow_run_name=run_name("anchors -> {config.out}"))
def anchors_build_flow(config: AnchorsConfig) -> list[dict[str, Any]]:
    """Features of each named anchor dataset (teacher inference with --features), partial
    sums per features file, merged into the anchors table. Returns (anchor, count) rows."""
    for name, spec in sorted(config.sources.items()):
        infer_flow(
            InferConfig(
                shards=spec,
                checkpoint=config.checkpoint,
                out=anchor_features_dir(config, name),
                top_p=1,
                features=True,
                batch_size=config.batch_size,
                device=config.device,
                num_workers=config.num_workers,
                cpu_threads=config.cpu_threads,
            )
        )
    run_units(AnchorSumsStage(config), what="anchor partial sums")
    (merged,) = run_units(AnchorMergeStage(config), what="anchor merge")
    rows = [{"anchor": n, "count": c} for n, c in merged.counts.items()]
    publish_table(
        rows, "anchors", f"Anchors ({config.kind}) in `{config.out}`", location=config.out
    )
    return rows


@flow(
    name="label", flow_run_name=run_name("label {config.method} ({config.metric}) -> {config.out}")
)
def label_flow(config: LabelConfig) -> dict[str, Any]:
    """Pseudo-label every features file; Uniform first counts Nearest-3 sequences over
    the whole set (map + merge) and freezes its rule. Returns the label statistics."""
    if config.method == "uniform":
        run_units(UniformCountsStage(config), what="nearest-3 sequence counts")
        run_units(UniformRuleStage(config), what="uniform rule")
    stage = LabelStage(config)
    stats = stage.summarize(run_units(stage, what=f"label {config.method}"))
    get_run_logger().info("labels: %s", stats)
    publish_table(
        [stats], f"labels-{config.method}", f"Anchor labels in `{config.out}`", location=config.out
    )
    return stats
