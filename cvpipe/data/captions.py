"""Synthetic captions for the bundled digits: a seeded, documented generator.

scikit-learn's digits have no captions, so weak supervision on the bundled data needs
made-up ones. Everything this module writes says so: every manifest row carries
``caption_origin = "synthetic: ..."`` (ingest ignores the column; it stays in the
manifest), and the folder holds a README. Do not mistake these for real captions.

A caption of an image of digit ``d`` (every draw from ``random.Random(f"{seed}:{index}")``,
so an image's caption depends only on the seed and its index, not on the split):

- with probability ``p_empty`` the sample has no caption and no hashtags;
- with probability ``q`` the caption names the digit, in one of four forms: the English
  word ("seven"), the numeral ("7"), a hashtag ("#Seven") or the French word ("sept");
  with probability ``noise`` that word names another digit instead (noisy tags);
- 1-3 distractor words from a pool shared by all digits ("photo", "ink", "paper"...),
  and stop words ("the", "of", "my");
- co-occurring words that carry a little real signal, as a photo's context does:
  "odd"/"even" (probability 0.3), "round" for 0, 6, 8, 9 and "straight" for 1, 4, 7
  (0.3), "lucky" for 7 (0.3);
- sometimes a URL (0.1), an e-mail address (0.05), and 0-2 hashtags in the
  ``hashtags`` list: the digit's ("#Seven", probability q/2) and generic ones.

:func:`synonyms_text` is the synonym file that maps every form to the English word, so
``cvpipe vocab --synonyms`` can merge "7", "sept" and "seven".
"""

from __future__ import annotations

import csv
import json
import os
import random

GENERATOR = "cvpipe.data.captions v1"
ENGLISH = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FRENCH = ("zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf")
DISTRACTORS = (
    "photo", "scan", "handwritten", "ink", "paper", "sketch", "note", "page", "pen",
    "pencil", "old", "blue", "homework", "desk", "school", "drawing", "written", "card",
)  # fmt: skip
STOP = ("the", "a", "of", "my", "this", "is", "on")
GENERIC_TAGS = ("#handwriting", "#Throwback", "#art", "#PenAndPaper", "#school")
ROUND, STRAIGHT = {0, 6, 8, 9}, {1, 4, 7}
PARTS = ("labeled", "unlabeled", "test")


def digit_word(digit: int, rng: random.Random) -> str:
    """One of the four forms of a digit's name."""
    form = rng.randrange(4)
    if form == 0:
        return ENGLISH[digit]
    if form == 1:
        return str(digit)
    if form == 2:
        return "#" + ENGLISH[digit].capitalize()
    return FRENCH[digit]


def caption(
    digit: int, rng: random.Random, q: float = 0.6, noise: float = 0.1, p_empty: float = 0.05
) -> tuple[str, list[str]]:
    """(caption, hashtags) of one image of ``digit``; see the module docstring."""
    if rng.random() < p_empty:
        return "", []
    words: list[str] = [rng.choice(STOP)]
    words += rng.sample(DISTRACTORS, rng.randint(1, 3))
    if rng.random() < q:
        named = rng.choice([d for d in range(10) if d != digit]) if rng.random() < noise else digit
        words.append(digit_word(named, rng))
    if rng.random() < 0.3:
        words.append("odd" if digit % 2 else "even")
    if rng.random() < 0.3 and (digit in ROUND or digit in STRAIGHT):
        words.append("round" if digit in ROUND else "straight")
    if digit == 7 and rng.random() < 0.3:
        words.append("lucky")
    rng.shuffle(words)
    if rng.random() < 0.1:
        words.append(f"https://example.org/scans/{rng.randrange(10**6)}")
    if rng.random() < 0.05:
        words.append(f"mail.{rng.randrange(100)}@example.org")
    tags = []
    if rng.random() < q / 2:
        tags.append("#" + ENGLISH[digit].capitalize())
    if rng.random() < 0.3:
        tags.append(rng.choice(GENERIC_TAGS))
    return " ".join(words).capitalize(), tags


def synonyms_text() -> str:
    """The synonym file of the digit words: numeral, French word and English word."""
    lines = [f"# {GENERATOR}: every form of a digit's name -> its English word"]
    for d in range(10):
        variants = [str(d)] + ([FRENCH[d]] if FRENCH[d] != ENGLISH[d] else [])
        lines.append(f"{', '.join(variants)} => {ENGLISH[d]}")
    return "\n".join(lines) + "\n"


README = """# Synthetic captions

The captions and hashtags in these manifests are SYNTHETIC: made up by {generator}
(seed {seed}, q={q}, noise={noise}, p_empty={p_empty}) for scikit-learn's digits, which
have none. See cvpipe/data/captions.py for the recipe. `synonyms.txt` maps every form of
a digit's name to its English word.
"""


def write_caption_manifests(
    out: str, seed: int = 0, q: float = 0.6, noise: float = 0.1, p_empty: float = 0.05
) -> dict[str, int]:
    """Caption manifests for the digits exported under ``out`` (by
    :func:`cvpipe.data.datasets.export_digits`, images named ``NNNN.png`` after their
    index in scikit-learn's order). Writes ``out/captions/<part>.csv`` per split part
    (``all.csv`` without a split), ``synonyms.txt`` and a README; returns rows per file.

    Columns: image (relative to the manifest), label (not for the unlabeled part: its
    labels stay hidden), caption, hashtags (JSON list), caption_origin."""
    from sklearn.datasets import load_digits

    if not 0 <= q <= 1 or not 0 <= noise <= 1 or not 0 <= p_empty <= 1:
        raise ValueError(f"q, noise and p_empty are probabilities, got {q}, {noise}, {p_empty}")
    target = load_digits().target
    folder = os.path.join(out, "captions")
    rows: dict[str, list[list[str]]] = {}
    origin = f"synthetic: {GENERATOR} seed={seed} q={q} noise={noise}"
    for dirpath, dirnames, filenames in os.walk(out):
        dirnames[:] = sorted(d for d in dirnames if d != "captions")
        rel_dir = os.path.relpath(dirpath, out)
        top = rel_dir.split(os.sep)[0]
        part = top if top in PARTS else "all"
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext != ".png" or not stem.isdigit() or int(stem) >= len(target):
                continue
            index = int(stem)
            digit = int(target[index])
            text, tags = caption(digit, random.Random(f"{seed}:{index}"), q, noise, p_empty)
            image = os.path.relpath(os.path.join(dirpath, name), folder)
            label = "" if part == "unlabeled" else str(digit)
            rows.setdefault(part, []).append([image, label, text, json.dumps(tags), origin])
    if not rows:
        raise ValueError(f"no exported digit images (NNNN.png) under {out}")
    os.makedirs(folder, exist_ok=True)
    counts = {}
    for part, part_rows in sorted(rows.items()):
        with open(os.path.join(folder, f"{part}.csv"), "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image", "label", "caption", "hashtags", "caption_origin"])
            w.writerows(sorted(part_rows))
        counts[f"captions/{part}.csv"] = len(part_rows)
    with open(os.path.join(folder, "synonyms.txt"), "w", encoding="utf-8") as f:
        f.write(synonyms_text())
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(README.format(generator=GENERATOR, seed=seed, q=q, noise=noise, p_empty=p_empty))
    return counts
