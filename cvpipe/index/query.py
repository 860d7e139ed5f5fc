"""Questions to an index: the neighbours of every vector of an embeddings set, of one
key, of one image; near-duplicates; a contact sheet of neighbours.

A query's own key never counts as its neighbour: vectors that are in the index find
themselves first, and a key indexed twice would find its copy.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cvpipe.core import tables
from cvpipe.core.storage import expand_specs, open_atomic, write_bytes_atomic
from cvpipe.index import engine, source
from cvpipe.index.config import DedupConfig, QueryConfig
from cvpipe.index.store import IndexFolderError, OpenIndex, open_index

MAX_EXTRA = 64  # a key indexed more than this many times loses neighbours to itself


@dataclass
class Hit:
    rank: int
    key: str
    shard: str
    distance: float
    id: int


def neighbours(
    opened: OpenIndex,
    x: np.ndarray,
    query_keys: Sequence[str | None],
    k: int,
    nprobe: int | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Row ids and distances of the ``k`` nearest of each row of ``x``, nearest first,
    leaving out hits whose key is the query's own (``None``: keep every hit)."""
    extra = 1
    todo = np.arange(len(x))
    ids_out: list[list[int]] = [[] for _ in range(len(x))]
    dist_out: list[list[float]] = [[] for _ in range(len(x))]
    while len(todo):
        dist, ids = opened.search(x[todo], k + extra, nprobe)
        keys, _ = opened.ids.take(ids.reshape(-1))
        width = k + extra
        again = []
        for row, q in enumerate(todo):
            own = query_keys[q]
            kept_i, kept_d = [], []
            for j in range(width):
                i = int(ids[row, j])
                if i < 0:
                    break
                if own is not None and keys[row * width + j] == own:
                    continue
                kept_i.append(i)
                kept_d.append(float(dist[row, j]))
            full = int(ids[row, -1]) >= 0  # the index had more to give
            if len(kept_i) < k and full and extra < MAX_EXTRA:
                again.append(q)
            ids_out[q], dist_out[q] = kept_i[:k], kept_d[:k]
        todo = np.array(again, dtype=np.int64)
        extra *= 4
    return ids_out, dist_out


def _lineage_schema(schema: pa.Schema, lineage: dict[str, Any]) -> pa.Schema:
    return schema.with_metadata(
        {tables.LINEAGE_KEY: json.dumps(lineage, sort_keys=True, default=str).encode()}
    )


def _check_model(opened: OpenIndex, urls: Sequence[str]) -> None:
    want = opened.manifest.model_id
    for u in urls:
        got = source.model_of(u)
        if want and got and got != want:
            raise IndexFolderError(
                f"{u} holds embeddings of model {got}; the index {opened.url} is of model {want}"
            )


def query_embeddings(cfg: QueryConfig) -> dict[str, Any]:
    """Write ``cfg.out``: the ``k`` neighbours of every vector of ``cfg.embeddings``
    (tables.NEIGHBORS, one row per query, in the embeddings' order), streamed."""
    with engine.faiss_threads(cfg.threads):
        return _query(cfg)


def _query(cfg: QueryConfig) -> dict[str, Any]:
    opened = open_index(cfg.index)
    urls = source.embedding_files(cfg.embeddings)
    _check_model(opened, urls)
    nprobe = cfg.nprobe or opened.manifest.nprobe
    lineage = tables.lineage(
        cfg, stage="index-query", index=cfg.index, build_hash=opened.manifest.build_hash,
        index_count=opened.manifest.count, k=cfg.k, nprobe=nprobe,
    )  # fmt: skip
    schema = _lineage_schema(tables.NEIGHBORS, lineage)
    rows = 0
    with open_atomic(cfg.out) as f, pq.ParquetWriter(f, schema, compression="zstd") as writer:
        for keys, _, x in source.iter_embeddings(urls, cfg.batch_rows):
            qkeys = keys.to_pylist()
            ids, dist = neighbours(opened, x, qkeys, cfg.k, nprobe)
            flat, _ = opened.ids.take(np.fromiter((i for r in ids for i in r), np.int64))
            offsets = np.cumsum([0] + [len(r) for r in ids]).astype(np.int32)
            writer.write_batch(
                pa.record_batch(
                    [
                        pa.array(qkeys, pa.string()),
                        pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.string())),
                        pa.ListArray.from_arrays(
                            pa.array(offsets),
                            pa.array(np.fromiter((d for r in dist for d in r), np.float32)),
                        ),
                    ],
                    schema=schema,
                )
            )
            rows += len(qkeys)
    return {"out": cfg.out, "queries": rows, "k": cfg.k, "nprobe": nprobe}


def dedup(cfg: DedupConfig) -> dict[str, Any]:
    """Write ``cfg.out`` (tables.DUPLICATES): every key with a neighbour closer than
    ``cfg.threshold`` that the index holds before it (a smaller row id), so of a group
    of near-duplicates the first added is kept and the others are marked. Vectors
    that are not in the index (``cfg.embeddings`` given) are marked against any
    indexed neighbour of another key."""
    with engine.faiss_threads(cfg.threads):
        return _dedup(cfg)


def _dedup(cfg: DedupConfig) -> dict[str, Any]:
    opened = open_index(cfg.index)
    m = opened.manifest
    own_sources = cfg.embeddings is None
    urls = (
        [u for p in m.parts for u in p.sources]
        if own_sources
        else source.embedding_files(cfg.embeddings)
    )
    _check_model(opened, urls)
    nprobe = cfg.nprobe or m.nprobe
    lineage = tables.lineage(
        cfg, stage="dedup", index=cfg.index, build_hash=m.build_hash, index_count=m.count,
        threshold=cfg.threshold, metric=m.metric, nprobe=nprobe,
    )  # fmt: skip
    schema = _lineage_schema(tables.DUPLICATES, lineage)
    checked = marked = 0
    with open_atomic(cfg.out) as f, pq.ParquetWriter(f, schema, compression="zstd") as writer:
        for keys, shards, x in source.iter_embeddings(urls, cfg.batch_rows):
            qkeys = keys.to_pylist()
            ids, dist = neighbours(opened, x, qkeys, cfg.k, nprobe)
            rows: dict[str, list[Any]] = {"key": [], "shard": [], "of": [], "d": []}
            for r, (hits, ds) in enumerate(zip(ids, dist, strict=True)):
                own_id = checked + r if own_sources else None
                for i, d in zip(hits, ds, strict=True):
                    if d >= cfg.threshold:
                        break  # nearest first: nothing closer follows
                    if own_id is None or i < own_id:
                        rows["key"].append(qkeys[r])
                        rows["shard"].append(shards[r].as_py())
                        rows["of"].append(i)
                        rows["d"].append(d)
                        break
            of_keys, _ = opened.ids.take(np.asarray(rows["of"], np.int64))
            writer.write_batch(
                pa.record_batch(
                    [
                        pa.array(rows["key"], pa.string()),
                        pa.array(rows["shard"], pa.string()),
                        pa.array(of_keys, pa.string()),
                        pa.array(rows["d"], pa.float32()),
                    ],
                    schema=schema,
                )
            )
            checked += len(qkeys)
            marked += len(rows["key"])
    return {"out": cfg.out, "checked": checked, "duplicates": marked, "threshold": cfg.threshold}


def duplicate_keys(url: str) -> pa.Array:
    """The keys a duplicates table marks: what selection and materialize leave out."""
    return tables.read_parquet(url, columns=["key"]).column("key").combine_chunks()


# ------------------------------------------------------------------ single queries


def _hits(opened: OpenIndex, ids: list[int], dist: list[float]) -> list[Hit]:
    keys, shards = opened.ids.take(np.asarray(ids, np.int64))
    return [
        Hit(rank=r + 1, key=k, shard=s, distance=d, id=i)
        for r, (k, s, d, i) in enumerate(zip(keys, shards, dist, ids, strict=True))
    ]


def vector_of_key(opened: OpenIndex, key: str) -> np.ndarray:
    """The embedding of an indexed key, read from the index's own sources (exact, even
    where the index keeps only compressed codes)."""
    found = opened.ids.ids_of(key)
    if not len(found):
        raise KeyError(f"key {key!r} is not in the index {opened.url}")
    _, shards = opened.ids.take(found[:1])
    sources = [u for p in opened.manifest.parts for u in p.sources]
    # A features file is named after its shard: look there first, then everywhere.
    first = [u for u in sources if u.endswith(f"{shards[0]}.parquet")]
    for url in first + [u for u in sources if u not in first]:
        for keys, _, x in source.iter_embeddings([url]):
            hit = np.flatnonzero(np.asarray(keys.to_pylist(), dtype=object) == key)
            if len(hit):
                return np.array(x[hit[:1]], dtype=np.float32)
    raise KeyError(f"key {key!r} is in the id map but in none of the index's sources")


def query_key(opened: OpenIndex, key: str, k: int, nprobe: int | None = None) -> list[Hit]:
    ids, dist = neighbours(opened, vector_of_key(opened, key), [key], k, nprobe)
    return _hits(opened, ids[0], dist[0])


def embed_image(image_bytes: bytes, checkpoint: str) -> tuple[np.ndarray, str]:
    """The embedding of one image under a checkpoint (its eval transform, then the
    model's features: the penultimate layer, or an embedding net's output), and the
    checkpoint's model id."""
    import torch

    from cvpipe import models
    from cvpipe.data import images

    model, info = models.load_model(checkpoint)
    model.eval()
    x = models.preprocess(info)(images.decode(image_bytes))[None]
    with torch.inference_mode():
        _, feats = model.forward_with_features(x)
    return feats.float().numpy(), models.model_id(checkpoint)


def query_image(
    opened: OpenIndex, image_bytes: bytes, checkpoint: str, k: int, nprobe: int | None = None
) -> list[Hit]:
    x, mid = embed_image(image_bytes, checkpoint)
    want = opened.manifest.model_id
    if want and mid != want:
        raise IndexFolderError(
            f"{checkpoint} is model {mid}; the index {opened.url} holds model {want}'s embeddings"
        )
    if x.shape[1] != opened.manifest.dim:
        raise IndexFolderError(
            f"{checkpoint} gives {x.shape[1]}-d vectors, the index {opened.manifest.dim}-d"
        )
    ids, dist = neighbours(opened, x, [None], k, nprobe)
    return _hits(opened, ids[0], dist[0])


def _images_of(shard_urls: Sequence[str], wanted: dict[str, set[str]]) -> Iterator[tuple[str, Any]]:
    from cvpipe.data.shards import Reject, iter_shard, shard_id

    for url in shard_urls:
        keys = wanted.get(shard_id(url))
        if not keys:
            continue
        for item in iter_shard(url):
            if not isinstance(item, Reject) and item.key in keys:
                yield item.key, item.image


def contact_sheet(
    hits: Sequence[Hit], shards: str | Sequence[str], out_png: str, query_image: Any = None,
    thumb: int = 96,
) -> str:  # fmt: skip
    """A PNG of the query (when given) and its neighbours, each captioned with rank,
    key and distance; images are read from ``shards`` (the shards the index came from)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    urls = expand_specs(shards if isinstance(shards, str) else list(shards), ".tar")
    wanted: dict[str, set[str]] = {}
    for h in hits:
        wanted.setdefault(h.shard, set()).add(h.key)
    found = dict(_images_of(urls, wanted))
    tiles = ([("query", query_image)] if query_image is not None else []) + [
        (f"{h.rank}. {h.key}\nd={h.distance:.3f}", found.get(h.key)) for h in hits
    ]
    cols = min(6, max(1, len(tiles)))
    rows = -(-len(tiles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * thumb / 50, rows * thumb / 42))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, (title, im) in zip(np.atleast_1d(axes).ravel(), tiles, strict=False):
        if im is not None:
            ax.imshow(im)
        else:
            ax.text(0.5, 0.5, "not found", ha="center", va="center", fontsize=7)
        ax.set_title(title, fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(out_png, buf.getvalue())
    return out_png
