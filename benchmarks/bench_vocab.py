"""Vocabulary counting: the stage vs a bare ``str.split`` + ``collections.Counter`` loop
over the same captions, in the same run; and peak memory from 1M to 10M captions.

Speed (target: the stage at >= 0.8x the bare loop's captions/s). Web-like captions
(Zipf over 50k made-up words, stop words, punctuation, CamelCase hashtags, URLs,
numbers, 0-15 words) are written into shards of 10k samples with a tiny image each.
Measured, best of ``--repeat`` runs each, alternating:

- ``stage``: :class:`cvpipe.label.vocab.VocabCountStage` over the shards (read each
  shard, tokenize with every rule, count occurrences and images per word, publish the
  partial and the rejects table), as a flow's unit would;
- ``bare``: the same shards read with the same reader, then ``Counter.update(text.split())``
  per sample (no normalization, no rules, no images count, nothing written);
- ``core`` and ``bare_core``: the same two without reading or writing, on the captions
  already in memory (10k per batch): the cost of the rules alone.

Memory (target: flat). In a fresh process per size, 1M and 10M generated captions (Zipf
over an unbounded word space, so the distinct-word count keeps growing) are counted in
batches of 10k (one partial each, written to disk), merged ``--fan-in`` at a time as a
tree with ``--partial-cap``, and finalized; the peak RSS is read from VmHWM. A merge
holds at most ``fan_in x partial_cap`` words, so memory stops growing once the merges
are full; the default cap (2^16 here, 2^20 in VocabConfig) is sized so that 1M
captions already fill them, which is what makes 1M vs 10M a test of flatness.

    python benchmarks/bench_vocab.py            # speed on 200k captions; memory 1M, 10M
    python benchmarks/bench_vocab.py --quick    # speed on 50k; memory 100k, 1M

Prints a summary and writes benchmarks/results/bench_vocab.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "bench_vocab.json"
PER_SHARD = 10_000
STOP = ("the", "a", "of", "and", "my", "in", "on", "with", "this", "at", "is", "to")


def _made_up_words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    cons, vow = "bcdfghjklmnprstvwz", "aeiou"
    words: set[str] = set()
    while len(words) < n:
        k = rng.randint(2, 4)
        words.add("".join(rng.choice(cons) + rng.choice(vow) for _ in range(k)))
    return sorted(words)


def web_captions(n: int, seed: int, words: list[str]) -> list[str]:
    """``n`` web-like captions (see the module docstring), seeded."""
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.zipf(1.1, size=n * 16), len(words)) - 1
    lengths = rng.integers(0, 16, n)
    kinds = rng.random(n * 16)
    out, j = [], 0
    for length in lengths.tolist():
        toks = []
        for _ in range(length):
            w, k = words[ranks[j]], kinds[j]
            j += 1
            if k < 0.25:
                w = STOP[int(k * 48)]
            elif k < 0.33:
                w = w + ","
            elif k < 0.38:
                w = w.capitalize()
            elif k < 0.45:
                w = "#" + w.capitalize() + words[ranks[j - 2]].capitalize()
            elif k < 0.47:
                w = f"https://example.org/p/{w}"
            elif k < 0.51:
                w = str(int(k * 10_000))
            toks.append(w)
        out.append(" ".join(toks))
    return out


def write_shards(root: str, captions: list[str]) -> list[str]:
    from PIL import Image

    from cvpipe.data.shards import encode_meta, write_shard

    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG")
    png = buf.getvalue()
    urls = []
    for s, start in enumerate(range(0, len(captions), PER_SHARD)):
        url = os.path.join(root, "shards", "bench", f"cap-{s:06d}.tar")
        batch = captions[start : start + PER_SHARD]
        samples = (
            (f"s{s}-{i:05d}", {"png": png, "json": encode_meta({"caption": c})})
            for i, c in enumerate(batch)
        )
        write_shard(url, samples)
        urls.append(url)
    return urls


def run_stage_once(urls: list[str], work: str) -> float:
    from cvpipe.core.stage import run_stage
    from cvpipe.label.config import VocabConfig
    from cvpipe.label.vocab import VocabCountStage

    shutil.rmtree(work, ignore_errors=True)
    stage = VocabCountStage(VocabConfig(shards=urls, out=os.path.join(work, "v.parquet"), size=1))
    t0 = time.perf_counter()
    run_stage(stage)
    return time.perf_counter() - t0


def run_bare_once(urls: list[str]) -> float:
    from cvpipe.data.shards import Sample, iter_shard

    t0 = time.perf_counter()
    counts: Counter = Counter()
    for url in urls:
        for item in iter_shard(url, decode=False):
            if isinstance(item, Sample):
                counts.update(item.meta.get("caption", "").split())
    return time.perf_counter() - t0


def run_core_once(batches: list[list[str]]) -> float:
    from cvpipe.label.text import Tokenizer
    from cvpipe.label.vocab import count_texts

    tok = Tokenizer()
    t0 = time.perf_counter()
    for b in batches:
        count_texts(b, tok, 1 << 20)
    return time.perf_counter() - t0


def run_bare_core_once(batches: list[list[str]]) -> float:
    t0 = time.perf_counter()
    counts: Counter = Counter()
    for b in batches:
        for c in b:
            counts.update(c.split())
    return time.perf_counter() - t0


# ----------------------------------------------------------------------- memory child


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def growing_captions(n: int, seed: int) -> list[str]:
    """Captions over an unbounded word space (Zipf ranks as words): the distinct-word
    count keeps growing with the corpus, as on the web."""
    rng = np.random.default_rng(seed)
    ranks = rng.zipf(1.3, size=n * 8)
    lengths = rng.integers(1, 15, n)
    words = [f"w{r}" for r in ranks.tolist()]
    out, j = [], 0
    for length in lengths.tolist():
        out.append(" ".join(words[j : j + length]))
        j += length
    return out


def child_memory(captions: int, fan_in: int, cap: int, work: str) -> dict:
    from cvpipe.label.text import Tokenizer
    from cvpipe.label.vocab import count_texts, finalize, merge, read_partial, write_partial

    tok = Tokenizer()
    t0 = time.perf_counter()
    level: list[str] = []
    for s in range(captions // PER_SHARD):
        url = os.path.join(work, "leaf", f"{s:06d}.parquet")
        write_partial(count_texts(growing_captions(PER_SHARD, s), tok, cap), url)
        level.append(url)
    count_s = time.perf_counter() - t0
    depth = 0
    while len(level) > 1:
        nxt = []
        for g in range(0, len(level), fan_in):
            url = os.path.join(work, f"merge-{depth}", f"{g:06d}.parquet")
            write_partial(merge([read_partial(u) for u in level[g : g + fan_in]], cap), url)
            nxt.append(url)
        level, depth = nxt, depth + 1
    vocab, facts = finalize(read_partial(level[0]), 10_000, 1)
    return {
        "captions": captions,
        "shards": captions // PER_SHARD,
        "merge_levels": depth,
        "count_s": round(count_s, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "peak_rss_mib": round(_vm_hwm_mib(), 1),
        "root_words": facts["distinct_words"],
        "error_bound": facts["error_bound"],
        "set_exact": facts["set_exact"],
        "occurrences": facts["occurrences"],
    }


def run_child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--captions", type=int, default=None, help="speed part (200k; quick 50k)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--fan-in", type=int, default=8)
    # Small enough that 1M captions already fill the merges (memory bound: fan_in x cap
    # words per merge); at 2^18, 1M captions stay under the bound and 10M reach it.
    ap.add_argument("--partial-cap", type=int, default=1 << 16)
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", nargs="*")
    args = ap.parse_args()
    if args.child:
        res = child_memory(int(args.child[0]), int(args.child[1]), int(args.child[2]),
                           args.child[3])  # fmt: skip
        print(json.dumps(res))
        return
    n = args.captions or (50_000 if args.quick else 200_000)
    mem_sizes = (100_000, 1_000_000) if args.quick else (1_000_000, 10_000_000)
    root = tempfile.mkdtemp(prefix="bench_vocab_", dir=args.tmp)
    try:
        t0 = time.perf_counter()
        captions = web_captions(n, 0, _made_up_words(50_000, 0))
        urls = write_shards(root, captions)
        gen = time.perf_counter() - t0
        batches = [captions[i : i + PER_SHARD] for i in range(0, n, PER_SHARD)]
        times: dict[str, list[float]] = {"stage": [], "bare": [], "core": [], "bare_core": []}
        for _ in range(args.repeat):
            times["bare"].append(run_bare_once(urls))
            times["stage"].append(run_stage_once(urls, os.path.join(root, "work")))
            times["bare_core"].append(run_bare_core_once(batches))
            times["core"].append(run_core_once(batches))
        best = {k: min(v) for k, v in times.items()}
        rate = {k: round(n / v) for k, v in best.items()}
        print(f"{n:,} captions in {len(urls)} shards (generated in {gen:.1f} s)")
        for k in ("stage", "bare", "core", "bare_core"):
            print(f"  {k:10s} {best[k]:7.3f} s  {rate[k]:>10,} captions/s")
        memory = []
        for size in mem_sizes:
            work = os.path.join(root, f"mem-{size}")
            res = run_child(str(size), str(args.fan_in), str(args.partial_cap), work)
            shutil.rmtree(work, ignore_errors=True)
            print(f"  memory {size:>12,} captions: {res}", flush=True)
            memory.append(res)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    stage_ratio = best["bare"] / best["stage"]
    core_ratio = best["bare_core"] / best["core"]
    growth = memory[-1]["peak_rss_mib"] / memory[0]["peak_rss_mib"]
    result = {
        "benchmark": "bench_vocab",
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "captions": n,
        "shards": len(urls),
        "repeat": args.repeat,
        "seconds_best": {k: round(v, 4) for k, v in best.items()},
        "captions_per_s": rate,
        "stage_vs_bare": round(stage_ratio, 3),
        "core_vs_bare_core": round(core_ratio, 3),
        "fan_in": args.fan_in,
        "partial_cap": args.partial_cap,
        "memory": memory,
        "memory_growth": round(growth, 3),
        "targets": {
            "stage_at_least_0.8x_bare": stage_ratio >= 0.8,
            "memory_flat_within_1.5x": growth <= 1.5,
        },
    }
    print(
        f"stage vs bare: {stage_ratio:.2f}x (target >= 0.8x); rules alone vs split+Counter: "
        f"{core_ratio:.2f}x; peak memory {memory[0]['peak_rss_mib']:.0f} -> "
        f"{memory[-1]['peak_rss_mib']:.0f} MiB ({growth:.2f}x) from "
        f"{mem_sizes[0]:,} to {mem_sizes[1]:,} captions"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
