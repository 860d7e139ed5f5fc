"""The features contract: a keys Parquet (the commit) beside a .npy matrix, one reader
with bounded memory, the commit protocol on local disk and on S3 (moto)."""

from __future__ import annotations

import os
import threading
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

from cvpipe.core import storage, tables
from cvpipe.data import features as ft


def make(url, rows, dim=12, seed=0, shard="day1/img-000000", model_id="m1"):
    rng = np.random.default_rng(seed)
    mat = rng.normal(size=(rows, dim)).astype(np.float32)
    keys = [f"{shard}/{i:05d}" for i in range(rows)]
    ft.write_features(url, keys, shard, mat, tables.lineage(model_id=model_id))
    return keys, mat


def read_all(source, **kw):
    keys, shards, mats = [], [], []
    for b in ft.iter_features(source, **kw):
        if b.keys is not None:
            keys += b.keys.to_pylist()
            shards += b.shards.to_pylist()
        mats.append(b.matrix)
    return keys, shards, (np.concatenate(mats) if mats else None)


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_round_trip_in_batches(tmp_path, prefetch):
    url = str(tmp_path / "features" / "day1" / "img-000000.parquet")
    keys, mat = make(url, 1000, dim=12)
    assert sorted(os.listdir(tmp_path / "features" / "day1")) == [
        "img-000000.npy",
        "img-000000.parquet",
    ]
    info = ft.features_info(url)
    assert (info.rows, info.dim, info.lineage["model_id"]) == (1000, 12, "m1")
    sizes = [len(b.matrix) for b in ft.iter_features(url, batch_rows=128, prefetch=prefetch)]
    assert sizes == [128] * 7 + [104]
    got_keys, got_shards, got = read_all(url, batch_rows=128, prefetch=prefetch)
    assert got_keys == keys and got_shards == ["day1/img-000000"] * 1000
    assert got.dtype == np.float32 and np.array_equal(got, mat)
    _, _, bare = read_all(url, batch_rows=300, with_keys=False, prefetch=prefetch)
    assert np.array_equal(bare, mat)
    assert np.array_equal(ft.read_matrix(url), mat)
    # The .npy is plain numpy: any tool reads it, memory-mapped too.
    assert np.array_equal(np.load(ft.matrix_url(url), mmap_mode="r"), mat)
    assert tables.read_parquet(url).schema.remove_metadata() == tables.FEATURES


def test_each_batch_owns_its_matrix(tmp_path):
    url = str(tmp_path / "f.parquet")
    _, mat = make(url, 100, dim=4)
    batches = list(ft.iter_features(url, batch_rows=10, prefetch=2))
    for b in batches:
        b.matrix[:] = -1  # writable, and writing one batch touches no other
    assert np.array_equal(batches[3].matrix, np.full((10, 4), -1, np.float32))
    assert np.array_equal(ft.read_matrix(url), mat)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_mapped_batches_are_read_only_views_equal_to_the_copies(tmp_path, prefetch):
    url = str(tmp_path / "f.parquet")
    keys, mat = make(url, 1000, dim=12)  # 48-byte rows: batches start inside pages
    mapped = list(ft.iter_features(url, batch_rows=77, prefetch=prefetch, copy=False))
    assert [len(b.matrix) for b in mapped] == [77] * 12 + [76]
    assert all(not b.matrix.flags.writeable and b.matrix.flags.c_contiguous for b in mapped)
    assert all(b.matrix.dtype == np.float32 for b in mapped)
    # Every batch stays valid after the reader is done, and equals the copied rows.
    assert np.array_equal(np.concatenate([b.matrix for b in mapped]), mat)
    assert sum((b.keys.to_pylist() for b in mapped), []) == keys
    with pytest.raises(ValueError, match="read-only"):
        mapped[0].matrix[0, 0] = 1
    _, _, bare = read_all(url, batch_rows=300, with_keys=False, copy=False)
    assert np.array_equal(bare, mat)
    assert np.array_equal(ft.read_matrix(url), mat)  # the file is untouched


def test_a_folder_reads_files_in_order_and_batches_never_span_files(tmp_path):
    root = tmp_path / "features"
    expect_keys, expect = [], []
    for i, rows in enumerate([5, 0, 17]):
        shard = f"day1/img-{i:06d}"
        k, m = make(str(root / "day1" / f"img-{i:06d}.parquet"), rows, dim=3, seed=i, shard=shard)
        expect_keys += k
        expect.append(m)
    assert len(ft.features_urls(str(root))) == 3
    batches = list(ft.iter_features(str(root), batch_rows=4))
    assert [len(b.matrix) for b in batches] == [4, 1, 4, 4, 4, 4, 1]
    assert all(len(set(b.shards.to_pylist())) == 1 for b in batches)
    keys, _, mat = read_all(str(root), batch_rows=4)
    assert keys == expect_keys and np.array_equal(mat, np.concatenate(expect))
    keys, _, mat = read_all(str(root / "day1" / "img-{000002,000000}.parquet"))
    assert keys == expect_keys[5:] + expect_keys[:5]  # a pattern or a list: in its order
    assert np.array_equal(mat, np.concatenate([expect[2], expect[0]]))
    empty = str(root / "day1" / "img-000001.parquet")
    assert list(ft.iter_features(empty)) == [] and ft.read_matrix(empty).shape == (0, 3)


def test_memory_is_bounded_by_the_batch_not_the_file(tmp_path):
    url = str(tmp_path / "big.parquet")
    make(url, 40_000, dim=64)  # 10 MB of vectors
    tracemalloc.start()
    try:
        n = sum(len(b.matrix) for b in ft.iter_features(url, batch_rows=512, prefetch=2))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 40_000
    # A batch is 128 KiB of vectors: a few of them plus their keys, far below the file.
    assert peak < 2 * 2**20, peak


def test_bad_files_give_clear_errors(tmp_path):
    url = str(tmp_path / "f.parquet")
    make(url, 10, dim=4)
    np.save(ft.matrix_url(url), np.zeros((9, 4), np.float32))
    with pytest.raises(ValueError, match="10 keys but 9 vectors"):
        ft.features_info(url)
    np.save(ft.matrix_url(url), np.zeros((10, 4), np.float64))
    with pytest.raises(ValueError, match="float64 .*expected C-order float32"):
        ft.features_info(url)
    with open(ft.matrix_url(url), "wb") as f:
        f.write(b"not a matrix")
    with pytest.raises(ValueError, match="not a .npy matrix"):
        ft.features_info(url)
    good = np.zeros((10, 4), np.float32)
    np.save(ft.matrix_url(url), good)
    with open(ft.matrix_url(url), "r+b") as f:
        f.truncate(os.path.getsize(ft.matrix_url(url)) - 8)
    with pytest.raises(ValueError, match="truncated matrix"):
        list(ft.iter_features(url, batch_rows=4))
    with pytest.raises(ValueError, match="truncated matrix"):  # not a fault on a mapped page
        list(ft.iter_features(url, batch_rows=4, copy=False))
    os.remove(ft.matrix_url(url))
    with pytest.raises(FileNotFoundError, match="its matrix .* is missing"):
        list(ft.iter_features(url))
    # A features table of the old layout (vectors in a Parquet list column).
    old = str(tmp_path / "old.parquet")
    t = pa.table({"key": ["a"], "shard": ["s"], "embedding": [[1.0, 2.0]]})
    tables.write_parquet(t, old, tables.lineage())
    with pytest.raises(ValueError, match="older cvpipe"):
        list(ft.iter_features(old))
    with pytest.raises(ValueError, match="4 vectors but 3 keys"):
        ft.write_features(str(tmp_path / "g.parquet"), ["a", "b", "c"], "s", good[:4], {})
    with pytest.raises(ValueError, match="named <stem>.parquet"):
        ft.matrix_url("x.npy")


def test_prefetch_raises_errors_in_the_consumer_and_stops_when_closed():
    def items():
        yield 1
        yield 2
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for x in ft.prefetched(items(), depth=2):
            got.append(x)
    assert got == [1, 2]
    before = threading.active_count()
    it = ft.prefetched(iter(range(10**9)), depth=2)
    assert next(it) == 0
    it.close()  # the consumer stops early: the thread ends, nothing keeps running
    assert threading.active_count() == before


def test_a_writer_killed_mid_matrix_leaves_nothing_visible(tmp_path):
    root = str(tmp_path / "features")
    url = storage.join(root, "day1", "img-000000.parquet")
    keys, mat = make(url, 50)
    # A second unit whose writer dies while writing its matrix: nothing of it shows.
    other = storage.join(root, "day1", "img-000001.parquet")
    killed = pytest.raises(RuntimeError, match="killed")
    with killed, storage.open_atomic(ft.matrix_url(other)) as f:
        f.write(b"\x93NUMPY partial")
        raise RuntimeError("killed")
    assert ft.features_urls(root) == [url]
    assert not os.path.exists(ft.matrix_url(other))


def test_commit_protocol_on_s3(s3_root):
    import s3fs

    root = f"{s3_root}/out/features"
    url = f"{root}/day1/img-000000.parquet"
    keys, mat = make(url, 300, dim=8)
    fs = s3fs.S3FileSystem()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.find("cvpipe-test/out/features"))
    assert names == [
        "img-000000.npy",
        "img-000000.npy.committed",
        "img-000000.parquet",
        "img-000000.parquet.committed",
    ]
    got_keys, _, got = read_all(root, batch_rows=64)
    assert got_keys == keys and np.array_equal(got, mat)
    # copy=False maps local files only: object stores still read into owned copies.
    batches = list(ft.iter_features(root, batch_rows=64, copy=False))
    assert all(b.matrix.flags.writeable for b in batches)
    assert np.array_equal(np.concatenate([b.matrix for b in batches]), mat)
    assert ft.features_info(url).lineage["model_id"] == "m1"
    # A writer killed after publishing the matrix of a second file but before its keys:
    # only committed keys files are listed, so readers never see the half-written unit.
    second = f"{root}/day1/img-000001.parquet"
    with storage.open_atomic(ft.matrix_url(second)) as f:
        np.lib.format.write_array(f, mat[:5], allow_pickle=False)
    fs.pipe(second[len("s3://") :], b"keys upload without its commit marker")
    assert ft.features_urls(root) == [url]
    # The rerun publishes it whole.
    keys2, mat2 = make(second, 7, dim=8, seed=3, shard="day1/img-000001")
    got_keys, _, got = read_all(root, batch_rows=64, prefetch=2)
    assert got_keys == keys + keys2 and np.array_equal(got, np.concatenate([mat, mat2]))
