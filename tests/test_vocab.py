"""The vocabulary: per-shard partials merged in any order equal one pass, the cap's
error bound holds, ties break by word, and the stages skip committed work."""

import os
import random

import pyarrow.compute as pc
import pytest
from weakdata import bad_json, random_captions, write_captioned_shard, write_corpus

from cvpipe.core import tables
from cvpipe.data.shards import Sample, iter_shard
from cvpipe.label.config import VocabConfig
from cvpipe.label.text import Tokenizer, normalize, sample_text
from cvpipe.label.vocab import (
    VocabCountStage,
    build_vocab,
    count_texts,
    finalize,
    merge,
    read_vocab,
)

BIG = 1 << 20


def _texts(n, seed):
    return [sample_text(m) for m in random_captions(n, seed)]


def _as_dict(partial):
    t = partial.table.to_pylist()
    return {r["word"]: (r["count"], r["images"]) for r in t}


def test_any_order_merge_equals_one_pass():
    tok = Tokenizer()
    shards = [_texts(random.Random(s).randint(0, 60), s) for s in range(9)]
    one_pass = count_texts([t for s in shards for t in s], tok, BIG)
    leaves = [count_texts(s, tok, BIG) for s in shards]
    rng = random.Random(0)
    for _ in range(5):
        parts = leaves[:]
        while len(parts) > 1:  # random pairs or triples, in random order
            rng.shuffle(parts)
            k = rng.choice([2, 3])
            parts = [merge(parts[:k], BIG), *parts[k:]]
        root = parts[0]
        assert root.table.equals(one_pass.table)
        assert (root.samples, root.with_words, root.error_bound) == (
            one_pass.samples,
            one_pass.with_words,
            0,
        )
    assert root.table.column("word").to_pylist() == sorted(root.table.column("word").to_pylist())


def test_a_cut_partial_keeps_its_error_bound():
    tok = Tokenizer()
    shards = [_texts(80, s) for s in range(6)]
    truth = _as_dict(count_texts([t for s in shards for t in s], tok, BIG))
    ranked = sorted(truth, key=lambda w: (-truth[w][0], w))
    for cap in (25, 60):
        parts = [count_texts(s, tok, cap) for s in shards]
        root = merge([merge(parts[:3], cap), merge(parts[3:], cap)], cap)
        assert root.table.num_rows == cap and root.error_bound > 0
        got = _as_dict(root)
        for word, (count, _) in truth.items():
            reported = got.get(word, (0, 0))[0]
            assert reported <= count <= reported + root.error_bound, word
        certified = []
        for size in range(1, 11):
            vocab, facts = finalize(root, size, 1)
            assert not facts["exact"]
            certified.append(facts["set_exact"])
            if facts["set_exact"]:  # certified: the set is the true top-V
                assert vocab.column("word").to_pylist() == ranked[:size]
    # With cap 60 some sizes fall in a wide gap of counts (certified), others not.
    assert any(certified) and not all(certified)


def test_finalize_breaks_ties_by_word_and_applies_min_count():
    tok = Tokenizer()
    p = count_texts(["pear apple", "apple pear fig", "kiwi", "zebra zebra zebra"], tok, BIG)
    vocab, facts = finalize(p, 3, 1)
    assert vocab.to_pylist() == [
        {"word": "zebra", "count": 3, "images": 1, "index": 0},
        {"word": "apple", "count": 2, "images": 2, "index": 1},
        {"word": "pear", "count": 2, "images": 2, "index": 2},
    ]
    assert facts["exact"] and facts["words"] == 3 and facts["distinct_words"] == 5
    vocab, _ = finalize(p, 10, 2)
    assert vocab.column("word").to_pylist() == ["zebra", "apple", "pear"]


def test_vocab_stages_count_merge_finalize_and_skip_committed_work(tmp_path):
    root = str(tmp_path)
    urls = write_corpus(root, 5, 40)
    bad = f"{root}/shards/part/cap-000005.tar"
    write_captioned_shard(bad, random_captions(10, 99), "bad", extra=bad_json("bad-00003"))
    out = str(tmp_path / "vocab.parquet")
    cfg = VocabConfig(shards=f"{root}/shards", out=out, size=50, fan_in=2)
    summary = build_vocab(cfg)
    assert summary["shards"] == 6 and summary["samples"] == 209
    assert summary["rejected"] == 1 and summary["rejects_by_reason"] == {"bad_metadata": 1}
    assert summary["samples_with_words"] + summary["samples_without_words"] == 209
    assert summary["exact"] and not summary["skipped"]

    texts = []
    for u in [*urls, bad]:
        texts += [sample_text(s.meta) for s in iter_shard(u, decode=False) if isinstance(s, Sample)]
    want, _ = finalize(count_texts(texts, Tokenizer(), BIG), 50, 1)
    assert tables.read_parquet(out).to_pylist() == want.to_pylist()
    vocab = read_vocab(out)
    assert len(vocab) == 50 and vocab.words[0] == want.column("word")[0].as_py()

    files = {p: os.path.getmtime(p) for p in _files(root)}
    again = build_vocab(cfg)
    assert again["shards_skipped"] == 6 and again["skipped"]
    assert {p: os.path.getmtime(p) for p in _files(root)} == files  # nothing rewritten

    # Another size reuses the counts; only the vocabulary is rewritten.
    smaller = build_vocab(cfg.model_copy(update={"size": 7}))
    assert smaller["shards_skipped"] == 6 and not smaller["skipped"]
    assert read_vocab(out).words == vocab.words[:7]


def test_synonyms_change_the_counting_identity(tmp_path):
    root = str(tmp_path)
    write_corpus(root, 2, 30)
    syn = tmp_path / "syn.txt"
    syn.write_text("7, sept => seven\n")
    plain = VocabConfig(shards=f"{root}/shards", out=f"{root}/v.parquet", size=400)
    merged = plain.model_copy(update={"synonyms": str(syn)})
    assert VocabCountStage(plain).parts_root() != VocabCountStage(merged).parts_root()
    build_vocab(plain)
    without = dict(zip(*(read_vocab(plain.out).words, read_vocab(plain.out).counts), strict=True))
    build_vocab(merged)
    v = read_vocab(merged.out)
    with_syn = dict(zip(v.words, v.counts, strict=True))
    assert "sept" in without and "sept" not in with_syn and "7" not in with_syn
    assert with_syn["seven"] == without["seven"] + without["sept"] + _numerals(root)
    assert v.synonyms == {"7": "seven", "sept": "seven"}
    # Same path, other content: the file's bytes decide.
    before = VocabCountStage(merged).parts_root()
    syn.write_text("sept => seven\n")
    assert VocabCountStage(merged).parts_root() != before


def _numerals(root):
    n = 0
    for s in sorted(os.listdir(f"{root}/shards/part")):
        for item in iter_shard(f"{root}/shards/part/{s}", decode=False):
            if isinstance(item, Sample):
                n += normalize(sample_text(item.meta)).split().count("7")
    return n


def test_duplicate_shard_ids_are_an_error(tmp_path):
    a = write_corpus(str(tmp_path / "a"), 1, 5)
    b = write_corpus(str(tmp_path / "b"), 1, 5)
    cfg = VocabConfig(shards=[a[0], b[0]], out=str(tmp_path / "v.parquet"), size=5)
    with pytest.raises(ValueError, match="shard id"):
        build_vocab(cfg)


def test_empty_captions_give_an_empty_vocabulary(tmp_path):
    url = str(tmp_path / "shards" / "p" / "e-000000.tar")
    write_captioned_shard(url, [{"caption": ""}, {}, {"caption": "the of"}], "e")
    cfg = VocabConfig(shards=url, out=str(tmp_path / "v.parquet"), size=5)
    summary = build_vocab(cfg)
    assert summary["samples"] == 3 and summary["samples_with_words"] == 0
    assert summary["words"] == 0 and len(read_vocab(cfg.out)) == 0
    assert pc.sum(tables.read_parquet(cfg.out).column("count")).as_py() is None


def _files(root):
    out = []
    for d, _, fs in os.walk(root):
        out += [os.path.join(d, f) for f in fs]
    return sorted(out)
