"""Labeling features files: streamed batches equal the in-memory labelers, one labels
file per features file, reruns write nothing, real features of the bundled digits."""

from __future__ import annotations

import os
import threading
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from anchor_helpers import (
    NAMES,
    make_anchors,
    make_features_dir,
    np_cosine,
    read_labels,
    ref_nearest,
    write_features,
)

from cvpipe import models
from cvpipe.core import tables
from cvpipe.core.storage import list_committed
from cvpipe.data.shards import shard_id
from cvpipe.label import anchor_labeling
from cvpipe.label import anchors as an


@pytest.fixture
def checkpoint(random_checkpoint):
    return random_checkpoint


def test_label_files_stream_one_per_features_file_and_rerun_writes_nothing(tmp_path):
    urls, emb, keys = make_features_dir(str(tmp_path), n_files=3, rows=50, dim=8)
    rng = np.random.default_rng(9)
    anchors_url = make_anchors(str(tmp_path / "anchors.parquet"), rng.normal(size=(5, 8)))
    names, mat, _ = an.read_anchors(anchors_url)
    out = str(tmp_path / "labels")

    res = an.label_folder(
        str(tmp_path / "features"), anchors_url, out, "nearest", n=2, batch_rows=16
    )
    assert [r.skipped for r in res] == [False] * 3 and sum(r.rows for r in res) == 150
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
    assert [r.skipped for r in again] == [True] * 3 and [r.rows for r in again] == [50] * 3
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
    assert res.rows == 60
    p = an.to_space(emb, "softmax", an.load_head(checkpoint))
    got = [r["label"] for r in read_labels(str(tmp_path / "o.parquet"))]
    assert got == an.nearest_labels(an.kl_matrix(p, mat), names).labels


def test_label_counts_of_a_labels_file(tmp_path):
    urls, _, _ = make_features_dir(str(tmp_path), n_files=1, rows=30)
    anchors_url = make_anchors(
        str(tmp_path / "a.parquet"), np.random.default_rng(0).normal(size=(5, 8))
    )
    res = an.label_file(urls[0], anchors_url, str(tmp_path / "o.parquet"), "nearest")
    c = an.label_counts(res.out)
    assert sum(c.values()) == 30 and set(c) <= set(NAMES)


# ------------------------------------------------- the fast path against the reference


def tie_features(tmp_path, rows=500, dim=16, seed=4):
    """Anchors with a duplicate and small-integer features (exact ties everywhere),
    Gaussian rows between them and zero vectors; one features file."""
    rng = np.random.default_rng(seed)
    vecs = rng.integers(0, 3, size=(5, dim)).astype(np.float64)
    vecs[3] = vecs[1]  # "tool" is "food": every image ties the two
    anchors_url = make_anchors(str(tmp_path / "a.parquet"), vecs)
    emb = rng.integers(0, 3, size=(rows, dim)).astype(np.float32)
    emb[1::3] = rng.normal(size=(len(emb[1::3]), dim))
    emb[::11] = 0
    url = str(tmp_path / "features" / "day1" / "part-000000.parquet")
    keys = [f"day1/img-{j:05d}" for j in range(rows)]
    write_features(url, keys, "day1/part-000000", emb)
    return url, anchors_url, emb, keys


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize(
    "method,n,ordered",
    [("nearest", 1, True), ("nearest", 3, True), ("nearest", 2, False), ("cfa", 1, True)],
)
def test_labels_file_equals_the_reference_path_bit_for_bit(
    tmp_path, monkeypatch, metric, method, n, ordered
):
    """The streamed labeler (memory-mapped reads, top-k picked on the transposed
    distances, label codes without a sort, rows encoded and written in row groups by a
    thread) against the reference path on the same batches: the full distance matrix,
    a stable sort of each row, the in-memory labelers and brute force."""
    monkeypatch.setattr(anchor_labeling, "ROW_GROUP_ROWS", 64)  # several row groups
    url, anchors_url, emb, keys = tie_features(tmp_path)
    names, mat, _ = an.read_anchors(anchors_url)
    res = an.label_file(
        url, anchors_url, str(tmp_path / "o.parquet"), method,
        n=n, ordered=ordered, metric=metric, batch_rows=37,
    )  # fmt: skip
    # The product's last bits depend on the rows multiplied together: same batches here.
    dists = [an.anchor_distances(emb[i : i + 37], mat, metric) for i in range(0, len(emb), 37)]
    if method == "nearest":
        ref = [an.nearest_labels(d, names, n, ordered) for d in dists]
        brute = sum((ref_nearest(d, names, n, ordered) for d in dists), [])
    else:
        ref = [an.cfa_labels(d, names) for d in dists]
        brute = sum((r.labels for r in ref), [])
    labels = sum((r.labels for r in ref), [])
    assert labels == brute

    got = tables.read_parquet(res.out)
    assert got.schema.remove_metadata() == tables.ANCHOR_LABELS
    assert pq.ParquetFile(res.out).metadata.num_row_groups > 1
    assert got.column("key").to_pylist() == keys
    assert set(got.column("shard").to_pylist()) == {"day1/part-000000"}
    assert set(got.column("method").to_pylist()) == {an.method_tag(method, n, ordered)}
    assert got.column("label").to_pylist() == labels
    expect_anchors = np.concatenate([r.anchors for r in ref])
    assert got.column("anchors").to_pylist() == [[names[j] for j in a] for a in expect_anchors]
    k = expect_anchors.shape[1]
    dist = got.column("distances").combine_chunks().flatten().to_numpy().reshape(-1, k)
    expect = np.concatenate([r.distances for r in ref]).astype(np.float32)
    assert np.array_equal(dist.view(np.int32), expect.view(np.int32))  # bit for bit
    assert res.counts == dict(sorted(Counter(labels).items())) and res.rows == len(keys)
    if method == "nearest" and metric == "cosine":
        zero = got.slice(0, 1).to_pylist()[0]  # row 0 is a zero vector: 1 to every anchor
        assert zero["anchors"][0] == names[0] and zero["distances"][0] == 1.0


def test_an_error_in_either_thread_leaves_no_labels_file_and_no_thread(tmp_path, monkeypatch):
    url, anchors_url, emb, keys = tie_features(tmp_path, rows=400)
    out = str(tmp_path / "o.parquet")
    threads = threading.active_count()
    # The labeling thread: a vector in the fourth batch gives NaN distances.
    bad = str(tmp_path / "bad" / "part-000000.parquet")
    nan = emb.copy()
    nan[200, 3] = np.nan
    write_features(bad, keys, "day1/part-000000", nan)
    with pytest.raises(ValueError, match="1 vector.* NaN distances"):
        an.label_file(bad, anchors_url, out, "nearest", batch_rows=64)
    assert not os.path.exists(out) and threading.active_count() == threads
    # The writer thread: encoding the third row group fails; the error reaches the caller.
    monkeypatch.setattr(anchor_labeling, "ROW_GROUP_ROWS", 64)
    real, calls = anchor_labeling.labels_table, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("encoder broke")
        return real(*args)

    monkeypatch.setattr(anchor_labeling, "labels_table", failing)
    with pytest.raises(RuntimeError, match="encoder broke"):
        an.label_file(url, anchors_url, out, "nearest", batch_rows=64)
    assert not os.path.exists(out) and threading.active_count() == threads
    assert sorted(os.listdir(tmp_path)) == ["a.parquet", "bad", "features"]  # no temp file
    monkeypatch.undo()
    assert an.label_file(url, anchors_url, out, "nearest", batch_rows=64).rows == 400


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
    rows = [r for x in res for r in read_labels(x.out)]
    assert len(rows) == len(truth) == 540 and len(res) == 6
    assert {r["shard"] for r in rows} == {shard_id(u) for u in digits_shards["test"]}
    acc = np.mean([r["label"] == str(truth[r["key"]]) for r in rows])
    assert acc > 0.3  # chance is 0.1


# ------------------------------------------------------------------------------ defects


def test_uniform_without_a_rule_is_a_clear_error_before_any_read(tmp_path):
    urls, _, _ = make_features_dir(str(tmp_path), n_files=1)
    anchors_url = make_anchors(str(tmp_path / "a.parquet"), np.ones((5, 8)))
    out = str(tmp_path / "o.parquet")
    with pytest.raises(ValueError, match="method 'uniform' needs rule_url"):
        an.label_file(urls[0], anchors_url, out, "uniform")
    assert not os.path.exists(out)


@pytest.mark.parametrize(
    "method,n,ordered",
    [("nearest", 2, True), ("nearest", 2, False), ("cfa", 1, False), ("random", 1, False)],
)
def test_the_experiment_names_a_method_as_its_labels_do(tmp_path, method, n, ordered):
    """The anchor experiment files each method's results under LabelMethod.tag; the
    labels of that method carry the same tag in their method column."""
    from cvpipe.experiments.config import LabelMethod

    urls, _, _ = make_features_dir(str(tmp_path), n_files=1, rows=10)
    anchors_url = make_anchors(str(tmp_path / "a.parquet"), np.eye(5, 8))
    res = an.label_file(
        urls[0], anchors_url, str(tmp_path / "o.parquet"), method, n=n, ordered=ordered
    )
    column = {r["method"] for r in read_labels(res.out)}
    assert column == {LabelMethod(method=method, n=n, ordered=ordered).tag}
