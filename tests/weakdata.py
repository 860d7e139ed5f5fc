"""Captioned shards for the weak-supervision tests, written directly (no ingest)."""

from __future__ import annotations

import io
import random

from PIL import Image

from cvpipe.data.shards import encode_meta, write_shard

WORDS = ["seven", "#Seven", "7", "sept", "the", "of"] + [f"w{i:03d}x" for i in range(300)]


def tiny_png(value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def random_captions(n: int, seed: int) -> list[dict]:
    """Zipf-ish captions over WORDS, some with hashtags, some empty."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(WORDS))]
    metas = []
    for _ in range(n):
        k = rng.randint(0, 8)
        caption = " ".join(rng.choices(WORDS, weights, k=k))
        tags = rng.choices(["#Seven", "#Art", "#w001x"], k=rng.randint(0, 2))
        metas.append({"caption": caption, "hashtags": tags})
    return metas


def write_captioned_shard(url: str, metas: list[dict], prefix: str, extra=None) -> list[str]:
    """A shard of tiny PNGs with the given metadata; ``extra`` maps a key to extra
    members (e.g. a bad json). Returns the keys."""
    samples, keys = [], []
    for i, meta in enumerate(metas):
        key = f"{prefix}-{i:05d}"
        keys.append(key)
        members = {"png": tiny_png(i), "json": encode_meta(meta)}
        members.update((extra or {}).get(key, {}))
        samples.append((key, members))
    write_shard(url, samples)
    return keys


def write_corpus(root: str, shards: int, per_shard: int, seed: int = 0) -> list[str]:
    """``shards`` captioned shards under ``root/shards/part/``; returns their URLs."""
    urls = []
    for s in range(shards):
        url = f"{root}/shards/part/cap-{s:06d}.tar"
        write_captioned_shard(url, random_captions(per_shard, seed * 1000 + s), f"s{s}")
        urls.append(url)
    return urls


def bad_json(key: str) -> dict:
    return {key: {"json": b"{not json"}}
