"""The vocabulary of captions and hashtags: counted per shard, merged as a tree.

Three stages (the flow runs them in order, a merge level at a time):

- :class:`VocabCountStage`, one unit per shard: the words of every sample's caption and
  hashtags (:mod:`cvpipe.label.text`) counted into a partial (tables.VOCAB_COUNTS:
  word, occurrences, samples holding it; sorted by word), plus the shard's rejects;
- :class:`VocabMergeStage`: partials merged ``fan_in`` at a time, level by level, into
  one root partial. A merge sums counts per word, so merging in any order or grouping
  gives the same root as counting everything in one pass;
- :class:`VocabFinalizeStage`, one unit: the ``size`` most frequent words of the root
  with ``count >= min_count``, ties broken by the word (ascending), indexed 0..V-1,
  published as tables.VOCAB with the tokenizer's synonyms in its lineage.

Bounded memory. A partial keeps at most ``partial_cap`` words: when a shard or a merge
holds more distinct words, only the ``partial_cap`` most frequent stay and the largest
count cut is remembered. A word's reported count is then a lower bound and exceeds its
true count by at most the vocabulary's ``error_bound`` (the sum of those cut counts over
every cut partial of the tree); a word cut everywhere has a true count <= error_bound.
With ``error_bound == 0`` (no cut: the usual case, the default cap being 2^20 words)
the vocabulary is exact. Otherwise the lineage says whether the chosen word *set* is
still certain (``set_exact``: the V-th count exceeds the next word's count plus the
bound). Memory per unit: one shard's distinct words, or ``fan_in x partial_cap`` words
in a merge (about 40 bytes each in Arrow); never the corpus.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cvpipe.core import tables
from cvpipe.core.config import identity_hash
from cvpipe.core.stage import Resources, Stage, Unit, run_stage
from cvpipe.core.storage import expand_specs, is_committed, join, read_bytes
from cvpipe.data.shards import Sample, iter_shard, shard_id, unit_url
from cvpipe.label.config import VocabConfig
from cvpipe.label.text import Tokenizer, load_synonyms, sample_text

STAGE = "vocab"


# --------------------------------------------------------------------------- partials


@dataclass
class Partial:
    """Word counts (tables.VOCAB_COUNTS, sorted by word) and what they cover."""

    table: pa.Table
    samples: int = 0  # samples read (rejects not included)
    with_words: int = 0  # samples with at least one word
    error_bound: int = 0  # counts may be short by at most this (see the module docstring)
    shards: int = 0

    def lineage_fields(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "with_words": self.with_words,
            "error_bound": self.error_bound,
            "shards": self.shards,
        }


def _by_word(table: pa.Table) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=[("word", "ascending")]))


def _by_rank(table: pa.Table) -> pa.Table:
    """Most frequent first, ties by word: the vocabulary's order."""
    keys = [("count", "descending"), ("word", "ascending")]
    return table.take(pc.sort_indices(table, sort_keys=keys))


def cut(table: pa.Table, cap: int) -> tuple[pa.Table, int]:
    """At most ``cap`` words (the most frequent, ties by word), sorted by word, and the
    largest count cut (0 when nothing was)."""
    if table.num_rows <= cap:
        return table, 0
    ranked = _by_rank(table)
    dropped = int(ranked.column("count")[cap].as_py())
    return _by_word(ranked.slice(0, cap)), dropped


def count_texts(texts: Sequence[str | None], tokenizer: Tokenizer, cap: int) -> Partial:
    """The partial of a batch of texts (one per sample)."""
    tokens = tokenizer.tokenize(texts)
    count, images = tokens.counts()
    table = pa.table(
        {"word": tokens.words, "count": count, "images": images},
        schema=tables.VOCAB_COUNTS,
    )
    table, dropped = cut(_by_word(table), cap)
    with_words = int(np.unique(tokens.owner).size)
    return Partial(table, len(texts), with_words, dropped, 1)


def merge(parts: Sequence[Partial], cap: int) -> Partial:
    """Sum the counts of ``parts`` per word (associative and commutative), then cut."""
    parts = list(parts)
    if not parts:
        return Partial(tables.VOCAB_COUNTS.empty_table())
    joined = pa.concat_tables([p.table for p in parts])
    summed = joined.group_by("word").aggregate([("count", "sum"), ("images", "sum")])
    summed = summed.rename_columns(["word", "count", "images"]).cast(tables.VOCAB_COUNTS)
    table, dropped = cut(_by_word(summed), cap)
    return Partial(
        table,
        samples=sum(p.samples for p in parts),
        with_words=sum(p.with_words for p in parts),
        error_bound=sum(p.error_bound for p in parts) + dropped,
        shards=sum(p.shards for p in parts),
    )


def write_partial(p: Partial, url: str, **lineage: Any) -> None:
    tables.write_parquet(p.table, url, tables.lineage(None, **p.lineage_fields(), **lineage))


def read_partial(url: str) -> Partial:
    lin = tables.read_lineage(url)
    return Partial(
        tables.read_parquet(url).cast(tables.VOCAB_COUNTS),
        samples=int(lin.get("samples", 0)),
        with_words=int(lin.get("with_words", 0)),
        error_bound=int(lin.get("error_bound", 0)),
        shards=int(lin.get("shards", 0)),
    )


def finalize(root: Partial, size: int, min_count: int) -> tuple[pa.Table, dict[str, Any]]:
    """The vocabulary table and facts about it (exactness, coverage)."""
    table = root.table.filter(pc.greater_equal(root.table.column("count"), min_count))
    ranked = _by_rank(table)
    vocab = ranked.slice(0, size)
    vocab = vocab.append_column("index", pa.array(range(vocab.num_rows), pa.int32()))
    counts = ranked.column("count").to_pylist()
    nxt = counts[size] if len(counts) > size else 0
    last = counts[vocab.num_rows - 1] if vocab.num_rows else 0
    facts = {
        "words": vocab.num_rows,
        "distinct_words": root.table.num_rows,
        "error_bound": root.error_bound,
        "exact": root.error_bound == 0,
        "set_exact": root.error_bound == 0 or last > nxt + root.error_bound,
        "samples": root.samples,
        "with_words": root.with_words,
        "shards": root.shards,
        "occurrences_in_vocab": int(pc.sum(vocab.column("count")).as_py() or 0),
        "occurrences": int(pc.sum(root.table.column("count")).as_py() or 0),
    }
    return vocab.cast(tables.VOCAB), facts


# --------------------------------------------------------------------------- reading


@dataclass
class Vocabulary:
    """A published vocabulary: words in index order, their counts, and the tokenizer
    that made it (same synonyms), so every later stage reads text the same way."""

    words: list[str]
    counts: list[int]
    synonyms: dict[str, str] = field(default_factory=dict)
    url: str = ""

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.words)}
        self.array = pa.array(self.words, pa.string())

    def __len__(self) -> int:
        return len(self.words)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.synonyms)


def read_vocab(url: str) -> Vocabulary:
    if not is_committed(url):
        raise FileNotFoundError(f"vocabulary {url} does not exist")
    table = tables.read_parquet(url)
    missing = set(tables.VOCAB.names) - set(table.column_names)
    if missing:
        raise ValueError(f"{url} is not a vocabulary (missing columns {sorted(missing)})")
    table = table.take(pc.sort_indices(table, sort_keys=[("index", "ascending")]))
    if table.column("index").to_pylist() != list(range(table.num_rows)):
        raise ValueError(f"vocabulary {url}: indices are not 0..{table.num_rows - 1}")
    lin = tables.read_lineage(url)
    return Vocabulary(
        table.column("word").to_pylist(),
        table.column("count").to_pylist(),
        dict(lin.get("synonyms") or {}),
        url,
    )


# --------------------------------------------------------------------------- stages


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def work_root(config: VocabConfig) -> str:
    if config.work:
        return config.work
    out = config.out
    return (out[: -len(".parquet")] if out.endswith(".parquet") else out) + ".parts"


@dataclass
class CountStats:
    shard: str
    samples: int = 0
    with_words: int = 0
    words: int = 0  # distinct words kept in the partial
    rejects: Counter = field(default_factory=Counter)
    skipped: bool = False


class _VocabStage(Stage[VocabConfig, Any]):
    """What the three vocabulary stages share: the shard list, the synonyms and where
    the partials live (named by the counting identity, so a rerun with another
    ``size`` or ``min_count`` reuses them and another tokenizer never does)."""

    resources = Resources(cpus=1)

    def __init__(self, config: VocabConfig) -> None:
        super().__init__(config)
        self._shards: list[str] | None = None
        self._synonyms: tuple[dict[str, str], str] | None = None

    def shards(self) -> list[str]:
        if self._shards is None:
            urls = expand_specs(self.config.shards, ".tar")
            ids = Counter(shard_id(u) for u in urls)
            dup = [i for i, n in ids.items() if n > 1]
            if dup:
                raise ValueError(
                    f"{len(dup)} shard id(s) appear twice among the inputs (e.g. {dup[0]}): "
                    "count each root's shards into its own vocabulary work folder"
                )
            self._shards = urls
        return self._shards

    def synonyms(self) -> tuple[dict[str, str], str]:
        """The synonym map and a digest of the file's bytes."""
        if self._synonyms is None:
            path = self.config.synonyms
            self._synonyms = (load_synonyms(path), _digest(read_bytes(path))) if path else ({}, "")
        return self._synonyms

    def identity(self) -> dict[str, Any]:
        # The synonym file's bytes, not only its path, decide the words.
        return {**super().identity(), "synonyms_sha": self.synonyms()[1]}

    def count_identity(self) -> dict[str, Any]:
        return {
            "stage": "vocab-count",
            "version": VocabCountStage.version,
            "synonyms": self.synonyms()[1],
            "partial_cap": self.config.partial_cap,
        }

    def parts_root(self) -> str:
        return join(work_root(self.config), f"counts-{identity_hash(self.count_identity())}")

    def leaf_url(self, shard_url: str) -> str:
        return unit_url(self.parts_root(), "shards", shard_id(shard_url))

    def merge_levels(self) -> list[list[Unit]]:
        """The merge tree: level by level, groups of ``fan_in`` partials in shard order,
        each merge named by its inputs (a rerun reuses committed merges)."""
        level_urls = [self.leaf_url(u) for u in self.shards()]
        levels: list[list[Unit]] = []
        while len(level_urls) > 1:
            units = []
            for i in range(0, len(level_urls), self.config.fan_in):
                group = tuple(level_urls[i : i + self.config.fan_in])
                digest = _digest("\n".join(group).encode())
                out = join(self.parts_root(), f"merge-{len(levels)}", f"{digest}.parquet")
                name = f"merge {len(levels)}/{i // self.config.fan_in}"
                units.append(Unit(name, group, index=len(levels), extra=(("out", out),)))
            levels.append(units)
            level_urls = [u.get("out") for u in units]
        return levels

    def root_url(self) -> str:
        levels = self.merge_levels()
        if levels:
            return levels[-1][0].get("out")
        shards = self.shards()
        if not shards:
            raise ValueError("no shards to count")
        return self.leaf_url(shards[0])


class VocabCountStage(_VocabStage):
    """One unit per shard: its words counted into a partial (plus its rejects)."""

    name = "vocab-count"

    def identity(self) -> dict[str, Any]:
        return self.count_identity()

    def setup(self) -> None:
        self.tokenizer = Tokenizer(self.synonyms()[0])

    def units(self) -> list[Unit]:
        return [Unit(shard_id(u), (u,)) for u in self.shards()]

    def _rejects_url(self, unit: Unit) -> str:
        return unit_url(self.parts_root(), "rejects", shard_id(unit.inputs[0]))

    def outputs(self, unit: Unit) -> list[str]:
        return [self._rejects_url(unit), self.leaf_url(unit.inputs[0])]

    def process(self, unit: Unit) -> CountStats:
        url = unit.inputs[0]
        sid = shard_id(url)
        texts: list[str] = []
        rejects: list[dict[str, str]] = []
        for item in iter_shard(url, stage=STAGE, decode=False):
            if isinstance(item, Sample):
                texts.append(sample_text(item.meta))
            else:
                rejects.append(item.row())
        partial = count_texts(texts, self.tokenizer, self.config.partial_cap)
        lin = tables.lineage(None, stage=STAGE, source=url, counting=self.count_identity())
        tables.write_parquet(
            tables.from_rows(rejects, tables.REJECTS), self._rejects_url(unit), lin
        )
        write_partial(partial, self.leaf_url(url), stage=STAGE, source=url,
                      counting=self.count_identity())  # fmt: skip
        return CountStats(
            sid, partial.samples, partial.with_words, partial.table.num_rows,
            Counter(r["reason"] for r in rejects),
        )  # fmt: skip

    def read_back(self, unit: Unit) -> CountStats:
        p = read_partial(self.leaf_url(unit.inputs[0]))
        reasons = tables.read_parquet(self._rejects_url(unit), columns=["reason"])
        return CountStats(
            shard_id(unit.inputs[0]), p.samples, p.with_words, p.table.num_rows,
            Counter(reasons.column("reason").to_pylist()), skipped=True,
        )  # fmt: skip

    def describe(self, stats: CountStats) -> str:
        state = "already counted" if stats.skipped else "counted"
        return f"{stats.shard} {state}: {stats.samples} samples, {stats.words} words"

    def summarize(self, stats: Sequence[CountStats]) -> dict[str, Any]:
        reasons: Counter = Counter()
        for s in stats:
            reasons.update(s.rejects)
        samples = sum(s.samples for s in stats)
        with_words = sum(s.with_words for s in stats)
        return {
            "shards": len(stats),
            "shards_skipped": sum(s.skipped for s in stats),
            "samples": samples,
            "samples_with_words": with_words,
            "samples_without_words": samples - with_words,
            "rejected": sum(reasons.values()),
            "rejects_by_reason": dict(sorted(reasons.items())),
        }


class VocabMergeStage(_VocabStage):
    """Partials merged ``fan_in`` at a time; :meth:`units` lists every level, and the
    flow runs one level (``unit.index``) after another."""

    name = "vocab-merge"

    def identity(self) -> dict[str, Any]:
        return {**self.count_identity(), "stage": self.name}

    def units(self) -> list[Unit]:
        return [u for level in self.merge_levels() for u in level]

    def outputs(self, unit: Unit) -> list[str]:
        return [unit.get("out")]

    def process(self, unit: Unit) -> str:
        merged = merge([read_partial(u) for u in unit.inputs], self.config.partial_cap)
        write_partial(merged, unit.get("out"), stage=self.name, inputs=len(unit.inputs))
        return unit.get("out")

    def read_back(self, unit: Unit) -> str:
        return unit.get("out")


class VocabFinalizeStage(_VocabStage):
    """One unit: the vocabulary table from the root partial."""

    name = "vocab-finalize"

    def units(self) -> list[Unit]:
        return [Unit("finalize", (self.root_url(),))]

    def outputs(self, unit: Unit) -> list[str]:
        return [self.config.out]

    def committed(self, unit: Unit) -> bool:
        # The output is the user's named file: it counts only if this config made it
        # from the same root partial (the root is named by the shards it covers).
        if not is_committed(self.config.out):
            return False
        lin = tables.read_lineage(self.config.out)
        return lin.get("config_hash") == self.identity_hash() and lin.get("root") == unit.inputs[0]

    def process(self, unit: Unit) -> dict[str, Any]:
        c = self.config
        vocab, facts = finalize(read_partial(unit.inputs[0]), c.size, c.min_count)
        lin = tables.lineage(
            None, stage=STAGE, size=c.size, min_count=c.min_count,
            synonyms=self.synonyms()[0], synonyms_file=c.synonyms, root=unit.inputs[0], **facts,
        )  # fmt: skip
        lin["config_hash"] = self.identity_hash()
        tables.write_parquet(vocab, c.out, lin)
        return {**facts, "skipped": False}

    def read_back(self, unit: Unit) -> dict[str, Any]:
        lin = tables.read_lineage(self.config.out)
        keys = ("words", "distinct_words", "error_bound", "exact", "set_exact", "samples",
                "with_words", "shards", "occurrences_in_vocab", "occurrences")  # fmt: skip
        return {**{k: lin.get(k) for k in keys}, "skipped": True}


def build_vocab(config: VocabConfig) -> dict[str, Any]:
    """The whole vocabulary in this process (no orchestrator): count, merge, finalize.
    Returns the finalize facts plus the counting summary."""
    counting = VocabCountStage(config)
    summary = counting.summarize(run_stage(counting))
    merging = VocabMergeStage(config)
    for level in merging.merge_levels():
        run_stage(merging, level)
    facts = run_stage(VocabFinalizeStage(config))[0]
    return {**summary, **facts}


def vocab_markdown(url: str, top: int = 20) -> str:
    """The head of a vocabulary as a markdown table, with its facts."""
    table = tables.read_parquet(url).slice(0, top).to_pylist()
    lin = tables.read_lineage(url)
    exactness = (
        "exact" if lin.get("exact") else "word set exact" if lin.get("set_exact") else "approximate"
    )
    lines = [
        f"Vocabulary: {lin.get('words')} words of {lin.get('distinct_words')} distinct "
        f"(min count {lin.get('min_count')}); error bound {lin.get('error_bound')} ({exactness}).",
        "",
        "| index | word | count | images |",
        "|---:|---|---:|---:|",
    ]
    lines += [f"| {r['index']} | {r['word']} | {r['count']} | {r['images']} |" for r in table]
    return "\n".join(lines) + "\n"
