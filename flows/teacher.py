"""Teacher stages as flows: infer over shards -> top-K selection -> materialize.

Selection is a map-reduce: one partial top-K per predictions file (map), merged
``fan_in`` at a time in a tree (reduce), then finalized into the selection table and
its report. Memory per task is O(classes x K) whatever the corpus size.
"""

from __future__ import annotations

import hashlib
from typing import Any

from prefect import flow, get_run_logger

from cvpipe.core import storage
from cvpipe.infer import teacher as inference
from cvpipe.infer.config import InferConfig
from cvpipe.label import selection
from cvpipe.label.config import MaterializeConfig, SelectConfig
from tasks.artifacts import publish_markdown, publish_table, summary_rows
from tasks.teacher import (
    infer_shards,
    materialize_shard,
    select_finalize,
    select_merge,
    select_partial,
)
from tasks.units import run_units


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _describe_infer(stats: list[inference.InferStats]) -> str:
    return ", ".join(f"{s.shard}: {s.images} img" for s in stats)


@flow(name="infer", flow_run_name="infer {config.shards}")
def infer_flow(config: InferConfig) -> dict[str, Any]:
    """Top-P predictions (and features) for every shard; committed shards are skipped."""
    urls = storage.expand_specs(config.shards, ".tar")
    groups = _chunks(urls, config.shards_per_unit)
    get_run_logger().info(
        "infer %d shard(s) in %d unit(s) with %s", len(urls), len(groups), config.checkpoint
    )
    units = [{"shard_urls": g, "config": config, "extra": len(g) - 1} for g in groups]
    results = run_units(
        infer_shards,
        units,
        what="infer",
        max_in_flight=config.parallel_units,
        describe=_describe_infer,
    )
    summary = inference.summarize([s for group in results for s in group])
    publish_table(summary_rows(summary), "infer-summary", f"Teacher inference into `{config.out}`")
    return summary


def predictions_of(spec: str | list[str]) -> list[str]:
    """Predictions files of a spec; an inference OUT folder means its predictions/ part
    (not its features/ or rejects/)."""
    if not isinstance(spec, str):
        return storage.expand_specs(spec, ".parquet")
    inner = storage.join(spec, "predictions")
    fs, path = storage.url_to_fs(inner)
    if fs.isdir(path):
        spec = inner
    return storage.expand_urls(spec, ".parquet")


def _merge_url(out: str, level: int, inputs: list[str]) -> str:
    # Named by its inputs: a rerun over the same predictions reuses committed merges,
    # and a run over other predictions can never pick up a stale one.
    digest = hashlib.sha1("\n".join(inputs).encode()).hexdigest()[:16]
    return storage.join(out, "selection_parts", f"merge-{level}", f"{digest}.parquet")


@flow(name="select", flow_run_name="select top-{config.top_k} (P={config.top_p})")
def select_flow(config: SelectConfig) -> dict[str, Any]:
    """Top-K images per class: partials per predictions file, a merge tree, the table."""
    logger = get_run_logger()
    if storage.is_committed(selection.selection_url(config.out)) and storage.is_committed(
        selection.report_url(config.out)
    ):
        logger.info("selection in %s is committed: nothing to do", config.out)
        return selection.read_report(config.out)
    urls = predictions_of(config.predictions)
    logger.info("select top-%d per class from %d predictions file(s)", config.top_k, len(urls))
    units = [
        {"predictions_url": u, "top_p": config.top_p, "top_k": config.top_k, "out": config.out}
        for u in urls
    ]
    parts = run_units(select_partial, units, what="top-k partials")
    level = 0
    while len(parts) > 1:
        groups = _chunks(parts, config.fan_in)
        merges = [{"part_urls": g, "out_url": _merge_url(config.out, level, g)} for g in groups]
        parts = run_units(select_merge, merges, what=f"top-k merge level {level}")
        level += 1
    report = select_finalize(parts[0], config.out)
    publish_markdown(
        storage.read_bytes(selection.report_md_url(config.out)).decode(),
        "selection-report",
        f"Top-{config.top_k} per class (P={config.top_p}) into `{config.out}`",
    )
    return report


@flow(name="materialize", flow_run_name="materialize {config.selection}")
def materialize_flow(config: MaterializeConfig) -> dict[str, Any]:
    """The selected images as shards, replicated once per selected class."""
    urls = storage.expand_specs(config.shards, ".tar")
    units = [
        {
            "selection_url": config.selection,
            "shard_url": u,
            "out": config.out,
            "checkpoint": config.checkpoint,
        }
        for u in urls
    ]
    stats = run_units(materialize_shard, units, what="materialize")
    summary = {
        "shards": len(stats),
        "shards_skipped": sum(s.skipped for s in stats),
        **{k: sum(getattr(s, k) for s in stats) for k in ("selected", "images", "written")},
        "missing": sum(s.missing for s in stats),
    }
    if summary["missing"]:
        get_run_logger().warning(
            "%d selected sample(s) were not found in their shards", summary["missing"]
        )
    publish_table(summary_rows(summary), "materialize-summary", f"Student shards in `{config.out}`")
    return summary
