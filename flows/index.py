"""Flows of the FAISS index: build, add a partition, query every vector, dedup. Each runs
its stage's single unit through the generic stage task and publishes a summary table."""

from __future__ import annotations

from typing import Any

from prefect import flow

from cvpipe.core.stage import Stage
from cvpipe.index.config import DedupConfig, IndexAddConfig, IndexBuildConfig, QueryConfig
from cvpipe.index.stages import DedupStage, IndexAddStage, IndexBuildStage, QueryStage
from tasks.artifacts import publish_table, run_name, summary_rows
from tasks.stage import run_units


def _run(stage: Stage, key: str, description: str) -> dict[str, Any]:
    summary = stage.summarize(run_units(stage))
    where = getattr(stage.config, "out", None) or getattr(stage.config, "index", None)
    publish_table(summary_rows(summary), key=key, description=description, location=str(where))
    return summary


@flow(name="index-build", flow_run_name=run_name("index build {config.out}"))
def index_build_flow(config: IndexBuildConfig) -> dict[str, Any]:
    """The index of every vector of ``config.embeddings`` (skipped when committed)."""
    return _run(IndexBuildStage(config), f"index-build-{config.out}",
                f"FAISS index `{config.out}` of `{config.embeddings}`")  # fmt: skip


@flow(name="index-add", flow_run_name=run_name("index add {config.index}"))
def index_add_flow(config: IndexAddConfig) -> dict[str, Any]:
    """A new embeddings set appended to a built index (no retraining)."""
    return _run(IndexAddStage(config), f"index-add-{config.index}",
                f"`{config.embeddings}` added to `{config.index}`")  # fmt: skip


@flow(name="index-query", flow_run_name=run_name("index query {config.out}"))
def index_query_flow(config: QueryConfig) -> dict[str, Any]:
    """The neighbours Parquet of every vector of ``config.embeddings``."""
    return _run(QueryStage(config), f"index-query-{config.out}",
                f"{config.k} neighbours of `{config.embeddings}` in `{config.index}`")  # fmt: skip


@flow(name="dedup", flow_run_name=run_name("dedup {config.out}"))
def dedup_flow(config: DedupConfig) -> dict[str, Any]:
    """Keys whose earlier-added neighbour is closer than ``config.threshold``."""
    return _run(DedupStage(config), f"dedup-{config.out}",
                f"near-duplicates in `{config.index}` below {config.threshold}")  # fmt: skip
