"""Validating P2L the way the paper does: against exhaustive fine-tuning.

Input: the transfer grid (tables.TRANSFER_GRID), one row per (target, source, seed):
every candidate source fine-tuned on every target, scored on the target's validation
and test splits, with the source's size and ``D(target, source)``. Then, per target:

- the ground truth is the source with the best mean *test* top-1 over seeds (sources
  whose mean equals the best count as best too);
- **P2L** picks the best score under weights fitted *leave-one-target-out*: on the
  other targets' transfer results (their test top-1 by default, the larger split, or
  their validation top-1), never on the held-out target's own; **largest** picks the
  largest source; **closest** the smallest divergence. Ties go to the first name, as in
  :func:`cvpipe.label.p2l.rank`;
- reported over targets: how often each pick is the best (the paper: 62% for P2L, 48%
  for the largest source, 52% for the closest, over 21 tasks), the mean and largest
  test top-1 lost against the best, and the Spearman rank correlation between the
  selector's score (P2L score, log size, minus divergence) and the mean test top-1,
  averaged over targets.

Outputs: ``p2l_validation.parquet`` (tables.P2L_VALIDATION, with the paper's rows),
``p2l_validation.md`` (that table and the per-target picks) and ``p2l_validation.png``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cvpipe.core import tables
from cvpipe.core.storage import join, write_bytes_atomic
from cvpipe.experiments.reports import markdown_table
from cvpipe.label import p2l

SELECTORS = ("p2l", "largest", "closest")
# Bhattacharjee et al. 2019: share of 21 tasks where each selector found the best source.
PAPER = {"p2l": 0.62, "largest": 0.48, "closest": 0.52}
PAPER_TASKS = 21


@dataclass(frozen=True)
class Cell:
    """One (target, source) of the grid, averaged over seeds."""

    target: str
    source: str
    size: int
    divergence: float
    val: float
    test: float
    test_std: float
    seeds: int


def aggregate(rows: Iterable[Mapping[str, Any]]) -> list[Cell]:
    """Mean validation and test top-1 over seeds per (target, source), sorted."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((str(r["target"]), str(r["source"])), []).append(r)
    cells = []
    for (t, s), rs in sorted(groups.items()):
        if len({(r["size"], round(float(r["divergence"]), 9)) for r in rs}) != 1:
            raise ValueError(f"({t}, {s}): size or divergence differs between seeds")
        test = np.array([float(r["test_top1"]) for r in rs])
        cells.append(
            Cell(
                t,
                s,
                int(rs[0]["size"]),
                float(rs[0]["divergence"]),
                float(np.mean([float(r["val_top1"]) for r in rs])),
                float(test.mean()),
                float(test.std(ddof=1)) if len(test) > 1 else 0.0,
                len(rs),
            )
        )
    return cells


def _by_target(cells: Sequence[Cell]) -> dict[str, list[Cell]]:
    out: dict[str, list[Cell]] = {}
    for c in cells:
        out.setdefault(c.target, []).append(c)
    return out


FIT_ON = ("test", "val")


def _fit(cells: Sequence[Cell], template: p2l.P2LWeights, fit_on: str) -> p2l.P2LWeights:
    if fit_on not in FIT_ON:
        raise ValueError(f"fit_on must be one of {FIT_ON}, got {fit_on!r}")
    return p2l.fit_weights(
        [c.target for c in cells],
        [c.size for c in cells],
        [c.divergence for c in cells],
        [c.test if fit_on == "test" else c.val for c in cells],
        metric=template.metric,
        kind=template.kind,
        kl_direction=template.kl_direction,
        eps=template.eps,
    )


def loto_weights(
    cells: Sequence[Cell], template: p2l.P2LWeights = p2l.P2LWeights(), fit_on: str = "test"
) -> dict[str, p2l.P2LWeights]:
    """For each target, weights fitted on every *other* target's results (their
    ``fit_on`` top-1): the held-out target's results never enter its own weights."""
    targets = sorted({c.target for c in cells})
    return {t: _fit([c for c in cells if c.target != t], template, fit_on) for t in targets}


def fit_all(
    cells: Sequence[Cell], template: p2l.P2LWeights = p2l.P2LWeights(), fit_on: str = "test"
) -> p2l.P2LWeights:
    """Weights fitted on every target's results (the weights to ship)."""
    return _fit(cells, template, fit_on)


def selector_scores(cs: Sequence[Cell], selector: str, w: p2l.P2LWeights | None) -> np.ndarray:
    """Each source's score under a selector (higher = picked first)."""
    if selector == "p2l":
        assert w is not None
        return p2l.scores([c.size for c in cs], np.array([c.divergence for c in cs]), w)
    if selector == "largest":
        return np.log(np.array([c.size for c in cs], np.float64))
    if selector == "closest":
        return -np.array([c.divergence for c in cs], np.float64)
    raise ValueError(f"unknown selector {selector!r}")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def picks(cells: Sequence[Cell], weights: Mapping[str, p2l.P2LWeights]) -> list[dict[str, Any]]:
    """One row per (target, selector): the pick, the best source(s), the loss, Spearman."""
    rows = []
    for t, cs in sorted(_by_target(cells).items()):
        cs = sorted(cs, key=lambda c: c.source)
        test = np.array([c.test for c in cs])
        best = max(test)
        best_names = [c.source for c in cs if c.test == best]
        for sel in SELECTORS:
            s = selector_scores(cs, sel, weights.get(t))
            i = min(range(len(cs)), key=lambda j: (-s[j], cs[j].source))
            rows.append(
                {
                    "target": t,
                    "selector": sel,
                    "pick": cs[i].source,
                    "best": "/".join(best_names),
                    "is_best": cs[i].source in best_names,
                    "pick_top1": cs[i].test,
                    "best_top1": best,
                    "loss": best - cs[i].test,
                    "spearman": _spearman(s, test),
                }
            )
    return rows


def summary(pick_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of tables.P2L_VALIDATION: this study's selectors, then the paper's figures."""
    out = []
    for sel in SELECTORS:
        rs = [r for r in pick_rows if r["selector"] == sel]
        if not rs:
            continue
        hits = sum(bool(r["is_best"]) for r in rs)
        rho = [r["spearman"] for r in rs if not math.isnan(r["spearman"])]
        out.append(
            {
                "selector": sel,
                "targets": len(rs),
                "best_picked": hits,
                "best_rate": hits / len(rs),
                "mean_loss": float(np.mean([r["loss"] for r in rs])),
                "max_loss": float(np.max([r["loss"] for r in rs])),
                "spearman": float(np.mean(rho)) if rho else math.nan,
            }
        )
    for sel, rate in PAPER.items():
        out.append(
            {
                "selector": f"{sel} (paper)",
                "targets": PAPER_TASKS,
                "best_picked": round(rate * PAPER_TASKS),
                "best_rate": rate,
                "mean_loss": None,
                "max_loss": None,
                "spearman": None,
            }
        )
    return out


def validation_png(summary_rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Two panels: how often each selector picks the best source (this study beside the
    paper), and the mean test top-1 lost by each pick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = {r["selector"]: r for r in summary_rows if r["selector"] in SELECTORS}
    sels = [s for s in SELECTORS if s in ours]
    x = np.arange(len(sels))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    n = ours[sels[0]]["targets"] if sels else 0
    a.bar(x - 0.2, [100 * ours[s]["best_rate"] for s in sels], 0.4, label=f"here ({n} targets)")
    a.bar(
        x + 0.2,
        [100 * PAPER[s] for s in sels],
        0.4,
        label=f"paper ({PAPER_TASKS} tasks)",
        color="0.7",
    )
    a.set_xticks(x, sels)
    a.set_ylabel("best source picked (%)")
    a.set_ylim(0, 100)
    a.legend(fontsize=8)
    a.grid(axis="y", alpha=0.3)
    b.bar(x, [100 * ours[s]["mean_loss"] for s in sels], 0.5, color="C3")
    b.set_xticks(x, sels)
    b.set_ylabel("mean test top-1 lost vs best (points)")
    b.grid(axis="y", alpha=0.3)
    fig.suptitle("P2L-style source selection vs exhaustive fine-tuning", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def validation_markdown(
    summary_rows: Sequence[Mapping[str, Any]], pick_rows: Sequence[Mapping[str, Any]]
) -> str:
    table = tables.from_rows(list(summary_rows), tables.P2L_VALIDATION)
    lines = [
        markdown_table(table, digits=3),
        "",
        "Picks per target (test top-1, mean over seeds):",
        "",
    ]
    head = ["target", "best", "best top-1", *[f"{s} pick (lost)" for s in SELECTORS]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_t: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in pick_rows:
        by_t.setdefault(r["target"], {})[r["selector"]] = r
    for t, rs in sorted(by_t.items()):
        first = next(iter(rs.values()))
        cells = [t, first["best"], f"{first['best_top1']:.3f}"]
        for s in SELECTORS:
            r = rs.get(s)
            mark = "**" if r and r["is_best"] else ""
            cells.append(f"{mark}{r['pick']}{mark} ({r['loss']:.3f})" if r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_validation(
    grid_rows: Sequence[Mapping[str, Any]],
    out: str,
    template: p2l.P2LWeights,
    lineage: Mapping[str, Any],
    fit_on: str = "test",
) -> dict[str, Any]:
    """The whole validation from the grid: LOTO picks, the summary table (Parquet, md,
    PNG), and the weights fitted on all targets (``p2l_weights.parquet``)."""
    cells = aggregate(grid_rows)
    loto = loto_weights(cells, template, fit_on)
    pick_rows = picks(cells, loto)
    rows = summary(pick_rows)
    urls = {
        "parquet": join(out, "p2l_validation.parquet"),
        "markdown": join(out, "p2l_validation.md"),
        "png": join(out, "p2l_validation.png"),
        "weights": join(out, "p2l_weights.parquet"),
    }
    lin = {**tables.lineage(), **lineage, "stage": "p2l_validation"}
    tables.write_parquet(tables.from_rows(rows, tables.P2L_VALIDATION), urls["parquet"], lin)
    md = validation_markdown(rows, pick_rows)
    write_bytes_atomic(urls["markdown"], md.encode())
    write_bytes_atomic(urls["png"], validation_png(rows))
    final = fit_all(cells, template, fit_on)
    fit_lin = {**lin, "stage": "p2l_fit", "fitted_on": f"{fit_on}_top1", "grid_cells": len(cells)}
    p2l.write_weights(final, urls["weights"], fit_lin)
    return {
        "urls": urls,
        "summary": rows,
        "picks": pick_rows,
        "loto": loto,
        "weights": final,
        "markdown": md,
        "cells": cells,
    }
