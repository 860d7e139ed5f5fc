"""Learning to transfer as flows: P2L-style source ranking and shallow learners on
frozen features (the whole study is flows/transfer_study.py).

- :func:`p2l_flow`: one forward pass of the target set through the reference model and
  the candidates' summaries in the same space (both through the anchors stage, the
  candidates' cached while their shards, reference and kind stay the same), then the
  ranking ``OUT/ranking.parquet`` (tables.P2L_RANKING) and a table artifact.
- :func:`shallow_flow`: a linear SVM or logistic regression on features of any
  checkpoint's penultimate layer, ``OUT/shallow.parquet`` (tables.SHALLOW).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from typing import Any

from prefect import flow, get_run_logger

from cvpipe import models
from cvpipe.core import storage, tables
from cvpipe.label import p2l
from cvpipe.label.config import AnchorsConfig, P2LConfig
from cvpipe.learn.config import ShallowConfig
from cvpipe.learn.shallow import ShallowStage
from flows.anchors import anchors_build_flow
from tasks.artifacts import publish_table, run_name
from tasks.stage import run_units


def _same(a: Any, b: Any) -> bool:
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


def summarize(
    sources: Mapping[str, str | list[str]],
    reference: str,
    out_url: str,
    kind: str,
    *,
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int = 0,
    cpu_threads: int | None = None,
) -> str:
    """Summaries of named datasets in the reference model's space: the anchors stage
    (features of each dataset, partial sums, merged). A committed table made from the
    same shards, reference model and kind is reused as it is. Name ``out_url`` after the
    kind: the anchors stage keeps its partial sums beside it, whatever their kind."""
    if storage.is_committed(out_url):
        lin = tables.read_lineage(out_url)
        if (
            lin.get("model_id") == models.model_id(reference)
            and lin.get("vector_kind") == kind
            and _same(lin.get("sources"), dict(sources))
        ):
            return out_url
    # The anchors stage lists every features file under a dataset's folder: a work folder
    # per set of shards keeps the features of datasets named alike but made of other
    # shards (an earlier run's) out of this summary.
    folder, name = posixpath.split(str(out_url))
    stem = name.rsplit(".", 1)[0]
    work = storage.join(folder, f"{stem}_work", tables.config_hash(dict(sources))[:12])
    anchors_build_flow(
        AnchorsConfig(
            sources=dict(sources),
            checkpoint=reference,
            out=out_url,
            kind=kind,
            work=work,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            cpu_threads=cpu_threads,
        )
    )
    return out_url


def weights_of(config: P2LConfig) -> p2l.P2LWeights:
    """Fitted weights from ``config.weights``, else the weights and divergence given."""
    if config.weights:
        return p2l.read_weights(config.weights)
    return p2l.P2LWeights(
        w_size=config.w_size,
        w_div=config.w_div,
        metric=config.metric,
        kind=config.kind,
        kl_direction=config.kl_direction,
        eps=config.eps,
    )


def ranking_url(out: str) -> str:
    return storage.join(out, "ranking.parquet")


@flow(name="p2l", flow_run_name=run_name("p2l {config.target} -> {config.out}"))
def p2l_flow(config: P2LConfig) -> list[dict[str, Any]]:
    """Rank the candidate sources of ``config.candidates`` for the target; returns the
    ranking rows (best first)."""
    cands = p2l.load_candidates(config.candidates)
    weights = weights_of(config)
    runtime = {
        "batch_size": config.batch_size,
        "device": config.device,
        "num_workers": config.num_workers,
        "cpu_threads": config.cpu_threads,
    }
    summaries = storage.join(config.out, "summaries")
    sources_url = cands.summaries or summarize(
        {n: c.shards for n, c in cands.candidates.items()},
        config.reference,
        storage.join(summaries, f"sources-{weights.kind}.parquet"),
        weights.kind,
        **runtime,
    )
    target_url = summarize(
        {"target": config.target},
        config.reference,
        storage.join(summaries, f"target-{weights.kind}.parquet"),
        weights.kind,
        **runtime,
    )
    rows = p2l.rank_summaries(
        target_url,
        sources_url,
        weights,
        sizes={n: c.size for n, c in cands.candidates.items() if c.size},
        checkpoints={n: c.checkpoint for n, c in cands.candidates.items()},
        candidates=list(cands.candidates),
    )
    lineage = {
        **tables.lineage(config, stage="p2l"),
        "reference_model": models.model_id(config.reference),
        "target_summary": target_url,
        "source_summaries": sources_url,
        "weights_url": config.weights,
    }
    p2l.write_ranking(rows, ranking_url(config.out), weights, lineage)
    publish_table(
        rows,
        "p2l-ranking",
        f"P2L-style ranking of sources for `{config.target}`",
        location=config.out,
    )
    get_run_logger().info("p2l: best source %s of %d", rows[0]["candidate"], len(rows))
    return rows


@flow(name="shallow", flow_run_name=run_name("shallow {config.model} -> {config.out}"))
def shallow_flow(config: ShallowConfig) -> dict[str, Any]:
    """Fit and score one shallow learner on frozen features; returns its row."""
    [row] = run_units(ShallowStage, config=config, what=f"shallow {config.model}")
    publish_table(
        [row],
        "shallow",
        f"Shallow learner `{config.model}` on `{config.features}`",
        location=config.out,
    )
    return row
