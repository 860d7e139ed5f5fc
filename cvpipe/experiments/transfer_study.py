"""The transfer study's tables, its recommendation and its report.

Rows in, report out (the flow in flows/transfer_study.py trains and scores):

- methods rows (tables.TRANSFER_METHODS, one per target, label count, method, seed) are
  summarized per (target, label count, method): mean validation top-1, mean and std
  test top-1 over seeds, mean training seconds (:func:`method_summary`);
- :func:`recommend` chooses for the target, on *validation* top-1 only: the source
  (the P2L-style pick, weights fitted without this target), the method (among that
  source's rows and scratch at the grid's label count; equal validation scores go to
  the cheaper training), the freezing depth (the best ``freeze-N`` fine-tune), the best
  curriculum beside its direct fine-tune, and the architecture (the most accurate,
  optionally under a latency budget). Test top-1 is reported beside each;
- :func:`write_report` writes ``transfer_report.md`` and ``transfer_report.png``
  (rendered by :mod:`cvpipe.experiments.transfer_report`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from cvpipe.core.storage import join, write_bytes_atomic
from cvpipe.experiments import transfer_report
from cvpipe.experiments.transfer_report import count_key


def fit_schedule(
    epochs: int, batch_size: int, images: int, min_steps: int, min_batch: int = 4
) -> tuple[int, int]:
    """``(epochs, batch_size)`` giving at least ``min_steps`` optimizer steps on
    ``images`` training images: smaller batches first (down to ``min_batch``), then more
    epochs. A training set of 10 images would otherwise get one step per epoch, and
    every label count a different amount of training."""
    if images < 1:
        raise ValueError("no training images")

    def steps(e: int, b: int) -> int:
        return e * math.ceil(images / b)

    if steps(epochs, batch_size) >= min_steps:
        return epochs, batch_size
    batch = max(min(batch_size, min_batch), min(batch_size, images * epochs // min_steps))
    if steps(epochs, batch) < min_steps:
        epochs = math.ceil(min_steps / math.ceil(images / batch))
    return epochs, batch


def _mean(v: Sequence[float]) -> float:
    return float(np.mean(v)) if len(v) else math.nan


def _std(v: Sequence[float]) -> float:
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def method_summary(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Seeds averaged per (target, label count, method), in first-seen order."""
    groups: dict[tuple[str, Any, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["per_class"], r["method"]), []).append(r)
    out = []
    for (t, k, m), rs in groups.items():
        test = [float(r["test_top1"]) for r in rs]
        out.append(
            {
                "target": t,
                "per_class": k,
                "method": m,
                "source": rs[0]["source"],
                "freeze": rs[0]["freeze"],
                "seeds": len(rs),
                "val": _mean([float(r["val_top1"]) for r in rs]),
                "test": _mean(test),
                "test_std": _std(test),
                "train_seconds": _mean([float(r["train_seconds"]) for r in rs]),
                "by_seed": {int(r["seed"]): float(r["test_top1"]) for r in rs},
            }
        )
    return out


def _best(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """Highest validation top-1; equals go to the cheaper training, then the name."""
    return min(rows, key=lambda r: (-r["val"], r["train_seconds"], r["method"]), default=None)


def cost_summary(costs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per architecture: its costs and its val/test top-1 over seeds."""
    out = []
    for c in costs:
        test = [s["test_top1"] for s in c["scores"]]
        out.append(
            {
                **c["costs"],
                "val": _mean([s["val_top1"] for s in c["scores"]]),
                "test": _mean(test),
                "test_std": _std(test),
            }
        )
    return out


def recommend(
    target: str,
    per_class: int | None,
    summary: Sequence[Mapping[str, Any]],
    ranking: Sequence[Mapping[str, Any]],
    costs: Sequence[Mapping[str, Any]] = (),
    latency_budget_ms: float | None = None,
) -> dict[str, Any]:
    """The study's choices for ``target`` at ``per_class`` labels (see module doc). The
    method is chosen among the rows of the recommended source (and scratch); a
    curriculum starts elsewhere, so it is reported beside the method: the best one on
    validation, with its direct fine-tune."""
    here = [r for r in summary if r["target"] == target and r["per_class"] == per_class]
    rows = [r for r in here if not r["method"].startswith(("curriculum:", "direct:"))]
    if not rows:
        raise ValueError(f"no method results for {target} at {count_key(per_class)} per class")
    freezes = [r for r in rows if r["method"].startswith("freeze-")]
    curricula = [r for r in here if r["method"].startswith("curriculum:")]
    curriculum = _best(curricula)
    direct = next(
        (r for r in here if curriculum and r["method"] == f"direct:{curriculum['source']}"), None
    )
    fits = [
        c for c in costs if latency_budget_ms is None or c["latency_ms_b1"] <= latency_budget_ms
    ]
    arch = max(fits, key=lambda c: (c["val"], -c["latency_ms_b1"]), default=None)
    return {
        "target": target,
        "per_class": per_class,
        "source": ranking[0]["candidate"] if ranking else None,
        "method": _best(rows),
        "freeze": _best(freezes),
        "curriculum": curriculum,
        "direct": direct,
        "arch": arch,
        "latency_budget_ms": latency_budget_ms,
    }


def write_report(
    root: str,
    config: Any,
    *,
    ranking: Sequence[Mapping[str, Any]],
    validation: Mapping[str, Any],
    methods: Sequence[Mapping[str, Any]],
    costs: Sequence[Mapping[str, Any]],
    lineage: Mapping[str, Any],
) -> dict[str, Any]:
    """``transfer_report.md`` and ``.png`` under ``root``; returns their URLs and the
    recommendation."""
    summary = method_summary(methods)
    cost_rows = cost_summary(costs)
    rec = recommend(
        config.target, config.grid_per_class, summary, ranking, cost_rows, config.latency_budget_ms
    )
    urls = {"markdown": join(root, "transfer_report.md"), "png": join(root, "transfer_report.png")}
    md = transfer_report.report_markdown(config, rec, ranking, validation, summary, cost_rows)
    write_bytes_atomic(urls["markdown"], md.encode())
    png = transfer_report.report_png(rec, validation, summary, cost_rows)
    write_bytes_atomic(urls["png"], png)
    return {
        **urls,
        "recommendation": {
            "source": rec["source"],
            "method": rec["method"]["method"],
            "freeze": rec["freeze"]["freeze"] if rec["freeze"] else None,
            "curriculum": rec["curriculum"]["method"] if rec["curriculum"] else None,
            "arch": rec["arch"]["model"] if rec["arch"] else None,
        },
        "lineage": dict(lineage),
    }
