"""The tokenizer rules of cvpipe/label/text.py, case by case, and synonym files."""

import pytest

from cvpipe.label.text import (
    STOP_WORDS,
    SynonymError,
    Tokenizer,
    load_synonyms,
    sample_text,
)

tok = Tokenizer()


@pytest.mark.parametrize(
    "text, words",
    [
        ("", []),
        (None, []),
        ("   \t\n ", []),
        ("the of and a", []),  # only stop words
        ("The Cat", ["cat"]),  # lowercase
        ("#Tag", ["tag"]),  # '#' stripped
        ("#NewYork #new_york", ["newyork", "new_york"]),  # hashtags kept whole
        ("Hello,world!!", ["hello", "world"]),  # punctuation splits
        ("dog🐶cat 😀", ["dog", "cat"]),  # emoji split and vanish
        ("Café ＦＵＬＬ ﬁne", ["café", "full", "fine"]),  # NFKC: full width, ligature
        ("cafe\u0301", ["café"]),  # a combining accent composed by NFKC
        ("नमस्ते दुनिया", ["नमस्ते", "दुनिया"]),  # marks belong to their word
        ("東京タワー", ["東京タワー"]),
        ("see https://x.org/a?b=1 and www.y.com, now", ["see"]),  # URLs go whole
        ("mail bob@example.org, @alice hi", ["mail", "hi"]),  # e-mail, mention
        ("7 2026 3.14 1,000 mp3 4k 1990s", ["mp3", "4k", "1990s"]),  # numbers go
        ("don't dog's 'quoted'", ["dogs", "quoted"]),  # apostrophes dropped; dont is stop
        ("__init__ _ __", ["init"]),
        ("one shell well", ["one", "shell", "well"]),  # nouns and numbers kept
        ("seven SEVEN Seven", ["seven", "seven", "seven"]),  # repeats kept
    ],
)
def test_tokenizer_case_by_case(text, words):
    assert tok.words(text) == words


def test_batch_tokenize_matches_one_text_at_a_time():
    texts = [
        "Hello, World! #NewYork",
        None,
        "",
        "the a",
        "world world hello",
        "Café ＦＵＬＬ",
        "x https://a.b/c 7 seven",
    ]
    t = Tokenizer().tokenize(texts)
    assert t.per_text() == [Tokenizer().words(x) for x in texts]
    count, images = t.counts()
    pairs = zip(count.tolist(), images.tolist(), strict=True)
    by_word = dict(zip(t.words.to_pylist(), pairs, strict=True))
    assert by_word["world"] == (3, 2) and by_word["hello"] == (2, 2)
    assert Tokenizer().tokenize([]).texts == 0


def test_cache_stays_bounded():
    t = Tokenizer(cache_size=8)
    t.tokenize([f"word{i}x" for i in range(100)])
    assert len(t._cache) <= 8
    assert t.words("word5x word5x") == ["word5x", "word5x"]


def test_sample_text_joins_caption_and_hashtags():
    assert sample_text({"caption": "A cat", "hashtags": ["#Pet", "#cute"]}) == "A cat #Pet #cute"
    assert sample_text({"hashtags": "#one"}) == "#one"
    assert sample_text({"caption": 5, "hashtags": [1, None, "#ok"]}) == "#ok"
    assert sample_text({}) == ""


def test_synonyms_apply_before_numbers_and_stop_words_are_removed(tmp_path):
    f = tmp_path / "syn.txt"
    f.write_text(
        "# digits\n\n7, sept, #Sept => Seven\nzéro => zero\nsiete => sept\nNYC => #NewYork\n",
        encoding="utf-8",
    )
    syn = load_synonyms(str(f))
    assert syn == {
        "7": "seven",
        "sept": "seven",
        "zéro": "zero",
        "siete": "seven",  # chain resolved
        "nyc": "newyork",
    }
    t = Tokenizer(syn)
    assert t.words("7 sept SIETE #sept seven 8 nyc") == ["seven"] * 5 + ["newyork"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("a b => c\n", "not one word"),
        ("seven\n", "want 'VARIANT"),
        ("x => the\n", "would be removed"),
        ("x => 42\n", "would be removed"),
        ("cat => dog\ndog => cat\n", "cycle"),
        ("cat => dog\ncat => fox\n", "already maps"),
    ],
)
def test_bad_synonym_files_are_one_line_errors(tmp_path, content, message):
    f = tmp_path / "syn.txt"
    f.write_text(content)
    with pytest.raises(SynonymError, match=message):
        load_synonyms(str(f))


def test_stop_words_are_already_normalized():
    assert all(w == Tokenizer(stop_words=()).words(w)[0] for w in STOP_WORDS if w.isalpha())


def test_fast_path_agrees_with_the_rules_on_random_chunks():
    """Plain chunks take Arrow's kernels, the rest :meth:`Tokenizer.chunk_words`: on
    random chunks the batch result equals the rules applied chunk by chunk."""
    import random

    from cvpipe.label.text import normalize

    alphabet = list("abcXYZ019_#@'.,:;!?/-") + ["é", "ß", "五", "²", "Ⅻ", "४", "ि", "😀", "ﬁ", "’"]
    rng = random.Random(0)
    syn = {"abc": "seven", "7": "seven"}
    t = Tokenizer(syn)
    chunks = ["".join(rng.choices(alphabet, k=rng.randint(1, 6))) for _ in range(3000)]
    chunks += ["http://a.b", "www.x", "@me", "a@b.c", "7", "abc", "x7", "७"]
    batch = t.tokenize(chunks).per_text()
    for chunk, got in zip(chunks, batch, strict=True):
        want = [w for c in normalize(chunk).split() for w in Tokenizer(syn).chunk_words(c)]
        assert got == want, chunk
