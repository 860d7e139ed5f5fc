"""How good an embedding and its index are, on a labeled evaluation set.

- recall@k of the approximate index against exact search (the same vectors in a flat
  index): the share of the exact k nearest the index returns;
- retrieval precision@k by label: the share of a query's k neighbours (itself excluded)
  that carry its label, for the approximate and the exact neighbours;
- a 2-D projection of the embeddings (t-SNE, seeded; PCA above 5,000 points) coloured
  by label.

Labels come from the ingest index tables of the shards (``{root}/index/...``), i.e. the
``label`` of each sample's metadata.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cvpipe.core import tables
from cvpipe.core.storage import is_committed, join, write_bytes_atomic
from cvpipe.data.shards import ingest_root, shard_id, unit_url
from cvpipe.index import query, source, store
from cvpipe.index.config import IndexBuildConfig, QueryConfig

TSNE_MAX = 5_000


def shard_labels(shard_urls: Sequence[str]) -> dict[str, str]:
    """``key -> label`` of the labeled samples of ``shard_urls`` (from ingest's index)."""
    out: dict[str, str] = {}
    for url in shard_urls:
        root = ingest_root(url)
        if root is None:
            raise ValueError(f"{url} is not under an ingest root ({{root}}/shards/...)")
        t = tables.read_parquet(unit_url(root, "index", shard_id(url)), columns=["key", "label"])
        for k, lab in zip(t.column("key").to_pylist(), t.column("label").to_pylist(), strict=True):
            if lab is not None:
                out[k] = str(lab)
    return out


def _neighbours(url: str) -> dict[str, list[str]]:
    t = tables.read_parquet(url, columns=["key", "neighbors"])
    return dict(zip(t.column("key").to_pylist(), t.column("neighbors").to_pylist(), strict=True))


def retrieval_rows(
    features: str | list[str],
    labels: Mapping[str, str],
    out: str,
    *,
    name: str,
    seed: int,
    ks: Sequence[int] = (1, 5, 10),
    kind: str = "auto",
    memory: str = "4G",
) -> list[dict[str, Any]]:
    """Index ``features`` twice (``kind`` and exact), query every vector against both, and
    score: one tables.RETRIEVAL row per k. Every step is skipped when committed."""
    k = max(ks)
    approx, exact = join(out, f"index-{kind}"), join(out, "index-exact")
    store.build_index(IndexBuildConfig(embeddings=features, out=approx, kind=kind, memory=memory))
    store.build_index(IndexBuildConfig(embeddings=features, out=exact, kind="flat"))
    got = {}
    for ix, tag in ((approx, "approx"), (exact, "exact")):
        url = join(out, f"neighbors-{tag}.parquet")
        if not is_committed(url):
            query.query_embeddings(QueryConfig(index=ix, embeddings=features, out=url, k=k))
        got[tag] = _neighbours(url)
    index_kind = store.read_manifest(approx).plan["kind"]
    rows = []
    for kk in ks:
        rec, prec, eprec, n = 0.0, 0.0, 0.0, 0
        for key, found in got["approx"].items():
            truth = got["exact"][key][:kk]
            found = found[:kk]
            rec += len(set(found) & set(truth)) / max(1, len(truth))
            own = labels.get(key)
            if own is None:
                continue
            prec += sum(labels.get(f) == own for f in found) / max(1, len(found))
            eprec += sum(labels.get(f) == own for f in truth) / max(1, len(truth))
            n += 1
        q = len(got["approx"])
        rows.append({
            "features": name, "seed": seed, "k": kk, "queries": q, "index_kind": index_kind,
            "recall": rec / q if q else math.nan,
            "precision": prec / n if n else math.nan,
            "exact_precision": eprec / n if n else math.nan,
        })  # fmt: skip
    return rows


def retrieval_markdown(rows: Sequence[Mapping[str, Any]], baseline: str = "teacher") -> str:
    """Mean +- std over seeds per (features, k), and the paired wins of each features
    set over ``baseline`` (same seed, same k: higher precision counts as a win)."""
    by: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["features"], r["k"]), []).append(r)
    base = {(r["seed"], r["k"]): r["precision"] for r in rows if r["features"] == baseline}
    lines = [
        "| features | k | seeds | precision@k | exact precision@k | recall@k vs exact | "
        f"wins vs {baseline} |",
        "|---|---|---|---|---|---|---|",
    ]

    def ms(values: list[float]) -> str:
        a = np.asarray(values, float)
        return f"{a.mean():.4f} +- {a.std(ddof=1) if len(a) > 1 else 0.0:.4f}"

    for (name, k), rs in sorted(by.items(), key=lambda t: (t[0][1], t[0][0])):
        wins = "" if name == baseline else (
            f"{sum(r['precision'] > base.get((r['seed'], k), math.inf) for r in rs)}/{len(rs)}"
        )  # fmt: skip
        lines.append(
            f"| {name} | {k} | {len(rs)} | {ms([r['precision'] for r in rs])} | "
            f"{ms([r['exact_precision'] for r in rs])} | {ms([r['recall'] for r in rs])} | "
            f"{wins} |"
        )
    return "\n".join(lines) + "\n"


def projection_png(
    features: str | list[str], labels: Mapping[str, str], out_png: str, title: str, seed: int = 0
) -> str:
    """A 2-D projection of the labeled vectors of ``features``, coloured by label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys, xs = [], []
    for k, _, x in source.iter_embeddings(source.embedding_files(features)):
        keep = [i for i, key in enumerate(k.to_pylist()) if key in labels]
        keys += [k[i].as_py() for i in keep]
        xs.append(np.asarray(x)[keep])
    x = np.concatenate(xs) if xs else np.empty((0, 2), np.float32)
    if len(x) < 3:
        raise ValueError(f"{features}: too few labeled vectors to project ({len(x)})")
    if len(x) <= TSNE_MAX:
        from sklearn.manifold import TSNE

        xy = TSNE(2, random_state=seed, init="pca", perplexity=min(30, len(x) - 1)).fit_transform(x)
        method = "t-SNE"
    else:
        c = x - x.mean(0)
        xy = c @ np.linalg.svd(c, full_matrices=False)[2][:2].T
        method = "PCA"
    names = sorted(
        {labels[k] for k in keys}, key=lambda c: (0, int(c), "") if c.isdigit() else (1, 0, c)
    )
    fig, ax = plt.subplots(figsize=(6, 5))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    lab = np.array([labels[k] for k in keys])
    for i, name in enumerate(names):
        m = lab == name
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(i % cmap.N), label=name)
    ax.set_title(f"{title} ({method}, {len(x)} images)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=2, fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(out_png, buf.getvalue())
    return out_png
