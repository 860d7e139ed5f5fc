"""Distances from image vectors to anchors, and their ranking.

Distances (``metric``), images and anchors already in the same space
(:func:`cvpipe.label.anchor_space.to_space`):

- ``cosine``: ``1 - cos(x, a)``: inner products with L2-normalized anchors through
  FAISS, divided by the image's norm (an all-zero vector has distance 1 to everything);
- ``l2``: the Euclidean distance, ``sqrt`` of FAISS's squared L2;
- ``kl``: KL divergence between distributions (``normalized`` or ``softmax`` anchors
  only). ``kl_direction="image_anchor"`` is ``KL(image || anchor)``,
  ``"anchor_image"`` is ``KL(anchor || image)``. Zeros are smoothed: every entry gets
  ``eps`` added and the distribution is renormalized, so the divergence is finite.

On the CPU, cosine and L2 take the full n x A matrix from the BLAS product that
IndexFlatIP / IndexFlatL2 run for batches (``faiss.pairwise_distances``; for inner
products that is numpy's product, called directly) and rank it in numpy: with A ~ 16
anchors, IndexFlat's top-k heaps cost more than the product itself. A ranking of the
k <= ``SMALL_K`` closest works on the transposed matrix (one row per anchor), picking
the closest anchor of every image at once; the values are those of :meth:`distances`,
bit for bit. When faiss has GPU support and sees a GPU (``gpu=None``), a GPU
IndexFlatIP / IndexFlatL2 searches all A anchors instead; never required.

Ties: anchors are ranked by the total order (distance, anchor index): of two anchors at
the same distance, the one with the lower index in the anchors file (anchors are stored
sorted by name) counts as closer.

The product's last bits depend on the BLAS's blocking, so on the rows multiplied
together (the batch) and on the number of BLAS threads: distances agree to float32
rounding across batch sizes and thread counts, not bit for bit.
"""

from __future__ import annotations

import faiss
import numpy as np

METRICS = ("cosine", "l2", "kl")
KL_DIRECTIONS = ("image_anchor", "anchor_image")
DEFAULT_EPS = 1e-8


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

    def _finish(
        self, raw: np.ndarray, norm: np.ndarray | None, by_anchor: bool = False
    ) -> np.ndarray:
        """Distances from raw scores, in place: ``1 - ip / |x|`` for cosine (inner
        products with the raw vectors divided by their norms afterwards: the cosine
        without copying and normalizing the batch; an all-zero vector divides by 1),
        ``sqrt`` of FAISS's squared L2. ``raw`` is n x A, or A x n with ``by_anchor``."""
        if self.metric == "cosine":
            scale = np.where(norm > 0, norm, 1)
            raw /= scale if by_anchor else scale[:, None]
            return np.subtract(1.0, raw, out=raw)
        return np.sqrt(np.maximum(raw, 0, out=raw), out=raw)

    def _query(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The batch as FAISS takes it, and its norms (cosine only). The norms come
        first: their pass brings the batch into the cache for the product (measured per
        200k x 512: 72 CPU ms norms then product, 81 ms the other way round)."""
        if x.shape[1] != self.dim:
            raise ValueError(f"vectors are {x.shape[1]}-d, anchors {self.dim}-d")
        q = np.ascontiguousarray(x, dtype=np.float32)
        if self.metric != "cosine":
            return q, None
        return q, np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float32))

    def _raw(self, q: np.ndarray) -> np.ndarray:
        # On the CPU, the BLAS product IndexFlat itself uses for batches, without its
        # top-k heap: with A = 16 the heap cost more than the product (measured k=2:
        # 1.4 s, product + argmin: 0.4 s per 200k x 512). For inner products
        # faiss.pairwise_distances is this numpy product plus a copy of its result.
        if self.metric == "cosine":
            return q @ self._base.T
        return faiss.pairwise_distances(q, self._base, faiss.METRIC_L2)

    def distances(self, x: np.ndarray) -> np.ndarray:
        """The full distance matrix (n x A, float32), columns in anchor order."""
        if self.metric == "kl":
            if x.shape[1] != self.dim:
                raise ValueError(f"vectors are {x.shape[1]}-d, anchors {self.dim}-d")
            return kl_matrix(x, self.anchors, self.kl_direction, self.eps)
        q, norm = self._query(x)
        if self.index is not None:
            raw, order = self.index.search(q, self.count)
            dist = self._finish(raw, norm)
            out = np.empty_like(dist)
            np.put_along_axis(out, order, dist, axis=1)
            return out
        return self._finish(self._raw(q), norm)

    def distances_by_anchor(self, x: np.ndarray) -> np.ndarray:
        """``distances(x).T`` as a C-contiguous (A x n) array of its own, bit for bit: the
        layout in which top-k picks run as vector operations over all images."""
        if self.metric == "kl" or self.index is not None:
            return np.array(self.distances(x).T, order="C")
        q, norm = self._query(x)
        return self._finish(np.array(self._raw(q).T, order="C"), norm, by_anchor=True)

    def rank(self, x: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(order[n, k], sorted_distances[n, k])``: the k closest anchors (all when k is
        None) under the total order (distance, anchor index), and their distances."""
        k = self.count if k is None else min(k, self.count)
        if k > SMALL_K:
            d = self.distances(x)
            _refuse_nan(d, axis=1)
            return _sorted_k(d, k)
        cols = self.distances_by_anchor(x)
        _refuse_nan(cols, axis=0)
        return _pick_k(cols, k)


def _refuse_nan(d: np.ndarray, axis: int) -> None:
    if np.isnan(d).any():
        raise ValueError(f"{int(np.isnan(d).any(axis=axis).sum())} vector(s) give NaN distances")


# Up to this k, the k smallest are picked one by one (k passes over the distances);
# beyond it, one stable argsort of each row is cheaper (per 200k x 16 measured: each
# pick ~5 ms, the argsort ~42 ms).
SMALL_K = 6


def top_k(dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest of each row, ordered by (distance, column index); NaN ranks last."""
    k = min(k, dist.shape[1])
    if k > SMALL_K or np.isnan(dist).any():
        return _sorted_k(dist, k)
    return _pick_k(np.array(dist.T, order="C"), k)


def _sorted_k(dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(dist, order, axis=1)


def _pick_k(cols: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_k` of the NaN-free transposed distances ``cols`` (A x n, overwritten).

    One anchor per row of ``cols``, so that every step is a vector operation over all
    images rather than a loop over images of A columns each (per 200k x 16, k=1: 4.5 ms
    against 6.1 ms for argmin along rows): the smallest distance of each image, then the
    lowest anchor index holding it; a picked anchor becomes NaN, which the next minimum
    (fmin) skips.
    """
    a, n = cols.shape
    anchor = np.arange(a, dtype=np.int16 if a < 2**15 else np.int64)[:, None]
    order = np.empty((n, k), np.int64)
    out = np.empty((n, k), cols.dtype)
    rows = np.arange(n)
    for j in range(k):
        best = np.fmin.reduce(cols, axis=0) if j else cols.min(axis=0)
        pick = np.where(cols == best, anchor, a).min(axis=0)
        order[:, j] = pick
        out[:, j] = cols[pick, rows]  # not best: of 0.0 and -0.0, the picked one's sign
        if j + 1 < k:
            cols[pick, rows] = np.nan
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
