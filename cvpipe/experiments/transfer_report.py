"""The transfer study's report: markdown (recommendation, P2L ranking and validation,
shallow learners vs fine-tuning per label count, curricula, costs) and a four-panel PNG.
Inputs are the summaries of :mod:`cvpipe.experiments.transfer_study`."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from cvpipe.experiments import p2l_validation as pv


def count_key(k: int | None) -> str:
    """A label count as a name: ``20`` or ``all``."""
    return "all" if k is None else str(k)


def _pct(v: float | None, std: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{100 * v:.1f} ± {100 * std:.1f}" if std is not None else f"{100 * v:.1f}"


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def _methods_table(summary: Sequence[Mapping[str, Any]], target: str) -> list[str]:
    rows = [
        r
        for r in summary
        if r["target"] == target and not r["method"].startswith(("curriculum:", "direct:"))
    ]
    counts = list(dict.fromkeys(r["per_class"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["per_class"], r["method"]): r for r in rows}
    out = []
    for m in methods:
        cells = [m]
        for k in counts:
            r = by.get((k, m))
            cells.append(f"{_pct(r['test'], r['test_std'])} ({_pct(r['val'])})" if r else "")
        secs = [by[(k, m)]["train_seconds"] for k in counts if (k, m) in by]
        cells.append(f"{np.mean(secs):.1f}")
        out.append(cells)
    head = ["method", *[f"{count_key(k)}/class: test (val)" for k in counts], "train s"]
    return _table(head, out)


def _curricula_table(summary: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = [r for r in summary if r["method"].startswith("curriculum:")]
    if not rows:
        return ["(no curricula configured)"]
    direct = {
        r["method"][len("direct:") :]: r for r in summary if r["method"].startswith("direct:")
    }
    out = []
    for r in rows:
        d = direct.get(r["source"])
        wins = (
            sum(r["by_seed"][s] > d["by_seed"].get(s, math.inf) for s in r["by_seed"]) if d else 0
        )
        out.append(
            [
                r["method"][len("curriculum:") :],
                _pct(r["val"]),
                _pct(r["test"], r["test_std"]),
                f"direct from {r['source']}",
                _pct(d["val"]) if d else "",
                _pct(d["test"], d["test_std"]) if d else "",
                f"{wins}/{r['seeds']}",
            ]
        )
    head = ["curriculum", "val", "test", "vs", "val", "test", "paired wins"]
    return _table(head, out)


def _cost_table(costs: Sequence[Mapping[str, Any]]) -> list[str]:
    out = [
        [
            c["model"],
            f"{c['params']:,}",
            f"{c['checkpoint_bytes'] / 2**20:.2f}",
            f"{c['peak_memory_mb']:.1f}",
            f"{c['latency_ms_b1']:.3f}",
            f"{c['latency_ms_batched']:.3f}",
            _pct(c["val"]),
            _pct(c["test"], c["test_std"]),
        ]
        for c in costs
    ]
    b = costs[0]["batch"] if costs else 0
    head = [
        "model",
        "params",
        "checkpoint MB",
        "peak MB",
        "ms/img b1",
        f"ms/img b{b}",
        "val top-1",
        "test top-1",
    ]
    return _table(head, out)


def report_markdown(
    config: Any,
    rec: Mapping[str, Any],
    ranking: Sequence[Mapping[str, Any]],
    validation: Mapping[str, Any],
    summary: Sequence[Mapping[str, Any]],
    costs: Sequence[Mapping[str, Any]],
) -> str:
    t, k = rec["target"], rec["per_class"]
    cells = {(c.target, c.source): c for c in validation["cells"]}
    truth = sorted((c for c in validation["cells"] if c.target == t), key=lambda c: -c.test)
    src_rank = next((i + 1 for i, c in enumerate(truth) if c.source == rec["source"]), None)
    w = validation["loto"][t]
    m, f, a = rec["method"], rec["freeze"], rec["arch"]
    seeds = len(config.seeds)
    lines = [
        f"# Transfer study: `{t}` (digits {config.digits.targets[t]})",
        "",
        "## Recommendation",
        "",
        f"- **Source: `{rec['source']}`**, the P2L-style pick (score = {w.w_size:.4g} * "
        f"log|S| - {w.w_div:.4g} * D, weights fitted on the other targets; D = "
        f"{w.metric} of {w.kind} summaries). In the exhaustive grid it is #{src_rank} of "
        f"{len(truth)} sources (test top-1 {_pct(cells[(t, rec['source'])].test)} vs best "
        f"{_pct(truth[0].test)} from `{truth[0].source}`).",
        f"- **Method: `{m['method']}`** at {count_key(k)} labels per class: validation "
        f"top-1 {_pct(m['val'])}, test top-1 {_pct(m['test'], m['test_std'])} over {seeds} "
        f"seed(s), {m['train_seconds']:.1f} s of training.",
    ]
    if f is not None:
        lines.append(
            f"- **Freezing depth: {f['freeze']}** backbone stage(s) frozen (the best fine-tune "
            f"on validation: {_pct(f['val'])}; test {_pct(f['test'], f['test_std'])})."
        )
    cur, direct = rec.get("curriculum"), rec.get("direct")
    if cur is not None and direct is not None:
        name = cur["method"][len("curriculum:") :]
        wins = sum(cur["by_seed"][s] > direct["by_seed"].get(s, math.inf) for s in cur["by_seed"])
        helps = "helps" if cur["val"] > direct["val"] else "does not help"
        lines.append(
            f"- **Curriculum: `{name}` {helps}** against the direct fine-tune from "
            f"`{cur['source']}` (validation {_pct(cur['val'])} vs {_pct(direct['val'])}; test "
            f"{_pct(cur['test'], cur['test_std'])} vs {_pct(direct['test'], direct['test_std'])}, "
            f"paired wins {wins}/{cur['seeds']})."
        )
        best_start = cur if cur["val"] > direct["val"] else direct
        if best_start["val"] > m["val"]:
            lines.append(
                f"- **Better start: `{best_start['method']}`** beats the recommended method "
                f"on validation ({_pct(best_start['val'])} vs {_pct(m['val'])}; test "
                f"{_pct(best_start['test'], best_start['test_std'])}): a start the P2L "
                "candidates did not include (the reference model saw every source)."
                if cur["source"] == "reference"
                else f"- **Better start: `{best_start['method']}`** beats the recommended "
                f"method on validation ({_pct(best_start['val'])} vs {_pct(m['val'])})."
            )
    if a is not None:
        budget = rec["latency_budget_ms"]
        lines.append(
            f"- **Architecture: `{a['model']}`**"
            + (f" (under {budget} ms per image at batch 1)" if budget else "")
            + f": {a['latency_ms_b1']:.3f} ms/image at batch 1, {a['peak_memory_mb']:.1f} MB "
            f"peak, {a['params']:,} parameters, test top-1 {_pct(a['test'], a['test_std'])}."
        )
    lines += [
        "",
        "Every choice is made on validation top-1; test top-1 is reported, never used to "
        "choose. Top-1 in percent, mean ± std over seeds.",
        "",
        "## Which source: P2L-style selection",
        "",
        f"Ranking for `{t}` (weights fitted leave-one-target-out):",
        "",
    ]
    lines += _table(
        ["rank", "source", "size", "D", "score", "grid test top-1"],
        [
            [
                r["rank"],
                r["candidate"],
                r["size"],
                f"{r['divergence']:.4f}",
                f"{r['score']:.4g}",
                _pct(cells[(t, r["candidate"])].test, cells[(t, r["candidate"])].test_std),
            ]
            for r in ranking
        ],
    )
    lines += [
        "",
        f"Validated against exhaustive fine-tuning ({len(config.digits.sources)} sources x "
        f"{len(config.digits.targets)} targets x {seeds} seed(s), "
        f"{count_key(config.grid_per_class)} labels per class):",
        "",
        validation["markdown"],
        "## Which method: shallow learners vs fine-tuning",
        "",
    ]
    for target in dict.fromkeys(r["target"] for r in summary):
        lines += [f"`{target}` (source `{_source_of(summary, target)}`): test top-1 (val):", ""]
        lines += _methods_table(summary, target) + [""]
    lines += [
        "`svm`/`logistic`: shallow learners on the source's penultimate features (C chosen "
        "on validation); `freeze-N`: fine-tuning with the first N backbone stages frozen "
        "(N = all: the last layer only; 0: all layers); `lr-mult`: all layers with "
        f"per-stage LR multipliers {dict(config.lr_multipliers)}; `scratch`: no source.",
        "",
        "## Which curriculum",
        "",
    ]
    lines += _curricula_table(summary) + ["", "## What each choice costs", ""]
    lines += _cost_table(costs)
    lines += [
        "",
        "Costs on this machine's CPU (torch threads as configured); peak MB is what one "
        "batched forward adds to a fresh process (see cvpipe/models/costs.py). A shallow "
        "learner deploys as the same backbone with a linear head: the costs of its "
        "architecture's row.",
        "",
        "![transfer study](transfer_report.png)",
        "",
    ]
    return "\n".join(lines)


def _source_of(summary: Sequence[Mapping[str, Any]], target: str) -> str:
    return next((r["source"] for r in summary if r["target"] == target and r["source"]), "")


def report_png(
    rec: Mapping[str, Any],
    validation: Mapping[str, Any],
    summary: Sequence[Mapping[str, Any]],
    costs: Sequence[Mapping[str, Any]],
) -> bytes:
    """Four panels: P2L validation, methods by label count, freezing depth, costs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = rec["target"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), dpi=100)
    a, b, c, d = axes.ravel()
    ours = {r["selector"]: r for r in validation["summary"]}
    sels = [s for s in pv.SELECTORS if s in ours]
    x = np.arange(len(sels))
    a.bar(x - 0.2, [100 * ours[s]["best_rate"] for s in sels], 0.4, label="this study")
    for i, sel in enumerate(sels):
        a.annotate(
            f"lost {100 * ours[sel]['mean_loss']:.1f} pts",
            (i - 0.2, 100 * ours[sel]["best_rate"] + 2),
            ha="center",
            fontsize=7,
        )
    a.bar(x + 0.2, [100 * pv.PAPER[s] for s in sels], 0.4, color="0.7", label="paper")
    a.set_xticks(x, sels)
    a.set_ylim(0, 100)
    a.set_ylabel("best source picked (%)")
    a.set_title("Which source: P2L vs largest vs closest", fontsize=10)
    a.legend(fontsize=8)

    rows = [r for r in summary if r["target"] == t and ":" not in r["method"]]
    counts = list(dict.fromkeys(r["per_class"] for r in rows))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = [
            (i, r)
            for i, k in enumerate(counts)
            for r in rows
            if r["per_class"] == k and r["method"] == m
        ]
        b.errorbar(
            [i for i, _ in pts],
            [100 * r["test"] for _, r in pts],
            yerr=[100 * r["test_std"] for _, r in pts],
            marker="o",
            capsize=2,
            label=m,
        )
    b.set_xticks(range(len(counts)), [count_key(k) for k in counts])
    b.set_xlabel("labels per class")
    b.set_ylabel("test top-1 (%)")
    b.set_title(f"Which method on {t}", fontsize=10)
    b.legend(fontsize=7, ncol=2)

    for k in counts:
        fr = sorted(
            (r for r in rows if r["per_class"] == k and r["method"].startswith("freeze-")),
            key=lambda r: r["freeze"],
        )
        c.errorbar(
            [r["freeze"] for r in fr],
            [100 * r["test"] for r in fr],
            yerr=[100 * r["test_std"] for r in fr],
            marker="o",
            capsize=2,
            label=f"{count_key(k)}/class",
        )
    c.set_xlabel("backbone stages frozen")
    c.set_ylabel("test top-1 (%)")
    c.set_title("Which layers: freezing depth", fontsize=10)
    c.legend(fontsize=8)

    for cost in costs:
        d.errorbar(
            cost["latency_ms_b1"],
            100 * cost["test"],
            yerr=100 * cost["test_std"],
            marker="o",
            capsize=2,
        )
        d.annotate(
            f"{cost['model']}\n{cost['peak_memory_mb']:.0f} MB",
            (cost["latency_ms_b1"], 100 * cost["test"]),
            fontsize=7,
        )
    d.set_xscale("log")
    d.set_xlabel("latency per image at batch 1 (ms, CPU)")
    d.set_ylabel("test top-1 (%)")
    d.set_title("What it costs", fontsize=10)
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
