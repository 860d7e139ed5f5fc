"""Named anchors in a reference model's feature space (Dube et al. 2019).

An *anchor* is a labeled dataset (``animal``, ``plant``, ``tool`` ...) summarized in a
reference model's feature space: the mean of its images' vectors of one ``kind``:

- ``mean``: the penultimate feature vector itself;
- ``normalized``: the per-image distribution ``relu(f) / sum(relu(f))`` (negative
  activations clipped to 0; an all-zero image counts as uniform);
- ``softmax``: ``softmax(W f + b)`` with the reference checkpoint's head (``W``, ``b``),
  so the features files suffice.

Anchors are streamed per features file as float64 sums and counts
(:func:`anchor_partial`), merged associatively in any order and any tree
(:func:`merge_anchor_sums`) and written as ANCHORS Parquet, sorted by name
(:func:`write_anchors`). Images are always compared in the anchors' space: for
``normalized`` and ``softmax`` anchors an image's vector goes through the same
transform first (:func:`to_space`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from cvpipe.core import tables
from cvpipe.data.features import feature_dim, features_urls, iter_features

KINDS = ("mean", "normalized", "softmax")


# ------------------------------------------------------------------- vector transforms


@functools.lru_cache(maxsize=4)
def load_head(checkpoint: str) -> tuple[np.ndarray, np.ndarray]:
    """The reference checkpoint's head as float32 ``(W[C, D], b[C])`` (weights_only load)."""
    from cvpipe.models import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    w = model.head.weight.detach().cpu().numpy().astype(np.float32)
    b = model.head.bias.detach().cpu().numpy().astype(np.float32)
    return w, b


def to_space(
    emb: np.ndarray, kind: str, head: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """Map embeddings into an anchor kind's space (float32; may return ``emb`` itself)."""
    if kind == "mean":
        return emb
    if kind == "normalized":
        p = np.maximum(emb, 0, dtype=np.float32)
        s = p.sum(axis=1, keepdims=True, dtype=np.float64)
        zero = s[:, 0] == 0
        p /= np.where(s == 0, 1.0, s).astype(np.float32)
        if zero.any():
            p[zero] = 1.0 / p.shape[1]
        return p
    if kind == "softmax":
        if head is None:
            raise ValueError("softmax vectors need the reference checkpoint's head")
        w, b = head
        if w.shape[1] != emb.shape[1]:
            raise ValueError(
                f"head expects {w.shape[1]}-d features, embeddings are {emb.shape[1]}-d"
            )
        z = emb @ w.T + b
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z.astype(np.float32, copy=False)
    raise ValueError(f"unknown vector kind {kind!r}; choose from {KINDS}")


# ----------------------------------------------------------------------------- anchors


@dataclass
class AnchorSums:
    """Per-anchor float64 sums and counts of vectors of one ``kind``: a partial result.

    ``model`` is the reference model id found in the features' lineage (None if absent),
    ``checkpoint`` the head used for ``softmax``; merging parts that disagree is an error.
    """

    kind: str
    dim: int
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    model: str | None = None
    checkpoint: str | None = None


def _model_of(features_url: str) -> str | None:
    lin = tables.read_lineage(features_url)
    return lin.get("model_id") or lin.get("model")


def anchor_partial(
    features_url: str,
    anchor: str,
    kind: str = "mean",
    checkpoint: str | None = None,
    batch_rows: int | None = None,
) -> AnchorSums:
    """Sums and count of one anchor's vectors over one features file (one pass, streamed)."""
    if kind not in KINDS:
        raise ValueError(f"unknown vector kind {kind!r}; choose from {KINDS}")
    head = load_head(checkpoint) if kind == "softmax" and checkpoint else None
    if kind == "softmax" and head is None:
        raise ValueError("kind='softmax' needs checkpoint= (the reference model)")
    total: np.ndarray | None = None
    count = 0
    for batch in iter_features(features_url, batch_rows, with_keys=False, copy=False):
        v = to_space(batch.matrix, kind, head)
        s = v.sum(axis=0, dtype=np.float64)
        total = s if total is None else total + s
        count += v.shape[0]
    dim = head[0].shape[0] if head is not None else feature_dim(features_url)
    if total is None:
        total = np.zeros(dim, np.float64)
    return AnchorSums(
        kind=kind,
        dim=dim,
        sums={anchor: total},
        counts={anchor: count},
        model=_model_of(features_url),
        checkpoint=checkpoint if kind == "softmax" else None,
    )


def merge_anchor_sums(parts: Iterable[AnchorSums]) -> AnchorSums:
    """Add partial sums (associative and commutative: any order, any tree). Streams:
    memory holds one part and the running total."""
    out: AnchorSums | None = None
    for p in parts:
        if out is None:
            out = AnchorSums(p.kind, p.dim, model=p.model, checkpoint=p.checkpoint)
        for attr in ("kind", "dim", "model", "checkpoint"):
            if getattr(p, attr) != getattr(out, attr):
                raise ValueError(
                    f"cannot merge anchor sums with different {attr}: "
                    f"{getattr(out, attr)!r} vs {getattr(p, attr)!r}"
                )
        for name, s in p.sums.items():
            out.sums[name] = out.sums[name] + s if name in out.sums else s.copy()
            out.counts[name] = out.counts.get(name, 0) + p.counts[name]
    if out is None:
        raise ValueError("nothing to merge")
    return out


def _sums_lineage(sums: AnchorSums) -> dict[str, Any]:
    return {
        "stage": "anchors",
        "vector_kind": sums.kind,
        "dim": sums.dim,
        "model_id": sums.model,
        "checkpoint": sums.checkpoint,
    }


def write_anchor_sums(sums: AnchorSums, url: str, lineage: Mapping[str, Any] | None = None) -> None:
    """Persist partial sums (ANCHOR_SUMS) so a tree of merges can run as separate units."""
    names = sorted(sums.sums)
    table = pa.Table.from_pydict(
        {
            "anchor": names,
            "count": [sums.counts[n] for n in names],
            "sum": [sums.sums[n].tolist() for n in names],
        },
        schema=tables.ANCHOR_SUMS,
    )
    tables.write_parquet(table, url, {**tables.lineage(), **(lineage or {}), **_sums_lineage(sums)})


def read_anchor_sums(url: str) -> AnchorSums:
    lin = tables.read_lineage(url)
    t = tables.read_parquet(url)
    out = AnchorSums(lin["vector_kind"], int(lin["dim"]), model=lin.get("model_id"))
    out.checkpoint = lin.get("checkpoint")
    for name, count, s in zip(
        t.column("anchor").to_pylist(),
        t.column("count").to_pylist(),
        t.column("sum").to_pylist(),
        strict=True,
    ):
        out.sums[name] = np.asarray(s, np.float64)
        out.counts[name] = int(count)
    return out


def merge_anchor_files(urls: Iterable[str]) -> AnchorSums:
    """Merge persisted partial sums, reading one file at a time."""
    return merge_anchor_sums(read_anchor_sums(u) for u in urls)


def write_anchors(sums: AnchorSums, url: str, lineage: Mapping[str, Any] | None = None) -> None:
    """Write the anchors (mean of each anchor's vectors), sorted by anchor name, as ANCHORS
    Parquet; the lineage records the vector kind, dim, model id and checkpoint."""
    names = sorted(sums.sums)
    empty = [n for n in names if sums.counts[n] == 0]
    if empty:
        raise ValueError(f"anchor(s) with no images: {empty}")
    vectors = [(sums.sums[n] / sums.counts[n]).astype(np.float32) for n in names]
    table = pa.Table.from_pydict(
        {
            "anchor": names,
            "count": [sums.counts[n] for n in names],
            "vector": [v.tolist() for v in vectors],
        },
        schema=tables.ANCHORS,
    )
    tables.write_parquet(table, url, {**tables.lineage(), **(lineage or {}), **_sums_lineage(sums)})


def read_anchors(url: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(names, vectors[A, D] float32, counts[A] int64)`` in file order (sorted by name)."""
    t = tables.read_parquet(url)
    names = t.column("anchor").to_pylist()
    if len(set(names)) != len(names):
        raise ValueError(f"{url}: duplicate anchor names")
    vec = t.column("vector").combine_chunks()
    dim = len(vec[0]) if len(vec) else 0
    if any(len(v) != dim for v in vec.to_pylist()):
        raise ValueError(f"{url}: anchor vectors of different lengths")
    mat = vec.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    counts = t.column("count").to_numpy().astype(np.int64)
    return names, mat, counts


def build_anchors(
    sources: Mapping[str, str | Sequence[str]],
    out_url: str,
    kind: str = "mean",
    checkpoint: str | None = None,
    lineage: Mapping[str, Any] | None = None,
) -> str:
    """Everything in one process (notebooks, small runs): ``sources`` maps an anchor name
    to a features spec (file, folder, brace pattern) or a list of features URLs."""
    parts = (
        anchor_partial(u, name, kind, checkpoint)
        for name, spec in sources.items()
        for u in features_urls(spec)
    )
    write_anchors(merge_anchor_sums(parts), out_url, lineage)
    return out_url
