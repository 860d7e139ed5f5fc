"""The FAISS index: the plan by size and memory, round trips, add == rebuild for exact
indexes, an id map that survives reruns and crashes, neighbours Parquet, dedup."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from cvpipe.core import storage, tables
from cvpipe.index import engine, query, store
from cvpipe.index.config import DedupConfig, IndexAddConfig, IndexBuildConfig, QueryConfig
from cvpipe.index.plan import (
    POINTS_PER_CENTROID,
    IndexPlan,
    estimated_bytes,
    parse_memory,
    plan_index,
)
from cvpipe.index.synthetic import Clustered, write_features

DIM = 16
SHARD_ROWS = 1000


@pytest.fixture(autouse=True)
def one_faiss_thread():
    # 2 cores shared with other processes: OpenMP threads spin while waiting.
    with engine.faiss_threads(1):
        yield


def make_features(root, partitions: dict[str, int], dim=DIM, seed=0, start=0, model="m1"):
    """Features files of ``SHARD_ROWS`` rows, ``{root}/{partition}/s-NNNNNN.parquet``,
    keys ``k{row}`` over consecutive synthetic rows. Returns (matrix, keys)."""
    g = Clustered(dim, clusters=32, intrinsic=4, seed=seed)
    xs, keys = [], []
    row = start
    for part, n in partitions.items():
        for s in range(0, n, SHARD_ROWS):
            m = min(SHARD_ROWS, n - s)
            x, _ = g.rows(row, row + m)
            k = [f"k{i}" for i in range(row, row + m)]
            sid = f"{part}/s-{row // SHARD_ROWS:06d}"
            write_features(os.path.join(root, f"{sid}.parquet"), k, sid, x, model_id=model)
            xs.append(x)
            keys += k
            row += m
    return np.concatenate(xs), keys


def brute_force(x, q, k):
    d = ((q[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.sqrt(np.take_along_axis(d, order, 1)), order


# ----------------------------------------------------------------------------- plan


def test_parse_memory():
    assert parse_memory("4G") == 4 << 30
    assert parse_memory("512M") == 512 << 20
    assert parse_memory("1.5GB") == int(1.5 * (1 << 30))
    assert parse_memory(1000) == 1000
    with pytest.raises(ValueError, match="memory must look like"):
        parse_memory("lots")


def test_plan_picks_flat_ivf_ivfpq_by_size_and_memory():
    assert plan_index(5_000, 128).kind == "flat"

    ivf = plan_index(200_000, 128, "4G")
    assert ivf.kind == "ivf" and ivf.factory == f"IVF{ivf.nlist},Flat"
    assert 4 * 200_000**0.5 <= ivf.nlist <= 16 * 200_000**0.5
    assert ivf.nlist & (ivf.nlist - 1) == 0  # a power of two
    assert ivf.train_size >= POINTS_PER_CENTROID * ivf.nlist

    big = plan_index(2_000_000, 128, "4G")  # above IVF-Flat's range: quantized
    assert big.kind == "ivfpq" and big.m == 64
    assert big.factory == f"OPQ64,IVF{big.nlist},PQ64x8np"
    assert big.train_size >= POINTS_PER_CENTROID * big.nlist

    # The raw vectors (256 MB) do not fit 40 MB: the largest PQ code that does.
    tight = plan_index(500_000, 128, "40M")
    assert tight.kind == "ivfpq"
    budget = parse_memory("40M")
    assert estimated_bytes("ivfpq", 500_000, 128, tight.nlist, tight.m) <= budget
    assert tight.m == 64 or estimated_bytes("ivfpq", 500_000, 128, tight.nlist, 2 * tight.m) > (
        budget
    )
    assert plan_index(500_000, 128, "20M").m < tight.m

    with pytest.raises(ValueError, match="fits"):
        plan_index(10_000_000, 128, "10M")
    with pytest.raises(ValueError, match="needs at least"):
        plan_index(100, 16, kind="ivf")
    with pytest.raises(ValueError, match="unknown index kind"):
        plan_index(100, 16, kind="hnsw")


def test_plan_round_trips_through_the_manifest():
    p = plan_index(2_000_000, 128, "4G")
    assert IndexPlan.from_dict(p.to_dict()) == p


# ------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_saved_index_answers_like_the_one_in_memory(tmp_path, kind):
    x, _ = Clustered(DIM, clusters=32, intrinsic=4, seed=3).rows(0, 12_000)
    plan = plan_index(len(x), DIM, kind=kind)
    index = engine.create(plan)
    if plan.train_size:
        engine.train(index, x[: plan.train_size], plan)
    index.add(x)
    engine.set_nprobe(index, 8)
    before = engine.search(index, x[:200], 10, "l2")
    url = str(tmp_path / "a.faiss")
    size = engine.write_index(index, url)
    assert size == os.path.getsize(url) > 0
    again = engine.read_index(url)
    engine.set_nprobe(again, 8)
    after = engine.search(again, x[:200], 10, "l2")
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])


def test_flat_index_is_exact_and_reports_euclidean_distances(tmp_path):
    x, keys = make_features(tmp_path / "emb", {"day0": 3000})
    stats = store.build_index(
        IndexBuildConfig(embeddings=str(tmp_path / "emb"), out=str(tmp_path / "ix"))
    )
    assert stats.kind == "flat" and stats.count == 3000 and not stats.skipped
    opened = store.open_index(str(tmp_path / "ix"))
    dist, ids = opened.search(x[:50], 5)
    want_d, want_i = brute_force(x, x[:50], 5)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(dist, want_d, rtol=1e-4, atol=1e-4)
    got_keys, got_shards = opened.ids.take(ids[0])
    assert got_keys == [keys[i] for i in want_i[0]]
    assert got_shards[0] == "day0/s-000000"


def test_index_on_s3(s3_root, tmp_path):
    make_features(f"{s3_root}/emb", {"day0": 2000})
    out = f"{s3_root}/ix"
    store.build_index(IndexBuildConfig(embeddings=f"{s3_root}/emb", out=out))
    assert storage.is_committed(store.manifest_url(out))
    opened = store.open_index(out)
    assert opened.manifest.count == 2000
    hits = query.query_key(opened, "k7", 3)
    assert len(hits) == 3 and all(h.key != "k7" for h in hits)


def test_cosine_distances_are_one_minus_cos(tmp_path):
    x, _ = make_features(tmp_path / "emb", {"day0": 1000})
    store.build_index(
        IndexBuildConfig(
            embeddings=str(tmp_path / "emb"), out=str(tmp_path / "ix"), metric="cosine"
        )
    )
    opened = store.open_index(str(tmp_path / "ix"))
    dist, ids = opened.search(x[:5], 3)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    want = 1 - (u[:5, None, :] * u[ids]).sum(-1)
    np.testing.assert_allclose(dist, want, atol=1e-5)
    assert np.all(np.diff(dist, axis=1) >= -1e-6)


# ------------------------------------------------------------------- add and reruns


def test_add_equals_rebuild_for_an_exact_index(tmp_path):
    make_features(tmp_path / "emb", {"day0": 2000, "day1": 1500})
    one = str(tmp_path / "one")
    store.build_index(
        IndexBuildConfig(embeddings=str(tmp_path / "emb" / "day0"), out=one, kind="flat")
    )
    added = store.add_to_index(IndexAddConfig(index=one, embeddings=str(tmp_path / "emb" / "day1")))
    assert added.added == 1500 and added.count == 3500 and added.parts == 2
    both = str(tmp_path / "both")
    store.build_index(IndexBuildConfig(embeddings=str(tmp_path / "emb"), out=both, kind="flat"))

    a, b = store.open_index(one), store.open_index(both)
    assert a.ids.keys.equals(b.ids.keys) and a.ids.shards.equals(b.ids.shards)
    out_a, out_b = str(tmp_path / "na.parquet"), str(tmp_path / "nb.parquet")
    emb = str(tmp_path / "emb")
    query.query_embeddings(QueryConfig(index=one, embeddings=emb, out=out_a, k=7))
    query.query_embeddings(QueryConfig(index=both, embeddings=emb, out=out_b, k=7))
    ta, tb = tables.read_parquet(out_a), tables.read_parquet(out_b)
    assert ta.num_rows == 3500
    assert ta.column("neighbors").equals(tb.column("neighbors"))
    assert ta.column("distances").equals(tb.column("distances"))
    assert a.manifest.parts[1].partitions == ["day1"]


def _files(root):
    fs, path = storage.url_to_fs(str(root))
    return {p: (fs.modified(p), fs.size(p)) for p in fs.find(path)}


def test_the_id_map_survives_reruns(tmp_path):
    make_features(tmp_path / "emb", {"day0": 2000, "day1": 1000})
    out = str(tmp_path / "ix")
    build = IndexBuildConfig(embeddings=str(tmp_path / "emb" / "day0"), out=out, kind="flat")
    store.build_index(build)
    first = store.open_index(out).ids.keys
    before = _files(out)

    again = store.build_index(build)
    assert again.skipped and again.count == 2000
    assert _files(out) == before  # nothing rewritten

    add = IndexAddConfig(index=out, embeddings=str(tmp_path / "emb" / "day1"))
    store.add_to_index(add)
    after_add = _files(out)
    rerun = store.add_to_index(add)
    assert rerun.skipped and rerun.count == 3000 and rerun.added == 0
    assert _files(out) == after_add

    opened = store.open_index(out)
    assert opened.ids.keys.slice(0, 2000).equals(first)  # earlier ids never move
    ids = tables.read_parquet(os.path.join(out, "ids", "part-000001.parquet"))
    assert ids.column("id").to_pylist() == list(range(2000, 3000))
    assert set(ids.column("partition").to_pylist()) == {"day1"}
    assert tables.read_lineage(os.path.join(out, "ids", "part-000001.parquet"))["stage"] == (
        "index-add"
    )
    # A different build into the same folder, or the same files again, are errors.
    with pytest.raises(store.IndexFolderError, match="another build"):
        store.build_index(build.model_copy(update={"kind": "auto", "metric": "cosine"}))
    day0_file = sorted(storage.list_committed(str(tmp_path / "emb" / "day0"), ".parquet"))[0]
    with pytest.raises(store.IndexFolderError, match="in the index already"):
        store.add_to_index(IndexAddConfig(index=out, embeddings=day0_file))


def test_an_add_killed_before_its_commit_leaves_the_previous_index(tmp_path, monkeypatch):
    make_features(tmp_path / "emb", {"day0": 1000, "day1": 1000})
    out = str(tmp_path / "ix")
    store.build_index(IndexBuildConfig(embeddings=str(tmp_path / "emb" / "day0"), out=out))
    manifest = storage.read_bytes(store.manifest_url(out))
    real = engine.write_index

    def dies(index, url):
        real(index, url)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(engine, "write_index", dies)
    add = IndexAddConfig(index=out, embeddings=str(tmp_path / "emb" / "day1"))
    with pytest.raises(KeyboardInterrupt):
        store.add_to_index(add)
    assert storage.read_bytes(store.manifest_url(out)) == manifest
    assert store.open_index(out).manifest.count == 1000
    monkeypatch.setattr(engine, "write_index", real)
    assert store.add_to_index(add).count == 2000
    assert store.open_index(out).index.ntotal == 2000


def test_add_refuses_other_dimensions_and_models(tmp_path):
    make_features(tmp_path / "a", {"day0": 1000})
    make_features(tmp_path / "b", {"day1": 1000}, dim=8)
    make_features(tmp_path / "c", {"day2": 1000}, model="m2", start=5000)
    out = str(tmp_path / "ix")
    store.build_index(IndexBuildConfig(embeddings=str(tmp_path / "a"), out=out))
    with pytest.raises(store.IndexFolderError, match="8-d"):
        store.add_to_index(IndexAddConfig(index=out, embeddings=str(tmp_path / "b")))
    with pytest.raises(store.IndexFolderError, match="model m2"):
        store.add_to_index(IndexAddConfig(index=out, embeddings=str(tmp_path / "c")))
    with pytest.raises(store.IndexFolderError, match="no committed index"):
        store.add_to_index(
            IndexAddConfig(index=str(tmp_path / "none"), embeddings=str(tmp_path / "a"))
        )


def test_ivf_build_tunes_nprobe_to_its_recall_target(tmp_path):
    x, _ = make_features(tmp_path / "emb", {"day0": 12_000})
    out = str(tmp_path / "ix")
    stats = store.build_index(
        IndexBuildConfig(embeddings=str(tmp_path / "emb"), out=out, kind="ivf", target_recall=0.9)
    )
    assert stats.kind == "ivf" and stats.tuned_recall >= 0.9
    opened = store.open_index(out)
    # Fresh queries (not the tuning sample) against exact search.
    q = Clustered(DIM, clusters=32, intrinsic=4, seed=0).rows(50_000, 50_300)[0]
    _, found = opened.search(q, 10)
    _, truth = engine.exact_search(q, [x], 10, "l2")
    assert engine.recall_at_k(found, truth, 10) >= 0.85
    assert engine.nearest_in_k(found, truth, 10) >= 0.9


def test_ivfpq_builds_and_finds_neighbours(tmp_path):
    x, _ = make_features(tmp_path / "emb", {"day0": 12_000})
    out = str(tmp_path / "ix")
    stats = store.build_index(
        IndexBuildConfig(embeddings=str(tmp_path / "emb"), out=out, kind="ivfpq")
    )
    assert stats.kind == "ivfpq" and stats.factory.startswith("OPQ8,IVF")
    assert stats.file_bytes < 4 * DIM * len(x)  # codes, not raw vectors
    opened = store.open_index(out)
    _, found = opened.search(x[:300], 10)
    _, truth = engine.exact_search(x[:300], [x], 10, "l2")
    assert engine.nearest_in_k(found, truth, 10) >= 0.9


# ------------------------------------------------------------------ queries, dedup


def test_neighbours_parquet_columns_order_and_self_exclusion(tmp_path):
    x, keys = make_features(tmp_path / "emb", {"day0": 2000})
    out = str(tmp_path / "ix")
    store.build_index(IndexBuildConfig(embeddings=str(tmp_path / "emb"), out=out))
    nb = str(tmp_path / "neighbors.parquet")
    res = query.query_embeddings(
        QueryConfig(index=out, embeddings=str(tmp_path / "emb"), out=nb, k=10)
    )
    assert res["queries"] == 2000
    t = tables.read_parquet(nb)
    assert t.schema.names == ["key", "neighbors", "distances"]
    assert t.schema.field("key").type == pa.string()
    assert t.schema.field("neighbors").type == pa.list_(pa.string())
    assert t.schema.field("distances").type == pa.list_(pa.float32())
    assert t.column("key").to_pylist() == keys
    want_d, want_i = brute_force(x, x[:100], 11)
    for r, row in enumerate(t.slice(0, 100).to_pylist()):
        assert row["key"] not in row["neighbors"] and len(row["neighbors"]) == 10
        assert row["distances"] == sorted(row["distances"])
        assert row["neighbors"] == [keys[i] for i in want_i[r] if i != r][:10]
    assert tables.read_lineage(nb)["k"] == 10


def test_a_key_indexed_twice_does_not_find_itself(tmp_path):
    make_features(tmp_path / "emb", {"day0": 1000})
    make_features(tmp_path / "again", {"day9": 1000})  # the same keys and vectors again
    out = str(tmp_path / "ix")
    store.build_index(IndexBuildConfig(embeddings=str(tmp_path / "emb"), out=out, kind="flat"))
    store.add_to_index(IndexAddConfig(index=out, embeddings=str(tmp_path / "again")))
    opened = store.open_index(out)
    assert list(opened.ids.ids_of("k3")) == [3, 1003]
    hits = query.query_key(opened, "k3", 5)
    assert len(hits) == 5 and all(h.key != "k3" for h in hits)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]


def test_dedup_marks_the_later_of_each_near_duplicate(tmp_path):
    x, keys = make_features(tmp_path / "emb", {"day0": 1000})
    # Day 1: 20 near-copies of day-0 images under new keys, and 20 new images.
    rng = np.random.default_rng(1)
    src = rng.choice(1000, 20, replace=False)
    copies = x[src] + 1e-3 * rng.standard_normal((20, DIM)).astype(np.float32)
    fresh = Clustered(DIM, clusters=32, intrinsic=4, seed=0).rows(90_000, 90_020)[0]
    new_keys = [f"copy{i}" for i in range(20)] + [f"new{i}" for i in range(20)]
    write_features(str(tmp_path / "emb" / "day1" / "s-000009.parquet"), new_keys, "day1/s-000009",
                   np.concatenate([copies, fresh]), model_id="m1")  # fmt: skip
    out = str(tmp_path / "ix")
    store.build_index(IndexBuildConfig(embeddings=str(tmp_path / "emb"), out=out, kind="flat"))
    dup = str(tmp_path / "dups.parquet")
    # Below the distance of any two distinct images here, above the copies' noise.
    _, want = brute_force(x, x[:200], 2)
    gap = float(np.min(np.sqrt(((x[:200] - x[want[:, 1]]) ** 2).sum(1))))
    res = query.dedup(DedupConfig(index=out, out=dup, threshold=min(0.05, gap / 2)))
    assert res["checked"] == 1040
    t = tables.read_parquet(dup)
    assert t.schema.names == ["key", "shard", "duplicate_of", "distance"]
    marked = dict(
        zip(t.column("key").to_pylist(), t.column("duplicate_of").to_pylist(), strict=True)
    )
    assert marked == {f"copy{i}": keys[s] for i, s in enumerate(src)}
    assert set(query.duplicate_keys(dup).to_pylist()) == set(marked)
    assert all(d < 0.05 for d in t.column("distance").to_pylist())
