"""The detection teacher-student study's report: per seed, mAP and mAP@.5 of the
supervised detector (the teacher, trained on the labeled canvases only), the student
pretrained on pseudo-boxes and the student fine-tuned on the labeled canvases; mean ±
std over seeds, paired wins of the fine-tuned student over the supervised detector,
and a PNG of the same.

Rows follow tables.DETECT_STUDY; the flow (flows/detection.py) produces them.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from cvpipe.core import tables
from cvpipe.core.storage import join, write_bytes_atomic

METHODS = ("supervised", "student_pretrained", "student_finetuned")


def _mean_std(values: list[float]) -> str:
    v = np.array(values, np.float64) * 100
    return f"{np.nanmean(v):.1f} ± {np.nanstd(v, ddof=1) if v.size > 1 else 0.0:.1f}"


def study_markdown(rows: Iterable[Mapping[str, Any]], metric: str = "map_50") -> str:
    """Per seed: labeled canvases, pseudo-boxed images and boxes, ``metric`` (x100) of
    every method and the fine-tuned student's gain; mean ± std; paired wins."""
    by_seed: dict[int, dict[str, Any]] = {}
    for r in rows:
        s = by_seed.setdefault(int(r["seed"]), {"row": r, "score": {}})
        s["score"][r["method"]] = float(r[metric])
        if r["method"] == "student_pretrained":
            s["row"] = r
    head = ["seed", "labeled", "pseudo images", "pseudo boxes", *METHODS, "gain"]
    lines = [f"Detection teacher-student, test {metric} (x100)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    gains = []
    for seed, s in sorted(by_seed.items()):
        sc, r = s["score"], s["row"]
        gain = sc["student_finetuned"] - sc["supervised"]
        gains.append(gain)
        cells = [str(seed), str(r["labeled"]), str(r["pseudo_images"]), str(r["pseudo_boxes"])]
        cells += [f"{100 * sc[m]:.1f}" for m in METHODS] + [f"{100 * gain:+.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    means = [_mean_std([s["score"][m] for s in by_seed.values()]) for m in METHODS]
    lines.append("| mean ± std | | | | " + " | ".join(means) + f" | {_mean_std(gains)} |")
    wins = sum(g > 0 for g in gains)
    mean = 100 * float(np.mean(gains))
    lines += ["", f"The fine-tuned student beats the supervised detector on {wins} of "
              f"{len(gains)} seeds (mean gain {mean:+.1f} points)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def study_png(rows: Iterable[Mapping[str, Any]]) -> bytes:
    """mAP and mAP@.5 per method: mean over seeds (bars), each seed (dots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5), dpi=110)
    for ax, metric in zip(axes, ("map", "map_50"), strict=True):
        for i, m in enumerate(METHODS):
            v = [100 * float(r[metric]) for r in rows if r["method"] == m]
            ax.bar(i, np.nanmean(v) if v else 0, color=f"C{i}", alpha=0.6)
            ax.scatter([i] * len(v), v, color="k", s=12, zorder=3)
        ax.set_xticks(range(len(METHODS)), [m.replace("_", "\n") for m in METHODS], fontsize=8)
        ax.set_ylabel(f"test {metric.replace('_', '@.')} (x100)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Detection: supervised vs student on pseudo-boxes (dots: seeds)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_study_report(
    rows: list[dict[str, Any]], root: str, lineage: dict[str, Any]
) -> dict[str, str]:
    """Publish results.parquet (tables.DETECT_STUDY), results.md and results.png."""
    urls = {k: join(root, f"results.{k}") for k in ("parquet", "md", "png")}
    tables.write_parquet(tables.from_rows(rows, tables.DETECT_STUDY), urls["parquet"], lineage)
    text = study_markdown(rows, "map_50") + "\n" + study_markdown(rows, "map")
    write_bytes_atomic(urls["md"], text.encode())
    write_bytes_atomic(urls["png"], study_png(rows))
    return urls
