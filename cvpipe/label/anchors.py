"""Divergence-based pseudo-labeling with named anchor points (Dube et al. 2019).

An *anchor* is a labeled dataset (``animal``, ``plant``, ``tool`` ...) summarized in a
reference model's feature space. An unlabeled image gets its distance to every anchor
and a pseudo-label built from those distances.

Anchor vectors (``kind``):

- ``mean``: the mean penultimate feature vector;
- ``normalized``: the mean of per-image distributions ``relu(f) / sum(relu(f))``
  (negative activations are clipped to 0; an all-zero image counts as uniform);
- ``softmax``: the mean of ``softmax(W f + b)`` with the reference checkpoint's head
  (``W``, ``b``), so features Parquet suffices.

Anchors are streamed per features file as float64 sums and counts
(:func:`anchor_partial`), merged associatively in any order (:func:`merge_anchor_sums`)
and written as ANCHORS Parquet (:func:`write_anchors`). Images are always compared in
the anchors' space: for ``normalized`` and ``softmax`` anchors an image's embedding
goes through the same transform first.

Distances (``metric``):

- ``cosine``: ``1 - cos(x, a)``: inner products with L2-normalized anchors through
  FAISS, divided by the image's norm (an all-zero vector has distance 1 to everything);
- ``l2``: the Euclidean distance, ``sqrt`` of FAISS's squared L2;
- ``kl``: KL divergence between distributions (``normalized`` or ``softmax`` anchors
  only). ``kl_direction="image_anchor"`` is ``KL(image || anchor)``,
  ``"anchor_image"`` is ``KL(anchor || image)``. Zeros are smoothed: every entry gets
  ``eps`` added and the distribution is renormalized, so the divergence is finite.

On the CPU, cosine and L2 take the full n x A matrix from ``faiss.pairwise_distances``
(the BLAS product that IndexFlatIP / IndexFlatL2 run for batches) and rank it in numpy:
with A ~ 16 anchors, IndexFlat's top-k heaps cost more than the product itself. When
faiss has GPU support and sees a GPU (``gpu=None``), a GPU IndexFlatIP / IndexFlatL2
searches all A anchors instead; never required.

Ties: anchors are ranked by the total order (distance, anchor index): of two anchors at
the same distance, the one with the lower index in the anchors file (anchors are stored
sorted by name) counts as closer. The farthest anchor of CFA is therefore, among
anchors tied at the largest distance, the one with the highest index.

Labelers map a distance matrix (n x A) and anchor names to :class:`Labels`:

- Nearest-N (:func:`nearest_labels`): names of the N closest anchors, ``"animal>plant"``;
  ``ordered=False`` sorts the N names alphabetically and joins them with ``"+"``;
- CFA (:func:`cfa_labels`): closest and farthest, ``"animal|tool"``;
- Uniform (:func:`uniform_labels`): about equal label sizes from the Nearest-3
  sequences, with a rule frozen from global counts (see :func:`uniform_rule`);
- Random (:func:`random_labels`): ``r0000`` ... uniformly from a hash of (seed, key);
- Vanilla (:func:`vanilla_labels`): the true labels, looked up by key.

Work units (one call each, small arguments): :func:`anchor_partial_file` (one features
file of one anchor -> partial sums), :func:`merge_anchor_files` + :func:`write_anchors`,
:func:`count_sequences_file` (Uniform's counting pass, one features file),
:func:`write_uniform_rule`, :func:`label_file` (one features file -> one labels file).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import posixpath
import queue
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cvpipe.core import tables
from cvpipe.core.storage import expand_urls, is_committed, is_local, join, open_atomic, url_to_fs

KINDS = ("mean", "normalized", "softmax")
METRICS = ("cosine", "l2", "kl")
METHODS = ("nearest", "cfa", "uniform", "random", "vanilla")
KL_DIRECTIONS = ("image_anchor", "anchor_image")
DEFAULT_EPS = 1e-8
READ_BUFFER_BYTES = 4 << 20
# Rows per batch when not given: ~16 MiB of embeddings (8192 rows at 512-d). Smaller
# batches decoded as fast here and cut peak memory (measured 225 MB vs 690 MB at 65536).
BATCH_BYTES = 16 << 20
UNIFORM_DEPTH = 3

SEP_ORDERED = ">"
SEP_UNORDERED = "+"
SEP_CFA = "|"
SEP_PART = "#"


# ------------------------------------------------------------------- reading features


def _embedding_dim(schema: pa.Schema, url: str) -> int:
    if "embedding" not in schema.names:
        raise ValueError(f"{url}: no embedding column (not a features table)")
    t = schema.field("embedding").type
    if not pa.types.is_fixed_size_list(t) or not pa.types.is_float32(t.value_type):
        raise ValueError(f"{url}: embedding is {t}, expected fixed_size_list<float32>[D]")
    return t.list_size


def feature_dim(url: str) -> int:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return _embedding_dim(pq.ParquetFile(f).schema_arrow, url)


def _read_batches(
    url: str, batch_rows: int | None, columns: list[str]
) -> Iterator[tuple[pa.RecordBatch, int]]:
    fs, path = url_to_fs(url)
    # Local files go through pyarrow's native reader (no Python file object per read).
    with contextlib.nullcontext(path) if is_local(fs) else fs.open(path, "rb") as f:
        # pre_buffer=True (pyarrow's default) keeps every row group it read cached until
        # the reader closes: memory grew with the file (measured). A buffered stream
        # instead reads pages as it decodes them.
        pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
        dim = _embedding_dim(pf.schema_arrow, url)
        if not batch_rows:
            batch_rows = max(1024, BATCH_BYTES // (4 * dim))
        for rb in pf.iter_batches(batch_size=batch_rows, columns=columns):
            yield rb, dim


def _prefetch(it: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``it`` in a thread, ``depth`` items ahead: Parquet decoding (which releases
    the GIL) overlaps the search of the previous batch. Memory: ``depth + 2`` items."""
    if depth <= 0:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in it:
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as e:  # handed to the consumer, raised there
            put((e, None))

    t = threading.Thread(target=work, name="cvpipe-prefetch", daemon=True)
    t.start()
    try:
        while True:
            err, item = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
        t.join()


def iter_features(
    url: str,
    batch_rows: int | None = None,
    with_keys: bool = True,
    prefetch: int = 1,
) -> Iterator[tuple[pa.Array | None, pa.Array | None, np.ndarray]]:
    """Stream ``(key, shard, embedding[n, D])`` batches from a features Parquet file.

    The embedding matrix is a zero-copy, read-only view of the Arrow buffer. Memory is
    bounded by a few batches whatever the file size; ``prefetch`` batches are decoded
    ahead in a background thread.
    """
    columns = ["key", "shard", "embedding"] if with_keys else ["embedding"]
    for rb, dim in _prefetch(_read_batches(url, batch_rows, columns), prefetch):
        col = rb.column("embedding")
        if col.null_count:
            raise ValueError(f"{url}: {col.null_count} null embedding(s)")
        # flatten() honours a sliced array's offset, which .values would ignore.
        emb = col.flatten().to_numpy(zero_copy_only=True).reshape(-1, dim)
        if with_keys:
            yield rb.column("key"), rb.column("shard"), emb
        else:
            yield None, None, emb


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
    for _, _, emb in iter_features(features_url, batch_rows, with_keys=False):
        v = to_space(emb, kind, head)
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
    """Add partial sums (associative and commutative: any order, any tree)."""
    parts = list(parts)
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    out = AnchorSums(first.kind, first.dim, model=first.model, checkpoint=first.checkpoint)
    for p in parts:
        for attr in ("kind", "dim", "model", "checkpoint"):
            if getattr(p, attr) != getattr(out, attr):
                raise ValueError(
                    f"cannot merge anchor sums with different {attr}: "
                    f"{getattr(out, attr)!r} vs {getattr(p, attr)!r}"
                )
        for name, s in p.sums.items():
            out.sums[name] = out.sums[name] + s if name in out.sums else s.copy()
            out.counts[name] = out.counts.get(name, 0) + p.counts[name]
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


def anchor_partial_file(
    features_url: str,
    anchor: str,
    out_url: str,
    kind: str = "mean",
    checkpoint: str | None = None,
    batch_rows: int | None = None,
) -> str:
    """Work unit: partial sums of one features file for one anchor, written to ``out_url``
    (skipped when already committed). Returns ``out_url``."""
    if not is_committed(out_url):
        sums = anchor_partial(features_url, anchor, kind, checkpoint, batch_rows)
        write_anchor_sums(sums, out_url, {"features": features_url, "anchor": anchor})
    return out_url


def merge_anchor_files(urls: Iterable[str]) -> AnchorSums:
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
    parts = []
    for name, spec in sources.items():
        urls = expand_urls(spec, ".parquet") if isinstance(spec, str) else list(spec)
        parts.extend(anchor_partial(u, name, kind, checkpoint) for u in urls)
    write_anchors(merge_anchor_sums(parts), out_url, lineage)
    return out_url


# --------------------------------------------------------------------------- distances


def _smooth(p: np.ndarray, eps: float) -> np.ndarray:
    q = p.astype(np.float64) + eps
    q /= q.sum(axis=1, keepdims=True)
    return q


def kl_matrix(
    images: np.ndarray,
    anchors: np.ndarray,
    direction: str = "image_anchor",
    eps: float = DEFAULT_EPS,
) -> np.ndarray:
    """KL divergences (n x A, float32) between image and anchor distributions.

    ``direction="image_anchor"``: ``KL(p_image || q_anchor) = sum p log(p / q)``;
    ``"anchor_image"``: ``KL(q_anchor || p_image)``. Rows are smoothed first (``+ eps``,
    renormalized) so zeros give finite values. Computed as entropy terms minus one
    matrix product, in float64, clipped at 0 against rounding.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"unknown KL direction {direction!r}; choose from {KL_DIRECTIONS}")
    if eps <= 0:
        raise ValueError("eps must be > 0 so that zeros give finite divergences")
    p = _smooth(images, eps)
    q = _smooth(anchors, eps)
    logp, logq = np.log(p), np.log(q)
    if direction == "image_anchor":
        d = (p * logp).sum(axis=1, keepdims=True) - p @ logq.T
    else:
        d = (q * logq).sum(axis=1)[None, :] - logp @ q.T
    return np.maximum(d, 0).astype(np.float32)


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class AnchorIndex:
    """Distances from image vectors (already in the anchors' space) to every anchor."""

    def __init__(
        self,
        anchors: np.ndarray,
        metric: str = "cosine",
        kl_direction: str = "image_anchor",
        eps: float = DEFAULT_EPS,
        gpu: bool | None = None,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
        self.metric = metric
        self.kl_direction = kl_direction
        self.eps = eps
        self.anchors = np.ascontiguousarray(anchors, dtype=np.float32)
        self.count, self.dim = self.anchors.shape
        if self.count == 0:
            raise ValueError("no anchors")
        self.index = None
        self._base = self.anchors
        if metric == "cosine":
            self._base = self.anchors.copy()
            faiss.normalize_L2(self._base)
        if gpu is None:
            gpu = _gpu_available()
        if gpu:
            if metric == "kl":
                raise ValueError("gpu=True: KL divergences are computed on the CPU")
            if not _gpu_available():
                raise RuntimeError("gpu=True, but faiss has no GPU support or sees no GPU")
            index = (
                faiss.IndexFlatIP(self.dim) if metric == "cosine" else faiss.IndexFlatL2(self.dim)
            )
            index.add(self._base)
            self._res = faiss.StandardGpuResources()  # must outlive the GPU index
            self.index = faiss.index_cpu_to_gpu(self._res, 0, index)

    def _to_distances(self, q: np.ndarray, raw: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            # Inner products with the raw vectors, divided by their norms afterwards:
            # the cosine without copying and normalizing the batch.
            norm = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float32))
            raw /= np.where(norm > 0, norm, 1)[:, None]
            return np.subtract(1.0, raw, out=raw)
        return np.sqrt(np.maximum(raw, 0, out=raw), out=raw)

    def distances(self, x: np.ndarray) -> np.ndarray:
        """The full distance matrix (n x A, float32), columns in anchor order."""
        if x.shape[1] != self.dim:
            raise ValueError(f"vectors are {x.shape[1]}-d, anchors {self.dim}-d")
        if self.metric == "kl":
            return kl_matrix(x, self.anchors, self.kl_direction, self.eps)
        q = np.ascontiguousarray(x, dtype=np.float32)
        if self.index is not None:
            raw, order = self.index.search(q, self.count)
            dist = self._to_distances(q, raw)
            out = np.empty_like(dist)
            np.put_along_axis(out, order, dist, axis=1)
            return out
        # On the CPU, the BLAS product IndexFlat itself uses for batches, without its
        # top-k heap: with A = 16 the heap cost more than the product (measured k=2:
        # 1.4 s, product + argmin: 0.4 s per 200k x 512).
        mt = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        return self._to_distances(q, faiss.pairwise_distances(q, self._base, mt))

    def rank(self, x: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(order[n, k], sorted_distances[n, k])``: the k closest anchors (all when k is
        None) under the total order (distance, anchor index), and their distances."""
        k = self.count if k is None else min(k, self.count)
        d = self.distances(x)
        if np.isnan(d).any():
            raise ValueError(f"{int(np.isnan(d).any(axis=1).sum())} vector(s) give NaN distances")
        return top_k(d, k)


def top_k(dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest of each row, ordered by (distance, column index)."""
    n, a = dist.shape
    k = min(k, a)
    if k > 4:
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(dist, order, axis=1)
    work = dist.copy() if k > 1 else dist
    order = np.empty((n, k), np.int64)
    out = np.empty((n, k), dist.dtype)
    rows = np.arange(n)
    for j in range(k):
        i = work.argmin(axis=1)  # the first of equal minima: the lower anchor index
        order[:, j] = i
        out[:, j] = work[rows, i]
        if j + 1 < k:
            work[rows, i] = np.inf
    return order, out


def anchor_distances(
    x: np.ndarray,
    anchors: np.ndarray,
    metric: str = "cosine",
    kl_direction: str = "image_anchor",
    eps: float = DEFAULT_EPS,
    gpu: bool | None = None,
) -> np.ndarray:
    """Distance matrix (n x A) from vectors to anchors (both already in the same space)."""
    return AnchorIndex(anchors, metric, kl_direction, eps, gpu).distances(x)


def rank_anchors(dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, sorted_distances)`` of a distance matrix; ties by anchor index ascending."""
    dist = np.asarray(dist)
    order = np.argsort(dist, axis=1, kind="stable")
    return order, np.take_along_axis(dist, order, axis=1)


# ----------------------------------------------------------------------------- labels


@dataclass
class Labels:
    """Labels of n images: ``vocab[codes[i]]`` is image i's label; ``anchors[i]`` the
    anchor indices the label was built from, in distance order, ``distances[i]`` theirs
    (k columns; k = 0 for labels that use no distances)."""

    vocab: list[str]
    codes: np.ndarray
    anchors: np.ndarray
    distances: np.ndarray

    @property
    def labels(self) -> list[str]:
        v = self.vocab
        return [v[c] for c in self.codes.tolist()]

    def __len__(self) -> int:
        return len(self.codes)


def _encode(parts: np.ndarray, base: int, names: Sequence[str], sep: str) -> tuple:
    """Codes and vocab for rows of anchor indices joined with ``sep``."""
    n, k = parts.shape
    code = np.zeros(n, np.int64)
    for j in range(k):
        code = code * base + parts[:, j]
    uniq, inv = np.unique(code, return_inverse=True)
    vocab = []
    for u in uniq.tolist():
        idx = []
        for _ in range(k):
            u, r = divmod(u, base)
            idx.append(r)
        vocab.append(sep.join(names[i] for i in reversed(idx)))
    return vocab, inv.reshape(-1).astype(np.int64)


def _nearest(
    order: np.ndarray, dsorted: np.ndarray, names: Sequence[str], n: int, ordered: bool
) -> Labels:
    a = len(names)
    if not 1 <= n <= a:
        raise ValueError(f"Nearest-{n} needs 1 <= N <= {a} (the number of anchors)")
    top = order[:, :n]
    if ordered:
        vocab, codes = _encode(top, a, names, SEP_ORDERED)
    else:
        # Sort the N anchors by name: encode name ranks, decode through the sorted names.
        by_name = sorted(range(a), key=lambda i: names[i])
        rank = np.empty(a, np.int64)
        rank[by_name] = np.arange(a)
        vocab, codes = _encode(
            np.sort(rank[top], axis=1), a, [names[i] for i in by_name], SEP_UNORDERED
        )
    return Labels(vocab, codes, top, dsorted[:, :n])


def _cfa(order: np.ndarray, dsorted: np.ndarray, names: Sequence[str]) -> Labels:
    pick = order[:, [0, -1]]
    vocab, codes = _encode(pick, len(names), names, SEP_CFA)
    return Labels(vocab, codes, pick, dsorted[:, [0, -1]])


def nearest_labels(
    dist: np.ndarray, names: Sequence[str], n: int = 1, ordered: bool = True
) -> Labels:
    """Nearest-N: ``"a>b"`` (ordered, closest first) or ``"a+b"`` (names sorted)."""
    return _nearest(*rank_anchors(dist), names, n, ordered)


def cfa_labels(dist: np.ndarray, names: Sequence[str]) -> Labels:
    """Closest and farthest anchor: ``"closest|farthest"``."""
    return _cfa(*rank_anchors(dist), names)


# ------------------------------------------------------------------------ key hashing

_M64 = (1 << 64) - 1


def _splitmix(h: np.ndarray) -> np.ndarray:
    h = h + np.uint64(0x9E3779B97F4A7C15)
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def key_hash(keys: pa.Array | pa.ChunkedArray | Sequence[str], seed: int = 0) -> np.ndarray:
    """A stable 64-bit hash per key (FNV-1a over UTF-8, splitmix64 finish), vectorized.
    The same (seed, key) gives the same value in every process, shard and run."""
    arr = (
        keys if isinstance(keys, pa.Array | pa.ChunkedArray) else pa.array(list(keys), pa.string())
    )
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.large_string())
    if arr.null_count:
        raise ValueError("null key")
    n = len(arr)
    offs = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + n + 1]
    buf = arr.buffers()[2]
    data = np.frombuffer(buf, np.uint8) if buf is not None else np.zeros(0, np.uint8)
    starts, lens = offs[:-1], np.diff(offs)
    seed_mix = _splitmix(np.array([seed & _M64], np.uint64))[0]
    h = np.full(n, np.uint64(0xCBF29CE484222325) ^ seed_mix, np.uint64)
    prime = np.uint64(0x100000001B3)
    with np.errstate(over="ignore"):
        for j in range(int(lens.max()) if n else 0):
            m = lens > j
            h[m] = (h[m] ^ data[starts[m] + j].astype(np.uint64)) * prime
        return _splitmix(h)


def random_labels(keys: pa.Array | Sequence[str], n_labels: int, seed: int = 0) -> Labels:
    """Baseline: ``r0000`` ... ``r{n_labels-1}``, uniformly from a hash of (seed, key)."""
    if n_labels < 1:
        raise ValueError("n_labels must be >= 1")
    width = max(4, len(str(n_labels - 1)))
    h = (key_hash(keys, seed) % np.uint64(n_labels)).astype(np.int64)
    uniq, inv = np.unique(h, return_inverse=True)
    vocab = [f"r{u:0{width}d}" for u in uniq.tolist()]
    n = len(h)
    return Labels(vocab, inv.reshape(-1), np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32))


def vanilla_labels(keys: pa.Array | Sequence[str], truth: Mapping[str, str]) -> Labels:
    """Baseline: the true label of each key; a key without one is a KeyError."""
    ks = keys.to_pylist() if isinstance(keys, pa.Array | pa.ChunkedArray) else list(keys)
    missing = [k for k in ks if truth.get(k) is None]
    if missing:
        raise KeyError(f"{len(missing)} key(s) without a true label, e.g. {missing[0]!r}")
    vocab = sorted({truth[k] for k in ks})
    pos = {v: i for i, v in enumerate(vocab)}
    codes = np.array([pos[truth[k]] for k in ks], np.int64)
    n = len(ks)
    return Labels(vocab, codes, np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32))


def read_truth(spec: str, column: str = "label") -> dict[str, str]:
    """``key -> label`` from Parquet with a ``key`` column (e.g. the shard index tables)."""
    out: dict[str, str] = {}
    for url in expand_urls(spec, ".parquet"):
        t = tables.read_parquet(url, columns=["key", column])
        out.update(zip(t.column("key").to_pylist(), t.column(column).to_pylist(), strict=True))
    return out


# ---------------------------------------------------------------------------- uniform


def _depth(a: int) -> int:
    return min(UNIFORM_DEPTH, a)


def sequence_counts(dist: np.ndarray, names: Sequence[str]) -> dict[str, int]:
    """Counting pass of Uniform for one batch: images per Nearest-3 ordered sequence."""
    return _sequence_counts(rank_anchors(dist)[0], names)


def _sequence_counts(order: np.ndarray, names: Sequence[str]) -> dict[str, int]:
    lab = _nearest(order, order, names, _depth(len(names)), True)
    counts = np.bincount(lab.codes, minlength=len(lab.vocab))
    return {v: int(c) for v, c in zip(lab.vocab, counts.tolist(), strict=True) if c}


def merge_counts(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Merge map-side histograms (associative)."""
    total: Counter[str] = Counter()
    for p in parts:
        total.update(p)
    return dict(sorted(total.items()))


@dataclass(frozen=True)
class UniformRule:
    """The frozen Uniform rule: ``parts[bucket]`` for every bucket (see :func:`uniform_rule`)."""

    target: float
    parts: Mapping[str, int]
    counts: Mapping[str, int]

    def bucket_of(self, seq: Sequence[str]) -> str:
        """The longest prefix of a Nearest-3 sequence that is a bucket (else its Nearest-1)."""
        for j in range(len(seq), 1, -1):
            b = SEP_ORDERED.join(seq[:j])
            if b in self.parts:
                return b
        return seq[0]


def uniform_rule(counts: Mapping[str, int], n_labels: int) -> UniformRule:
    """Freeze the Uniform rule from global Nearest-3 counts, for about ``n_labels`` labels.

    Target size ``T = total / n_labels``. Bottom-up over the sequence tree: a Nearest-3
    sequence with at least ``T`` images is its own bucket; the smaller ones are pooled
    into their Nearest-2 prefix; a pooled prefix with at least ``T`` images is a bucket,
    smaller ones are pooled into their Nearest-1 anchor, which is always a bucket
    (however small). Then every bucket of ``c`` images is split into
    ``max(1, floor(c / T + 1/2))`` parts by a hash of (seed, image key), labels
    ``"bucket#i"``. Part sizes land in about ``[0.75 T, 1.5 T)``; only Nearest-1
    leftovers can be smaller. Measured on random 16-anchor data: label count within 3%
    of ``n_labels``, coefficient of variation of sizes 0.1. At labeling time an image
    goes to the longest prefix of its sequence that is a bucket, so sequences unseen
    when counting still get a label.
    """
    if n_labels < 1:
        raise ValueError("n_labels must be >= 1")
    total = sum(counts.values())
    if total == 0:
        raise ValueError("no images counted")
    target = total / n_labels
    buckets: dict[str, int] = {}
    pending = {tuple(k.split(SEP_ORDERED)): int(c) for k, c in counts.items() if c}
    depth = max(len(k) for k in pending)
    for level in range(depth, 1, -1):
        pooled: Counter[tuple[str, ...]] = Counter()
        for seq, c in pending.items():
            if len(seq) == level and c >= target:
                buckets[SEP_ORDERED.join(seq)] = c
            else:
                pooled[seq[: level - 1]] += c
        pending = dict(pooled)
    for seq, c in pending.items():
        buckets[SEP_ORDERED.join(seq)] = c
    parts = {b: max(1, math.floor(c / target + 0.5)) for b, c in sorted(buckets.items())}
    return UniformRule(target, parts, dict(sorted(buckets.items())))


def write_uniform_rule(
    counts: Mapping[str, int], n_labels: int, url: str, lineage: Mapping[str, Any] | None = None
) -> UniformRule:
    """Freeze the rule and write it (UNIFORM_RULE Parquet; target in the lineage)."""
    rule = uniform_rule(counts, n_labels)
    t = pa.Table.from_pydict(
        {
            "bucket": list(rule.parts),
            "count": [rule.counts[b] for b in rule.parts],
            "parts": list(rule.parts.values()),
        },
        schema=tables.UNIFORM_RULE,
    )
    extra = {"stage": "uniform_rule", "target": rule.target, "n_labels": n_labels}
    tables.write_parquet(t, url, {**tables.lineage(), **(lineage or {}), **extra})
    return rule


def read_uniform_rule(url: str) -> UniformRule:
    t = tables.read_parquet(url)
    b, c, p = (t.column(x).to_pylist() for x in ("bucket", "count", "parts"))
    return UniformRule(
        float(tables.read_lineage(url)["target"]),
        dict(zip(b, p, strict=True)),
        dict(zip(b, c, strict=True)),
    )


def _uniform(
    order: np.ndarray,
    dsorted: np.ndarray,
    names: Sequence[str],
    keys: pa.Array | Sequence[str],
    rule: UniformRule,
    seed: int,
) -> Labels:
    seq = _nearest(order, dsorted, names, _depth(len(names)), True)
    buckets = [rule.bucket_of(v.split(SEP_ORDERED)) for v in seq.vocab]
    bnames = sorted(set(buckets))
    bpos = {b: i for i, b in enumerate(bnames)}
    bucket = np.array([bpos[b] for b in buckets], np.int64)[seq.codes]
    parts = np.array([rule.parts.get(b, 1) for b in bnames], np.int64)[bucket]
    part = np.zeros(len(bucket), np.int64)
    split = np.flatnonzero(parts > 1)
    if split.size:
        karr = keys if isinstance(keys, pa.Array | pa.ChunkedArray) else pa.array(list(keys))
        h = key_hash(karr.take(pa.array(split)), seed)
        part[split] = (h % parts[split].astype(np.uint64)).astype(np.int64)
    width = int(parts.max()) if len(parts) else 1
    uniq, inv = np.unique(bucket * width + part, return_inverse=True)
    vocab = []
    for u in uniq.tolist():
        b, p = divmod(u, width)
        name = bnames[b]
        vocab.append(f"{name}{SEP_PART}{p}" if rule.parts.get(name, 1) > 1 else name)
    return Labels(vocab, inv.reshape(-1), seq.anchors, seq.distances)


def uniform_labels(
    dist: np.ndarray,
    names: Sequence[str],
    keys: pa.Array | Sequence[str],
    rule: UniformRule,
    seed: int = 0,
) -> Labels:
    """Uniform: each image's bucket under the frozen ``rule``, split by key hash."""
    return _uniform(*rank_anchors(dist), names, keys, rule, seed)


# ------------------------------------------------------------------ streaming labeling


def labels_url(out_root: str, features_url: str) -> str:
    """``OUT/<partition>/<stem>.parquet`` for ``.../<partition>/<stem>.parquet``."""
    path = url_to_fs(features_url)[1] if "://" in str(features_url) else str(features_url)
    path = path.replace("\\", "/")
    partition = posixpath.basename(posixpath.dirname(path))
    return join(out_root, *([partition] if partition else []), posixpath.basename(path))


@dataclass
class _Setup:
    names: list[str]
    kind: str
    head: tuple[np.ndarray, np.ndarray] | None
    index: AnchorIndex | None


def _setup(
    anchors_url: str,
    method: str,
    metric: str,
    kl_direction: str,
    eps: float,
    checkpoint: str | None,
    gpu: bool | None,
) -> _Setup:
    names, mat, _ = read_anchors(anchors_url)
    lin = tables.read_lineage(anchors_url)
    kind = lin.get("vector_kind", "mean")
    if metric == "kl" and kind == "mean":
        raise ValueError("metric 'kl' needs distribution anchors (kind normalized or softmax)")
    head = None
    if kind == "softmax":
        ckpt = checkpoint or lin.get("checkpoint")
        if not ckpt:
            raise ValueError("softmax anchors: pass checkpoint= (none recorded in the anchors)")
        head = load_head(ckpt)
    index = None
    if method in ("nearest", "cfa", "uniform"):
        index = AnchorIndex(mat, metric, kl_direction, eps, gpu)
    return _Setup(names, kind, head, index)


def _batch_table(
    key: pa.Array, shard: pa.Array, method: str, lab: Labels, names: pa.Array
) -> pa.Table:
    n, k = lab.anchors.shape
    key, shard = key.cast(pa.string()), shard.cast(pa.string())  # large_string inputs too
    offsets = pa.array(
        np.arange(0, n * k + 1, k, dtype=np.int32) if k else np.zeros(n + 1, np.int32)
    )
    flat = lab.anchors.reshape(-1)
    arrays = [
        key,
        shard,
        pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([method])).cast(
            pa.string()
        ),
        pa.array(lab.vocab, pa.string()).take(pa.array(lab.codes)),
        pa.ListArray.from_arrays(offsets, names.take(pa.array(flat, pa.int64()))),
        pa.ListArray.from_arrays(offsets, pa.array(lab.distances.reshape(-1), pa.float32())),
    ]
    return pa.Table.from_arrays(arrays, schema=tables.ANCHOR_LABELS)


def method_tag(method: str, n: int = 1, ordered: bool = True) -> str:
    """What the ``method`` column holds: ``nearest-2``, ``nearest-2-unordered``, ``cfa``,
    ``uniform``, ``random``, ``vanilla`` (the rows of the pseudo-label table)."""
    if method == "nearest":
        return f"nearest-{n}" + ("" if ordered else "-unordered")
    return method


def label_file(
    features_url: str,
    anchors_url: str,
    out_url: str,
    method: str,
    *,
    n: int = 1,
    metric: str = "cosine",
    ordered: bool = True,
    rule_url: str | None = None,
    n_labels: int | None = None,
    seed: int = 0,
    truth_url: str | None = None,
    truth_column: str = "label",
    kl_direction: str = "image_anchor",
    eps: float = DEFAULT_EPS,
    checkpoint: str | None = None,
    batch_rows: int | None = None,
    prefetch: int = 1,
    gpu: bool | None = None,
) -> dict[str, Any]:
    """Work unit: label one features file into one ANCHOR_LABELS file at ``out_url``.

    Streams batches from Parquet into a streaming Parquet writer, so memory is bounded
    by ``batch_rows`` whatever the file size. Skipped when ``out_url`` is committed.
    ``method``: nearest (``n``, ``ordered``), cfa, uniform (``rule_url``, ``seed``),
    random (``n_labels``, ``seed``), vanilla (``truth_url``, ``truth_column``).
    Returns ``{"out": out_url, "rows": int, "skipped": bool}``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
    if is_committed(out_url):
        fs, path = url_to_fs(out_url)
        with fs.open(path, "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        return {"out": out_url, "rows": rows, "skipped": True}
    setup = _setup(anchors_url, method, metric, kl_direction, eps, checkpoint, gpu)
    names = setup.names
    if method == "nearest" and not 1 <= n <= len(names):
        raise ValueError(f"Nearest-{n} needs 1 <= N <= {len(names)} (the number of anchors)")
    rule = read_uniform_rule(rule_url) if method == "uniform" else None
    if method == "uniform" and rule_url is None:
        raise ValueError("method 'uniform' needs rule_url (see write_uniform_rule)")
    if method == "random" and not n_labels:
        raise ValueError("method 'random' needs n_labels")
    truth = None
    if method == "vanilla":
        if truth_url is None:
            raise ValueError("method 'vanilla' needs truth_url")
        truth = read_truth(truth_url, truth_column)
    lin = {
        **tables.lineage(),
        "stage": "anchor_labels",
        "features": features_url,
        "anchors": anchors_url,
        "anchors_lineage": tables.read_lineage(anchors_url),
        "vector_kind": setup.kind,
        "metric": metric,
        "method": method,
        "method_tag": method_tag(method, n, ordered),
        "n": n if method == "nearest" else None,
        "ordered": ordered if method == "nearest" else None,
        "kl_direction": kl_direction if metric == "kl" else None,
        "eps": eps if metric == "kl" else None,
        "rule": rule_url,
        "n_labels": n_labels if method == "random" else None,
        "seed": seed if method in ("random", "uniform") else None,
        "truth": truth_url,
    }
    schema = tables.ANCHOR_LABELS.with_metadata(
        {tables.LINEAGE_KEY: json.dumps(lin, sort_keys=True, default=str).encode()}
    )
    names_arr = pa.array(names, pa.string())
    tag = method_tag(method, n, ordered)
    rows = 0
    with open_atomic(out_url) as f, pq.ParquetWriter(f, schema, compression="zstd") as writer:
        for key, shard, emb in iter_features(features_url, batch_rows, prefetch=prefetch):
            if method in ("random", "vanilla"):
                lab = (
                    random_labels(key, n_labels, seed)
                    if truth is None
                    else vanilla_labels(key, truth)
                )
            else:
                k = {"nearest": n, "uniform": _depth(len(names))}.get(method)
                order, dsorted = setup.index.rank(to_space(emb, setup.kind, setup.head), k)
                if method == "nearest":
                    lab = _nearest(order, dsorted, names, n, ordered)
                elif method == "cfa":
                    lab = _cfa(order, dsorted, names)
                else:
                    lab = _uniform(order, dsorted, names, key, rule, seed)
            writer.write_table(_batch_table(key, shard, tag, lab, names_arr))
            rows += len(lab)
    return {"out": out_url, "rows": rows, "skipped": False}


def count_sequences_file(
    features_url: str,
    anchors_url: str,
    *,
    metric: str = "cosine",
    kl_direction: str = "image_anchor",
    eps: float = DEFAULT_EPS,
    checkpoint: str | None = None,
    batch_rows: int | None = None,
    gpu: bool | None = None,
) -> dict[str, int]:
    """Work unit, Uniform's counting pass: Nearest-3 sequence histogram of one features
    file (small: at most A*(A-1)*(A-2) entries). Merge with :func:`merge_counts`."""
    setup = _setup(anchors_url, "uniform", metric, kl_direction, eps, checkpoint, gpu)
    parts = []
    for _, _, emb in iter_features(features_url, batch_rows, with_keys=False):
        x = to_space(emb, setup.kind, setup.head)
        order, _ = setup.index.rank(x, _depth(len(setup.names)))
        parts.append(_sequence_counts(order, setup.names))
    return merge_counts(parts)


def label_folder(
    features_spec: str, anchors_url: str, out_root: str, method: str, **kwargs: Any
) -> list[dict[str, Any]]:
    """Label every committed features file of a spec, one output per input (no Prefect)."""
    return [
        label_file(u, anchors_url, labels_url(out_root, u), method, **kwargs)
        for u in expand_urls(features_spec, ".parquet")
    ]


def label_counts(url: str) -> dict[str, int]:
    """Images per label in one labels file (map side of the label-size histograms)."""
    t = tables.read_parquet(url, columns=["label"])
    vc = t.column("label").combine_chunks().value_counts()
    return {
        str(v): int(c)
        for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)
    }


def label_stats(counts: Mapping[str, int]) -> dict[str, float]:
    """Distinct labels, images, and the mean and (population) std of images per label."""
    c = np.array(list(counts.values()), np.float64)
    if not c.size:
        return {"labels": 0, "images": 0, "mean": math.nan, "std": math.nan}
    return {
        "labels": int(c.size),
        "images": int(c.sum()),
        "mean": float(c.mean()),
        "std": float(c.std()),
    }
