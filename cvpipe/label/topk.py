"""The streaming top-K per class (Yalniz et al. 2019): the state and its accumulator.

For each class ``l``: among the images whose first ``P`` predicted classes contain ``l``,
rank by the score of ``l`` and keep the ``K`` best; equal scores are ordered by key
(ascending), so the result is one well-defined set whatever the order of the inputs.

- map: :func:`partial_topk` streams one predictions file in record batches;
- reduce: :func:`merge` folds any number of partials (associative and commutative).
Files, work units and the report are :mod:`cvpipe.label.selection`'s.

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cvpipe.core import tables
from cvpipe.core.storage import url_to_fs

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
        return bincount(self.label, self.num_classes)

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


class Accumulator:
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


def bincount(x: np.ndarray, n: int) -> np.ndarray:
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


# --------------------------------------------------------------------- map and reduce


def partial_topk(
    predictions_url: str, top_p: int, top_k: int, thresholds: np.ndarray | None = None
) -> TopK:
    """Map step: the top-K per class of one predictions file. ``thresholds`` (per class,
    e.g. :meth:`TopK.thresholds` of another partial) let it drop candidates that cannot
    make the final cut; the result of the reduce is the same with or without them."""
    acc = Accumulator(top_p, top_k, thresholds=thresholds)
    acc.add_file(predictions_url, top_p)
    return acc.result()


def merge(parts: Iterable[TopK], thresholds: np.ndarray | None = None) -> TopK:
    """Reduce step: the top-K of the union of disjoint partials. Parts are consumed one
    at a time (pass a generator to hold one in memory at once); any grouping and any
    order give the same result."""
    acc: Accumulator | None = None
    for part in parts:
        if acc is None:
            acc = Accumulator(part.top_p, part.top_k, part.num_classes, thresholds)
        acc.add_topk(part)
    if acc is None:
        raise ValueError("merge() needs at least one partial")
    return acc.result()
