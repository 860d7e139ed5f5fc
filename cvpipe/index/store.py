"""An index folder: the FAISS index, its id map, and a manifest that commits both.

Layout of ``INDEX``::

    INDEX/manifest.json              the commit: plan, count, parts, tuned nprobe, lineage
    INDEX/index-000001.faiss         the index after part 1 (index-00000N after N parts)
    INDEX/ids/part-000000.parquet    id map of part 0 (tables.INDEX_IDS): row id -> key,
                                     shard, partition; one file per build or add

Row ids are FAISS's sequential ids: part p holds ids ``start .. start + count - 1``.
A build writes part 0; :func:`add_to_index` trains nothing, appends the new vectors to
the trained index (a new partition without a rebuild) and writes the next part. Every
file is published atomically and the manifest last, so a build or add killed half way
leaves the previous manifest (and its index file) as they were; a rerun with the same
inputs is a no-op, so ids never change and nothing is added twice.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cvpipe.core import tables
from cvpipe.core.config import identity_hash
from cvpipe.core.stage import PermanentError
from cvpipe.core.storage import (
    COMMIT_SUFFIX,
    is_committed,
    join,
    open_atomic,
    read_bytes,
    url_to_fs,
    write_bytes_atomic,
)
from cvpipe.index import engine, source
from cvpipe.index.config import IndexAddConfig, IndexBuildConfig
from cvpipe.index.plan import IndexPlan, plan_index

FORMAT = 1
TUNE_K = 10


class IndexFolderError(PermanentError, ValueError):
    """An index folder that cannot take this operation (another build, a different
    dimension or model, a missing manifest): retrying cannot help."""


def manifest_url(out: str) -> str:
    return join(out, "manifest.json")


def index_file_url(out: str, version: int) -> str:
    return join(out, f"index-{version:06d}.faiss")


def ids_url(out: str, part: int) -> str:
    return join(out, "ids", f"part-{part:06d}.parquet")


@dataclass
class Part:
    """One build or add: its vectors hold row ids ``start .. start + count - 1``."""

    part: int
    start: int
    count: int
    ids: str  # the id map file, relative to the index folder
    sources: list[str]
    sources_hash: str
    partitions: list[str]
    model_id: str | None = None
    seconds: float = 0.0


@dataclass
class Manifest:
    plan: dict[str, Any]
    dim: int
    metric: str
    count: int
    index_file: str
    nprobe: int
    build_hash: str
    parts: list[Part] = field(default_factory=list)
    tuned_recall: float | None = None
    model_id: str | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT

    @property
    def version(self) -> int:
        return len(self.parts)

    @property
    def index_plan(self) -> IndexPlan:
        return IndexPlan.from_dict(self.plan)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        raw = json.loads(data)
        raw["parts"] = [Part(**p) for p in raw.get("parts", [])]
        return cls(**raw)


def read_manifest(out: str) -> Manifest | None:
    url = manifest_url(out)
    if not is_committed(url):
        return None
    try:
        return Manifest.from_json(read_bytes(url))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise IndexFolderError(f"{url} is malformed: {e}") from None


@dataclass
class IndexStats:
    """What a build or add did (``skipped``: it was committed already)."""

    index: str
    kind: str
    factory: str
    count: int  # vectors in the index now
    added: int  # vectors added by this call
    parts: int
    nprobe: int
    tuned_recall: float | None
    file_bytes: int
    seconds: float
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stats(out: str, m: Manifest, added: int, seconds: float, skipped: bool) -> IndexStats:
    fs, path = url_to_fs(join(out, m.index_file))
    return IndexStats(
        index=out,
        kind=m.plan["kind"],
        factory=IndexPlan.from_dict(m.plan).factory,
        count=m.count,
        added=added,
        parts=len(m.parts),
        nprobe=m.nprobe,
        tuned_recall=m.tuned_recall,
        file_bytes=int(fs.size(path)),
        seconds=round(seconds, 3),
        skipped=skipped,
    )


# --------------------------------------------------------------------------- id map


def _partitions(shards: pa.Array) -> pa.Array:
    """``{partition}/{stem}`` shard ids -> their partition ("" for a bare stem)."""
    shards = shards.cast(pa.string())
    has = pc.match_substring(shards, "/")
    return pc.if_else(has, pc.replace_substring_regex(shards, r"/[^/]*$", ""), "")


@contextlib.contextmanager
def _ids_writer(url: str, lineage: dict[str, Any]) -> Iterator[Any]:
    """Stream an id map into an atomic file (a part may be larger than memory allows)."""
    schema = tables.INDEX_IDS.with_metadata(
        {tables.LINEAGE_KEY: json.dumps(lineage, sort_keys=True, default=str).encode()}
    )
    with (
        open_atomic(url) as f,
        pq.ParquetWriter(
            f, schema, compression="zstd", use_dictionary=["shard", "partition"]
        ) as writer,
    ):

        def write(start: int, keys: pa.Array, shards: pa.Array) -> None:
            n = len(keys)
            writer.write_batch(
                pa.record_batch(
                    [
                        pa.array(np.arange(start, start + n, dtype=np.int64)),
                        keys.cast(pa.string()),
                        shards.cast(pa.string()),
                        _partitions(shards),
                    ],
                    schema=schema,
                )
            )

        yield write


class IdMap:
    """Row id -> key and shard over every part of an index.

    Holds the key and shard columns in memory as Arrow arrays (compact strings, no
    Python objects): ~40 bytes per vector, e.g. 4 GB for 100M vectors."""

    def __init__(self, out: str, manifest: Manifest) -> None:
        t = pa.concat_tables(
            tables.read_parquet(join(out, p.ids), columns=["id", "key", "shard"])
            for p in manifest.parts
        )
        ids = t.column("id").to_numpy()
        if len(ids) != manifest.count or not np.array_equal(ids, np.arange(len(ids))):
            raise IndexFolderError(f"{out}: the id map does not hold ids 0..{manifest.count - 1}")
        self.keys = t.column("key").combine_chunks()
        self.shards = t.column("shard").combine_chunks()

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, ids: np.ndarray) -> tuple[list[str | None], list[str | None]]:
        """Keys and shards of ``ids`` (-1, FAISS's "no result", gives None)."""
        ids = np.asarray(ids, dtype=np.int64)
        valid = ids >= 0
        idx = pa.array(np.where(valid, ids, 0), mask=~valid)
        return self.keys.take(idx).to_pylist(), self.shards.take(idx).to_pylist()

    def ids_of(self, key: str) -> np.ndarray:
        """Row ids holding ``key`` (several if the key was added more than once)."""
        return np.flatnonzero(pc.equal(self.keys, key).to_numpy(zero_copy_only=False))


@dataclass
class OpenIndex:
    """A loaded index: the manifest, the FAISS index and the id map."""

    url: str
    manifest: Manifest
    index: faiss.Index
    ids: IdMap

    @property
    def metric(self) -> str:
        return self.manifest.metric

    def search(
        self, queries: np.ndarray, k: int, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        engine.set_nprobe(self.index, nprobe or self.manifest.nprobe)
        return engine.search(self.index, queries, k, self.metric)


def open_index(url: str) -> OpenIndex:
    m = read_manifest(url)
    if m is None:
        raise IndexFolderError(f"{url} holds no committed index (no manifest.json)")
    index = engine.read_index(join(url, m.index_file))
    if index.ntotal != m.count:
        raise IndexFolderError(f"{url}: {m.index_file} holds {index.ntotal} vectors, not {m.count}")
    engine.set_nprobe(index, m.nprobe)
    return OpenIndex(url, m, index, IdMap(url, m))


# --------------------------------------------------------------------------- build


def _sources_hash(urls: Sequence[str]) -> str:
    return identity_hash({"sources": list(urls)})


def _model_id(urls: Sequence[str]) -> str | None:
    ids = {source.model_of(u) for u in urls}
    ids.discard(None)
    if len(ids) > 1:
        raise IndexFolderError(
            f"the embeddings come from {len(ids)} different models: {sorted(ids)}"
        )
    return ids.pop() if ids else None


def _matrices(urls: Sequence[str], batch_rows: int | None) -> Iterator[np.ndarray]:
    for _, _, x in source.iter_embeddings(urls, batch_rows):
        yield x


def _gather(
    urls: Sequence[str], positions: np.ndarray, dim: int, batch_rows: int | None
) -> np.ndarray:
    """The rows at sorted ``positions`` (global row numbers), in one streamed pass."""
    out = np.empty((len(positions), dim), np.float32)
    offset = filled = 0
    for x in _matrices(urls, batch_rows):
        lo, hi = np.searchsorted(positions, [offset, offset + len(x)])
        if hi > lo:
            out[filled : filled + hi - lo] = x[positions[lo:hi] - offset]
            filled += hi - lo
        offset += len(x)
        if filled == len(positions):
            break
    return out[:filled]


def _add_all(
    index: faiss.Index,
    urls: Sequence[str],
    start: int,
    metric: str,
    ids_file: str,
    lineage: dict[str, Any],
    batch_rows: int | None,
    knn: engine.ExactKnn | None = None,
) -> tuple[int, list[str]]:
    """Add every vector of ``urls`` to ``index`` (ids from ``start``) and write their id
    map; ``knn`` also sees every batch (ground truth for tuning). Returns (added,
    partitions)."""
    added = 0
    partitions: set[str] = set()
    with _ids_writer(ids_file, lineage) as write_ids:
        for keys, shards, x in source.iter_embeddings(urls, batch_rows):
            if x.shape[1] != index.d:
                raise IndexFolderError(f"embeddings are {x.shape[1]}-d, the index is {index.d}-d")
            index.add(engine.prepare(x, metric))
            if knn is not None:
                knn.add(x)
            write_ids(start + added, keys, shards)
            partitions.update(pc.unique(_partitions(shards)).to_pylist())
            added += len(x)
    return added, sorted(partitions)


def build_index(cfg: IndexBuildConfig) -> IndexStats:
    """Build the index of ``cfg.embeddings`` in ``cfg.out`` (a committed build of the same
    config is read back; an index folder holding another build is an error)."""
    with engine.faiss_threads(cfg.threads):
        return _build(cfg)


def _build(cfg: IndexBuildConfig) -> IndexStats:
    t0 = time.perf_counter()
    urls = source.embedding_files(cfg.embeddings)
    build_hash = identity_hash({"config": cfg, "sources": urls})
    have = read_manifest(cfg.out)
    if have is not None:
        if have.build_hash != build_hash:
            raise IndexFolderError(
                f"{cfg.out} holds another build (hash {have.build_hash}, now {build_hash}): "
                "use a new folder, or `index add` for new vectors"
            )
        return _stats(cfg.out, have, 0, time.perf_counter() - t0, skipped=True)

    n = source.count_rows(urls)
    dim = source.embedding_dim(urls[0])
    model_id = _model_id(urls)
    plan = plan_index(n, dim, cfg.memory, cfg.kind, cfg.metric)
    index = engine.create(plan)
    rng = np.random.default_rng(cfg.seed)
    tuning = plan.kind != "flat" and cfg.tune_queries > 0
    queries = np.empty((0, dim), np.float32)
    query_pos = np.empty(0, np.int64)
    if plan.train_size or tuning:
        train_pos = np.sort(rng.choice(n, plan.train_size, replace=False))
        query_pos = np.sort(rng.choice(n, min(n, cfg.tune_queries), replace=False))
        both = np.union1d(train_pos, query_pos) if tuning else train_pos
        rows = _gather(urls, both, dim, cfg.batch_rows)
        if plan.train_size:
            engine.train(
                index, engine.prepare(rows[np.searchsorted(both, train_pos)], plan.metric),
                plan, seed=cfg.seed,
            )  # fmt: skip
        if tuning:
            queries = rows[np.searchsorted(both, query_pos)]
        del rows
    knn = engine.ExactKnn(queries, TUNE_K + 1, plan.metric) if tuning else None
    lineage = tables.lineage(
        cfg, stage="index-build", part=0, factory=plan.factory, model_id=model_id,
        sources=len(urls),
    )  # fmt: skip
    added, partitions = _add_all(
        index, urls, 0, plan.metric, ids_url(cfg.out, 0), lineage, cfg.batch_rows, knn
    )
    nprobe, tuned = plan.nprobe, None
    if knn is not None:
        _, truth = knn.result()
        nprobe, tuned = engine.tune_nprobe(
            index, queries, truth, TUNE_K, plan.metric, cfg.target_recall, own=query_pos
        )
    manifest = Manifest(
        plan=plan.to_dict(),
        dim=dim,
        metric=plan.metric,
        count=added,
        index_file=f"index-{1:06d}.faiss",
        nprobe=nprobe,
        build_hash=build_hash,
        tuned_recall=tuned,
        model_id=model_id,
        lineage=lineage,
        parts=[
            Part(
                part=0, start=0, count=added, ids="ids/part-000000.parquet", sources=urls,
                sources_hash=_sources_hash(urls), partitions=partitions, model_id=model_id,
                seconds=round(time.perf_counter() - t0, 3),
            )
        ],
    )  # fmt: skip
    engine.write_index(index, index_file_url(cfg.out, 1))
    write_bytes_atomic(manifest_url(cfg.out), manifest.to_json())  # the commit
    return _stats(cfg.out, manifest, added, time.perf_counter() - t0, skipped=False)


def already_added(out: str, embeddings: str | list[str]) -> bool:
    """True when the committed index in ``out`` holds a part of exactly these files."""
    m = read_manifest(out)
    if m is None:
        return False
    h = _sources_hash(source.embedding_files(embeddings))
    return any(p.sources_hash == h for p in m.parts)


def add_to_index(cfg: IndexAddConfig) -> IndexStats:
    """Append ``cfg.embeddings`` to the trained index in ``cfg.index`` as a new part
    (nothing is retrained). Embeddings already added (the same files) are a no-op."""
    with engine.faiss_threads(cfg.threads):
        return _add(cfg)


def _add(cfg: IndexAddConfig) -> IndexStats:
    t0 = time.perf_counter()
    out = cfg.index
    m = read_manifest(out)
    if m is None:
        raise IndexFolderError(f"{out} holds no committed index: build it first")
    urls = source.embedding_files(cfg.embeddings)
    h = _sources_hash(urls)
    if any(p.sources_hash == h for p in m.parts):
        return _stats(out, m, 0, time.perf_counter() - t0, skipped=True)
    known = {u for p in m.parts for u in p.sources}
    again = sorted(known.intersection(urls))
    if again:
        raise IndexFolderError(
            f"{len(again)} embeddings file(s) are in the index already: {again[0]}"
        )
    dim = source.embedding_dim(urls[0])
    if dim != m.dim:
        raise IndexFolderError(f"embeddings are {dim}-d, the index {out} is {m.dim}-d")
    model_id = _model_id(urls)
    if m.model_id and model_id and model_id != m.model_id:
        raise IndexFolderError(
            f"embeddings of model {model_id} cannot join an index of model {m.model_id}"
        )
    index = engine.read_index(join(out, m.index_file))
    part = len(m.parts)
    lineage = tables.lineage(
        None, stage="index-add", part=part, factory=m.index_plan.factory, model_id=model_id,
        sources=len(urls), build_hash=m.build_hash,
    )  # fmt: skip
    added, partitions = _add_all(
        index, urls, m.count, m.metric, ids_url(out, part), lineage, cfg.batch_rows
    )
    old_file = m.index_file
    m.parts.append(
        Part(
            part=part, start=m.count, count=added, ids=f"ids/part-{part:06d}.parquet",
            sources=urls, sources_hash=h, partitions=partitions, model_id=model_id,
            seconds=round(time.perf_counter() - t0, 3),
        )
    )  # fmt: skip
    m.count += added
    m.index_file = f"index-{part + 1:06d}.faiss"
    engine.write_index(index, index_file_url(out, part + 1))
    write_bytes_atomic(manifest_url(out), m.to_json())  # the commit
    _remove(join(out, old_file))
    return _stats(out, m, added, time.perf_counter() - t0, skipped=False)


def _remove(url: str) -> None:
    """Drop a superseded index file (its commit marker first on object stores)."""
    fs, path = url_to_fs(url)
    for p in (path + COMMIT_SUFFIX, path):
        with contextlib.suppress(FileNotFoundError):
            if fs.exists(p):
                fs.rm(p)
