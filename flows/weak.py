"""Weak supervision from captions and hashtags as flows: the vocabulary (count per shard
-> merge tree -> finalize) and the word targets of a set of shards."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from cvpipe.label.config import TargetsConfig, VocabConfig
from cvpipe.label.targets import TargetsStage
from cvpipe.label.vocab import (
    VocabCountStage,
    VocabFinalizeStage,
    VocabMergeStage,
    vocab_markdown,
)
from tasks.artifacts import publish_markdown, publish_table, summary_rows
from tasks.stage import run_units


@flow(name="vocab", flow_run_name="vocab {config.out}")
def vocab_flow(config: VocabConfig) -> dict[str, Any]:
    """Count every shard's words (one task run per shard), merge the partials
    ``fan_in`` at a time, level by level, and publish the ``size`` most frequent words.
    Committed partials and merges are reused; returns the summary."""
    logger = get_run_logger()
    counting = VocabCountStage(config)
    summary = counting.summarize(run_units(counting, what="vocab count"))
    merging = VocabMergeStage(config)
    levels = merging.merge_levels()
    for level in levels:
        run_units(merging, level, what=f"vocab merge level {level[0].index}")
    facts = run_units(VocabFinalizeStage(config), what="vocab finalize")[0]
    logger.info(
        "vocab %s: %s words of %s distinct, %d merge level(s), error bound %s",
        config.out, facts["words"], facts["distinct_words"], len(levels), facts["error_bound"],
    )  # fmt: skip
    result = {**summary, **facts}
    publish_table(summary_rows(result), "vocab-summary", f"Vocabulary `{config.out}`")
    publish_markdown(vocab_markdown(config.out), "vocab", f"The head of `{config.out}`")
    return result


@flow(name="word-targets", flow_run_name="word targets {config.out}")
def targets_flow(config: TargetsConfig) -> dict[str, Any]:
    """Every shard's word targets over the vocabulary (one task run per shard)."""
    stage = TargetsStage(config)
    summary = stage.summarize(run_units(stage, what="word targets"))
    publish_table(summary_rows(summary), "word-targets-summary", f"Word targets `{config.out}`")
    return summary
