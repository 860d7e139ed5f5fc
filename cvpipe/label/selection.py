"""Top-K per class from top-P predictions (Yalniz et al. 2019), as a bounded-memory
map-reduce.

For each class ``l``: among the images whose first ``P`` predicted classes contain ``l``,
rank by the score of ``l`` and keep the ``K`` best; equal scores are ordered by key
(ascending), so the result is one well-defined set whatever the order of the inputs.

- map: :func:`partial_topk` streams one predictions file in record batches;
- reduce: :func:`merge` folds any number of partials (associative and commutative);
- :func:`select` does both in one process (every file streamed into one accumulator)
  and writes the selection and its report.

State is numeric: per kept candidate a class, a score and its location (file id, row).
Each class has a score threshold (its K-th best so far), so most candidates are dropped
by one vectorized compare; the survivors are grouped by class in batches and a class is
cut back to K with ``np.partition`` when it holds K/2 more. Memory is O(classes x K)
whatever the corpus (about 1.5 x classes x K x 12 bytes, then 16 bytes per kept
entry). Keys are read only to break ties (a tie group that straddles the K boundary, or
equal scores inside the kept set) and, at the end, for the survivors, one predictions
file at a time.
"""

from __future__ import annotations

import ctypes
import json
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cvpipe.core import tables
from cvpipe.core.storage import is_committed, join, open_atomic, url_to_fs
from cvpipe.data.shards import shard_id, unit_url

STAGE = "select"
BATCH_ROWS = 65_536
# Candidates queued before they are grouped by class: big enough that the per-class
# Python work is rare, small enough that a flush's temporaries stay a few tens of MB.
FLUSH_ROWS = 1 << 20
_NEG = np.float32(-np.inf)


# ------------------------------------------------------------------------ the state


@dataclass
class TopK:
    """A (partial) top-K per class. Entries are sorted by class, then rank (score
    descending, key ascending); ``file`` indexes ``files`` (the sorted URLs of the
    predictions files that hold a kept row). ``sources`` are all the files covered."""

    top_p: int
    top_k: int
    files: list[str]
    label: np.ndarray  # int32
    score: np.ndarray  # float32
    file: np.ndarray  # int32
    row: np.ndarray  # int32
    candidates: np.ndarray  # int64 per class: images whose top-P holds it
    sources: list[str] = field(default_factory=list)
    model_ids: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.candidates)

    def __len__(self) -> int:
        return len(self.label)

    def counts(self) -> np.ndarray:
        return _bincount(self.label, self.num_classes)

    def ranks(self) -> np.ndarray:
        """1-based rank of each entry within its class."""
        if not len(self):
            return np.empty(0, np.int32)
        starts = np.flatnonzero(np.r_[True, self.label[1:] != self.label[:-1]])
        sizes = np.diff(np.r_[starts, len(self)])
        return (np.arange(len(self)) - np.repeat(starts, sizes) + 1).astype(np.int32)

    def thresholds(self) -> np.ndarray:
        """Per class, the score of the K-th kept entry (-inf when fewer than K): a lower
        bound that any set containing this one can use to drop candidates early."""
        thr = np.full(self.num_classes, _NEG, np.float32)
        full = np.flatnonzero(self.counts() >= self.top_k)
        if len(full):
            last = np.searchsorted(self.label, full.astype(self.label.dtype), side="right") - 1
            thr[full] = self.score[last]
        return thr

    def locations(self) -> list[tuple[str, int]]:
        return [(self.files[f], int(r)) for f, r in zip(self.file, self.row, strict=True)]

    def same_as(self, other: TopK) -> bool:
        return (
            self.top_p == other.top_p
            and self.top_k == other.top_k
            and self.files == other.files
            and sorted(self.sources) == sorted(other.sources)
            and all(
                np.array_equal(getattr(self, a), getattr(other, a))
                for a in ("label", "score", "file", "row", "candidates")
            )
        )


class _Keys:
    """Keys of predictions rows, read on demand (ties only); a few files are cached."""

    def __init__(self, files: list[str], cache_files: int = 4) -> None:
        self.files = files
        self.cache: OrderedDict[int, pa.Array] = OrderedDict()
        self.cache_files = cache_files

    def column(self, fid: int) -> pa.Array:
        if fid in self.cache:
            self.cache.move_to_end(fid)
            return self.cache[fid]
        fs, path = url_to_fs(self.files[fid])
        col = pq.ParquetFile(path, filesystem=fs).read(columns=["key"]).column(0)
        col = col.combine_chunks()
        self.cache[fid] = col
        if len(self.cache) > self.cache_files:
            self.cache.popitem(last=False)
        return col

    def sort_keys(self, locs: np.ndarray) -> list[tuple[str, str, int]]:
        """(key, file URL, row) per location: the full tie-break order."""
        out: list[tuple[str, str, int] | None] = [None] * len(locs)
        fids, rows = (locs >> 32).astype(np.int64), (locs & 0xFFFFFFFF).astype(np.int64)
        for fid in np.unique(fids):
            idx = np.flatnonzero(fids == fid)
            keys = self.column(int(fid)).take(pa.array(rows[idx])).to_pylist()
            url = self.files[int(fid)]
            for i, k in zip(idx, keys, strict=True):
                out[i] = (k, url, int(rows[i]))
        return out  # type: ignore[return-value]


class _Accumulator:
    """Per-class kept candidates; see the module docstring.

    Candidates that pass the class threshold wait in a pending buffer; a flush groups
    them by class once (a linear radix sort) and appends each class's run to that
    class's arrays, so Python-level work is per flush and class, not per file. A class
    whose arrays would exceed ``top_k + slack`` entries is cut back to its exact top K,
    and the K-th score becomes its threshold."""

    def __init__(
        self, top_p: int, top_k: int, num_classes: int = 0, thresholds: np.ndarray | None = None
    ) -> None:
        if top_p < 1 or top_k < 1:
            raise ValueError("top_p and top_k must be >= 1")
        self.top_p, self.top_k = top_p, top_k
        # Cut a class once it holds this many extra candidates: large enough that
        # np.partition runs rarely, small enough to keep memory near classes x K.
        self.slack = max(top_k // 2, 64)
        self.files: list[str] = []
        self.file_ids: dict[str, int] = {}
        self.sources: list[str] = []
        self.model_ids: set[str] = set()
        self.keys = _Keys(self.files)
        self.num_classes = 0
        # Per class: score and location (file id << 32 | row) arrays, of which the first
        # fill[c] entries are used. Capacity grows geometrically up to top_k + slack, so
        # a huge K over few candidates never allocates classes x K.
        self.score: list[np.ndarray] = []
        self.loc: list[np.ndarray] = []
        self.fill = np.zeros(0, np.int64)
        self.thr = np.zeros(0, np.float32)
        self.candidates = np.zeros(0, np.int64)
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.pending_rows = 0
        self._grow(num_classes)
        if thresholds is not None:
            self.raise_thresholds(thresholds)

    def _grow(self, n: int) -> None:
        if n <= self.num_classes:
            return
        extra = n - self.num_classes
        self.score += [np.empty(0, np.float32) for _ in range(extra)]
        self.loc += [np.empty(0, np.int64) for _ in range(extra)]
        self.fill = np.r_[self.fill, np.zeros(extra, np.int64)]
        self.thr = np.r_[self.thr, np.full(extra, _NEG, np.float32)]
        self.candidates = np.r_[self.candidates, np.zeros(extra, np.int64)]
        self.num_classes = n

    def raise_thresholds(self, thresholds: np.ndarray) -> None:
        t = np.asarray(thresholds, np.float32)
        self._grow(len(t))
        np.maximum(self.thr[: len(t)], t, out=self.thr[: len(t)])

    def file_id(self, url: str) -> int:
        if url not in self.file_ids:
            self.file_ids[url] = len(self.files)
            self.files.append(url)
        return self.file_ids[url]

    def add_source(self, url: str) -> None:
        self.sources.append(url)

    def add(self, label: np.ndarray, score: np.ndarray, loc: np.ndarray, count: bool) -> None:
        if not len(label):
            return
        top = int(label.max()) + 1
        if int(label.min()) < 0:
            raise ValueError("negative class index in predictions")
        self._grow(top)
        if count:
            self.candidates[:top] += np.bincount(label, minlength=top)
        # Slices of a large partial (a merge) keep the temporaries of one flush bounded.
        for a in range(0, len(label), FLUSH_ROWS):
            lab, sc, lo = (
                label[a : a + FLUSH_ROWS],
                score[a : a + FLUSH_ROWS],
                loc[a : a + FLUSH_ROWS],
            )
            keep = sc >= self.thr[lab]
            if not keep.all():
                lab, sc, lo = lab[keep], sc[keep], lo[keep]
            if len(lab):
                self.pending.append((lab, sc, lo))
                self.pending_rows += len(lab)
                if self.pending_rows >= FLUSH_ROWS:
                    self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        parts, self.pending, self.pending_rows = self.pending, [], 0
        label = np.concatenate([p[0] for p in parts]).astype(np.int32, copy=False)
        score = np.concatenate([p[1] for p in parts]).astype(np.float32, copy=False)
        loc = np.concatenate([p[2] for p in parts]).astype(np.int64, copy=False)
        del parts
        # Thresholds may have risen since these were queued.
        keep = score >= self.thr[label]
        if not keep.all():
            label, score, loc = label[keep], score[keep], loc[keep]
        del keep
        # Grouping by class: a stable sort of uint16 labels is a linear radix sort.
        key = label.astype(np.uint16) if self.num_classes <= 65_536 else label
        order = np.argsort(key, kind="stable")
        del key
        score, loc = score[order], loc[order]
        del order
        counts = np.bincount(label, minlength=self.num_classes)
        del label
        present = np.flatnonzero(counts)
        ends = np.cumsum(counts)[present].tolist()
        cap = self.top_k + self.slack
        fill = self.fill
        for c, n, end in zip(present.tolist(), counts[present].tolist(), ends, strict=True):
            f = int(fill[c])
            s_new, l_new = score[end - n : end], loc[end - n : end]
            if f + n > cap:
                self._cut(c, np.concatenate([self.score[c][:f], s_new]),
                          np.concatenate([self.loc[c][:f], l_new]))  # fmt: skip
                continue
            if f + n > len(self.score[c]):
                size = min(cap, max(f + n, 2 * len(self.score[c])))
                s_arr, l_arr = np.empty(size, np.float32), np.empty(size, np.int64)
                s_arr[:f], l_arr[:f] = self.score[c][:f], self.loc[c][:f]
                self.score[c], self.loc[c] = s_arr, l_arr
            self.score[c][f : f + n] = s_new
            self.loc[c][f : f + n] = l_new
            fill[c] = f + n

    def _cut(self, c: int, s: np.ndarray, loc: np.ndarray) -> None:
        """Store the exact top K of ``s, loc`` (score desc, key asc) as class ``c``."""
        k = self.top_k
        n = len(s)
        if n > k:
            kth = np.partition(s, n - k)[n - k]
            keep = s > kth
            ties = np.flatnonzero(s == kth)
            need = k - int(np.count_nonzero(keep))
            if len(ties) > need:  # the K boundary cuts a group of equal scores: by key
                order = self.keys.sort_keys(loc[ties])
                ties = ties[sorted(range(len(ties)), key=order.__getitem__)[:need]]
            keep[ties] = True
            s, loc = s[keep], loc[keep]
            self.thr[c] = max(self.thr[c], kth)
        cap = self.top_k + self.slack
        if len(self.score[c]) < len(s) or len(self.score[c]) > cap:
            self.score[c] = np.empty(min(cap, max(len(s), 2 * len(self.score[c]))), np.float32)
            self.loc[c] = np.empty(len(self.score[c]), np.int64)
        self.score[c][: len(s)] = s
        self.loc[c][: len(s)] = loc
        self.fill[c] = len(s)

    # ------------------------------------------------------------------ inputs

    def add_file(self, url: str, top_p: int) -> None:
        """Stream one predictions file (classes and scores columns only)."""
        fs, path = url_to_fs(url)
        pf = pq.ParquetFile(path, filesystem=fs)
        meta = (pf.schema_arrow.metadata or {}).get(tables.LINEAGE_KEY)
        lineage = json.loads(meta) if meta else {}
        stored_p = lineage.get("top_p")
        if stored_p is not None and top_p > int(stored_p):
            raise ValueError(f"{url} holds top-{stored_p} predictions; cannot select top-{top_p}")
        if lineage.get("model_id"):
            self.model_ids.add(str(lineage["model_id"]))
        if lineage.get("num_classes"):
            self._grow(int(lineage["num_classes"]))
        fid = self.file_id(url)
        self.add_source(url)
        if pf.metadata.num_rows >= 2**31:
            raise ValueError(f"{url} has too many rows for an int32 row index")
        row0 = 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=["classes", "scores"]):
            label, score, rows = _candidates(batch, top_p)
            loc = (np.int64(fid) << 32) | (rows + row0).astype(np.int64)
            self.add(label, score, loc, count=True)
            row0 += batch.num_rows

    def add_topk(self, part: TopK) -> None:
        if self.top_k != part.top_k or self.top_p != part.top_p:
            raise ValueError(
                f"cannot merge top-{part.top_p}/K={part.top_k} into top-{self.top_p}/K={self.top_k}"
            )
        overlap = set(part.sources) & set(self.sources)
        if overlap:
            raise ValueError(f"partials overlap (e.g. {sorted(overlap)[0]}): merge disjoint ones")
        self.sources += part.sources
        self.model_ids.update(part.model_ids)
        self._grow(part.num_classes)
        self.candidates[: part.num_classes] += part.candidates
        self.raise_thresholds(part.thresholds())
        remap = np.array([self.file_id(u) for u in part.files], np.int64)
        if len(part):
            loc = (remap[part.file] << 32) | part.row.astype(np.int64)
            self.add(part.label, part.score, loc, count=False)

    # ------------------------------------------------------------------ output

    def result(self) -> TopK:
        """The sorted top K per class. Each class is sorted and copied into pre-sized
        output arrays, then freed, so the state is never held twice."""
        self._flush()
        for c in np.flatnonzero(self.fill > self.top_k).tolist():
            self._cut(c, self.score[c][: self.fill[c]], self.loc[c][: self.fill[c]])
        sizes = self.fill.copy()
        present = np.flatnonzero(sizes).tolist()
        total = int(sizes.sum())
        # Output file ids index the sorted URLs of the files that hold a kept row.
        used = np.zeros(len(self.files), bool)
        for c in present:
            used[self.loc[c][: sizes[c]] >> 32] = True
        used_ids = np.flatnonzero(used)
        names = [self.files[i] for i in used_ids.tolist()]
        by_name = sorted(range(len(names)), key=names.__getitem__)
        files = [names[i] for i in by_name]
        new_id = np.zeros(len(self.files), np.int32)
        new_id[used_ids[by_name]] = np.arange(len(names), dtype=np.int32)
        label = np.repeat(np.arange(self.num_classes, dtype=np.int32), sizes)
        score = np.empty(total, np.float32)
        file = np.empty(total, np.int32)
        row = np.empty(total, np.int32)
        runs: list[tuple[int, int]] = []  # [a, b): equal scores inside a class
        run_locs: list[np.ndarray] = []
        pos = 0
        for i, c in enumerate(present):
            n = int(sizes[c])
            s, loc = self.score[c][:n], self.loc[c][:n]
            # Unstable is fine (and twice as fast): equal scores are ordered by key below.
            order = np.argsort(-s)
            s, loc = s[order], loc[order]
            score[pos : pos + n] = s
            file[pos : pos + n] = new_id[loc >> 32]
            row[pos : pos + n] = loc & 0xFFFFFFFF
            same = np.flatnonzero(s[1:] == s[:-1])
            if len(same):
                first = same[np.r_[True, np.diff(same) > 1]]
                last = same[np.r_[np.diff(same) > 1, True]] + 2
                for a, b in zip(first.tolist(), last.tolist(), strict=True):
                    runs.append((pos + a, pos + b))
                    run_locs.append(loc[a:b].copy())  # a view would pin the class
            self.score[c] = np.empty(0, np.float32)
            self.loc[c] = np.empty(0, np.int64)
            pos += n
            if i % 64 == 63:
                _release_freed_memory()
        self.fill[:] = 0
        if runs:
            # Equal scores inside the kept set: their ranks follow the keys. All runs are
            # resolved together, so each predictions file is read once.
            keys = self.keys.sort_keys(np.concatenate(run_locs))
            off = 0
            for a, b in runs:
                run_keys = keys[off : off + b - a]
                off += b - a
                perm = np.array(sorted(range(b - a), key=run_keys.__getitem__)) + a
                file[a:b], row[a:b] = file[perm], row[perm]
        _release_freed_memory()
        return TopK(
            top_p=self.top_p,
            top_k=self.top_k,
            files=files,
            label=label,
            score=score,
            file=file,
            row=row,
            candidates=self.candidates.copy(),
            sources=sorted(self.sources),
            model_ids=sorted(self.model_ids),
        )


def _bincount(x: np.ndarray, n: int) -> np.ndarray:
    """``np.bincount(x, minlength=n)`` in slices: bincount first casts its input to
    int64, which for the 16M int32 labels of a result is a 128 MB temporary."""
    out = np.zeros(n, np.int64)
    for a in range(0, len(x), FLUSH_ROWS):
        c = np.bincount(x[a : a + FLUSH_ROWS], minlength=n)
        if len(c) > len(out):
            out = np.r_[out, np.zeros(len(c) - len(out), np.int64)]
        out[: len(c)] += c
    return out


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS. The per-class arrays are small enough that
    glibc serves them from its heap, and free() keeps those pages: without this, the
    freed state (~300 MB at K=16,000 x 1,000 classes) stays in RSS next to the result.
    Dask's workers trim the same way. A no-op where glibc is absent."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()


def _candidates(batch: pa.RecordBatch, top_p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class, score, row-in-batch) of the first ``top_p`` entries of each row."""
    classes, scores = batch.column(0), batch.column(1)
    n = batch.num_rows
    lengths = pc.fill_null(pc.list_value_length(classes), 0).to_numpy().astype(np.int64)
    slengths = pc.fill_null(pc.list_value_length(scores), 0).to_numpy().astype(np.int64)
    if not np.array_equal(lengths, slengths):
        raise ValueError("predictions rows whose classes and scores differ in length")
    values = classes.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    svalues = scores.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if n and (lengths == lengths[0]).all():  # the usual case: every row holds P entries
        p = int(lengths[0])
        q = min(p, top_p)
        label = values.reshape(n, p)[:, :q].reshape(-1)
        score = svalues.reshape(n, p)[:, :q].reshape(-1)
        rows = np.repeat(np.arange(n, dtype=np.int64), q)
        return label, score, rows
    starts = np.cumsum(lengths) - lengths
    pos = np.arange(len(values)) - np.repeat(starts, lengths)
    keep = pos < top_p
    rows = np.repeat(np.arange(n, dtype=np.int64), lengths)[keep]
    return values[keep], svalues[keep], rows


# --------------------------------------------------------------------- public API


def partial_topk(
    predictions_url: str, top_p: int, top_k: int, thresholds: np.ndarray | None = None
) -> TopK:
    """Map step: the top-K per class of one predictions file. ``thresholds`` (per class,
    e.g. :meth:`TopK.thresholds` of another partial) let it drop candidates that cannot
    make the final cut; the result of the reduce is the same with or without them."""
    acc = _Accumulator(top_p, top_k, thresholds=thresholds)
    acc.add_file(predictions_url, top_p)
    return acc.result()


def merge(parts: Iterable[TopK], thresholds: np.ndarray | None = None) -> TopK:
    """Reduce step: the top-K of the union of disjoint partials. Parts are consumed one
    at a time (pass a generator to hold one in memory at once); any grouping and any
    order give the same result."""
    acc: _Accumulator | None = None
    for part in parts:
        if acc is None:
            acc = _Accumulator(part.top_p, part.top_k, part.num_classes, thresholds)
        acc.add_topk(part)
    if acc is None:
        raise ValueError("merge() needs at least one partial")
    return acc.result()


def select(
    prediction_urls: Sequence[str],
    top_p: int,
    top_k: int,
    out: str,
    fan_in: int = 64,
    classes: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Select the top-K images per class from predictions files and write
    ``OUT/selection.parquet`` (:data:`tables.SELECTION`, ordered by shard then row),
    ``OUT/selection_report.parquet`` and ``OUT/selection_report.md``. Returns the report.
    Skipped (report read back) when the selection is committed. ``fan_in`` is checked
    but has no effect here: it is the shape of a tree of work units (the flow's)."""
    if fan_in < 2:
        raise ValueError("fan_in must be >= 2")
    urls = sorted(dict.fromkeys(prediction_urls))
    if not urls:
        raise ValueError("no predictions files to select from")
    if is_committed(selection_url(out)) and is_committed(report_url(out)):
        return read_report(out)
    # In one process every node of a reduce tree would run in turn, so the tree collapses
    # into one accumulator: its thresholds rise from the first files on and no partial is
    # ever sorted. (With K=16,000 and 64-file nodes, no node ever reached K per class, so
    # the tree shared no thresholds and sorted every candidate twice.)
    acc = _Accumulator(top_p, top_k)
    for url in urls:
        acc.add_file(url, top_p)
    result = acc.result()
    del acc
    return finalize(result, out, classes=classes, num_classes=num_classes)


def selection_url(out: str) -> str:
    return join(out, "selection.parquet")


def report_url(out: str) -> str:
    return join(out, "selection_report.parquet")


def report_md_url(out: str) -> str:
    return join(out, "selection_report.md")


def _first_lineage(urls: Sequence[str]) -> dict[str, Any]:
    for u in urls[:1]:
        return tables.read_lineage(u)
    return {}


def finalize(
    result: TopK,
    out: str,
    classes: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Resolve the survivors' keys and shards (one predictions file at a time), write
    the selection, the per-class report (Parquet and markdown), and return the report."""
    if len(result.model_ids) > 1:
        raise ValueError(f"predictions from several teachers: {result.model_ids}")
    pred_lineage = _first_lineage(result.sources)
    n_classes = max(result.num_classes, num_classes or 0, int(pred_lineage.get("num_classes", 0)))
    if classes is None:
        classes = _teacher_classes(pred_lineage.get("checkpoint"))
    if classes is not None:
        n_classes = max(n_classes, len(classes))
    lineage = tables.lineage(
        {
            "stage": STAGE,
            "top_p": result.top_p,
            "top_k": result.top_k,
            "model_id": pred_lineage.get("model_id"),
            "sources": result.sources,
        },
        stage=STAGE,
        top_p=result.top_p,
        top_k=result.top_k,
        model_id=result.model_ids[0] if result.model_ids else pred_lineage.get("model_id"),
        checkpoint=pred_lineage.get("checkpoint"),
        num_classes=n_classes,
        classes=list(classes) if classes is not None else None,
        predictions=len(result.sources),
    )
    _write_selection(result, selection_url(out), lineage)
    report = _report(result, n_classes, classes)
    tables.write_parquet(report, report_url(out), lineage)
    summary = _summary(report, result.top_p, result.top_k, len(result.sources))
    with open_atomic(report_md_url(out)) as f:
        f.write(_markdown(summary, report).encode())
    return summary


def _teacher_classes(checkpoint: str | None) -> list[str] | None:
    if not checkpoint:
        return None
    from cvpipe.models import CheckpointError, load_info

    try:
        return list(load_info(checkpoint).classes)
    except (CheckpointError, OSError):
        return None  # the report falls back to class indices


def _by_file(result: TopK) -> Iterator[tuple[int, np.ndarray]]:
    """(file id, entry indices in row order) for every file of ``result``.

    Files are taken in groups of about ``FLUSH_ROWS`` entries: one compare pass per group
    finds its entries, a stable radix sort of their (uint16) file offsets groups them,
    so the index arrays are a few MB instead of a full argsort of every entry."""
    counts = _bincount(result.file, len(result.files))
    f0 = 0
    while f0 < len(counts):
        total = np.cumsum(counts[f0:])
        f1 = f0 + max(1, int(np.searchsorted(total, FLUSH_ROWS, side="right")))
        f1 = min(f1, f0 + 65_536, len(counts))
        mask = result.file >= f0
        mask &= result.file < f1
        idx = np.flatnonzero(mask)
        del mask
        sub = (result.file[idx] - f0).astype(np.uint16)
        idx = idx[np.argsort(sub, kind="stable")]
        bounds = np.r_[0, np.cumsum(counts[f0:f1])]
        for i in range(f1 - f0):
            part = idx[bounds[i] : bounds[i + 1]]
            # Stable: an image selected for several classes keeps its rows in class order.
            yield f0 + i, part[np.argsort(result.row[part], kind="stable")]
        f0 = f1


def _write_selection(result: TopK, url: str, lineage: dict[str, Any]) -> None:
    """Stream the selection file by file, so keys are never all in memory at once."""
    # Rank = position in the class's sorted run (label is sorted), computed per file.
    # Needles of the label dtype: mixed dtypes make searchsorted copy the whole haystack.
    labels = np.arange(result.num_classes + 1, dtype=result.label.dtype)
    class_start = np.searchsorted(result.label, labels)
    schema = tables.SELECTION.with_metadata(
        {tables.LINEAGE_KEY: json.dumps(lineage, sort_keys=True, default=str).encode()}
    )
    # Straight into the atomic file: the selection can be larger than memory allows.
    # Dictionaries only where values repeat: on unique keys and raw scores they cost half
    # the write time and make the file larger.
    dictionary = ["shard", "label"]
    with (
        open_atomic(url) as f,
        pq.ParquetWriter(f, schema, compression="zstd", use_dictionary=dictionary) as writer,
    ):
        for fid, idx in _by_file(result):
            rows = result.row[idx]
            label = result.label[idx]
            ranks = (idx - class_start[label] + 1).astype(np.int32)
            fs, path = url_to_fs(result.files[fid])
            cols = pq.ParquetFile(path, filesystem=fs).read(columns=["key", "shard"])
            take = pa.array(rows.astype(np.int64))
            writer.write_batch(  # one row group per predictions file, i.e. per shard
                pa.record_batch(
                    [
                        cols.column("key").take(take).combine_chunks(),
                        cols.column("shard").take(take).combine_chunks(),
                        pa.array(label, pa.int32()),
                        pa.array(result.score[idx], pa.float32()),
                        pa.array(ranks, pa.int32()),
                    ],
                    schema=schema,
                )
            )


def _report(result: TopK, n_classes: int, classes: Sequence[str] | None) -> pa.Table:
    counts = _bincount(result.label, n_classes)[:n_classes]
    cands = np.zeros(n_classes, np.int64)
    cands[: result.num_classes] = result.candidates
    min_s = np.full(n_classes, np.nan, np.float32)
    max_s = np.full(n_classes, np.nan, np.float32)
    if len(result):
        labels = np.arange(n_classes, dtype=result.label.dtype)  # no haystack copy
        first = np.searchsorted(result.label, labels, side="left")
        last = np.searchsorted(result.label, labels, side="right") - 1
        has = counts > 0
        max_s[has] = result.score[first[has]]
        min_s[has] = result.score[last[has]]
    names = [classes[i] if classes is not None else str(i) for i in range(n_classes)]
    return pa.Table.from_arrays(
        [
            pa.array(np.arange(n_classes, dtype=np.int32)),
            pa.array(names, pa.string()),
            pa.array(cands),
            pa.array(counts.astype(np.int64)),
            pa.array(min_s, pa.float32(), mask=np.isnan(min_s)),
            pa.array(max_s, pa.float32(), mask=np.isnan(max_s)),
        ],
        schema=tables.SELECTION_REPORT,
    )


def _summary(report: pa.Table, top_p: int, top_k: int, files: int) -> dict[str, Any]:
    sel = report.column("selected").to_numpy()
    names = report.column("class_name").to_pylist()
    short = [names[i] for i in np.flatnonzero(sel < top_k)]
    return {
        "top_p": top_p,
        "top_k": top_k,
        "predictions_files": files,
        "classes": len(sel),
        "selected": int(sel.sum()),
        "candidates": int(report.column("candidates").to_numpy().sum()),
        "images_per_class_mean": float(sel.mean()) if len(sel) else 0.0,
        "images_per_class_std": float(sel.std()) if len(sel) else 0.0,
        "images_per_class_min": int(sel.min()) if len(sel) else 0,
        "images_per_class_max": int(sel.max()) if len(sel) else 0,
        "classes_below_k": len(short),
        "classes_below_k_names": short[:100],
    }


def _markdown(summary: dict[str, Any], report: pa.Table) -> str:
    s = summary
    lines = [
        f"# Top-K selection (P={s['top_p']}, K={s['top_k']})",
        "",
        f"- predictions files: {s['predictions_files']}",
        f"- candidates (image, class) pairs: {s['candidates']}",
        f"- selected: {s['selected']} over {s['classes']} classes",
        f"- images per class: mean {s['images_per_class_mean']:.1f}, "
        f"std {s['images_per_class_std']:.1f}, min {s['images_per_class_min']}, "
        f"max {s['images_per_class_max']}",
        f"- classes with fewer than K: {s['classes_below_k']}",
        "",
    ]
    if s["classes_below_k"]:
        lines += ["| class | candidates | selected |", "|---|---:|---:|"]
        below = report.filter(pc.less(report.column("selected"), s["top_k"]))
        for r in below.slice(0, 50).to_pylist():
            lines.append(f"| {r['class_name']} | {r['candidates']} | {r['selected']} |")
        if below.num_rows > 50:
            lines.append(f"| ... {below.num_rows - 50} more | | |")
    return "\n".join(lines) + "\n"


def read_report(out: str) -> dict[str, Any]:
    """The summary of a committed selection, read back from its report table."""
    lin = tables.read_lineage(report_url(out))
    report = tables.read_parquet(report_url(out))
    files = int(lin.get("predictions", 0))
    return {**_summary(report, int(lin["top_p"]), int(lin["top_k"]), files), "skipped": True}


# ------------------------------------------------- persisted partials (work units)


def write_topk(t: TopK, url: str) -> None:
    files = pa.array(t.files, pa.string())
    table = pa.Table.from_arrays(
        [
            pa.array(t.label, pa.int32()),
            pa.array(t.score, pa.float32()),
            pa.DictionaryArray.from_arrays(pa.array(t.file, pa.int32()), files).cast(pa.string()),
            pa.array(t.row, pa.int32()),
        ],
        schema=tables.TOPK_STATE,
    )
    lineage = tables.lineage(
        None,
        stage=STAGE + "/partial",
        top_p=t.top_p,
        top_k=t.top_k,
        candidates=t.candidates.tolist(),
        sources=t.sources,
        model_ids=t.model_ids,
    )
    tables.write_parquet(table, url, lineage)


def read_topk(url: str) -> TopK:
    lin = tables.read_lineage(url)
    table = tables.read_parquet(url)
    files = pc.unique(table.column("file")).to_pylist()
    files = sorted(files)
    ids = pc.index_in(table.column("file"), value_set=pa.array(files, pa.string()))
    return TopK(
        top_p=int(lin["top_p"]),
        top_k=int(lin["top_k"]),
        files=files,
        label=table.column("label").to_numpy().astype(np.int32),
        score=table.column("score").to_numpy().astype(np.float32),
        file=ids.to_numpy().astype(np.int32),
        row=table.column("row").to_numpy().astype(np.int32),
        candidates=np.asarray(lin["candidates"], np.int64),
        sources=list(lin["sources"]),
        model_ids=list(lin["model_ids"]),
    )


def partial_url(out: str, predictions_url: str) -> str:
    return unit_url(out, "selection_parts/map", shard_id(predictions_url))


def partial_unit(predictions_url: str, top_p: int, top_k: int, out: str) -> str:
    """One map work unit: the partial of one predictions file, persisted as Parquet
    under ``OUT/selection_parts/map/<partition>/<stem>.parquet``; skipped if committed."""
    url = partial_url(out, predictions_url)
    if not is_committed(url):
        write_topk(partial_topk(predictions_url, top_p, top_k), url)
    return url


def merge_unit(part_urls: Sequence[str], out_url: str) -> str:
    """One reduce work unit: merge persisted partials (read one at a time) into
    ``out_url``; skipped if committed."""
    if not is_committed(out_url):
        write_topk(merge(read_topk(u) for u in part_urls), out_url)
    return out_url


def finalize_unit(topk_url: str, out: str, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """The last work unit: the selection and report from the root partial."""
    if is_committed(selection_url(out)) and is_committed(report_url(out)):
        return read_report(out)
    return finalize(read_topk(topk_url), out, classes=classes)
