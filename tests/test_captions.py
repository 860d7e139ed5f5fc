"""The synthetic digit captions: seeded, marked as synthetic, every promised form."""

import csv
import json
import random
from collections import Counter

import pytest

from cvpipe.data import captions
from cvpipe.data.datasets import export_digits
from cvpipe.label.text import Tokenizer, load_synonyms


def test_caption_forms_over_many_draws():
    rng = random.Random(0)
    drawn = [captions.caption(7, rng) for _ in range(2000)]
    texts = [c for c, _ in drawn]
    words = Counter(w for c in texts for w in c.lower().split())
    assert {"seven", "7", "#seven", "sept", "lucky"} <= set(words)
    assert sum(1 for c, t in drawn if not c and not t) == pytest.approx(100, abs=40)
    assert any("https://" in c for c in texts) and any("@example.org" in c for c in texts)
    assert any("#Seven" in t for _, t in drawn)
    # The class word shows up in about q of the captions (minus empties and noise).
    named = sum(
        any(f in c.lower().split() for f in ("seven", "7", "#seven", "sept")) for c in texts
    )
    assert 0.45 < named / len(texts) < 0.62


def test_manifests_are_seeded_marked_synthetic_and_split_aware(tmp_path):
    plain, split = tmp_path / "plain", tmp_path / "split"
    export_digits(str(plain), size=8)
    export_digits(str(split), size=8, split={"labeled": 0.1, "unlabeled": 0.6, "test": 0.3})
    counts = captions.write_caption_manifests(str(plain), seed=3)
    assert counts == {"captions/all.csv": 1797}
    counts = captions.write_caption_manifests(str(split), seed=3)
    assert sum(counts.values()) == 1797 and set(counts) == {
        f"captions/{p}.csv" for p in ("labeled", "unlabeled", "test")
    }
    rows = {}
    for path in (plain / "captions" / "all.csv", *sorted((split / "captions").glob("*.csv"))):
        with open(path, encoding="utf-8") as f:
            for r in csv.DictReader(f):
                assert r["caption_origin"].startswith("synthetic: cvpipe.data.captions")
                assert isinstance(json.loads(r["hashtags"]), list)
                assert (path.parent / r["image"]).is_file()
                name = r["image"].rsplit("/", 1)[-1]
                rows.setdefault(name, []).append((r["caption"], r["hashtags"], r["label"], path))
    # The same image has the same caption with or without a split; unlabeled hides labels.
    assert all(len(v) == 2 and v[0][:2] == v[1][:2] for v in rows.values())
    assert all(v[1][2] == "" for v in rows.values() if v[1][3].name == "unlabeled.csv")
    assert all(v[1][2] != "" for v in rows.values() if v[1][3].name != "unlabeled.csv")
    assert "SYNTHETIC" in (split / "captions" / "README.md").read_text()
    again = tmp_path / "again"
    export_digits(str(again), size=8)
    captions.write_caption_manifests(str(again), seed=3)
    # Image paths are relative to the manifest: a rerun elsewhere writes the same file.
    assert (again / "captions" / "all.csv").read_text() == (
        plain / "captions" / "all.csv"
    ).read_text()


def test_synonym_file_maps_every_form_to_the_english_word(tmp_path):
    f = tmp_path / "syn.txt"
    f.write_text(captions.synonyms_text(), encoding="utf-8")
    tok = Tokenizer(load_synonyms(str(f)))
    for d in range(10):
        forms = [captions.ENGLISH[d], str(d), "#" + captions.ENGLISH[d].capitalize(),
                 captions.FRENCH[d]]  # fmt: skip
        assert tok.words(" ".join(forms)) == [captions.ENGLISH[d]] * 4


def test_no_images_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no exported digit images"):
        captions.write_caption_manifests(str(tmp_path))
