"""Teacher stages as flows: infer over shards -> top-K selection -> materialize.

Every unit runs through the one generic task (tasks/stage.py ``run_units``). Selection
is a map-reduce: one partial top-K per predictions file (map), merged ``fan_in`` at a
time in a tree (reduce, one ``run_units`` per level), then finalized into the selection
table and its report. Memory per task is O(classes x K) whatever the corpus size.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from cvpipe.core import storage
from cvpipe.infer.config import InferConfig
from cvpipe.infer.stage import InferStage
from cvpipe.infer.teacher import rejects_url
from cvpipe.label import selection
from cvpipe.label.config import MaterializeConfig, SelectConfig
from cvpipe.label.materialize import MaterializeStage
from cvpipe.label.selection import SelectFinalizeStage, SelectMergeStage, SelectPartialStage
from tasks.artifacts import publish_markdown, publish_rejects, publish_table, run_name, summary_rows
from tasks.stage import run_units


@flow(name="infer", flow_run_name=run_name("infer {config.shards} -> {config.out}"))
def infer_flow(config: InferConfig) -> dict[str, Any]:
    """Top-P predictions (and features) for every shard; committed shards are skipped."""
    stage = InferStage(config)
    units = stage.units()
    get_run_logger().info(
        "infer %d shard(s) in %d unit(s) with %s",
        sum(len(u.inputs) for u in units),
        len(units),
        config.checkpoint,
    )
    stats = run_units(stage, units, what="infer", max_in_flight=config.parallel_units)
    summary = stage.summarize(stats)
    publish_table(
        summary_rows(summary), "infer-summary", f"Teacher inference into `{config.out}`",
        location=config.out,
    )  # fmt: skip
    if summary.get("rejected"):
        publish_rejects(
            [rejects_url(config.out, s.shard) for unit in stats for s in unit if s.rejects],
            "infer-rejects",
            f"{summary['rejected']} image(s) rejected by teacher inference (the first 200)",
            location=config.out,
        )
    return summary


@flow(name="select", flow_run_name="select top-{config.top_k} (P={config.top_p})")
def select_flow(config: SelectConfig) -> dict[str, Any]:
    """Top-K images per class: partials per predictions file, a merge tree, the table."""
    logger = get_run_logger()
    finalize = SelectFinalizeStage(config)
    if finalize.done():
        logger.info("selection in %s is committed: nothing to do", config.out)
        return selection.read_report(config.out)
    partials = SelectPartialStage(config)
    units = partials.units()
    if not units:
        raise ValueError(f"no predictions files to select from in {config.predictions}")
    logger.info("select top-%d per class from %d predictions file(s)", config.top_k, len(units))
    run_units(partials, units, what="top-k partials")
    merges = SelectMergeStage(config)
    for level, level_units in enumerate(merges.levels()):
        run_units(merges, level_units, what=f"top-k merge level {level}")
    [report] = run_units(finalize, what="top-k finalize")
    publish_markdown(
        storage.read_bytes(selection.report_md_url(config.out)).decode(),
        "selection-report",
        f"Top-{config.top_k} per class (P={config.top_p}) into `{config.out}`",
        location=config.out,
    )
    return report


@flow(name="materialize", flow_run_name=run_name("materialize -> {config.out}"))
def materialize_flow(config: MaterializeConfig) -> dict[str, Any]:
    """The selected images as shards, replicated once per selected class."""
    stage = MaterializeStage(config)
    summary = stage.summarize(run_units(stage, what="materialize"))
    if summary["missing"]:
        get_run_logger().warning(
            "%d selected sample(s) were not found in their shards", summary["missing"]
        )
    publish_table(
        summary_rows(summary), "materialize-summary", f"Student shards in `{config.out}`",
        location=config.out,
    )  # fmt: skip
    return summary
