"""Builders shared by the anchor tests: features folders, anchors, brute-force rankings."""

from __future__ import annotations

import os

import numpy as np

from cvpipe.core import tables
from cvpipe.data import features
from cvpipe.label import anchors as an

NAMES = ["animal", "food", "plant", "tool", "vehicle"]


def ref_order(row) -> list[int]:
    """Brute force: anchors by (distance, index)."""
    return sorted(range(len(row)), key=lambda j: (row[j], j))


def ref_nearest(dist, names, n, ordered=True) -> list[str]:
    out = []
    for row in dist.tolist():
        top = [names[j] for j in ref_order(row)[:n]]
        out.append(">".join(top) if ordered else "+".join(sorted(top)))
    return out


def np_cosine(x, a):
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    anorm = a / np.linalg.norm(a, axis=1, keepdims=True)
    return 1.0 - xn.astype(np.float64) @ anorm.astype(np.float64).T


def np_l2(x, a):
    return np.sqrt(((x[:, None, :].astype(np.float64) - a[None, :, :]) ** 2).sum(-1))


def random_dist(seed, n=400, a=5, d=8):
    rng = np.random.default_rng(seed)
    return np_cosine(rng.normal(size=(n, d)), rng.normal(size=(a, d))).astype(np.float32)


def tie_dist(seed, n=400, a=5):
    # Small integers: most rows hold several exact ties.
    return np.random.default_rng(seed).integers(0, 3, size=(n, a)).astype(np.float32)


def write_features(url, keys, shard, emb, model_id="m1"):
    features.write_features(url, keys, shard, emb, tables.lineage(model_id=model_id))


def make_features_dir(root, n_files=3, rows=50, dim=8, seed=0):
    """Features Parquet as inference writes them: root/features/<partition>/<stem>.parquet."""
    rng = np.random.default_rng(seed)
    urls, embs, keys = [], [], []
    for i in range(n_files):
        sid = f"day1/digits-{i:06d}"
        url = os.path.join(root, "features", "day1", f"digits-{i:06d}.parquet")
        k = [f"day1/img-{i}-{j:04d}" for j in range(rows)]
        e = rng.normal(size=(rows, dim)).astype(np.float32)
        write_features(url, k, sid, e)
        urls.append(url)
        embs.append(e)
        keys += k
    return urls, np.concatenate(embs), keys


def make_anchors(path, vectors, names=NAMES, kind="mean"):
    sums = an.AnchorSums(kind, vectors.shape[1], model="m1")
    for n, v in zip(names, vectors, strict=True):
        sums.sums[n] = v.astype(np.float64)
        sums.counts[n] = 1
    an.write_anchors(sums, path)
    return path


def read_labels(url):
    return tables.read_parquet(url).to_pylist()
