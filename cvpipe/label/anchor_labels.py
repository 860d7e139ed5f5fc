"""Pseudo-labels from anchor distances: the labelers, the Uniform rule, the method tag.

Labelers map a ranking of the anchors (or a distance matrix, n x A) and the anchor
names to :class:`Labels`:

- Nearest-N (:func:`nearest_labels`): names of the N closest anchors, ``"animal>plant"``;
  ``ordered=False`` sorts the N names alphabetically and joins them with ``"+"``;
- CFA (:func:`cfa_labels`): closest and farthest, ``"animal|tool"``; the farthest is,
  among anchors tied at the largest distance, the one with the highest index;
- Uniform (:func:`uniform_labels`): about equal label sizes from the Nearest-3
  sequences, with a rule frozen from global counts (see :func:`uniform_rule`);
- Random (:func:`random_labels`): ``r0000`` ... uniformly from a hash of (seed, key);
- Vanilla (:func:`vanilla_labels`): the true labels, looked up by key.

Ties follow :func:`cvpipe.label.distances.top_k`: (distance, anchor index).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from cvpipe.core import tables
from cvpipe.label.distances import rank_anchors

METHODS = ("nearest", "cfa", "uniform", "random", "vanilla")
UNIFORM_DEPTH = 3

SEP_ORDERED = ">"
SEP_UNORDERED = "+"
SEP_CFA = "|"
SEP_PART = "#"


def method_tag(method: str, n: int = 1, ordered: bool = True) -> str:
    """What the ``method`` column holds: ``nearest-2``, ``nearest-2-unordered``, ``cfa``,
    ``uniform``, ``random``, ``vanilla`` (the rows of the pseudo-label table)."""
    if method == "nearest":
        return f"nearest-{n}" + ("" if ordered else "-unordered")
    return method


# ----------------------------------------------------------------------------- labels


@dataclass
class Labels:
    """Labels of n images: ``vocab[codes[i]]`` is image i's label; ``anchors[i]`` the
    anchor indices the label was built from, in distance order, ``distances[i]`` theirs
    (k columns; k = 0 for labels that use no distances)."""

    vocab: list[str]
    codes: np.ndarray
    anchors: np.ndarray
    distances: np.ndarray

    @property
    def labels(self) -> list[str]:
        v = self.vocab
        return [v[c] for c in self.codes.tolist()]

    def __len__(self) -> int:
        return len(self.codes)


def concat_labels(parts: Sequence[Labels]) -> Labels:
    """The labels of consecutive batches as one: the union of their vocabularies
    (sorted), each batch's codes mapped into it."""
    if len(parts) == 1:
        return parts[0]
    vocab = sorted(set().union(*(p.vocab for p in parts)))
    pos = {v: i for i, v in enumerate(vocab)}
    codes = [np.array([pos[v] for v in p.vocab], np.int64)[p.codes] for p in parts]
    return Labels(
        vocab,
        np.concatenate(codes),
        np.concatenate([p.anchors for p in parts]),
        np.concatenate([p.distances for p in parts]),
    )


def _encode(parts: np.ndarray, base: int, names: Sequence[str], sep: str) -> tuple:
    """Codes and vocab for rows of anchor indices joined with ``sep``."""
    n, k = parts.shape
    code = np.zeros(n, np.int64)
    for j in range(k):
        code = code * base + parts[:, j]
    if base**k <= max(n, 1 << 16):
        # A table over the code space instead of np.unique's sort: the same sorted
        # codes and inverse, in O(n) (Nearest-1..3 of 16 anchors: 16..4096 codes).
        seen = np.zeros(base**k, bool)
        seen[code] = True
        uniq = np.flatnonzero(seen)
        slot = np.zeros(base**k, np.int64)
        slot[uniq] = np.arange(len(uniq))
        inv = slot[code]
    else:
        uniq, inv = np.unique(code, return_inverse=True)
    vocab = []
    for u in uniq.tolist():
        idx = []
        for _ in range(k):
            u, r = divmod(u, base)
            idx.append(r)
        vocab.append(sep.join(names[i] for i in reversed(idx)))
    return vocab, inv.reshape(-1).astype(np.int64)


def nearest_ranked(
    order: np.ndarray, dsorted: np.ndarray, names: Sequence[str], n: int, ordered: bool
) -> Labels:
    """Nearest-N from a ranking: ``order[i]`` the anchors of image i closest first (at
    least N columns), ``dsorted[i]`` their distances (see ``distances.top_k``)."""
    a = len(names)
    if not 1 <= n <= a:
        raise ValueError(f"Nearest-{n} needs 1 <= N <= {a} (the number of anchors)")
    top = order[:, :n]
    if ordered:
        vocab, codes = _encode(top, a, names, SEP_ORDERED)
    else:
        # Sort the N anchors by name: encode name ranks, decode through the sorted names.
        by_name = sorted(range(a), key=lambda i: names[i])
        rank = np.empty(a, np.int64)
        rank[by_name] = np.arange(a)
        vocab, codes = _encode(
            np.sort(rank[top], axis=1), a, [names[i] for i in by_name], SEP_UNORDERED
        )
    return Labels(vocab, codes, top, dsorted[:, :n])


def cfa_ranked(order: np.ndarray, dsorted: np.ndarray, names: Sequence[str]) -> Labels:
    """CFA from a full ranking (all A columns: the last is the farthest)."""
    pick = order[:, [0, -1]]
    vocab, codes = _encode(pick, len(names), names, SEP_CFA)
    return Labels(vocab, codes, pick, dsorted[:, [0, -1]])


def nearest_labels(
    dist: np.ndarray, names: Sequence[str], n: int = 1, ordered: bool = True
) -> Labels:
    """Nearest-N: ``"a>b"`` (ordered, closest first) or ``"a+b"`` (names sorted)."""
    return nearest_ranked(*rank_anchors(dist), names, n, ordered)


def cfa_labels(dist: np.ndarray, names: Sequence[str]) -> Labels:
    """Closest and farthest anchor: ``"closest|farthest"``."""
    return cfa_ranked(*rank_anchors(dist), names)


# ------------------------------------------------------------------------ key hashing

_M64 = (1 << 64) - 1


def _splitmix(h: np.ndarray) -> np.ndarray:
    h = h + np.uint64(0x9E3779B97F4A7C15)
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def key_hash(keys: pa.Array | pa.ChunkedArray | Sequence[str], seed: int = 0) -> np.ndarray:
    """A stable 64-bit hash per key (FNV-1a over UTF-8, splitmix64 finish), vectorized.
    The same (seed, key) gives the same value in every process, shard and run."""
    arr = (
        keys if isinstance(keys, pa.Array | pa.ChunkedArray) else pa.array(list(keys), pa.string())
    )
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.large_string())
    if arr.null_count:
        raise ValueError("null key")
    n = len(arr)
    offs = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + n + 1]
    buf = arr.buffers()[2]
    data = np.frombuffer(buf, np.uint8) if buf is not None else np.zeros(0, np.uint8)
    starts, lens = offs[:-1], np.diff(offs)
    seed_mix = _splitmix(np.array([seed & _M64], np.uint64))[0]
    h = np.full(n, np.uint64(0xCBF29CE484222325) ^ seed_mix, np.uint64)
    prime = np.uint64(0x100000001B3)
    with np.errstate(over="ignore"):
        for j in range(int(lens.max()) if n else 0):
            m = lens > j
            h[m] = (h[m] ^ data[starts[m] + j].astype(np.uint64)) * prime
        return _splitmix(h)


def random_labels(keys: pa.Array | Sequence[str], n_labels: int, seed: int = 0) -> Labels:
    """Baseline: ``r0000`` ... ``r{n_labels-1}``, uniformly from a hash of (seed, key)."""
    if n_labels < 1:
        raise ValueError("n_labels must be >= 1")
    width = max(4, len(str(n_labels - 1)))
    h = (key_hash(keys, seed) % np.uint64(n_labels)).astype(np.int64)
    uniq, inv = np.unique(h, return_inverse=True)
    vocab = [f"r{u:0{width}d}" for u in uniq.tolist()]
    n = len(h)
    return Labels(vocab, inv.reshape(-1), np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32))


def vanilla_labels(keys: pa.Array | Sequence[str], truth: Mapping[str, str]) -> Labels:
    """Baseline: the true label of each key; a key without one is a KeyError."""
    ks = keys.to_pylist() if isinstance(keys, pa.Array | pa.ChunkedArray) else list(keys)
    missing = [k for k in ks if truth.get(k) is None]
    if missing:
        raise KeyError(f"{len(missing)} key(s) without a true label, e.g. {missing[0]!r}")
    vocab = sorted({truth[k] for k in ks})
    pos = {v: i for i, v in enumerate(vocab)}
    codes = np.array([pos[truth[k]] for k in ks], np.int64)
    n = len(ks)
    return Labels(vocab, codes, np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32))


# ---------------------------------------------------------------------------- uniform


def uniform_depth(a: int) -> int:
    """Length of the sequences Uniform counts: Nearest-3, or all anchors when fewer."""
    return min(UNIFORM_DEPTH, a)


def sequence_counts(dist: np.ndarray, names: Sequence[str]) -> dict[str, int]:
    """Counting pass of Uniform for one batch: images per Nearest-3 ordered sequence."""
    return sequence_counts_ranked(rank_anchors(dist)[0], names)


def sequence_counts_ranked(order: np.ndarray, names: Sequence[str]) -> dict[str, int]:
    """:func:`sequence_counts` from a ranking of at least :func:`uniform_depth` columns."""
    lab = nearest_ranked(order, order, names, uniform_depth(len(names)), True)
    counts = np.bincount(lab.codes, minlength=len(lab.vocab))
    return {v: int(c) for v, c in zip(lab.vocab, counts.tolist(), strict=True) if c}


def merge_counts(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Merge map-side histograms (associative)."""
    total: Counter[str] = Counter()
    for p in parts:
        total.update(p)
    return dict(sorted(total.items()))


@dataclass(frozen=True)
class UniformRule:
    """The frozen Uniform rule: ``parts[bucket]`` for every bucket (see :func:`uniform_rule`)."""

    target: float
    parts: Mapping[str, int]
    counts: Mapping[str, int]

    def bucket_of(self, seq: Sequence[str]) -> str:
        """The longest prefix of a Nearest-3 sequence that is a bucket (else its Nearest-1)."""
        for j in range(len(seq), 1, -1):
            b = SEP_ORDERED.join(seq[:j])
            if b in self.parts:
                return b
        return seq[0]


def uniform_rule(counts: Mapping[str, int], n_labels: int) -> UniformRule:
    """Freeze the Uniform rule from global Nearest-3 counts, for about ``n_labels`` labels.

    Target size ``T = total / n_labels``. Bottom-up over the sequence tree: a Nearest-3
    sequence with at least ``T`` images is its own bucket; the smaller ones are pooled
    into their Nearest-2 prefix; a pooled prefix with at least ``T`` images is a bucket,
    smaller ones are pooled into their Nearest-1 anchor, which is always a bucket
    (however small). Then every bucket of ``c`` images is split into
    ``max(1, floor(c / T + 1/2))`` parts by a hash of (seed, image key), labels
    ``"bucket#i"``. Part sizes land in about ``[0.75 T, 1.5 T)``; only Nearest-1
    leftovers can be smaller. Measured on random 16-anchor data: label count within 3%
    of ``n_labels``, coefficient of variation of sizes 0.1. At labeling time an image
    goes to the longest prefix of its sequence that is a bucket, so sequences unseen
    when counting still get a label.
    """
    if n_labels < 1:
        raise ValueError("n_labels must be >= 1")
    total = sum(counts.values())
    if total == 0:
        raise ValueError("no images counted")
    target = total / n_labels
    buckets: dict[str, int] = {}
    pending = {tuple(k.split(SEP_ORDERED)): int(c) for k, c in counts.items() if c}
    depth = max(len(k) for k in pending)
    for level in range(depth, 1, -1):
        pooled: Counter[tuple[str, ...]] = Counter()
        for seq, c in pending.items():
            if len(seq) == level and c >= target:
                buckets[SEP_ORDERED.join(seq)] = c
            else:
                pooled[seq[: level - 1]] += c
        pending = dict(pooled)
    for seq, c in pending.items():
        buckets[SEP_ORDERED.join(seq)] = c
    parts = {b: max(1, math.floor(c / target + 0.5)) for b, c in sorted(buckets.items())}
    return UniformRule(target, parts, dict(sorted(buckets.items())))


def write_uniform_rule(
    counts: Mapping[str, int], n_labels: int, url: str, lineage: Mapping[str, Any] | None = None
) -> UniformRule:
    """Freeze the rule and write it (UNIFORM_RULE Parquet; target in the lineage)."""
    rule = uniform_rule(counts, n_labels)
    t = pa.Table.from_pydict(
        {
            "bucket": list(rule.parts),
            "count": [rule.counts[b] for b in rule.parts],
            "parts": list(rule.parts.values()),
        },
        schema=tables.UNIFORM_RULE,
    )
    extra = {"stage": "uniform_rule", "target": rule.target, "n_labels": n_labels}
    tables.write_parquet(t, url, {**tables.lineage(), **(lineage or {}), **extra})
    return rule


def read_uniform_rule(url: str) -> UniformRule:
    t = tables.read_parquet(url)
    b, c, p = (t.column(x).to_pylist() for x in ("bucket", "count", "parts"))
    return UniformRule(
        float(tables.read_lineage(url)["target"]),
        dict(zip(b, p, strict=True)),
        dict(zip(b, c, strict=True)),
    )


def uniform_ranked(
    order: np.ndarray,
    dsorted: np.ndarray,
    names: Sequence[str],
    keys: pa.Array | Sequence[str],
    rule: UniformRule,
    seed: int,
) -> Labels:
    """:func:`uniform_labels` from a ranking of at least :func:`uniform_depth` columns."""
    seq = nearest_ranked(order, dsorted, names, uniform_depth(len(names)), True)
    buckets = [rule.bucket_of(v.split(SEP_ORDERED)) for v in seq.vocab]
    bnames = sorted(set(buckets))
    bpos = {b: i for i, b in enumerate(bnames)}
    bucket = np.array([bpos[b] for b in buckets], np.int64)[seq.codes]
    parts = np.array([rule.parts.get(b, 1) for b in bnames], np.int64)[bucket]
    part = np.zeros(len(bucket), np.int64)
    split = np.flatnonzero(parts > 1)
    if split.size:
        karr = keys if isinstance(keys, pa.Array | pa.ChunkedArray) else pa.array(list(keys))
        h = key_hash(karr.take(pa.array(split)), seed)
        part[split] = (h % parts[split].astype(np.uint64)).astype(np.int64)
    width = int(parts.max()) if len(parts) else 1
    uniq, inv = np.unique(bucket * width + part, return_inverse=True)
    vocab = []
    for u in uniq.tolist():
        b, p = divmod(u, width)
        name = bnames[b]
        vocab.append(f"{name}{SEP_PART}{p}" if rule.parts.get(name, 1) > 1 else name)
    return Labels(vocab, inv.reshape(-1), seq.anchors, seq.distances)


def uniform_labels(
    dist: np.ndarray,
    names: Sequence[str],
    keys: pa.Array | Sequence[str],
    rule: UniformRule,
    seed: int = 0,
) -> Labels:
    """Uniform: each image's bucket under the frozen ``rule``, split by key hash."""
    return uniform_ranked(*rank_anchors(dist), names, keys, rule, seed)


def label_stats(counts: Mapping[str, int]) -> dict[str, float]:
    """Distinct labels, images, and the mean and (population) std of images per label."""
    c = np.array(list(counts.values()), np.float64)
    if not c.size:
        return {"labels": 0, "images": 0, "mean": math.nan, "std": math.nan}
    return {
        "labels": int(c.size),
        "images": int(c.sum()),
        "mean": float(c.mean()),
        "std": float(c.std()),
    }
