"""Which FAISS index to build for N vectors of dimension D under a memory budget.

The choice follows autofaiss and the FAISS guidelines ("Guidelines to choose an index"):

- ``flat``: exact search (IndexFlat) while N is small (below :data:`FLAT_MAX`) and the
  raw vectors fit the budget: nothing to train, every answer exact;
- ``ivf``: IVF-Flat (a coarse k-means quantizer, full vectors in the inverted lists) up
  to :data:`IVF_FLAT_MAX` vectors when the raw vectors fit;
- ``ivfpq``: OPQ + IVF + PQ (a learned rotation, a coarse quantizer, then ``m`` bytes
  per vector): the largest ``m`` whose codes fit the budget. ``np``: no polysemous
  training (index_factory's default for ``PQ``), which costs minutes and helps only
  Hamming-threshold search, never used here.

``nlist`` is the power of two nearest to 4 x sqrt(N) (the guidelines give 4-16 x
sqrt(N); the low end trains 4x faster, and nprobe is tuned for recall anyway), and
the coarse quantizer is trained on a sample of :data:`POINTS_PER_CENTROID` points per
centroid (FAISS warns below 39). ``nprobe`` starts at nlist / 64 and is
tuned on a sample of queries after the build (:func:`cvpipe.index.store.build_index`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("auto", "flat", "ivf", "ivfpq")
METRICS = ("l2", "cosine")
FLAT_MAX = 50_000  # exact search below this many vectors (guidelines: 1e4 - 1e5)
IVF_FLAT_MAX = 1_000_000  # IVF-Flat up to here when the raw vectors fit
POINTS_PER_CENTROID = 40  # training sample per coarse centroid (FAISS warns below 39)
PQ_TRAIN_POINTS = 256 * 100  # PQ / OPQ codebooks: 256 centroids per sub-quantizer x 100
ID_BYTES = 8  # an int64 id per vector in the inverted lists
PQ_CHOICES = (64, 48, 32, 24, 16, 12, 8, 4)  # bytes per vector, best first
MIN_NLIST = 16

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_memory(text: str | int) -> int:
    """``"4G"``, ``"512M"``, ``"1.5GB"`` or a byte count -> bytes (powers of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)I?B?\s*", str(text).upper())
    if not m:
        raise ValueError(f"memory must look like 4G, 512M or 1073741824, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@dataclass(frozen=True)
class IndexPlan:
    """What to build: ``factory`` is the FAISS index_factory string."""

    kind: str  # flat | ivf | ivfpq
    dim: int
    metric: str
    nlist: int = 0
    m: int = 0  # PQ bytes per vector
    train_size: int = 0  # vectors sampled to train (0: nothing to train)
    nprobe: int = 1

    @property
    def factory(self) -> str:
        if self.kind == "flat":
            return "Flat"
        if self.kind == "ivf":
            return f"IVF{self.nlist},Flat"
        return f"OPQ{self.m},IVF{self.nlist},PQ{self.m}x8np"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "factory": self.factory}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexPlan:
        return cls(**{k: v for k, v in d.items() if k != "factory"})


def nlist_for(n: int) -> int:
    """The power of two nearest to 4 x sqrt(n), at least :data:`MIN_NLIST`, and small
    enough that each centroid gets :data:`POINTS_PER_CENTROID` training points."""
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    while target > MIN_NLIST and target * POINTS_PER_CENTROID > n:
        target //= 2
    return max(MIN_NLIST, target)


def estimated_bytes(kind: str, n: int, dim: int, nlist: int = 0, m: int = 0) -> int:
    """Memory of the built index (codes, ids, centroids, codebooks), a few % low."""
    if kind == "flat":
        return 4 * n * dim
    centroids = 4 * nlist * dim
    if kind == "ivf":
        return n * (4 * dim + ID_BYTES) + centroids
    codebooks = 4 * 256 * dim + 4 * dim * dim  # PQ centroids + the OPQ rotation
    return n * (m + ID_BYTES) + centroids + codebooks


def plan_index(
    n: int, dim: int, memory: int | str = "4G", kind: str = "auto", metric: str = "l2"
) -> IndexPlan:
    """The index for ``n`` vectors of dimension ``dim`` within ``memory`` bytes.

    ``kind="auto"`` picks by size and budget (see the module doc); an explicit kind is
    honoured when it can be built (IVF needs at least :data:`MIN_NLIST` x
    :data:`POINTS_PER_CENTROID` vectors to train), else it is an error. A budget no
    index fits is an error naming the smallest size that would do."""
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose from {KINDS}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
    if n < 1 or dim < 1:
        raise ValueError(f"nothing to index: {n} vector(s) of dimension {dim}")
    budget = parse_memory(memory)
    nlist = nlist_for(n)
    trainable = n >= MIN_NLIST * POINTS_PER_CENTROID

    def flat() -> IndexPlan:
        return IndexPlan("flat", dim, metric)

    def ivf() -> IndexPlan:
        return IndexPlan(
            "ivf", dim, metric, nlist=nlist, train_size=_train_size(n, nlist, 0),
            nprobe=_start_nprobe(nlist),
        )  # fmt: skip

    def ivfpq(m: int) -> IndexPlan:
        return IndexPlan(
            "ivfpq", dim, metric, nlist=nlist, m=m, train_size=_train_size(n, nlist, m),
            nprobe=_start_nprobe(nlist),
        )  # fmt: skip

    pq_options = [m for m in PQ_CHOICES if dim % m == 0 and m <= dim // 2] or [1]
    if kind == "flat":
        return flat()
    if kind in ("ivf", "ivfpq") and not trainable:
        raise ValueError(
            f"{kind} needs at least {MIN_NLIST * POINTS_PER_CENTROID} vectors to train, "
            f"got {n}: use --kind flat or auto"
        )
    if kind == "ivf":
        return ivf()
    if kind == "ivfpq":
        fits = [m for m in pq_options if estimated_bytes("ivfpq", n, dim, nlist, m) <= budget]
        return ivfpq(fits[0] if fits else pq_options[-1])

    # auto: the most exact index that fits
    raw_fits = estimated_bytes("ivf", n, dim, nlist) <= budget
    if (n < FLAT_MAX or not trainable) and estimated_bytes("flat", n, dim) <= budget:
        return flat()
    if trainable and n <= IVF_FLAT_MAX and raw_fits:
        return ivf()
    if trainable:
        for m in pq_options:
            if estimated_bytes("ivfpq", n, dim, nlist, m) <= budget:
                return ivfpq(m)
    smallest = (
        estimated_bytes("ivfpq", n, dim, nlist, pq_options[-1])
        if trainable
        else estimated_bytes("flat", n, dim)
    )
    raise ValueError(
        f"no index of {n} x {dim} vectors fits {budget} bytes; the smallest needs ~{smallest}"
    )


def _train_size(n: int, nlist: int, m: int) -> int:
    want = POINTS_PER_CENTROID * nlist
    if m:
        want = max(want, PQ_TRAIN_POINTS)
    return min(n, want)


def _start_nprobe(nlist: int) -> int:
    return max(1, min(nlist, nlist // 64 or 1, 256))
