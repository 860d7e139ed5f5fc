"""Anchor pseudo-labeling: labelers against brute force, distances against numpy,
anchor merges in any order, streaming label files and reruns, report tables."""

from __future__ import annotations

import itertools
import os
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from cvpipe import models
from cvpipe.core import tables
from cvpipe.core.storage import list_committed
from cvpipe.data.shards import shard_id
from cvpipe.experiments import reports
from cvpipe.label import anchors as an

NAMES = ["animal", "food", "plant", "tool", "vehicle"]


# ---------------------------------------------------------------------------- helpers


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
    t = pa.Table.from_pydict(
        {"key": keys, "shard": [shard] * len(keys), "embedding": list(emb.astype(np.float32))},
        schema=tables.features_schema(emb.shape[1]),
    )
    tables.write_parquet(t, url, tables.lineage(model_id=model_id))


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


# ---------------------------------------------------------------------------- labelers


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


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_top_k_equals_brute_force_with_ties(k):
    dist = tie_dist(k, a=7)
    order, d = an.top_k(dist, k)
    for i, row in enumerate(dist.tolist()):
        ref = ref_order(row)[:k]
        assert order[i].tolist() == ref and d[i].tolist() == [row[j] for j in ref]


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


# --------------------------------------------------------------------------- distances


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


# ----------------------------------------------------------------------------- anchors


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("ckpt") / "ref.pt")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = models.build("small_cnn", 10)
    models.save_checkpoint(
        model, models.ModelInfo("small_cnn", [str(i) for i in range(10)], 16), url
    )
    return url


@pytest.mark.parametrize("kind", ["mean", "normalized", "softmax"])
def test_anchors_merged_in_any_order_equal_one_pass(tmp_path, kind, checkpoint):
    rng = np.random.default_rng(4)
    data = {}
    urls = []
    for name in ("animal", "plant", "tool"):
        embs = []
        for i in range(3):
            e = rng.normal(loc=rng.normal(), size=(int(rng.integers(1, 40)), 48))
            e = np.maximum(e, 0) if kind != "mean" else e  # ReLU features, some all-zero
            e[0] = 0
            url = str(tmp_path / name / f"f{i}.parquet")
            write_features(url, [f"{name}{i}-{j}" for j in range(len(e))], name, e)
            urls.append((url, name))
            embs.append(e.astype(np.float32))
        data[name] = np.concatenate(embs)
    ck = checkpoint if kind == "softmax" else None
    parts = [an.anchor_partial(u, n, kind, ck, batch_rows=7) for u, n in urls]
    head = an.load_head(checkpoint)
    ref = {n: an.to_space(e, kind, head).astype(np.float64).mean(0) for n, e in data.items()}

    results = []
    for seed in range(3):
        shuffled = parts[:]
        random.Random(seed).shuffle(shuffled)
        # A tree: merge pairs, then the merged pairs.
        level = [an.merge_anchor_sums(shuffled[i : i + 2]) for i in range(0, len(shuffled), 2)]
        results.append(an.merge_anchor_sums(level))
    # Through files too, as separate work units would.
    files = [
        an.anchor_partial_file(u, n, str(tmp_path / "p" / f"{k}.parquet"), kind, ck)
        for k, (u, n) in enumerate(urls)
    ]
    results.append(an.merge_anchor_files(reversed(files)))
    for k, merged in enumerate(results):
        out = str(tmp_path / f"anchors{k}.parquet")
        an.write_anchors(merged, out)
        names, mat, counts = an.read_anchors(out)
        assert names == ["animal", "plant", "tool"]
        assert counts.tolist() == [len(data[n]) for n in names]
        np.testing.assert_allclose(mat, np.stack([ref[n] for n in names]), rtol=1e-6, atol=1e-7)
        lin = tables.read_lineage(out)
        assert lin["vector_kind"] == kind and lin["model_id"] == "m1"
    if kind != "mean":
        assert np.allclose(mat.sum(axis=1), 1.0, atol=1e-5)  # distributions


def test_merging_sums_of_different_models_is_an_error():
    a = an.AnchorSums("mean", 2, {"x": np.zeros(2)}, {"x": 1}, model="m1")
    b = an.AnchorSums("mean", 2, {"y": np.zeros(2)}, {"y": 1}, model="m2")
    with pytest.raises(ValueError, match="model"):
        an.merge_anchor_sums([a, b])


# --------------------------------------------------------------------------- streaming


def read_labels(url):
    return tables.read_parquet(url).to_pylist()


def test_label_files_stream_one_per_features_file_and_rerun_writes_nothing(tmp_path):
    urls, emb, keys = make_features_dir(str(tmp_path), n_files=3, rows=50, dim=8)
    rng = np.random.default_rng(9)
    anchors_url = make_anchors(str(tmp_path / "anchors.parquet"), rng.normal(size=(5, 8)))
    names, mat, _ = an.read_anchors(anchors_url)
    out = str(tmp_path / "labels")

    res = an.label_folder(
        str(tmp_path / "features"), anchors_url, out, "nearest", n=2, batch_rows=16
    )
    assert [r["skipped"] for r in res] == [False] * 3 and sum(r["rows"] for r in res) == 150
    written = list_committed(out, ".parquet", recursive=True)
    assert written == [os.path.join(out, "day1", f"digits-{i:06d}.parquet") for i in range(3)]

    rows = [r for u in written for r in read_labels(u)]
    ref = an.nearest_labels(np_cosine(emb, mat).astype(np.float32), names, n=2)
    assert [r["key"] for r in rows] == keys
    assert [r["label"] for r in rows] == ref.labels
    assert {r["method"] for r in rows} == {"nearest-2"}
    assert rows[0]["shard"] == "day1/digits-000000"
    assert [r["anchors"] for r in rows] == [[names[j] for j in a] for a in ref.anchors.tolist()]
    np.testing.assert_allclose([r["distances"] for r in rows], ref.distances, atol=1e-5)
    lin = tables.read_lineage(written[0])
    assert (lin["method"], lin["metric"], lin["n"], lin["anchors"]) == (
        "nearest",
        "cosine",
        2,
        anchors_url,
    )

    mtimes = [os.stat(u).st_mtime_ns for u in written]
    again = an.label_folder(str(tmp_path / "features"), anchors_url, out, "nearest", n=2)
    assert [r["skipped"] for r in again] == [True] * 3 and [r["rows"] for r in again] == [50] * 3
    assert [os.stat(u).st_mtime_ns for u in written] == mtimes
    assert list_committed(out, ".parquet", recursive=True) == written

    with pytest.raises(ValueError, match="Nearest-6"):
        an.label_file(urls[0], anchors_url, str(tmp_path / "x.parquet"), "nearest", n=6)
    assert not os.path.exists(tmp_path / "x.parquet")


@pytest.mark.parametrize("metric", ["cosine", "l2", "kl"])
def test_streamed_cfa_equals_in_memory(tmp_path, metric):
    urls, emb, _ = make_features_dir(str(tmp_path), n_files=2, rows=40, dim=8)
    emb = np.maximum(emb, 0)
    for i, u in enumerate(urls):
        os.remove(u)
        write_features(
            u, [f"k{i}-{j}" for j in range(40)], f"day1/digits-{i:06d}", emb[i * 40 : (i + 1) * 40]
        )
    kind = "normalized" if metric == "kl" else "mean"
    vecs = np.abs(np.random.default_rng(1).normal(size=(5, 8)))
    if kind == "normalized":
        vecs /= vecs.sum(1, keepdims=True)
    anchors_url = make_anchors(str(tmp_path / "a.parquet"), vecs, kind=kind)
    names, mat, _ = an.read_anchors(anchors_url)
    out = str(tmp_path / "labels")
    an.label_folder(urls[0].rsplit("/", 1)[0], anchors_url, out, "cfa", metric=metric, batch_rows=9)
    got = [
        r["label"] for u in list_committed(out, ".parquet", recursive=True) for r in read_labels(u)
    ]
    x = an.to_space(emb, kind)
    dist = an.kl_matrix(x, mat) if metric == "kl" else an.anchor_distances(x, mat, metric)
    assert got == an.cfa_labels(dist, names).labels


def test_kl_needs_distribution_anchors(tmp_path):
    urls, _, _ = make_features_dir(str(tmp_path), n_files=1)
    anchors_url = make_anchors(str(tmp_path / "a.parquet"), np.ones((5, 8)))
    with pytest.raises(ValueError, match="distribution anchors"):
        an.label_file(urls[0], anchors_url, str(tmp_path / "o.parquet"), "nearest", metric="kl")


def test_uniform_two_passes_random_and_vanilla_streamed(tmp_path):
    urls, emb, keys = make_features_dir(str(tmp_path), n_files=3, rows=200, dim=8)
    anchors_url = make_anchors(
        str(tmp_path / "a.parquet"), np.random.default_rng(5).normal(size=(5, 8))
    )
    names, mat, _ = an.read_anchors(anchors_url)
    counts = an.merge_counts(an.count_sequences_file(u, anchors_url, batch_rows=50) for u in urls)
    rule_url = str(tmp_path / "rule.parquet")
    an.write_uniform_rule(counts, 10, rule_url)
    rule = an.read_uniform_rule(rule_url)
    assert rule == an.uniform_rule(counts, 10)

    def run(method, **kw):
        out = str(tmp_path / method)
        an.label_folder(str(tmp_path / "features"), anchors_url, out, method, batch_rows=64, **kw)
        return [r for u in list_committed(out, ".parquet", recursive=True) for r in read_labels(u)]

    dist = an.anchor_distances(emb, mat, "cosine")
    rows = run("uniform", rule_url=rule_url, seed=3)
    assert [r["label"] for r in rows] == an.uniform_labels(dist, names, keys, rule, 3).labels
    assert all(len(r["anchors"]) == 3 for r in rows)

    rows = run("random", n_labels=7, seed=1)
    assert [r["label"] for r in rows] == an.random_labels(keys, 7, 1).labels
    assert rows[0]["anchors"] == [] and rows[0]["distances"] == []

    truth_url = str(tmp_path / "index.parquet")
    truth = {k: f"c{i % 4}" for i, k in enumerate(keys)}
    tables.write_parquet(
        tables.from_rows(
            [{"key": k, "label": v} for k, v in truth.items()],
            pa.schema([("key", pa.string()), ("label", pa.string())]),
        ),
        truth_url,
        tables.lineage(),
    )
    rows = run("vanilla", truth_url=truth_url)
    assert [r["label"] for r in rows] == [truth[k] for k in keys]


def test_softmax_anchors_label_through_the_head(tmp_path, checkpoint):
    urls, emb, keys = make_features_dir(str(tmp_path), n_files=1, rows=60, dim=48)
    anchors_url = str(tmp_path / "a.parquet")
    an.build_anchors({"left": urls[0]}, anchors_url, "softmax", checkpoint)
    names, mat, _ = an.read_anchors(anchors_url)
    assert mat.shape == (1, 10)
    # A second anchor from a shifted half, then KL labels streamed vs in memory.
    sums = an.merge_anchor_sums(
        [an.anchor_partial(urls[0], "left", "softmax", checkpoint)]
        + [
            an.AnchorSums(
                "softmax", 10, {"right": np.full(10, 0.1) * 60}, {"right": 60}, "m1", checkpoint
            )
        ]
    )
    an.write_anchors(sums, anchors_url.replace("a.parquet", "b.parquet"))
    b_url = anchors_url.replace("a.parquet", "b.parquet")
    names, mat, _ = an.read_anchors(b_url)
    res = an.label_file(urls[0], b_url, str(tmp_path / "o.parquet"), "nearest", metric="kl")
    assert res["rows"] == 60
    p = an.to_space(emb, "softmax", an.load_head(checkpoint))
    got = [r["label"] for r in read_labels(str(tmp_path / "o.parquet"))]
    assert got == an.nearest_labels(an.kl_matrix(p, mat), names).labels


# ----------------------------------------------------------------------------- reports


def test_pseudo_label_report(tmp_path):
    counts = {"nearest1": {"a": 10, "b": 30}, "random": {"r0": 20, "r1": 19, "r2": 1}}
    urls = reports.write_pseudo_label_report(counts, str(tmp_path / "pl"), top1={"random": 0.5})
    t = tables.read_parquet(urls["parquet"]).to_pylist()
    assert t[0] == {
        "method": "nearest1",
        "labels": 2,
        "images": 40,
        "images_per_label_mean": 20.0,
        "images_per_label_std": 10.0,
        "top1": None,
    }
    assert t[1]["labels"] == 3 and t[1]["top1"] == 0.5
    assert t[1]["images_per_label_std"] == pytest.approx(np.std([20, 19, 1]))
    md = (tmp_path / urls["markdown"]).read_text()
    assert md.splitlines()[0].startswith("| method | labels |") and "| nearest1 | 2 | 40 |" in md
    assert (tmp_path / urls["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_label_counts_of_a_labels_file(tmp_path):
    urls, _, _ = make_features_dir(str(tmp_path), n_files=1, rows=30)
    anchors_url = make_anchors(
        str(tmp_path / "a.parquet"), np.random.default_rng(0).normal(size=(5, 8))
    )
    res = an.label_file(urls[0], anchors_url, str(tmp_path / "o.parquet"), "nearest")
    c = an.label_counts(res["out"])
    assert sum(c.values()) == 30 and set(c) <= set(NAMES)


def test_transfer_table_marks_best_per_row(tmp_path):
    rows = [
        {"target": "flowers", "method": "nearest1", "top1": 0.71},
        {"target": "flowers", "method": "random", "top1": 0.65},
        {"target": "cars", "method": "nearest1", "top1": 0.5},
        {"target": "cars", "method": "random", "top1": 0.55},
        {"target": "birds", "method": "random", "top1": 0.3},
    ]
    urls = reports.write_transfer_report(rows, str(tmp_path / "tr"))
    t = tables.read_parquet(urls["parquet"])
    assert t.column_names == ["target", "nearest1", "random", "best"]
    assert t.column("best").to_pylist() == ["nearest1", "random", "random"]
    assert t.column("nearest1").to_pylist() == [0.71, 0.5, None]
    md = (tmp_path / urls["markdown"]).read_text()
    assert "| flowers | **0.710** | 0.650 | nearest1 |" in md
    assert "| cars | 0.500 | **0.550** | random |" in md
    with pytest.raises(ValueError, match="two results"):
        reports.transfer_table(rows + rows[:1])


# ------------------------------------------------------- end to end on real features


def test_digits_end_to_end_with_a_fresh_reference_model(tmp_path, digits_shards):
    """Real penultimate features of the bundled digits (a fresh small_cnn): anchors =
    the labeled digits of each class, Nearest-1 on the test shards beats chance."""
    torch = pytest.importorskip("torch")
    from cvpipe.data.loader import ShardDataset, collate

    torch.manual_seed(0)
    model = models.build("small_cnn", 10).eval()
    info = models.ModelInfo("small_cnn", [str(i) for i in range(10)], 16)

    def embed(url):
        ds = ShardDataset([url], models.preprocess(info), classes=info.classes)
        batch = collate(list(ds))
        with torch.no_grad():
            return batch.keys, batch.labels.numpy(), model.backbone(batch.images).numpy()

    by_class: dict[str, list[np.ndarray]] = {}
    for url in digits_shards["labeled"]:
        _, labels, emb = embed(url)
        for c in np.unique(labels):
            by_class.setdefault(str(c), []).append(emb[labels == c])
    parts = []
    for c, embs in by_class.items():
        e = np.concatenate(embs)
        url = str(tmp_path / "anchor_sets" / f"{c}.parquet")
        write_features(url, [f"{c}-{i}" for i in range(len(e))], "labeled/x", e)
        parts.append(an.anchor_partial(url, c, "mean"))
    anchors_url = str(tmp_path / "anchors.parquet")
    an.write_anchors(an.merge_anchor_sums(parts), anchors_url)

    truth = {}
    for url in digits_shards["test"]:  # labels known, so accuracy can be measured
        keys, labels, emb = embed(url)
        sid = shard_id(url)
        write_features(str(tmp_path / "features" / f"{sid}.parquet"), keys, sid, emb)
        truth.update(zip(keys, labels.tolist(), strict=True))
    res = an.label_folder(
        str(tmp_path / "features"), anchors_url, str(tmp_path / "labels"), "nearest"
    )
    rows = [r for x in res for r in read_labels(x["out"])]
    assert len(rows) == len(truth) == 540 and len(res) == 6
    assert {r["shard"] for r in rows} == {shard_id(u) for u in digits_shards["test"]}
    acc = np.mean([r["label"] == str(truth[r["key"]]) for r in rows])
    assert acc > 0.3  # chance is 0.1
