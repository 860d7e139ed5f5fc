"""The features contract: one vector per image, read at disk speed.

Embeddings are read by anchors, the index and P2L at billions of rows, so the matrix is
stored where it decodes for free: a numpy ``.npy`` file per unit beside a keys Parquet
(the layout of clip-retrieval and autofaiss). Measured here on 200k x 512 float32, warm
page cache, 2 cores: Parquet ``fixed_size_list<float32>`` decodes at ~0.5 GB/s,
``fixed_size_binary`` at ~3-7 GB/s, the same bytes read from ``.npy`` into memory at
10-25 GB/s (see benchmarks/bench_anchors.py).

One unit (an input shard) is two files with one stem::

    <dir>/<stem>.npy       the matrix: float32 [n, D], C order; numpy's header holds
                           dtype and shape, so any numpy (or np.load(mmap_mode="r")) reads it
    <dir>/<stem>.parquet   key, shard (tables.FEATURES), row i <-> matrix row i; the run's
                           lineage, and ``cvpipe.features`` = {dim, dtype, rows, matrix}
                           in the schema metadata. Written LAST: it is the commit.

A consumer holds the URL of the keys Parquet (listed like every other table: only
committed files are visible). The matrix is published first through the same atomic
protocol (rename on local disk, object + commit marker on object stores), so a writer
killed between the two leaves a matrix nobody lists, replaced by the rerun.

:func:`iter_features` is the one reader: batches of ``(keys, shards, matrix)`` with
memory bounded by a few batches whatever the file size, decoded one batch ahead in a
thread (reads release the GIL, so they overlap the consumer's compute). Consumers that
only read the vectors (anchor labeling, sums, counts) take ``copy=False``: the batches
are then read-only memory maps of a local file, with no copy at all.
"""

from __future__ import annotations

import contextlib
import io
import json
import mmap
import os
import posixpath
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.lib import format as npy_format

from cvpipe.core import tables
from cvpipe.core.storage import expand_specs, is_local, open_atomic, url_to_fs

META_KEY = b"cvpipe.features"
DTYPE = np.dtype("<f4")
KEYS_SUFFIX = ".parquet"
MATRIX_SUFFIX = ".npy"
# Rows per batch when not given: ~16 MiB of vectors (8192 rows at 512-d). Larger
# batches read no faster here and cost memory in every consumer.
BATCH_BYTES = 16 << 20
HEADER_READERS = {
    (1, 0): npy_format.read_array_header_1_0,
    (2, 0): npy_format.read_array_header_2_0,
}


class FeatureBatch(NamedTuple):
    """Consecutive rows of one features file: ``matrix[i]`` is the vector of ``keys[i]``.
    ``keys`` and ``shards`` are None when read with ``with_keys=False``."""

    keys: pa.Array | None
    shards: pa.Array | None
    matrix: np.ndarray


@dataclass(frozen=True)
class FeaturesInfo:
    """What a features file holds, from the keys footer and the matrix header."""

    url: str
    matrix_url: str
    rows: int
    dim: int
    lineage: dict[str, Any]
    data_offset: int  # where the matrix's rows start in the .npy file


def matrix_url(url: str) -> str:
    """The ``.npy`` beside the keys Parquet ``url``."""
    url = str(url)
    if not url.endswith(KEYS_SUFFIX):
        raise ValueError(f"{url}: a features file is named <stem>{KEYS_SUFFIX}")
    return url[: -len(KEYS_SUFFIX)] + MATRIX_SUFFIX


# ----------------------------------------------------------------------------- writing


def keys_schema(dim: int, rows: int, matrix_name: str) -> pa.Schema:
    """The keys Parquet's schema: tables.FEATURES with the matrix's description."""
    meta = {"dim": dim, "dtype": DTYPE.str, "rows": rows, "matrix": matrix_name}
    return tables.FEATURES.with_metadata({META_KEY: json.dumps(meta).encode()})


def write_features(
    url: str,
    keys: pa.Array | Sequence[str],
    shard: str | pa.Array | Sequence[str],
    matrix: np.ndarray,
    lineage: Mapping[str, Any],
) -> None:
    """Publish one features file: the matrix (``.npy``) first, then the keys Parquet at
    ``url`` (the commit). ``shard`` is one shard id for every row, or one per row."""
    matrix = np.ascontiguousarray(matrix, dtype=DTYPE)
    if matrix.ndim != 2:
        raise ValueError(f"features matrix must be 2-d (rows, dim), got shape {matrix.shape}")
    n, dim = matrix.shape
    key_col = keys if isinstance(keys, pa.Array) else pa.array(list(keys), pa.string())
    if isinstance(shard, str):
        shard_col = pa.DictionaryArray.from_arrays(
            pa.array(np.zeros(n, np.int32)), pa.array([shard], pa.string())
        ).cast(pa.string())
    else:
        shard_col = shard if isinstance(shard, pa.Array) else pa.array(list(shard), pa.string())
    if len(key_col) != n or len(shard_col) != n:
        raise ValueError(f"{n} vectors but {len(key_col)} keys and {len(shard_col)} shards")
    m_url = matrix_url(url)
    with open_atomic(m_url) as f:
        npy_format.write_array(f, matrix, allow_pickle=False)
    schema = keys_schema(dim, n, posixpath.basename(m_url))
    table = pa.Table.from_arrays([key_col.cast(pa.string()), shard_col.cast(pa.string())],
                                 schema=schema)  # fmt: skip
    tables.write_parquet(table, url, lineage)


# ----------------------------------------------------------------------------- reading


def _open(url: str) -> contextlib.AbstractContextManager[IO[bytes]]:
    fs, path = url_to_fs(url)
    if is_local(fs):  # unbuffered: readinto() lands straight in the caller's array
        return open(path, "rb", buffering=0)
    # One ranged GET per read call: the reader asks for whole batches.
    return fs.open(path, "rb", cache_type="none")


def _read_header(f: IO[bytes], url: str) -> tuple[tuple[int, ...], int]:
    try:
        version = npy_format.read_magic(f)
        if version not in HEADER_READERS:
            raise ValueError(f"npy format version {version}")
        shape, fortran, dtype = HEADER_READERS[version](f)
    except ValueError as e:
        raise ValueError(f"{url}: not a .npy matrix ({e})") from None
    if dtype != DTYPE or fortran or len(shape) != 2:
        raise ValueError(
            f"{url}: matrix is {dtype} {shape}{' Fortran-order' if fortran else ''}, "
            f"expected C-order {DTYPE} (rows, dim)"
        )
    return shape, f.tell()


def features_info(url: str) -> FeaturesInfo:
    """Rows, dimension and lineage of the features file ``url`` (the keys Parquet);
    checks that its matrix is there and agrees with it."""
    fs, path = url_to_fs(url)
    pf = pq.ParquetFile(path, filesystem=fs)  # the footer only
    schema, rows = pf.schema_arrow, pf.metadata.num_rows
    meta = schema.metadata or {}
    if META_KEY not in meta:
        legacy = " (an embedding column: written by an older cvpipe; rerun inference)"
        raise ValueError(
            f"{url}: not a features file{legacy if 'embedding' in schema.names else ''}"
        )
    m_url = matrix_url(url)
    try:
        with _open(m_url) as f:
            shape, offset = _read_header(f, m_url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: its matrix {m_url} is missing") from None
    if shape[0] != rows:
        raise ValueError(f"{url}: {rows} keys but {shape[0]} vectors in {m_url}")
    lineage = json.loads(meta[tables.LINEAGE_KEY]) if tables.LINEAGE_KEY in meta else {}
    return FeaturesInfo(str(url), m_url, rows, shape[1], lineage, offset)


def feature_dim(url: str) -> int:
    return features_info(url).dim


def features_urls(spec: str | Sequence[str]) -> list[str]:
    """The committed features files of a spec: a file, a folder or prefix (sorted), a
    brace pattern or a list of them (in their order, without duplicates). One work unit
    each for the stages that read features."""
    return expand_specs(spec, KEYS_SUFFIX)


def _read_rows(f: IO[bytes], rows: int, dim: int, url: str) -> np.ndarray:
    out = np.empty((rows, dim), DTYPE)
    view = memoryview(out).cast("B")
    got = 0
    while got < view.nbytes:  # a raw read may return less than asked
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"{url}: truncated matrix ({got} of {view.nbytes} bytes)")
        got += n
    return out


def _map_rows(fd: int, info: FeaturesInfo, start: int, rows: int) -> np.ndarray:
    """Rows ``[start, start + rows)`` of a local matrix as a read-only memory map: no
    copy into the process (the consumer reads the page cache itself). The pages are
    mapped here (MAP_POPULATE, in the prefetch thread), and the mapping goes with the
    last reference to the array."""
    row_bytes = info.dim * DTYPE.itemsize
    if rows == 0 or row_bytes == 0:
        return np.empty((rows, info.dim), DTYPE)
    off = info.data_offset + start * row_bytes
    base = off - off % mmap.ALLOCATIONGRANULARITY
    m = mmap.mmap(
        fd,
        off - base + rows * row_bytes,
        flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
        prot=mmap.PROT_READ,
        offset=base,
    )
    return np.frombuffer(m, DTYPE, rows * info.dim, off - base).reshape(rows, info.dim)


def _row_reader(f: IO[bytes], info: FeaturesInfo, copy: bool) -> Callable[[int, int], np.ndarray]:
    """``read(start, rows) -> matrix``: copies into owned arrays, or (``copy=False`` on a
    local file, where the platform maps files) read-only memory maps."""
    if copy or not hasattr(mmap, "MAP_SHARED") or not isinstance(f, io.FileIO):
        f.seek(info.data_offset)
        return lambda start, rows: _read_rows(f, rows, info.dim, info.matrix_url)
    size = os.fstat(f.fileno()).st_size
    need = info.data_offset + info.rows * info.dim * DTYPE.itemsize
    if size < need:  # a map past the end of the file would fault (SIGBUS) when read
        raise ValueError(f"{info.matrix_url}: truncated matrix ({size} of {need} bytes)")
    return lambda start, rows: _map_rows(f.fileno(), info, start, rows)


def _batches(
    info: FeaturesInfo, batch_rows: int, with_keys: bool, copy: bool = True
) -> Iterator[FeatureBatch]:
    with _open(info.matrix_url) as f:
        read = _row_reader(f, info, copy)
        if not with_keys:
            for start in range(0, info.rows, batch_rows):
                yield FeatureBatch(None, None, read(start, min(batch_rows, info.rows - start)))
            return
        fs, path = url_to_fs(info.url)
        with contextlib.nullcontext(path) if is_local(fs) else fs.open(path, "rb") as kf:
            # pre_buffer=True (pyarrow's default) keeps every row group it read until
            # the reader closes: memory would grow with the file (measured).
            pf = pq.ParquetFile(kf, pre_buffer=False)
            start = 0
            for rb in pf.iter_batches(batch_size=batch_rows, columns=["key", "shard"]):
                yield FeatureBatch(rb.column(0), rb.column(1), read(start, rb.num_rows))
                start += rb.num_rows


def iter_features(
    source: str | Sequence[str],
    batch_rows: int | None = None,
    with_keys: bool = True,
    prefetch: int = 1,
    copy: bool = True,
) -> Iterator[FeatureBatch]:
    """Stream ``(keys, shards, matrix[n, D] float32)`` batches from features files.

    ``source`` is one features file (its keys Parquet URL), a folder or prefix, a brace
    pattern or a list of them; files are read in :func:`features_urls` order, a batch
    never spans two files. Each batch owns its matrix (writable, C-contiguous). Memory is bounded by
    ``prefetch + 2`` batches whatever the file sizes; ``prefetch`` batches are read
    ahead in a background thread.

    ``copy=False``: matrices of local files are read-only memory maps of the file
    instead (C-contiguous; each released with its last reference): no copy, for
    consumers that only read the vectors. Measured on 200k x 512: reading the matrix
    and one product with it cost 72 CPU ms mapped, 95 ms copied. Object stores copy.
    """
    urls = features_urls(source)

    def batches() -> Iterator[FeatureBatch]:
        for url in urls:
            info = features_info(url)
            rows = batch_rows or max(1024, BATCH_BYTES // (DTYPE.itemsize * max(1, info.dim)))
            yield from _batches(info, rows, with_keys, copy)

    yield from prefetched(batches(), prefetch)


def read_matrix(url: str) -> np.ndarray:
    """The whole matrix of one features file in memory (small files, tests)."""
    parts = [b.matrix for b in iter_features(url, with_keys=False, prefetch=0)]
    if not parts:
        return np.empty((0, features_info(url).dim), DTYPE)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


# ---------------------------------------------------------------------------- prefetch


def prefetched(it: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``it`` in a thread, ``depth`` items ahead: reads and Parquet decoding (which
    release the GIL) overlap the consumer's work on the previous item. An error in the
    thread is raised in the consumer; closing the generator stops the thread."""
    if depth <= 0:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in it:
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as e:  # handed to the consumer, raised there
            put((e, None))
        finally:
            with contextlib.suppress(Exception):
                it.close()  # type: ignore[attr-defined]

    t = threading.Thread(target=work, name="cvpipe-prefetch", daemon=True)
    t.start()
    try:
        while True:
            err, item = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
        t.join()
