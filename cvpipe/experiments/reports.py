"""Result tables for people: Parquet (with lineage) plus markdown, and PNG figures.

- The pseudo-label dataset table (one row per labeling method): distinct labels, images,
  images per label mean and std, and the top-1 of the base model trained on those
  labels once known (:func:`pseudo_label_table`, :func:`write_pseudo_label_report`),
  with a histogram of label sizes per method.
- The transfer table: targets x methods top-1, the best of each row marked
  (:func:`transfer_table`, :func:`write_transfer_report`).

Inputs are small merged results (per-method label histograms from
:func:`cvpipe.label.anchors.label_counts` merged with :func:`cvpipe.label.anchors.merge_counts`),
never per-image rows.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from cvpipe.core import tables
from cvpipe.core.storage import write_bytes_atomic


def _fmt(v: Any, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def md_cell(text: Any) -> str:
    """A value as a markdown table cell: a ``|`` inside it (``|D|``) would end the cell
    and break the table, so it is escaped; a newline would end the row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(md_cell(c) for c in cells) + " |"


def markdown_table(table: pa.Table, bold: Mapping[int, str] | None = None, digits: int = 2) -> str:
    """A GitHub markdown table; ``bold[row] = column`` marks one cell per row in bold."""
    cols = table.column_names
    rows = table.to_pylist()
    lines = [md_row(cols), "|" + "|".join("---" for _ in cols) + "|"]
    for i, row in enumerate(rows):
        cells = []
        for c in cols:
            s = md_cell(_fmt(row[c], digits))
            if bold and bold.get(i) == c and s:
                s = f"**{s}**"
            cells.append(s)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ pseudo-label table


def pseudo_label_table(
    counts_by_method: Mapping[str, Mapping[str, int]],
    top1: Mapping[str, float] | None = None,
) -> pa.Table:
    """One row per method from its label histogram (label -> images); std is the
    population std of images per label; ``top1`` fills the accuracy column when known."""
    rows = []
    for method, counts in counts_by_method.items():
        c = np.array([v for v in counts.values() if v], np.float64)
        rows.append(
            {
                "method": method,
                "labels": int(c.size),
                "images": int(c.sum()),
                "images_per_label_mean": float(c.mean()) if c.size else math.nan,
                "images_per_label_std": float(c.std()) if c.size else math.nan,
                "top1": (top1 or {}).get(method),
            }
        )
    return tables.from_rows(rows, tables.PSEUDO_LABEL_STATS)


def label_size_histogram_png(counts_by_method: Mapping[str, Mapping[str, int]]) -> bytes:
    """PNG: per method, a histogram of label sizes (images per label, log-spaced bins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(counts_by_method)
    fig, axes = plt.subplots(
        len(methods), 1, figsize=(6, 1.8 * max(1, len(methods))), squeeze=False
    )
    sizes = [np.array([v for v in counts_by_method[m].values() if v]) for m in methods]
    top = max((s.max() for s in sizes if s.size), default=1)
    bins = np.unique(np.geomspace(1, max(2, top) + 1, 30).astype(int))
    for ax, m, s in zip(axes[:, 0], methods, sizes, strict=True):
        ax.hist(s, bins=bins, color="C0")
        ax.set_xscale("log")
        ax.set_title(f"{m}: {s.size} labels", fontsize=9)
        ax.set_ylabel("labels", fontsize=8)
    axes[-1, 0].set_xlabel("images per label")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_pseudo_label_report(
    counts_by_method: Mapping[str, Mapping[str, int]],
    out_prefix: str,
    top1: Mapping[str, float] | None = None,
    lineage: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write ``{out_prefix}.parquet``, ``.md`` and ``_sizes.png``; returns their URLs."""
    table = pseudo_label_table(counts_by_method, top1)
    urls = {
        "parquet": f"{out_prefix}.parquet",
        "markdown": f"{out_prefix}.md",
        "png": f"{out_prefix}_sizes.png",
    }
    lin = {**tables.lineage(), "stage": "pseudo_label_report", **(lineage or {})}
    tables.write_parquet(table, urls["parquet"], lin)
    write_bytes_atomic(urls["markdown"], markdown_table(table, digits=3).encode())
    write_bytes_atomic(urls["png"], label_size_histogram_png(counts_by_method))
    return urls


# ---------------------------------------------------------------------- transfer table


def transfer_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows ``{target, method, top1}`` -> one row per target, one column per method
    (first-seen order), and ``best``: the method with the highest top-1 (first of equals).
    A (target, method) given twice is an error; missing cells are null."""
    cells: dict[str, dict[str, float]] = {}
    methods: list[str] = []
    for r in rows:
        t, m = str(r["target"]), str(r["method"])
        if m not in methods:
            methods.append(m)
        if m in cells.setdefault(t, {}):
            raise ValueError(f"two results for target {t!r}, method {m!r}")
        cells[t][m] = float(r["top1"])
    out = []
    for t, bym in cells.items():
        known = [(v, -methods.index(m), m) for m, v in bym.items() if not math.isnan(v)]
        best = max(known)[2] if known else None
        out.append({"target": t, **{m: bym.get(m) for m in methods}, "best": best})
    return tables.from_rows(out, tables.transfer_schema(methods))


def transfer_markdown(table: pa.Table, digits: int = 3) -> str:
    """The transfer table in markdown, each row's best top-1 in bold."""
    bold = {i: b for i, b in enumerate(table.column("best").to_pylist()) if b}
    return markdown_table(table, bold, digits)


def write_transfer_report(
    rows: Iterable[Mapping[str, Any]], out_prefix: str, lineage: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """Write ``{out_prefix}.parquet`` and ``.md``; returns their URLs."""
    table = transfer_table(rows)
    urls = {"parquet": f"{out_prefix}.parquet", "markdown": f"{out_prefix}.md"}
    lin = {**tables.lineage(), "stage": "transfer_report", **(lineage or {})}
    tables.write_parquet(table, urls["parquet"], lin)
    write_bytes_atomic(urls["markdown"], transfer_markdown(table).encode())
    return urls


# --------------------------------------------------------- the semi-supervised results

SSL_METHODS = ("teacher", "supervised", "student_pretrained", "student_finetuned")


def _mean_std(values: list[float]) -> str:
    v = np.array(values, np.float64) * 100
    return f"{v.mean():.2f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.2f}"


def ssl_results_markdown(rows: Iterable[Mapping[str, Any]]) -> str:
    """Per seed: |D|, |D^|, precision, top-1 of every method and the gain of the
    fine-tuned student over the supervised baseline; then mean ± std and paired wins.
    ``rows`` follow tables.SSL_RUNS for one (K, |U|) setting."""
    by_seed: dict[int, dict[str, Any]] = {}
    for r in rows:
        seed = by_seed.setdefault(int(r["seed"]), {"row": r, "top1": {}})
        seed["top1"][r["method"]] = float(r["top1"])
    head = ["seed", "|D|", "|D^|", "precision", *SSL_METHODS, "gain"]
    lines = [md_row(head), "|" + "---|" * len(head)]
    gains = []
    for seed, s in sorted(by_seed.items()):
        acc, r = s["top1"], s["row"]
        gain = acc["student_finetuned"] - acc["supervised"]
        gains.append(gain)
        cells = [str(seed), str(r["labeled"]), str(r["pseudo"]), _fmt(r["precision"], 3)]
        cells += [f"{100 * acc[m]:.2f}" for m in SSL_METHODS] + [f"{100 * gain:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    means = [_mean_std([s["top1"][m] for s in by_seed.values()]) for m in SSL_METHODS]
    lines.append("| mean ± std | | | | " + " | ".join(means) + f" | {_mean_std(gains)} |")
    wins = sum(g > 0 for g in gains)
    lines += [
        "",
        f"The fine-tuned student beats the supervised baseline on {wins} of "
        f"{len(gains)} seeds (mean gain {100 * float(np.mean(gains)):+.2f} points).",
    ]
    return "\n".join(lines) + "\n"


def ssl_sweep(rows: Iterable[Mapping[str, Any]], x: str) -> tuple[str, bytes]:
    """A sweep over ``x`` (``top_k`` or ``unlabeled_fraction``): markdown of mean ± std
    top-1 per method at each value, and a PNG plot of the student against the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells: dict[float, dict[str, list[float]]] = {}
    for r in rows:
        cells.setdefault(float(r[x]), {}).setdefault(r["method"], []).append(float(r["top1"]))
    xs = sorted(cells)
    lines = [md_row([x, *SSL_METHODS]), "|" + "---|" * (len(SSL_METHODS) + 1)]
    for v in xs:
        lines.append(
            f"| {v:g} | "
            + " | ".join(_mean_std(cells[v][m]) if m in cells[v] else "" for m in SSL_METHODS)
            + " |"
        )
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for m in ("student_finetuned", "student_pretrained", "supervised"):
        ys = [100 * np.mean(cells[v][m]) for v in xs if m in cells[v]]
        es = [100 * np.std(cells[v][m]) for v in xs if m in cells[v]]
        ax.errorbar(
            [v for v in xs if m in cells[v]],
            ys,
            yerr=es,
            marker="o",
            capsize=3,
            label=m.replace("_", " "),
        )
    ax.set_xlabel("K (images per class)" if x == "top_k" else "fraction of U used")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "\n".join(lines) + "\n", buf.getvalue()


def ssl_seed_bars(rows: Iterable[Mapping[str, Any]]) -> bytes:
    """PNG: test top-1 of every method, grouped by seed (one bar per method), so a
    reader sees the paired comparison seed by seed, not only the means. ``rows`` follow
    tables.SSL_RUNS for one (K, |U|) setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top1: dict[int, dict[str, float]] = {}
    for r in rows:
        top1.setdefault(int(r["seed"]), {})[r["method"]] = 100 * float(r["top1"])
    seeds = sorted(top1)
    width = 0.8 / len(SSL_METHODS)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(seeds), 3.5), dpi=120)
    for j, m in enumerate(SSL_METHODS):
        xs = [i + (j - (len(SSL_METHODS) - 1) / 2) * width for i in range(len(seeds))]
        ax.bar(xs, [top1[s].get(m, 0.0) for s in seeds], width, label=m.replace("_", " "))
    ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    ax.set_ylabel("test top-1 (%)")
    low = min((v for s in seeds for v in top1[s].values()), default=0.0)
    ax.set_ylim(max(0.0, low - 10), 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
