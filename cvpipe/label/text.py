"""Captions and hashtags to words: every tokenizer rule lives here.

The rules, in the order they apply to a sample's text (its ``caption`` followed by its
``hashtags`` entries, joined by spaces):

1. Unicode NFKC (full-width letters, ligatures such as "ﬁ" and compatibility forms become
   plain letters), then lowercase.
2. The text is split at whitespace into chunks. A chunk that is a URL (starts with
   ``http://``, ``https://`` or ``www.``), an e-mail address (``name@host.tld``) or a
   mention (starts with ``@``) is removed whole, trailing punctuation included.
3. Apostrophes inside a chunk are dropped ("don't" -> "dont", "dog's" -> "dogs"); every
   other character that is not a letter, a combining mark, a digit or ``_`` splits the
   chunk (punctuation, symbols, emoji). So ``#Tag`` loses its ``#``, and a CamelCase
   hashtag is kept whole: ``#NewYork`` -> ``newyork`` (nothing ever splits at a case
   change). Leading and trailing ``_`` are stripped (``#new_york`` -> ``new_york``).
4. The synonym map (optional; word -> canonical word, see :func:`load_synonyms`) is
   applied to each word, before step 5, so a map can rescue a number ("7 => seven").
5. Removed: words without any letter (numbers such as ``7``, ``2026``, ``3.14`` split as
   ``3``/``14``; mixed words such as ``mp3`` or ``4k`` stay) and English stop words
   (:data:`STOP_WORDS`).

A sample's words keep their repeats (vocabulary counts occurrences); targets use the
distinct ones. Empty or missing text gives no word.

Speed: a batch of texts is lowercased, split and dictionary-encoded with Arrow's
kernels, so the per-occurrence work runs in C. Each *distinct* chunk is then decided
once: a chunk that is one plain word once punctuation is trimmed from its ends (the
common case) by Arrow's kernels too; the rest (URLs, inner punctuation, synonyms,
non-ASCII numbers) by :meth:`Tokenizer.chunk_words` in Python, cached across batches
(up to ``cache_size`` chunks, then a fresh cache: memory stays bounded on any corpus).
Both paths give the same words (a test compares them on random chunks).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cvpipe.core.storage import read_bytes

# English stop words: function words that carry no visual content. Forms with an
# apostrophe appear without it, as rule 3 leaves them; words that are also nouns or
# numbers ("one", "shell", "well", "shed") are kept.
STOP_WORDS: frozenset[str] = frozenset(
    """
    a about above after again against ain all also am an and any are aren arent as at be
    because been before being below between both but by can cannot could couldn couldnt d
    did didn didnt do does doesn doesnt doing don dont down during each either etc even ever
    every few for from further get gets got had hadn hadnt has hasn hasnt have haven havent
    having he her here heres hers herself hes him himself his how hows i if im in into is
    isn isnt it itd itll its itself ive just least let lets ll m ma may me might mightn
    mightnt more most much must mustn mustnt my myself neither no nor not now o of off often
    on once only or other ought our ours ourselves out over own per quite rather re s same
    shan shant she shes should shouldn shouldnt since so some such t than that thatll thats
    the their theirs them themselves then there theres these they theyd theyll theyre theyve
    this those though through thus to too under until up upon us ve very via was wasn wasnt
    we were weren werent weve what whats when whens where wheres whether which while who
    whom whos why whys will with within without wont would wouldn wouldnt y yet you youd
    youll your youre yours yourself yourselves youve
    """.split()  # noqa: SIM905 (a word list reads better as text)
)

_URL_PREFIXES = ("http://", "https://", "www.")
_APOSTROPHES = str.maketrans("", "", "'\u2019\u02bc\u2018")


class SynonymError(ValueError):
    """A synonym file that cannot be used (bad line, cycle, a word the rules remove)."""


def _is_email(chunk: str) -> bool:
    name, at, host = chunk.partition("@")
    return bool(at and name and "." in host.strip(".,;:!?)]}>\"'"))


def _is_word_char(ch: str) -> bool:
    return ch == "_" or unicodedata.category(ch)[0] in "LMN"


def split_chunk(chunk: str) -> list[str]:
    """Rules 2 and 3 on one lowercased, NFKC-normalized whitespace chunk: the words it
    holds before synonyms and removals (a URL, e-mail or mention gives none)."""
    if chunk.startswith(_URL_PREFIXES) or chunk.startswith("@") or _is_email(chunk):
        return []
    chunk = chunk.translate(_APOSTROPHES)
    if chunk.isalnum():  # the common case: one plain word
        return [chunk]
    words, start = [], None
    for i, ch in enumerate(chunk):
        if _is_word_char(ch):
            if start is None:
                start = i
        elif start is not None:
            words.append(chunk[start:i])
            start = None
    if start is not None:
        words.append(chunk[start:])
    return [w for w in (w.strip("_") for w in words) if w]


def _has_letter(word: str) -> bool:
    return any(unicodedata.category(ch)[0] == "L" for ch in word)


def normalize(text: str) -> str:
    """Rule 1: NFKC, then lowercase."""
    return unicodedata.normalize("NFKC", text).lower()


def sample_text(meta: Mapping[str, Any]) -> str:
    """The text of a sample's metadata: its caption, then its hashtags (a list of
    strings, or one string), joined by spaces. Anything else counts as no text."""
    parts: list[str] = []
    caption = meta.get("caption")
    if isinstance(caption, str):
        parts.append(caption)
    tags = meta.get("hashtags")
    if isinstance(tags, str):
        parts.append(tags)
    elif isinstance(tags, (list, tuple)):
        parts.extend(t for t in tags if isinstance(t, str))
    return " ".join(parts)


@dataclass
class Tokens:
    """The words of a batch of texts, as ids into ``words`` (distinct words of the
    batch): occurrence ``j`` is word ``ids[j]`` of text ``owner[j]`` (non-decreasing)."""

    words: pa.Array  # string
    ids: np.ndarray  # int64, one per occurrence
    owner: np.ndarray  # int64, the text each occurrence belongs to
    texts: int

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Per word: occurrences, and texts holding it at least once."""
        n = max(len(self.words), 1)
        count = np.bincount(self.ids, minlength=len(self.words))
        pairs = np.sort(self.owner * n + self.ids)
        first = np.r_[True, pairs[1:] != pairs[:-1]] if len(pairs) else np.zeros(0, bool)
        images = np.bincount(pairs[first] % n, minlength=len(self.words))
        return count, images

    def per_text(self) -> list[list[str]]:
        """Each text's words, in order, repeats kept."""
        words = self.words.to_pylist()
        out: list[list[str]] = [[] for _ in range(self.texts)]
        for o, i in zip(self.owner.tolist(), self.ids.tolist(), strict=True):
            out[o].append(words[i])
        return out


# Characters that rule 3 strips from the ends of a chunk; a chunk that is one plain word
# once they are gone (the common case) takes the vectorized path of Tokenizer.tokenize.
_TRIM = "#_.,;:!?'\"()[]{}<>*~\u2018\u2019\u201c\u201d\u00ab\u00bb\u2026"


class Tokenizer:
    """The rules of this module over batches of texts. ``synonyms`` maps a word to its
    canonical word (keys and values already normalized, see :func:`load_synonyms`)."""

    def __init__(
        self,
        synonyms: Mapping[str, str] | None = None,
        stop_words: Iterable[str] = STOP_WORDS,
        cache_size: int = 1 << 18,
    ) -> None:
        self.synonyms = dict(synonyms or {})
        self.stop_words = frozenset(stop_words)
        self.cache_size = cache_size
        self._cache: dict[str, tuple[str, ...]] = {}
        self._stop_set = pa.array(sorted(self.stop_words), pa.string())
        self._synonym_set = pa.array(sorted(self.synonyms), pa.string())

    def chunk_words(self, chunk: str) -> tuple[str, ...]:
        """Rules 2-5 on one normalized chunk (cached)."""
        got = self._cache.get(chunk)
        if got is None:
            words = []
            for w in split_chunk(chunk):
                w = self.synonyms.get(w, w)
                if w not in self.stop_words and _has_letter(w):
                    words.append(w)
            got = tuple(words)
            if len(self._cache) >= self.cache_size:
                self._cache = {}
            self._cache[chunk] = got
        return got

    def words(self, text: str | None) -> list[str]:
        """One text's words, in order, repeats kept."""
        return self.tokenize([text]).per_text()[0]

    def _chunk_table(self, chunks: pa.Array) -> tuple[np.ndarray, np.ndarray, pa.Array]:
        """Words of distinct chunks as (chunk index, word index) pairs sorted by chunk,
        and the distinct words. A chunk that is one plain word once ``_TRIM`` characters
        are stripped from its ends is decided with Arrow's kernels; the others (URLs,
        inner punctuation, synonyms, non-ASCII numbers...) go through
        :meth:`chunk_words`."""
        core = pc.utf8_trim(chunks, _TRIM)
        alnum = pc.utf8_is_alnum(core)
        numeric = pc.utf8_is_numeric(core)
        synonym = pc.is_in(core, value_set=self._synonym_set)
        plain = pc.and_(pc.and_not(alnum, synonym), pc.invert(numeric))
        keep = pc.and_not(plain, pc.is_in(core, value_set=self._stop_set))
        ascii_number = pc.and_not(
            pc.and_(pc.and_(alnum, numeric), pc.string_is_ascii(core)), synonym
        )
        empty = pc.equal(pc.utf8_length(core), 0)
        rest = pc.invert(pc.or_(pc.or_(plain, ascii_number), empty))
        keep_idx = np.flatnonzero(keep.to_numpy(zero_copy_only=False))
        words = [core.take(pa.array(keep_idx))]
        owners = [keep_idx]
        rest_idx = np.flatnonzero(rest.to_numpy(zero_copy_only=False))
        if len(rest_idx):
            extra_owner, extra = [], []
            for i, chunk in zip(rest_idx.tolist(), chunks.take(pa.array(rest_idx)).to_pylist(),
                                strict=True):  # fmt: skip
                ws = self.chunk_words(chunk)
                extra_owner += [i] * len(ws)
                extra += ws
            words.append(pa.array(extra, pa.string()))
            owners.append(np.asarray(extra_owner, np.int64))
        owner = np.concatenate(owners)
        order = np.argsort(owner, kind="stable")
        encoded = pa.concat_arrays(words).take(pa.array(order)).dictionary_encode()
        return owner[order], encoded.indices.to_numpy().astype(np.int64), encoded.dictionary

    def tokenize(self, texts: Sequence[str | None] | pa.Array) -> Tokens:
        """Every text of a batch at once. Per occurrence the work is Arrow's (lowercase,
        split, dictionary-encode) and numpy's; Python runs per distinct chunk, and only
        for chunks that are not plain words."""
        arr = texts if isinstance(texts, pa.Array) else pa.array(texts, pa.string())
        empty = Tokens(pa.array([], pa.string()), np.zeros(0, np.int64), np.zeros(0, np.int64),
                       len(arr))  # fmt: skip
        if len(arr) == 0:
            return empty
        ascii_only = pc.string_is_ascii(arr)
        if not pc.all(ascii_only).as_py():  # NFKC changes nothing in ASCII text
            arr = pc.if_else(ascii_only, arr, pc.utf8_normalize(arr, "NFKC"))
        chunks = pc.utf8_split_whitespace(pc.utf8_lower(arr))
        owner = pc.list_parent_indices(chunks).to_numpy().astype(np.int64)
        encoded = pc.list_flatten(chunks).dictionary_encode()
        if len(encoded) == 0:
            return empty
        codes = encoded.indices.to_numpy().astype(np.int64)
        chunk_of, values, words = self._chunk_table(encoded.dictionary)
        lengths = np.bincount(chunk_of, minlength=len(encoded.dictionary))
        starts = np.cumsum(lengths) - lengths
        # Expand each occurrence of a chunk into its words (0, 1 or more).
        n = lengths[codes]
        total = int(n.sum())
        if total == 0:
            return Tokens(words, empty.ids, empty.owner, len(arr))
        first = np.repeat(starts[codes] - (np.cumsum(n) - n), n)
        ids = values[first + np.arange(total)]
        return Tokens(words, ids, np.repeat(owner, n), len(arr))


def load_synonyms(url: str) -> dict[str, str]:
    """A synonym file: one rule per line, ``VARIANT [, VARIANT ...] => CANONICAL``;
    blank lines and lines starting with ``#`` are ignored. Every word goes through
    rules 1-3 and must stay one word, and a canonical word must survive rule 5.
    Chains (``a => b``, ``b => c``) resolve to the last word; a cycle is an error."""
    raw = read_bytes(url).decode("utf-8")
    direct: dict[str, str] = {}
    plain = Tokenizer(stop_words=())

    def one_word(text: str, lineno: int) -> str:
        ws = [w for chunk in normalize(text).split() for w in split_chunk(chunk)]
        if len(ws) != 1:
            raise SynonymError(f"{url}:{lineno}: {text.strip()!r} is not one word ({ws})")
        return ws[0]

    for lineno, line in enumerate(raw.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        left, arrow, right = line.partition("=>")
        if not arrow or not left.strip() or not right.strip():
            raise SynonymError(f"{url}:{lineno}: want 'VARIANT[, VARIANT...] => CANONICAL'")
        canonical = one_word(right, lineno)
        if canonical in STOP_WORDS or not plain.words(canonical):
            raise SynonymError(f"{url}:{lineno}: canonical word {canonical!r} would be removed")
        for variant in left.split(","):
            v = one_word(variant, lineno)
            if v != canonical:
                if direct.get(v, canonical) != canonical:
                    raise SynonymError(f"{url}:{lineno}: {v!r} already maps to {direct[v]!r}")
                direct[v] = canonical
    resolved: dict[str, str] = {}
    for v in direct:
        seen, w = {v}, direct[v]
        while w in direct:
            w = direct[w]
            if w in seen:
                raise SynonymError(f"{url}: synonyms form a cycle through {w!r}")
            seen.add(w)
        resolved[v] = w
    return resolved
