"""FAISS operations the index is made of: create, train, add, search, (de)serialize,
exact search over streamed batches, recall, and nprobe tuning.

Distances are reported in the metric's own units: ``l2`` gives the Euclidean distance
(the square root of FAISS's squared L2, so it is the D of the contrastive loss and of
dedup thresholds); ``cosine`` gives ``1 - cos`` (vectors are L2-normalized on the way
in, and the index searches inner products).

GPU: when faiss has GPU support and sees a GPU, the coarse quantizer's k-means runs on
it (the costly part of a build); everything else, and the saved index, stays on the
CPU, so an index built on a GPU host is read anywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import IO

import faiss
import numpy as np

from cvpipe.core.storage import open_atomic, url_to_fs
from cvpipe.index.plan import IndexPlan

QUERY_BATCH = 4096  # queries per FAISS call (bounds the result matrices)


@contextlib.contextmanager
def faiss_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` FAISS (OpenMP) threads (None: leave FAISS's setting).

    On cores shared with other processes, OpenMP threads that wait for each other spin:
    PQ training ran ~10x slower here on 2 threads than on 1 while the machine was busy.
    The setting is process-wide, so it is restored afterwards."""
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def prepare(x: np.ndarray, metric: str) -> np.ndarray:
    """Vectors as FAISS wants them: C-contiguous float32, L2-normalized for cosine (a
    copy then: the input may be a read-only view of an Arrow buffer)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cosine":
        x = x.copy()
        faiss.normalize_L2(x)
    return x


def to_distances(raw: np.ndarray, metric: str) -> np.ndarray:
    """FAISS's scores -> the metric's distances (float32; missing results stay inf)."""
    d = 1.0 - raw if metric == "cosine" else np.sqrt(np.maximum(raw, 0.0))
    d = d.astype(np.float32, copy=False)
    d[~np.isfinite(raw) | (np.abs(raw) >= 3e38)] = np.inf
    return d


def create(plan: IndexPlan) -> faiss.Index:
    return faiss.index_factory(plan.dim, plan.factory, _faiss_metric(plan.metric))


OPQ_ITERATIONS = 10  # FAISS's default 50 costs ~5x the time for a rotation barely better


@contextlib.contextmanager
def _blas_for_small_batches() -> Iterator[None]:
    """FAISS 1.15 computes distances without BLAS below 128,000 query rows; for the
    2- to 4-d sub-spaces of PQ training that path ran ~9x slower here than BLAS
    (k-means of 25,600 points in 2-d: 1.6 s vs 0.18 s). Scoped to training."""
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 20
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


def train(index: faiss.Index, sample: np.ndarray, plan: IndexPlan, seed: int = 0) -> None:
    """Train ``index`` on ``sample`` (already through :func:`prepare`); the coarse k-means
    on the GPU when there is one."""
    if index.is_trained:
        return
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = seed
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                vt.niter = OPQ_ITERATIONS
                vt.max_train_points = len(sample)
    gpu = gpu_available()
    if gpu:  # pragma: no cover - needs faiss-gpu and a CUDA device
        res = faiss.StandardGpuResources()
        ivf.clustering_index = faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatL2(ivf.d))
    with _blas_for_small_batches():
        index.train(sample)
    if gpu:  # pragma: no cover
        ivf.clustering_index = None
    set_nprobe(index, plan.nprobe)


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    if _is_ivf(index):
        faiss.extract_index_ivf(index).nprobe = int(nprobe)


def nlist_of(index: faiss.Index) -> int:
    return faiss.extract_index_ivf(index).nlist if _is_ivf(index) else 0


def _is_ivf(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return True


def search(
    index: faiss.Index, queries: np.ndarray, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(distances[n, k], row ids[n, k])`` of the ``k`` nearest, nearest first; rows
    with fewer than ``k`` results are padded with id -1 and distance inf."""
    q = prepare(queries, metric)
    k = max(1, int(k))
    dist = np.empty((len(q), k), np.float32)
    ids = np.empty((len(q), k), np.int64)
    for s in range(0, len(q), QUERY_BATCH):
        raw, found = index.search(q[s : s + QUERY_BATCH], k)
        dist[s : s + QUERY_BATCH] = to_distances(raw, metric)
        ids[s : s + QUERY_BATCH] = found
    return dist, ids


class ExactKnn:
    """The exact ``k`` nearest of ``queries`` among rows fed batch by batch (memory: one
    batch and the queries' heaps). Row ids count across batches in the order fed."""

    def __init__(self, queries: np.ndarray, k: int, metric: str) -> None:
        self.q = prepare(queries, metric)
        self.k, self.metric = k, metric
        self.heap = faiss.ResultHeap(len(self.q), k, keep_max=metric == "cosine")
        self.offset = 0

    def add(self, batch: np.ndarray) -> None:
        x = prepare(batch, self.metric)
        if len(self.q) and len(x):
            kk = min(self.k, len(x))
            mt = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
            raw, ids = faiss.knn(self.q, x, kk, metric=mt)
            self.heap.add_result(np.ascontiguousarray(raw), np.ascontiguousarray(ids + self.offset))
        self.offset += len(x)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(distances, ids)`` as :func:`search` gives them."""
        self.heap.finalize()
        return to_distances(self.heap.D, self.metric), self.heap.I


def exact_search(
    queries: np.ndarray, batches: Iterable[np.ndarray], k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """:class:`ExactKnn` over every batch of ``batches``."""
    knn = ExactKnn(queries, k, metric)
    for batch in batches:
        knn.add(batch)
    return knn.result()


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of the true ``k`` nearest that ``found`` holds in its first ``k``
    (the "k-recall@k" of the FAISS wiki, the intersection measure)."""
    if len(truth) == 0:
        return float("nan")
    hits = 0
    for f, t in zip(found[:, :k], truth[:, :k], strict=True):
        t = t[t >= 0]
        hits += len(np.intersect1d(f[f >= 0], t, assume_unique=True)) / max(1, len(t))
    return hits / len(truth)


def nearest_in_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of queries whose true nearest neighbour is among ``found``'s first ``k``
    (the FAISS wiki's "1-recall@k")."""
    if len(truth) == 0:
        return float("nan")
    return float(np.mean([t[0] in f[:k] for f, t in zip(found, truth, strict=True)]))


def tune_nprobe(
    index: faiss.Index,
    queries: np.ndarray,
    truth: np.ndarray,
    k: int,
    metric: str,
    target: float,
    own: np.ndarray | None = None,
) -> tuple[int, float]:
    """The smallest power-of-two ``nprobe`` whose recall@k on ``queries`` reaches
    ``target`` (or the best seen if none does); leaves it set. Returns (nprobe, recall).

    ``own``: the row id of each query when the queries are indexed vectors; a query
    then counts neither itself in ``truth`` nor in what is found (finding oneself is
    easy and would flatter the recall). ``truth`` then holds ``k + 1`` ids per query."""
    nlist = nlist_of(index)
    if not nlist:
        return 1, 1.0
    if own is not None:
        truth = _without(truth, own, k)
    best = (1, -1.0)
    nprobe = 1
    while True:
        set_nprobe(index, nprobe)
        _, found = search(index, queries, k + (own is not None), metric)
        if own is not None:
            found = _without(found, own, k)
        r = recall_at_k(found, truth, k)
        if r > best[1] + 1e-9:
            best = (nprobe, r)
        if r >= target or nprobe >= nlist:
            break
        nprobe = min(nlist, nprobe * 2)
    set_nprobe(index, best[0])
    return best


def _without(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` ids of each row that are not the row's own id."""
    out = np.full((len(ids), k), -1, np.int64)
    for r, (row, o) in enumerate(zip(ids, own, strict=True)):
        kept = row[row != o][:k]
        out[r, : len(kept)] = kept
    return out


# ------------------------------------------------------------------------- files


def write_index(index: faiss.Index, url: str) -> int:
    """Publish ``index`` at ``url`` atomically, streamed (no second copy in memory).
    Returns the file's size in bytes."""
    written = 0

    def sink(f: IO[bytes]):
        def write(b: bytes) -> int:
            nonlocal written
            f.write(b)
            written += len(b)
            return len(b)

        return write

    with open_atomic(url) as f:
        writer = faiss.PyCallbackIOWriter(sink(f))
        faiss.write_index(index, writer)
        del writer  # flushes FAISS's buffer into the file before it is closed
    return written


def read_index(url: str) -> faiss.Index:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        reader = faiss.PyCallbackIOReader(f.read)
        index = faiss.read_index(reader)
        del reader
    return index
