"""What a command wrote, with paths: the table that ends every ``cvpipe`` command.

Each function names the outputs of one command from its config (the same URL helpers
the stages write through); :func:`print_written` shows those that exist, so the table
never lists a file that is not there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cvpipe.core import storage

Output = tuple[str, str]  # (what, URL)


def exists(url: str) -> bool:
    fs, path = storage.url_to_fs(url)
    return bool(fs.exists(path))


def print_written(outputs: Iterable[Output], title: str = "written") -> None:
    """The outputs that exist, one per line (never folded: a path is for copying);
    nothing when none does."""
    import typer

    rows = [(what, url) for what, url in outputs if url and exists(url)]
    if not rows:
        return
    width = max(len(what) for what, _ in rows)
    typer.echo(f"{title}:")
    for what, url in rows:
        typer.echo(f"  {what:<{width}}  {url}")


def ingest(root: str, partition: str, summary: Mapping[str, Any] | None = None) -> list[Output]:
    out = [
        ("shards", storage.join(root, "shards", partition)),
        ("index", storage.join(root, "index", partition)),
    ]
    if summary is None or summary.get("rejected"):
        out.append(("rejects", storage.join(root, "rejects", "ingest", partition)))
    return out


def backfill(root: str, partitions: Sequence[str], summaries: Mapping[str, Any]) -> list[Output]:
    return [o for p in partitions for o in ingest(root, p, summaries.get(p))]


def infer(out: str, features: bool, summary: Mapping[str, Any] | None = None) -> list[Output]:
    outputs = [("predictions", storage.join(out, "predictions"))]
    if features:
        outputs.append(("features", storage.join(out, "features")))
    if summary is None or summary.get("rejected"):
        outputs.append(("rejects", storage.join(out, "rejects", "infer")))
    return outputs


def select(out: str) -> list[Output]:
    from cvpipe.label import selection

    return [
        ("selection", selection.selection_url(out)),
        ("report", selection.report_md_url(out)),
        ("report table", selection.report_url(out)),
    ]


def materialize(out: str) -> list[Output]:
    return [("shards", storage.join(out, "shards"))]


def anchors(out: str) -> list[Output]:
    return [("anchors", out)]


def labels(out: str) -> list[Output]:
    return [("labels", out)]


def train(out: str, test: bool) -> list[Output]:
    from cvpipe.learn import resume, training

    outputs = [
        ("checkpoint", resume.final_url(out)),
        ("metrics", resume.metrics_url(out)),
        ("curves", resume.curves_url(out)),
        ("rejects", storage.join(out, "rejects.parquet")),
    ]
    if test:
        per_class, metrics = training.eval_urls(storage.join(out, "eval"), "test")
        outputs += [("test scores", metrics), ("test per class", per_class)]
    return outputs


def chop(urls: Mapping[str, str]) -> list[Output]:
    return [(f"chop {kind}", url) for kind, url in urls.items()]


def semi_supervised(root: str) -> list[Output]:
    names = [
        ("results", "results.md"),
        ("results table", "results.parquet"),
        ("per-seed chart", "results_per_seed.png"),
        ("every run", "runs.parquet"),
        ("K sweep", "sweep_top_k.md"),
        ("K sweep plot", "sweep_top_k.png"),
        ("|U| sweep", "sweep_unlabeled.md"),
        ("|U| sweep plot", "sweep_unlabeled.png"),
    ]
    return [(what, storage.join(root, name)) for what, name in names]


def anchor_transfer(root: str) -> list[Output]:
    names = [
        ("pseudo-label datasets", "pseudo_labels.md"),
        ("pseudo-label table", "pseudo_labels.parquet"),
        ("label sizes plot", "pseudo_labels_sizes.png"),
        ("transfer", "transfer.md"),
        ("transfer table", "transfer.parquet"),
        ("anchors", "anchors.parquet"),
    ]
    return [(what, storage.join(root, name)) for what, name in names]


def folder(what: str, url: str) -> list[Output]:
    return [(what, url)]
