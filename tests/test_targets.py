"""Word targets: rows sum to 1, samples without a vocabulary word are counted and
skipped, sqrt resampling weights, and the stage skips committed work."""

import math
import os

import numpy as np
import pytest
from weakdata import write_captioned_shard

from cvpipe.core import tables
from cvpipe.label.config import TargetsConfig, VocabConfig
from cvpipe.label.targets import (
    build_targets,
    dense_targets,
    read_targets,
    resample_scale,
    sample_weight,
    word_lists,
)
from cvpipe.label.text import Tokenizer
from cvpipe.label.vocab import Vocabulary, build_vocab, read_vocab

METAS = [
    {"caption": "A cat and a dog", "hashtags": ["#Cat"]},  # cat twice: one target
    {"caption": "the of"},  # only stop words
    {"caption": "dog"},
    {},  # no text at all
    {"caption": "zebra https://x.org"},  # a word outside the vocabulary
    {"caption": "cat dog bird", "hashtags": ["#Bird"]},
]


def test_word_lists_are_distinct_sorted_and_in_vocabulary():
    vocab = Vocabulary(["dog", "cat", "bird"], [5, 4, 1])
    texts = ["A cat and a dog #Cat", "", "zebra", "bird cat bird"]
    assert word_lists(Tokenizer().tokenize(texts), vocab) == [[0, 1], [], [], [1, 2]]


def test_targets_are_normalized_multi_hot():
    y = dense_targets([[0, 1], [2], [], [0, 1, 3]], 4)
    assert y.shape == (4, 4)
    np.testing.assert_allclose(y.sum(axis=1), [1, 1, 0, 1], rtol=1e-6)
    np.testing.assert_allclose(y[3], [1 / 3, 1 / 3, 0, 1 / 3], rtol=1e-6)


def test_sqrt_weights_and_scale():
    counts = [100, 25, 4]
    assert sample_weight([0], counts, "none") == 1.0
    assert sample_weight([0], counts, "sqrt") == pytest.approx(0.1)
    assert sample_weight([1, 2], counts, "sqrt") == pytest.approx((0.2 + 0.5) / 2)
    # Single-word samples: word k is drawn count_k * weight * scale ~ sqrt(count_k) times.
    weights = [0.1] * 100 + [0.2] * 25 + [0.5] * 4
    scale = resample_scale(len(weights), sum(weights))
    draws = [sum(weights[:100]) * scale, sum(weights[100:125]) * scale, 2.0 * scale]
    ratios = [d / math.sqrt(c) for d, c in zip(draws, counts, strict=True)]
    assert max(ratios) == pytest.approx(min(ratios))


def test_targets_stage(tmp_path):
    url = str(tmp_path / "shards" / "p" / "t-000000.tar")
    keys = write_captioned_shard(url, METAS, "t")
    vocab_url = str(tmp_path / "vocab.parquet")
    build_vocab(VocabConfig(shards=url, out=vocab_url, size=3))
    assert read_vocab(vocab_url).words == ["cat", "dog", "bird"]
    out = str(tmp_path / "targets")
    cfg = TargetsConfig(shards=url, vocab=vocab_url, out=out)
    summary = build_targets(cfg)
    assert summary["samples"] == 6 and summary["with_words"] == 3
    assert summary["without_words"] == 3 and summary["rejected"] == 0
    got = read_targets(f"{out}/p/t-000000.parquet")
    assert got == {keys[0]: ([0, 1], 1.0), keys[2]: ([1], 1.0), keys[5]: ([0, 1, 2], 1.0)}
    lin = tables.read_lineage(f"{out}/p/t-000000.parquet")
    assert lin["vocab"] == vocab_url and lin["with_words"] == 3

    mtime = os.path.getmtime(f"{out}/p/t-000000.parquet")
    assert build_targets(cfg)["shards_skipped"] == 1
    assert os.path.getmtime(f"{out}/p/t-000000.parquet") == mtime

    # Another resampling (or vocabulary) rewrites the targets in place.
    summary = build_targets(cfg.model_copy(update={"resample": "sqrt"}))
    assert summary["shards_skipped"] == 0
    w = read_targets(f"{out}/p/t-000000.parquet")
    counts = dict(zip(read_vocab(vocab_url).words, read_vocab(vocab_url).counts, strict=True))
    assert w[keys[2]][1] == pytest.approx(1 / math.sqrt(counts["dog"]), rel=1e-6)
    total = sum(x for _, x in w.values())
    assert summary["resample_scale"] == pytest.approx(3 / total, rel=1e-5)


def test_missing_vocabulary_is_a_clear_error(tmp_path):
    url = str(tmp_path / "shards" / "p" / "t-000000.tar")
    write_captioned_shard(url, METAS, "t")
    cfg = TargetsConfig(shards=url, vocab=str(tmp_path / "nope.parquet"), out=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vocabulary"):
        build_targets(cfg)
