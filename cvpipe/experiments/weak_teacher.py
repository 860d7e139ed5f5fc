"""The weak-teacher comparison as tables: per seed, the teacher trained on D from scratch
against the same teacher initialized from weak pretraining on the captions of U, and
the fine-tuned students of the two loops; then mean ± std and paired wins. Also the
word-prediction table of the weak models (precision@k against the frequency baseline).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

COLUMNS = (
    ("teacher_scratch", "teacher (scratch)"),
    ("teacher_weak", "teacher (weak init)"),
    ("student_scratch", "student fine-tuned (scratch teacher)"),
    ("student_weak", "student fine-tuned (weak teacher)"),
)


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    v = np.array(values, np.float64) * scale
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.{digits}f}"


def comparison_rows(
    scratch: Iterable[Mapping[str, Any]], weak: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Per seed, the four top-1s from the main rows (tables.RESULTS) of the two loops."""
    out: dict[int, dict[str, Any]] = {}
    for rows, tag in ((scratch, "scratch"), (weak, "weak")):
        for r in rows:
            seed = out.setdefault(int(r["seed"]), {"seed": int(r["seed"])})
            if r["method"] == "teacher":
                seed[f"teacher_{tag}"] = float(r["top1"])
            elif r["method"] == "student_finetuned":
                seed[f"student_{tag}"] = float(r["top1"])
    return [out[s] for s in sorted(out)]


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    """Top-1 (%) per seed, mean ± std, and the paired wins of weak over scratch."""
    head = ["seed", *(title for _, title in COLUMNS), "teacher gain", "student gain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    t_gain = [r["teacher_weak"] - r["teacher_scratch"] for r in rows]
    s_gain = [r["student_weak"] - r["student_scratch"] for r in rows]
    for r, tg, sg in zip(rows, t_gain, s_gain, strict=True):
        cells = [str(r["seed"]), *(f"{100 * r[k]:.2f}" for k, _ in COLUMNS)]
        lines.append("| " + " | ".join([*cells, f"{100 * tg:+.2f}", f"{100 * sg:+.2f}"]) + " |")
    means = [_mean_std([r[k] for r in rows]) for k, _ in COLUMNS]
    lines.append(
        "| mean ± std | " + " | ".join([*means, _mean_std(t_gain), _mean_std(s_gain)]) + " |"
    )
    lines += [
        "",
        f"The weakly initialized teacher beats the teacher from scratch on "
        f"{sum(g > 0 for g in t_gain)} of {len(rows)} seeds "
        f"(mean {100 * float(np.mean(t_gain)):+.2f} points); its fine-tuned student beats "
        f"the scratch loop's on {sum(g > 0 for g in s_gain)} of {len(rows)} "
        f"(mean {100 * float(np.mean(s_gain)):+.2f}).",
    ]
    return "\n".join(lines) + "\n"


def precision_markdown(rows: list[dict[str, Any]]) -> str:
    """Word prediction on the captioned test split, mean ± std over seeds, for the weak
    models and the frequency baseline. ``rows``: seed, method, p_at_1, p_at_5, p_at_10,
    plus the chosen pretraining length per seed (``epochs``)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| method | P@1 | P@5 | P@10 |", "|---|---:|---:|---:|"]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        cells = [_mean_std([r[f"p_at_{k}"] for r in mine], 1.0, 3) for k in (1, 5, 10)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    wins = [
        next(r["p_at_1"] for r in rows if r["seed"] == s and r["method"] == "model")
        > next(r["p_at_1"] for r in rows if r["seed"] == s and r["method"] != "model")
        for s in sorted({r["seed"] for r in rows})
    ]
    epochs = {r["seed"]: r.get("epochs") for r in rows if r["method"] == "model"}
    lines += [
        "",
        f"The model beats the frequency baseline at P@1 on {sum(wins)} of {len(wins)} seeds; "
        f"pretraining epochs chosen on the validation shards per seed: {epochs}.",
    ]
    return "\n".join(lines) + "\n"
