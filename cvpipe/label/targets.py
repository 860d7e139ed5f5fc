"""Word targets: per sample, a normalized multi-hot target over the vocabulary.

Joulin et al. 2016: with ``y_nk`` the normalized target of sample ``n`` over ``K`` words
(``1/k`` on each of its ``k`` distinct in-vocabulary words, 0 elsewhere, so a row sums
to 1), the loss is ``l = -1/N sum_n sum_k y_nk log softmax(W f(x_n))_k``
(:func:`cvpipe.learn.weak.soft_target_loss`).

:class:`TargetsStage` has one unit per shard: it reads every sample's caption and
hashtags (the vocabulary's own tokenizer, synonyms included) and publishes the shard's
rejects, then its targets (tables.WORD_TARGETS: key, shard, word indices, weight).
Samples with no in-vocabulary word get no row: they are counted in the stage summary
(``without_words``) and skipped, never an error.

Resampling (a documented switch, ``resample="sqrt"``; Mahajan et al. 2018): a sample's
weight is the mean of ``1/sqrt(count_k)`` over its words. An epoch then draws each
sample about ``weight x scale`` times (:func:`resample_scale` keeps the epoch's size),
so a word held by single-word samples is seen about ``sqrt(count)`` times instead of
``count``: frequent words are damped, rare ones repeated. With ``none`` every weight is
1.0.
"""

from __future__ import annotations

import math
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
from cvpipe.core.storage import expand_specs, is_committed, join
from cvpipe.data.shards import Sample, iter_shard, shard_id
from cvpipe.label.config import TargetsConfig
from cvpipe.label.text import Tokens, sample_text
from cvpipe.label.vocab import Vocabulary, read_vocab

STAGE = "targets"


def word_lists(tokens: Tokens, vocab: Vocabulary) -> list[list[int]]:
    """Per text, its distinct in-vocabulary word indices, ascending."""
    found = pc.index_in(tokens.words, value_set=vocab.array).fill_null(-1)
    to_index = found.to_numpy(zero_copy_only=False).astype(np.int64)
    out: list[list[int]] = [[] for _ in range(tokens.texts)]
    if not len(tokens.ids):
        return out
    idx = to_index[tokens.ids]
    keep = idx >= 0
    pairs = np.unique(tokens.owner[keep] * len(vocab) + idx[keep])  # sorted, distinct
    for owner, word in zip((pairs // len(vocab)).tolist(), (pairs % len(vocab)).tolist(),
                           strict=True):  # fmt: skip
        out[owner].append(word)
    return out


def dense_targets(lists: Sequence[Sequence[int]], num_words: int) -> np.ndarray:
    """The ``N x K`` matrix ``y`` of :func:`word_lists`: ``1/k`` on each of a row's k
    words (an empty list gives a zero row)."""
    y = np.zeros((len(lists), num_words), np.float32)
    for n, words in enumerate(lists):
        if words:
            y[n, list(words)] = 1.0 / len(words)
    return y


def sample_weight(words: Sequence[int], counts: Sequence[int], resample: str) -> float:
    if resample == "none" or not words:
        return 1.0
    return float(np.mean([1.0 / math.sqrt(max(counts[k], 1)) for k in words]))


def resample_scale(samples: int, weight_sum: float) -> float:
    """The factor that turns weights into expected draws per epoch, keeping the epoch
    at ``samples`` draws."""
    return samples / weight_sum if weight_sum > 0 else 1.0


def targets_url(out: str, sid: str) -> str:
    return join(out, f"{sid}.parquet")


def read_targets(url: str) -> dict[str, tuple[list[int], float]]:
    """One shard's targets: key -> (word indices, weight)."""
    t = tables.read_parquet(url, columns=["key", "words", "weight"])
    return {
        k: (w, float(x))
        for k, w, x in zip(
            t.column("key").to_pylist(),
            t.column("words").to_pylist(),
            t.column("weight").to_pylist(),
            strict=True,
        )
    }


@dataclass
class TargetStats:
    shard: str
    samples: int = 0
    with_words: int = 0
    weight_sum: float = 0.0
    rejects: Counter = field(default_factory=Counter)
    skipped: bool = False

    @property
    def without_words(self) -> int:
        return self.samples - self.with_words


class TargetsStage(Stage[TargetsConfig, TargetStats]):
    """One unit per shard: its samples' word targets over the vocabulary."""

    name = "targets"
    resources = Resources(cpus=1)

    def __init__(self, config: TargetsConfig) -> None:
        super().__init__(config)
        self._vocab: Vocabulary | None = None
        self._vocab_id: str | None = None

    def vocab(self) -> Vocabulary:
        if self._vocab is None:
            self._vocab = read_vocab(self.config.vocab)
        return self._vocab

    def vocab_id(self) -> str:
        """The vocabulary's identity: its words and synonyms, not its file's path."""
        if self._vocab_id is None:
            v = self.vocab()
            self._vocab_id = identity_hash({"words": v.words, "synonyms": v.synonyms})
        return self._vocab_id

    def identity(self) -> dict[str, Any]:
        return {"stage": self.name, "version": self.version, "vocab": self.vocab_id(),
                "resample": self.config.resample}  # fmt: skip

    def setup(self) -> None:
        self.tokenizer = self.vocab().tokenizer()

    def units(self) -> list[Unit]:
        return [Unit(shard_id(u), (u,)) for u in expand_specs(self.config.shards, ".tar")]

    def _urls(self, unit: Unit) -> tuple[str, str]:
        sid = shard_id(unit.inputs[0])
        return join(self.config.out, "rejects", f"{sid}.parquet"), targets_url(self.config.out, sid)

    def outputs(self, unit: Unit) -> list[str]:
        return list(self._urls(unit))

    def committed(self, unit: Unit) -> bool:
        rejects, targets = self._urls(unit)
        if not (is_committed(rejects) and is_committed(targets)):
            return False
        return tables.read_lineage(targets).get("targets_id") == self.identity_hash()

    def process(self, unit: Unit) -> TargetStats:
        url = unit.inputs[0]
        sid = shard_id(url)
        vocab = self.vocab()
        keys, texts, rejects = [], [], []
        for item in iter_shard(url, stage=STAGE, decode=False):
            if isinstance(item, Sample):
                keys.append(item.key)
                texts.append(sample_text(item.meta))
            else:
                rejects.append(item.row())
        lists = word_lists(self.tokenizer.tokenize(texts), vocab)
        rows = [
            {"key": k, "shard": sid, "words": ws,
             "weight": sample_weight(ws, vocab.counts, self.config.resample)}
            for k, ws in zip(keys, lists, strict=True)
            if ws
        ]  # fmt: skip
        stats = TargetStats(
            sid, len(keys), len(rows), float(sum(r["weight"] for r in rows)),
            Counter(r["reason"] for r in rejects),
        )  # fmt: skip
        lin = tables.lineage(
            None, stage=STAGE, source=url, vocab=self.config.vocab, targets_id=self.identity_hash(),
            resample=self.config.resample, samples=stats.samples, with_words=stats.with_words,
            weight_sum=stats.weight_sum,
        )  # fmt: skip
        rejects_url, out_url = self._urls(unit)
        tables.write_parquet(tables.from_rows(rejects, tables.REJECTS), rejects_url, lin)
        tables.write_parquet(pa.Table.from_pylist(rows, tables.WORD_TARGETS), out_url, lin)
        return stats

    def read_back(self, unit: Unit) -> TargetStats:
        rejects_url, out_url = self._urls(unit)
        lin = tables.read_lineage(out_url)
        reasons = tables.read_parquet(rejects_url, columns=["reason"]).column("reason")
        return TargetStats(
            shard_id(unit.inputs[0]), int(lin["samples"]), int(lin["with_words"]),
            float(lin["weight_sum"]), Counter(reasons.to_pylist()), skipped=True,
        )  # fmt: skip

    def describe(self, stats: TargetStats) -> str:
        return f"{stats.shard}: {stats.with_words}/{stats.samples} samples with words"

    def summarize(self, stats: Sequence[TargetStats]) -> dict[str, Any]:
        reasons: Counter = Counter()
        for s in stats:
            reasons.update(s.rejects)
        with_words = sum(s.with_words for s in stats)
        weight_sum = sum(s.weight_sum for s in stats)
        return {
            "shards": len(stats),
            "shards_skipped": sum(s.skipped for s in stats),
            "samples": sum(s.samples for s in stats),
            "with_words": with_words,
            "without_words": sum(s.without_words for s in stats),
            "rejected": sum(reasons.values()),
            "rejects_by_reason": dict(sorted(reasons.items())),
            "resample": self.config.resample,
            "resample_scale": resample_scale(with_words, weight_sum),
        }


def build_targets(config: TargetsConfig) -> dict[str, Any]:
    """Every shard's targets in this process (no orchestrator)."""
    stage = TargetsStage(config)
    return stage.summarize(run_stage(stage))
