"""Distances against numpy, FAISS rankings with exact ties, top-k, KL with zeros."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from anchor_helpers import np_cosine, np_l2, ref_order, tie_dist

from cvpipe.label import anchors as an
from cvpipe.label.distances import SMALL_K


@pytest.mark.parametrize(
    "k", [1, 2, 3, 4, 5, 6, 7]
)  # picked one by one up to SMALL_K, sorted past it
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


def test_top_k_picks_equal_a_stable_sort_on_random_data_with_ties_infinities_and_zeros():
    rng = np.random.default_rng(3)
    for trial in range(200):
        n, a = int(rng.integers(1, 40)), int(rng.integers(1, 12))
        if trial % 2:
            dist = rng.integers(0, 3, size=(n, a)).astype(np.float32)  # exact ties
        else:
            dist = rng.random((n, a), dtype=np.float32)
        dist[rng.random((n, a)) < 0.15] = np.inf  # several infinite distances in a row
        dist[rng.random((n, a)) < 0.1] = -0.0
        before = dist.copy()
        for k in range(1, min(a, SMALL_K) + 1):
            order, d = an.top_k(dist, k)
            expect = np.argsort(dist, axis=1, kind="stable")[:, :k]
            assert np.array_equal(order, expect), (trial, k)
            # the distances of the picked anchors, bit for bit (-0.0 stays -0.0)
            picked = np.take_along_axis(dist, expect, axis=1)
            assert np.array_equal(d.view(np.int32), picked.view(np.int32))
        assert np.array_equal(dist, before)  # the input is left alone


def test_top_k_ranks_nan_last_and_rank_refuses_nan():
    dist = np.array([[0.5, np.nan, 0.1], [np.nan, np.nan, 0.2]], np.float32)
    order, d = an.top_k(dist, 2)
    assert order.tolist() == [[2, 0], [2, 0]]
    assert d[0].tolist() == [pytest.approx(0.1), 0.5] and np.isnan(d[1, 1])
    x = np.array([[1, np.nan], [1, 0]], np.float32)
    with pytest.raises(ValueError, match="1 vector.* NaN"):
        an.AnchorIndex(np.eye(2, dtype=np.float32)).rank(x, 1)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_rank_equals_the_reference_ranking_bit_for_bit(metric):
    """The index's ranking (picks for small k) against the reference: the full distance
    matrix sorted by (distance, index); zero vectors and duplicated anchors included."""
    rng = np.random.default_rng(5)
    a = rng.integers(0, 3, size=(9, 16)).astype(np.float32)
    a[4] = a[1]  # a duplicated anchor: exact ties everywhere
    x = rng.integers(0, 3, size=(3000, 16)).astype(np.float32)
    x[1::5] = rng.normal(size=(len(x[1::5]), 16))
    x[::7] = 0  # zero vectors: cosine distance 1 to every anchor
    index = an.AnchorIndex(a, metric)
    ref_order, ref_d = an.rank_anchors(index.distances(x))
    for k in (1, 2, 3, SMALL_K, SMALL_K + 1, None):
        order, d = index.rank(x, k)
        kk = 9 if k is None else k
        assert np.array_equal(order, ref_order[:, :kk]), k
        assert np.array_equal(d.view(np.int32), ref_d[:, :kk].view(np.int32)), k
    if metric == "cosine":
        assert (index.rank(x[::7], 1)[0] == 0).all()
