"""Distances against numpy, FAISS rankings with exact ties, top-k, KL with zeros."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from anchor_helpers import np_cosine, np_l2, ref_order, tie_dist

from cvpipe.label import anchors as an


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_top_k_equals_brute_force_with_ties(k):
    dist = tie_dist(k, a=7)
    order, d = an.top_k(dist, k)
    for i, row in enumerate(dist.tolist()):
        ref = ref_order(row)[:k]
        assert order[i].tolist() == ref and d[i].tolist() == [row[j] for j in ref]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_faiss_distances_equal_numpy(metric):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(500, 16)).astype(np.float32)
    x[0] = 0  # a zero vector: cosine distance 1 to everything
    a = rng.normal(size=(5, 16)).astype(np.float32)
    got = an.anchor_distances(x, a, metric)
    ref = np_cosine(x, a) if metric == "cosine" else np_l2(x, a)
    if metric == "cosine":
        ref[0] = 1.0
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    order, dsorted = an.AnchorIndex(a, metric).rank(x)
    assert np.array_equal(order, np.argsort(got, axis=1, kind="stable"))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_faiss_rank_breaks_exact_ties_by_index(metric):
    a = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float32)  # duplicated anchors
    x = np.array([[1, 0.1], [0.1, 1], [1, 1]], np.float32)
    index = an.AnchorIndex(a, metric)
    order, d = index.rank(x)
    assert order.tolist() == [[0, 2, 1, 3], [1, 3, 0, 2], [0, 1, 2, 3]]
    assert index.rank(x, 1)[0].tolist() == [[0], [1], [0]]  # ties across the cut
    assert index.rank(x, 3)[0].tolist() == [[0, 2, 1], [1, 3, 0], [0, 1, 2]]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_top_k_rank_equals_prefix_of_full_rank_with_many_ties(metric):
    rng = np.random.default_rng(8)
    a = rng.integers(-1, 2, size=(6, 3)).astype(np.float32)  # small integers: exact ties
    a[a.sum(1) == 0] += 1
    x = rng.integers(-2, 3, size=(2000, 3)).astype(np.float32)
    index = an.AnchorIndex(a, metric)
    full_o, full_d = index.rank(x)
    assert np.array_equal(full_o, np.argsort(index.distances(x), axis=1, kind="stable"))
    assert (full_d[:, 1:] == full_d[:, :-1]).any(axis=1).mean() > 0.3  # ties are common
    for k in (1, 2, 3):
        o, d = index.rank(x, k)
        assert np.array_equal(o, full_o[:, :k]) and np.array_equal(d, full_d[:, :k])


def test_kl_with_zeros_is_finite_and_matches_definition():
    rng = np.random.default_rng(2)
    p = rng.random((40, 6)) * (rng.random((40, 6)) > 0.4)
    p[0] = 0
    p[1] = [1, 0, 0, 0, 0, 0]
    q = rng.random((4, 6)) * (rng.random((4, 6)) > 0.4)
    q[0] = [0, 0, 0, 0, 0, 1]
    for direction in an.KL_DIRECTIONS:
        d = an.kl_matrix(p, q, direction, eps=1e-6)
        assert d.shape == (40, 4) and np.isfinite(d).all() and (d >= 0).all()
        ps, qs = (p + 1e-6), (q + 1e-6)
        ps, qs = ps / ps.sum(1, keepdims=True), qs / qs.sum(1, keepdims=True)
        for i, j in itertools.product(range(40), range(4)):
            a, b = (ps[i], qs[j]) if direction == "image_anchor" else (qs[j], ps[i])
            assert d[i, j] == pytest.approx(float((a * np.log(a / b)).sum()), rel=1e-4, abs=1e-5)
    fwd, bwd = an.kl_matrix(p, q, "image_anchor"), an.kl_matrix(p, q, "anchor_image")
    assert not np.allclose(fwd, bwd)
    assert an.kl_matrix(q, q).diagonal() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError):
        an.kl_matrix(p, q, eps=0)
