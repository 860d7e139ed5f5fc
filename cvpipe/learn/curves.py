"""Training curves: loss and each metric per epoch, train against validation, as a PNG
beside a run's metrics table (``curves.png``)."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

NOT_METRICS = ("epoch", "split", "images_per_s")


def curves_png(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """One panel per quantity (loss, then the task's metrics such as top1), one line per
    split (train, val), epochs on x. ``rows`` follow ``tables.metrics_schema``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Splits may report different quantities (a detector's train rows hold its losses,
    # its val rows mAP): every quantity any row has gets a panel.
    names = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in NOT_METRICS]
    fig, axes = plt.subplots(
        1, max(1, len(names)), figsize=(3.6 * max(1, len(names)), 3.0), squeeze=False
    )
    for ax, name in zip(axes[0], names, strict=False):
        for split in dict.fromkeys(r["split"] for r in rows):
            points = [
                (r["epoch"], r[name])
                for r in rows
                if r["split"] == split and r.get(name) is not None and not math.isnan(r[name])
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=split)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
