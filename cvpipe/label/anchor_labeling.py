"""Labeling features files: one features file in, one ANCHOR_LABELS file out, streamed.

:class:`AnchorRanker` holds what every batch needs (the anchors, their space, the
distance index), built once; :class:`Labeler` adds one method's settings (N, the frozen
Uniform rule, ...) and labels a features file batch by batch (memory-mapped reads)
into a :class:`LabelsWriter`, which writes the rows a row group at a time in a thread,
so memory is bounded by a few batches whatever the file size. The stages in
:mod:`cvpipe.label.anchor_stages` build one labeler per worker process; the functions
:func:`label_file`, :func:`count_sequences_file` and :func:`label_folder` do the same in
one call (notebooks, tests, benchmarks).
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cvpipe.core import tables
from cvpipe.core.storage import expand_urls, is_committed, join, open_atomic, url_to_fs
from cvpipe.data.features import features_urls, iter_features
from cvpipe.label.anchor_labels import (
    METHODS,
    Labels,
    UniformRule,
    cfa_ranked,
    concat_labels,
    method_tag,
    nearest_ranked,
    random_labels,
    read_uniform_rule,
    sequence_counts_ranked,
    uniform_depth,
    uniform_ranked,
    vanilla_labels,
)
from cvpipe.label.anchor_space import load_head, read_anchors, to_space
from cvpipe.label.distances import DEFAULT_EPS, METRICS, AnchorIndex

# Columns of the labels table worth a dictionary (keys are unique: a dictionary only costs).
LOW_CARDINALITY = ["shard", "method", "label", "anchors.list.element"]
# Strings compressed, the float distances stored plain (zstd saves little on them);
# min/max statistics for the key only: keys ascend within a shard, so they locate a key,
# while those of the other columns (labels in random order) prune nothing and cost ~1.4
# CPU ms per column and 200k rows, ~5% of labeling.
LABELS_WRITE_OPTIONS: dict[str, Any] = {
    "use_dictionary": LOW_CARDINALITY,
    "compression": {
        **{c: "zstd" for c in ("key", "shard", "method", "label", "anchors.list.element")},
        "distances.list.element": "none",
    },
    "write_statistics": ["key"],
}
# Rows per row group of a labels file: batches are gathered to this size, since a row
# group per 16 MiB feature batch (8192 rows) costs a dictionary page per column each.
ROW_GROUP_ROWS = 65_536


def labels_url(out_root: str, features_url: str) -> str:
    """``OUT/<partition>/<stem>.parquet`` for ``.../<partition>/<stem>.parquet``."""
    path = url_to_fs(features_url)[1] if "://" in str(features_url) else str(features_url)
    path = path.replace("\\", "/")
    partition = posixpath.basename(posixpath.dirname(path))
    return join(out_root, *([partition] if partition else []), posixpath.basename(path))


def read_truth(spec: str, column: str = "label") -> dict[str, str]:
    """``key -> label`` from Parquet with a ``key`` column (e.g. the shard index tables)."""
    out: dict[str, str] = {}
    for url in expand_urls(spec, ".parquet"):
        t = tables.read_parquet(url, columns=["key", column])
        out.update(zip(t.column("key").to_pylist(), t.column(column).to_pylist(), strict=True))
    return out


def label_counts(url: str) -> dict[str, int]:
    """Images per label in one labels file (map side of the label-size histograms)."""
    t = tables.read_parquet(url, columns=["label"])
    vc = t.column("label").combine_chunks().value_counts()
    return {
        str(v): int(c)
        for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)
    }


@dataclass
class LabelStats:
    """One labeled features file: where, how many rows, and images per label."""

    out: str
    rows: int
    skipped: bool = False
    counts: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------ ranking


class AnchorRanker:
    """The anchors of ``anchors_url`` and a distance index over them, in their space
    (the vector kind recorded in the anchors' lineage)."""

    def __init__(
        self,
        anchors_url: str,
        metric: str = "cosine",
        kl_direction: str = "image_anchor",
        eps: float = DEFAULT_EPS,
        checkpoint: str | None = None,
        gpu: bool | None = None,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
        self.anchors_url = anchors_url
        self.names, mat, _ = read_anchors(anchors_url)
        self.lineage = tables.read_lineage(anchors_url)
        self.kind = self.lineage.get("vector_kind", "mean")
        if metric == "kl" and self.kind == "mean":
            raise ValueError("metric 'kl' needs distribution anchors (kind normalized or softmax)")
        self.head = None
        if self.kind == "softmax":
            ckpt = checkpoint or self.lineage.get("checkpoint")
            if not ckpt:
                raise ValueError("softmax anchors: pass checkpoint= (none recorded in the anchors)")
            self.head = load_head(ckpt)
        self.metric, self.kl_direction, self.eps = metric, kl_direction, eps
        self.index = AnchorIndex(mat, metric, kl_direction, eps, gpu)

    def rank(self, emb: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(order[n, k], sorted_distances[n, k])`` of raw features ``emb``."""
        return self.index.rank(to_space(emb, self.kind, self.head), k)


def count_sequences_file(
    features_url: str,
    anchors_url: str | AnchorRanker,
    *,
    metric: str = "cosine",
    kl_direction: str = "image_anchor",
    eps: float = DEFAULT_EPS,
    checkpoint: str | None = None,
    batch_rows: int | None = None,
    gpu: bool | None = None,
) -> dict[str, int]:
    """Uniform's counting pass over one features file: images per Nearest-3 sequence
    (small: at most A*(A-1)*(A-2) entries). Merge with ``merge_counts``."""
    ranker = (
        anchors_url
        if isinstance(anchors_url, AnchorRanker)
        else AnchorRanker(anchors_url, metric, kl_direction, eps, checkpoint, gpu)
    )
    total: Counter[str] = Counter()
    depth = uniform_depth(len(ranker.names))
    for batch in iter_features(features_url, batch_rows, with_keys=False, copy=False):
        order, _ = ranker.rank(batch.matrix, depth)
        total.update(sequence_counts_ranked(order, ranker.names))
    return dict(sorted(total.items()))


# ----------------------------------------------------------------------------- labeling


class Labeler:
    """One labeling method over one set of anchors, checked and built once.

    ``method``: nearest (``n``, ``ordered``), cfa, uniform (``rule_url``, ``seed``),
    random (``n_labels``, default one per anchor; ``seed``), vanilla (a truth table per
    file, see :meth:`label`).
    Every argument is checked here, before any file is read or written.
    """

    def __init__(
        self,
        anchors_url: str,
        method: str,
        *,
        n: int = 1,
        metric: str = "cosine",
        ordered: bool = True,
        rule_url: str | None = None,
        n_labels: int | None = None,
        seed: int = 0,
        kl_direction: str = "image_anchor",
        eps: float = DEFAULT_EPS,
        checkpoint: str | None = None,
        gpu: bool | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
        if method == "uniform" and rule_url is None:
            raise ValueError("method 'uniform' needs rule_url (see write_uniform_rule)")
        self.anchors_url, self.method, self.n, self.ordered = anchors_url, method, n, ordered
        self.metric, self.kl_direction, self.eps = metric, kl_direction, eps
        self.ranker = AnchorRanker(anchors_url, metric, kl_direction, eps, checkpoint, gpu)
        self.names = self.ranker.names
        self.rule_url, self.n_labels, self.seed = rule_url, n_labels or len(self.names), seed
        if method == "nearest" and not 1 <= n <= len(self.names):
            raise ValueError(
                f"Nearest-{n} needs 1 <= N <= {len(self.names)} (the number of anchors)"
            )
        self.rule: UniformRule | None = read_uniform_rule(rule_url) if rule_url else None
        self.tag = method_tag(method, n, ordered)
        self._names_arr = pa.array(self.names, pa.string())

    def lineage(self, features_url: str, truth_url: str | None) -> dict[str, Any]:
        m = self.method
        return {
            **tables.lineage(),
            "stage": "anchor_labels",
            "features": features_url,
            "anchors": self.anchors_url,
            "anchors_lineage": self.ranker.lineage,
            "vector_kind": self.ranker.kind,
            "metric": self.metric,
            "method": m,
            "method_tag": self.tag,
            "n": self.n if m == "nearest" else None,
            "ordered": self.ordered if m == "nearest" else None,
            "kl_direction": self.kl_direction if self.metric == "kl" else None,
            "eps": self.eps if self.metric == "kl" else None,
            "rule": self.rule_url if m == "uniform" else None,
            "n_labels": self.n_labels if m == "random" else None,
            "seed": self.seed if m in ("random", "uniform") else None,
            "truth": truth_url,
        }

    def _labels(self, batch: Any, truth: Mapping[str, str] | None) -> Labels:
        m = self.method
        if m == "random":
            return random_labels(batch.keys, self.n_labels, self.seed)
        if m == "vanilla":
            return vanilla_labels(batch.keys, truth)
        k = {"nearest": self.n, "uniform": uniform_depth(len(self.names))}.get(m)
        order, dsorted = self.ranker.rank(batch.matrix, k)
        if m == "nearest":
            return nearest_ranked(order, dsorted, self.names, self.n, self.ordered)
        if m == "cfa":
            return cfa_ranked(order, dsorted, self.names)
        return uniform_ranked(order, dsorted, self.names, batch.keys, self.rule, self.seed)

    def label(
        self,
        features_url: str,
        out_url: str,
        *,
        truth_url: str | None = None,
        truth_column: str = "label",
        batch_rows: int | None = None,
        prefetch: int = 1,
        lineage: Mapping[str, Any] | None = None,
    ) -> LabelStats:
        """Label one features file into ``out_url`` (published atomically)."""
        truth = None
        if self.method == "vanilla":
            if truth_url is None:
                raise ValueError("method 'vanilla' needs truth_url")
            truth = read_truth(truth_url, truth_column)
        lin = {**self.lineage(features_url, truth_url), **(lineage or {})}
        schema = tables.ANCHOR_LABELS.with_metadata(
            {tables.LINEAGE_KEY: json.dumps(lin, sort_keys=True, default=str).encode()}
        )
        counts: Counter[str] = Counter()
        rows = 0
        with (
            open_atomic(out_url) as f,
            pq.ParquetWriter(f, schema, **LABELS_WRITE_OPTIONS) as w,
            LabelsWriter(w, self.tag, self._names_arr) as sink,
        ):
            for batch in iter_features(features_url, batch_rows, prefetch=prefetch, copy=False):
                lab = self._labels(batch, truth)
                sink.put(batch.keys, batch.shards, lab)
                sizes = np.bincount(lab.codes, minlength=len(lab.vocab)).tolist()
                counts.update(dict(zip(lab.vocab, sizes, strict=True)))
                rows += len(lab)
        return LabelStats(out_url, rows, counts=dict(sorted(counts.items())))


class LabelsWriter:
    """Writes label batches as ANCHOR_LABELS rows in a thread, a row group of about
    ``row_group_rows`` at a time: the labeling thread only ranks.

    Batches are gathered here and handed to the thread a row group at a time, where each
    Arrow and Parquet call then runs over 64k rows instead of 8k (in the pipeline, where
    the product leaves the caches cold, building and writing the rows of 200k cost 43
    CPU ms batch by batch, 38 ms this way) and the thread wakes once per row group. At
    most one row group waits for the thread; an error in the thread is raised by a later
    :meth:`put` or on exit. Leaving the ``with`` block without an error writes the last
    row group; with an error, nothing more is written.
    """

    def __init__(
        self,
        writer: pq.ParquetWriter,
        method: str,
        names: pa.Array,
        row_group_rows: int | None = None,
    ) -> None:
        self.writer, self.method, self.names = writer, method, names
        self.row_group_rows = row_group_rows or ROW_GROUP_ROWS
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cvpipe-labels-writer")
        self._pending: Future | None = None
        self._parts: list[tuple[pa.Array, pa.Array, Labels]] = []
        self._rows = 0

    def __enter__(self) -> LabelsWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            if exc_type is None:
                self._hand_over()
                if self._pending is not None:
                    self._pending.result()
            elif self._pending is not None:
                wait([self._pending])  # its error, if any, is the one being raised
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def put(self, key: pa.Array, shard: pa.Array, lab: Labels) -> None:
        """Add one batch's rows (keys and shards of the features batch)."""
        self._parts.append((key, shard, lab))
        self._rows += len(lab)
        if self._rows >= self.row_group_rows:
            self._hand_over()

    def _hand_over(self) -> None:
        if not self._parts:
            return
        if self._pending is not None:
            self._pending.result()  # one row group in flight: raises the thread's error
        self._pending = self._pool.submit(self._write, self._parts)
        self._parts, self._rows = [], 0

    def _write(self, parts: list[tuple[pa.Array, pa.Array, Labels]]) -> None:
        keys, shards, labs = zip(*parts, strict=True)
        table = labels_table(
            pa.chunked_array(keys, keys[0].type),
            pa.chunked_array(shards, shards[0].type),
            self.method,
            concat_labels(labs),
            self.names,
        )
        self.writer.write_table(table)


def _as_string(a: pa.ChunkedArray) -> pa.ChunkedArray:
    return a if a.type == pa.string() else a.cast(pa.string())  # large_string inputs too


def labels_table(
    key: pa.ChunkedArray, shard: pa.ChunkedArray, method: str, lab: Labels, names: pa.Array
) -> pa.Table:
    """ANCHOR_LABELS rows: keys and shards passed through as they were read, labels and
    anchor names taken from their (few) distinct strings by index."""
    n, k = lab.anchors.shape
    offsets = pa.array(
        np.arange(0, n * k + 1, k, dtype=np.int32) if k else np.zeros(n + 1, np.int32)
    )
    arrays = [
        _as_string(key),
        _as_string(shard),
        pa.chunked_array([pa.repeat(pa.scalar(method, pa.string()), n)]),
        pa.chunked_array([pa.array(lab.vocab, pa.string()).take(pa.array(lab.codes))]),
        pa.chunked_array(
            [pa.ListArray.from_arrays(offsets, names.take(pa.array(lab.anchors.reshape(-1))))]
        ),
        pa.chunked_array(
            [pa.ListArray.from_arrays(offsets, pa.array(lab.distances.reshape(-1), pa.float32()))]
        ),
    ]
    return pa.Table.from_arrays(arrays, schema=tables.ANCHOR_LABELS)


def label_file(
    features_url: str,
    anchors_url: str,
    out_url: str,
    method: str,
    *,
    truth_url: str | None = None,
    truth_column: str = "label",
    batch_rows: int | None = None,
    prefetch: int = 1,
    **settings: Any,
) -> LabelStats:
    """Label one features file into one ANCHOR_LABELS file at ``out_url`` in one call;
    skipped (its stats read back) when ``out_url`` is committed. ``settings`` are
    :class:`Labeler`'s (``n``, ``metric``, ``ordered``, ``rule_url``, ``n_labels``,
    ``seed``, ``kl_direction``, ``eps``, ``checkpoint``, ``gpu``)."""
    if is_committed(out_url):
        counts = label_counts(out_url)
        return LabelStats(out_url, sum(counts.values()), skipped=True, counts=counts)
    labeler = Labeler(anchors_url, method, **settings)
    return labeler.label(
        features_url,
        out_url,
        truth_url=truth_url,
        truth_column=truth_column,
        batch_rows=batch_rows,
        prefetch=prefetch,
    )


def label_folder(
    features_spec: str, anchors_url: str, out_root: str, method: str, **kwargs: Any
) -> list[LabelStats]:
    """Label every committed features file of a spec, one output per input (no Prefect)."""
    return [
        label_file(u, anchors_url, labels_url(out_root, u), method, **kwargs)
        for u in features_urls(features_spec)
    ]
