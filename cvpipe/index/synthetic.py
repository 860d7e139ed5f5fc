"""Synthetic clustered vectors for index tests and benchmarks, and a features writer.

Real embeddings sit near low-dimensional structure, not in isotropic noise: each vector
here is a cluster centre, plus a point of that cluster's ``intrinsic``-dimensional
subspace, plus a little isotropic noise. Rows are generated in blocks, each block
seeded by (seed, block), so any row range comes out the same however it is batched.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from cvpipe.core import tables
from cvpipe.data import features

BLOCK = 16_384
BASES = 32  # clusters share this many subspace bases (cluster c uses basis c % BASES)


class Clustered:
    def __init__(
        self,
        dim: int,
        clusters: int = 1024,
        intrinsic: int = 16,
        spread: float = 1.0,
        noise: float = 0.05,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng([seed, 0])
        self.dim, self.clusters, self.seed = dim, clusters, seed
        self.noise = noise
        self.centres = rng.standard_normal((clusters, dim)).astype(np.float32)
        bases = rng.standard_normal((BASES, intrinsic, dim)).astype(np.float32)
        bases /= np.linalg.norm(bases, axis=2, keepdims=True)
        self.bases = bases * spread

    def block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``b * BLOCK .. (b + 1) * BLOCK - 1`` and their cluster ids."""
        rng = np.random.default_rng([self.seed, 1, b])
        c = rng.integers(self.clusters, size=BLOCK)
        z = rng.standard_normal((BLOCK, self.bases.shape[1])).astype(np.float32)
        x = self.centres[c] + self.noise * rng.standard_normal((BLOCK, self.dim), np.float32)
        for j in range(BASES):
            rows = np.flatnonzero(c % BASES == j)
            x[rows] += z[rows] @ self.bases[j]
        return x, c

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``start .. stop - 1`` (and their clusters)."""
        xs, cs = [], []
        for b in range(start // BLOCK, (stop - 1) // BLOCK + 1 if stop > start else 0):
            x, c = self.block(b)
            lo, hi = max(start - b * BLOCK, 0), min(stop - b * BLOCK, BLOCK)
            xs.append(x[lo:hi])
            cs.append(c[lo:hi])
        if not xs:
            return np.empty((0, self.dim), np.float32), np.empty(0, np.int64)
        return np.concatenate(xs), np.concatenate(cs)

    def batches(self, n: int, rows: int = BLOCK) -> Iterator[np.ndarray]:
        for s in range(0, n, rows):
            yield self.rows(s, min(n, s + rows))[0]


def write_features(
    url: str, keys: list[str], shard: str, x: np.ndarray, model_id: str | None = "synthetic"
) -> None:
    """A features file in the inference stage's layout (one shard's embeddings)."""
    features.write_features(url, keys, shard, x,
                            tables.lineage(None, stage="infer", model_id=model_id))  # fmt: skip
