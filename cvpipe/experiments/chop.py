"""The "degree of fine-tuning" experiment (Yosinski et al. 2014): for n = 0..L copy a
base model's first n stages, retrain everything above them with the copy frozen (AnB)
or fine-tuned (AnB+), and score each run on a test set.

:func:`chop_configs` lists the runs, :func:`chop_report` publishes the table, the
markdown and the plot, and :func:`chop` does both in one process (each run is skipped
when committed); flows/training.py runs the same steps as Prefect tasks.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from cvpipe.core import tables
from cvpipe.core.storage import join, write_bytes_atomic
from cvpipe.learn import training
from cvpipe.learn.config import TrainConfig
from cvpipe.models import ARCHITECTURES


def chop_configs(
    cfg: TrainConfig, modes: Sequence[str] = ("frozen", "finetuned")
) -> list[tuple[int, str, TrainConfig]]:
    """The runs of the chop experiment: for n = 0..L (L = the architecture's stage
    count), copy the base model's first n stages and retrain everything above them,
    with the copied stages ``frozen`` (Yosinski's AnB) or ``finetuned`` (AnB+).
    n = 0 trains from scratch, so it runs once (as ``finetuned``) whatever the modes."""
    bad = set(modes) - {"frozen", "finetuned"}
    if bad:
        raise ValueError(f"unknown chop mode(s) {sorted(bad)}; use frozen, finetuned")
    runs = []
    for n in range(len(ARCHITECTURES[cfg.arch].stages) + 1):
        for mode in modes:
            if n == 0 and mode == "frozen" and "finetuned" in modes:
                continue
            freeze = n if mode == "frozen" else 0
            runs.append(
                (n, mode, cfg.model_copy(update={"copy_stages": n, "freeze_stages": freeze}))
            )
    return runs


def chop_run_dir(out: str, n: int, mode: str) -> str:
    return join(out, "runs", f"n{n}-{mode}")


def chop_report(rows: Sequence[dict[str, Any]], out: str, arch: str) -> dict[str, str]:
    """Publish the chop table (``chop.parquet``, tables.CHOP), ``chop.md`` and
    ``chop.png`` under ``out``; ``rows`` carry n, mode, top1, top5. Returns the URLs."""
    stages = ARCHITECTURES[arch].stages
    rows = [{**r, "stage": stages[r["n"] - 1] if r["n"] > 0 else ""} for r in rows]
    if any(r["n"] == 0 for r in rows):
        # n = 0 is the same run in both modes (nothing copied, nothing frozen).
        base = next(r for r in rows if r["n"] == 0)
        have = {(r["n"], r["mode"]) for r in rows}
        for mode in sorted({r["mode"] for r in rows}):
            if (0, mode) not in have:
                rows.append({**base, "mode": mode})
    rows.sort(key=lambda r: (r["mode"], r["n"]))
    lin = tables.lineage(None, stage="chop", arch=arch)
    urls = {
        "parquet": join(out, "chop.parquet"),
        "markdown": join(out, "chop.md"),
        "png": join(out, "chop.png"),
    }
    tables.write_parquet(tables.from_rows(rows, tables.CHOP), urls["parquet"], lin)

    modes = sorted({r["mode"] for r in rows})
    by = {(r["n"], r["mode"]): r for r in rows}
    ns = sorted({r["n"] for r in rows})
    lines = [
        f"# Chop experiment ({arch}): retrain above stage n",
        "",
        "| n | stage | " + " | ".join(f"{m} top-1" for m in modes) + " |",
        "|---|---|" + "---|" * len(modes),
    ]
    for n in ns:
        cells = [f"{by[(n, m)]['top1']:.4f}" if (n, m) in by else "" for m in modes]
        lines.append(f"| {n} | {stages[n - 1] if n else '(scratch)'} | " + " | ".join(cells) + " |")
    write_bytes_atomic(urls["markdown"], ("\n".join(lines) + "\n").encode())
    write_bytes_atomic(urls["png"], _plot(by, ns, modes, stages, arch))
    return urls


def _plot(
    by: dict[tuple[int, str], dict[str, Any]],
    ns: list[int],
    modes: list[str],
    stages: Sequence[str],
    arch: str,
) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in modes:
        pts = [(n, by[(n, m)]["top1"]) for n in ns if (n, m) in by]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xticks(ns, ["0"] + [f"{n}\n{stages[n - 1]}" for n in ns if n], fontsize=8)
    ax.set_xlabel("stages copied from the base model (n)")
    ax.set_ylabel("top-1 on the target test set")
    ax.set_title(f"{arch}: frozen vs fine-tuned transfer")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def chop(
    base_checkpoint: str,
    cfg: TrainConfig,
    train_urls: Sequence[str],
    test_urls: Sequence[str],
    out: str,
    modes: Sequence[str] = ("frozen", "finetuned"),
) -> dict[str, str]:
    """The whole chop experiment in one call (each run is skipped when committed)."""
    rows = []
    for n, mode, run_cfg in chop_configs(cfg, modes):
        run_out = chop_run_dir(out, n, mode)
        ckpt = training.train(run_cfg, train_urls, run_out, init_checkpoint=base_checkpoint)
        res = training.evaluate(ckpt, test_urls, run_out, device=cfg.device)
        rows.append({"n": n, "mode": mode, "top1": res.top1, "top5": res.top5})
    return chop_report(rows, out, cfg.arch)
