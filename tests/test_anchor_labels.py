"""The labelers against brute force (ties included), the Uniform rule, key hashing,
and the one method tag."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from anchor_helpers import NAMES, random_dist, ref_nearest, ref_order, tie_dist

from cvpipe.label import anchors as an
from cvpipe.label.anchor_labels import _encode, concat_labels


@pytest.mark.parametrize("make", [random_dist, tie_dist], ids=["random", "ties"])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("ordered", [True, False])
def test_nearest_equals_brute_force(make, n, ordered):
    dist = make(n)
    lab = an.nearest_labels(dist, NAMES, n=n, ordered=ordered)
    assert lab.labels == ref_nearest(dist, NAMES, n, ordered)
    for i, row in enumerate(dist.tolist()):
        ref = ref_order(row)[:n]
        assert lab.anchors[i].tolist() == ref  # distance order even when unordered
        assert lab.distances[i].tolist() == [row[j] for j in ref]


@pytest.mark.parametrize("base,k", [(5, 1), (16, 3), (300, 1), (300, 2)])
def test_label_codes_are_the_sorted_distinct_labels(base, k):
    """Codes come from a table over the code space when it is small (16^3) and from a
    sort when it is not (300^2 > 65,536): the same vocab, in code order, either way."""
    rng = np.random.default_rng(base + k)
    parts = rng.integers(0, base, size=(3000, k))
    parts[:10] = parts[10]  # repeats
    names = [f"a{i:03d}" for i in range(base)]  # fixed width: name order is index order
    vocab, codes = _encode(parts, base, names, ">")
    expect = [">".join(names[j] for j in row) for row in parts.tolist()]
    assert [vocab[c] for c in codes.tolist()] == expect
    assert vocab == sorted(set(expect)) and codes.dtype == np.int64


def test_concatenated_batches_keep_every_label_anchor_and_distance():
    parts = [
        an.nearest_labels(make(seed), NAMES, n=2)
        for make, seed in ((random_dist, 1), (tie_dist, 2), (random_dist, 3))
    ]
    parts.append(an.random_labels([f"k{i}" for i in range(7)], 3))  # no anchors: k = 0
    one = concat_labels(parts[:3])
    assert one.labels == sum((p.labels for p in parts[:3]), [])
    assert one.vocab == sorted(set(one.vocab)) and len(one) == 1200
    assert np.array_equal(one.anchors, np.concatenate([p.anchors for p in parts[:3]]))
    assert np.array_equal(one.distances, np.concatenate([p.distances for p in parts[:3]]))
    assert concat_labels(parts[3:]) is parts[3]
    both = concat_labels([parts[3], parts[3]])
    assert both.labels == parts[3].labels * 2 and both.anchors.shape == (14, 0)


def test_ties_break_by_anchor_index():
    dist = np.array([[1, 0, 0, 1, 0.5]], np.float32)
    assert an.nearest_labels(dist, NAMES, 3).labels == ["food>plant>vehicle"]
    assert an.cfa_labels(dist, NAMES).labels == ["food|tool"]  # farthest: highest index


def test_nearest_n_larger_than_anchor_count_is_an_error():
    with pytest.raises(ValueError, match="Nearest-6 needs 1 <= N <= 5"):
        an.nearest_labels(random_dist(0), NAMES, n=6)
    with pytest.raises(ValueError, match="Nearest-0"):
        an.nearest_labels(random_dist(0), NAMES, n=0)


@pytest.mark.parametrize("make", [random_dist, tie_dist], ids=["random", "ties"])
def test_cfa_equals_brute_force(make):
    dist = make(7)
    lab = an.cfa_labels(dist, NAMES)
    ref = []
    for row in dist.tolist():
        o = ref_order(row)
        ref.append(f"{NAMES[o[0]]}|{NAMES[o[-1]]}")
    assert lab.labels == ref
    assert np.array_equal(lab.distances[:, 0], dist.min(axis=1))
    assert np.array_equal(lab.distances[:, 1], dist.max(axis=1))


def test_uniform_rule_by_hand():
    counts = {"a>b>c": 50, "a>b>d": 4, "a>c>b": 3, "a>c>d": 3, "b>a>c": 30, "b>c>a": 10}
    rule = an.uniform_rule(counts, n_labels=5)  # total 100, target 20
    # a>b>c (50) and b>a>c (30) are buckets, split in floor(50/20 + 1/2) = 3 and 2 parts;
    # the rest pool into a>b (4), a>c (6), b>c (10), all < 20, so into "a" and "b".
    assert rule.target == 20
    assert rule.parts == {"a": 1, "a>b>c": 3, "b": 1, "b>a>c": 2}
    assert rule.counts == {"a": 10, "a>b>c": 50, "b": 10, "b>a>c": 30}
    assert rule.bucket_of(["a", "b", "d"]) == "a"
    assert rule.bucket_of(["c", "a", "b"]) == "c"  # unseen when counting: its Nearest-1


def ref_uniform(dist, names, keys, rule, seed):
    out = []
    for row, key in zip(dist.tolist(), keys, strict=True):
        seq = [names[j] for j in ref_order(row)[:3]]
        b = rule.bucket_of(seq)
        p = rule.parts.get(b, 1)
        h = int(an.key_hash([key], seed)[0])  # the scalar path of the same hash
        out.append(f"{b}#{h % p}" if p > 1 else b)
    return out


@pytest.mark.parametrize("make", [random_dist, tie_dist], ids=["random", "ties"])
def test_uniform_equals_brute_force_and_evens_sizes(make):
    dist = make(3, n=3000)
    keys = [f"k{i}" for i in range(len(dist))]
    counts = an.merge_counts(
        an.sequence_counts(dist[i : i + 700], NAMES) for i in range(0, 3000, 700)
    )
    ref_counts = Counter(">".join(NAMES[j] for j in ref_order(r)[:3]) for r in dist.tolist())
    assert counts == dict(ref_counts)
    rule = an.uniform_rule(counts, n_labels=12)
    lab = an.uniform_labels(dist, NAMES, keys, rule, seed=5)
    assert lab.labels == ref_uniform(dist, NAMES, keys, rule, 5)
    sizes = Counter(lab.labels)
    raw = Counter(an.nearest_labels(dist, NAMES, 3).labels)

    def cv(c):
        v = np.array(list(c.values()))
        return v.std() / v.mean()

    assert cv(sizes) < 0.5 * cv(raw)
    assert 9 <= len(sizes) <= 15


def test_random_labels_are_deterministic_per_key_and_uniform():
    keys = [f"shard/{i:06d}" for i in range(20_000)]
    lab = an.random_labels(keys, n_labels=10, seed=1)
    assert len(set(lab.labels)) == 10
    sizes = np.array(list(Counter(lab.labels).values()))
    assert sizes.min() > 1700 and sizes.max() < 2300  # expected 2000, sd ~42
    shuffled = keys[::-1]
    again = an.random_labels(shuffled, n_labels=10, seed=1).labels[::-1]
    assert again == lab.labels  # per key: batch composition and order do not matter
    assert an.random_labels(keys, 10, seed=2).labels != lab.labels


def test_key_hash_vectorized_equals_scalar_and_handles_unicode():
    keys = ["", "a", "ab", "ünïcode/κλειδί", "x" * 300, "a"]
    vec = an.key_hash(keys, seed=3)
    assert [int(an.key_hash([k], seed=3)[0]) for k in keys] == vec.tolist()
    assert vec[1] == vec[5] and len(set(vec.tolist())) == 5
    sliced = pa.array(["zz"] + keys).slice(1)  # a sliced Arrow array keeps its offset
    assert an.key_hash(sliced, seed=3).tolist() == vec.tolist()


def test_vanilla_labels():
    truth = {"a": "cat", "b": "dog", "c": "cat"}
    assert an.vanilla_labels(["c", "b", "a"], truth).labels == ["cat", "dog", "cat"]
    with pytest.raises(KeyError, match="1 key"):
        an.vanilla_labels(["a", "zz"], truth)
