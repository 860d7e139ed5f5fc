"""Top-K selection at scale: streamed from Parquet vs one numpy argsort in memory.

Generates N images x P=10 predictions over 1,000 classes (10M images = 100M candidates
by default, ~700 MB of Parquet in /tmp, 10k rows per file like a shard), then measures in
separate subprocesses, so each peak RSS is its own:

- ``cvpipe.label.selection.select`` with K=16,000: wall time (including writing the selection
  and its report) and peak RSS; target < 1 GiB;
- the baseline: one ``np.argsort`` of the same N x P scores held in memory (the time of
  the argsort alone; loading them is reported separately). Target: select is faster.

    python benchmarks/bench_select.py            # 10M images
    python benchmarks/bench_select.py --quick    # 1M images

Prints a summary and writes benchmarks/results/bench_select.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "bench_select.json"
ROWS_PER_FILE = 10_000


def generate(root: str, images: int, top_p: int, classes: int, seed: int = 0) -> list[str]:
    import pyarrow as pa
    import pyarrow.compute as pc

    from cvpipe.core import tables

    rng = np.random.default_rng(seed)
    # Strides coprime with the class count give P distinct classes per row cheaply.
    strides = np.array([b for b in range(1, classes // top_p) if np.gcd(b, classes) == 1])
    lin = tables.lineage(None, top_p=top_p, num_classes=classes, model_id="bench")
    urls = []
    for f, start in enumerate(range(0, images, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, images - start)
        a = rng.integers(0, classes, n)
        b = rng.choice(strides, n)
        cls = ((a[:, None] + b[:, None] * np.arange(top_p)) % classes).astype(np.int32)
        s = -np.sort(-(rng.random((n, top_p), dtype=np.float32) ** 3), axis=1)
        s = (s / (s.sum(1, keepdims=True) * 1.25)).astype(np.float32)
        offsets = pa.array(np.arange(0, (n + 1) * top_p, top_p, dtype=np.int32))
        keys = pc.binary_join_element_wise(
            "img-", pa.array(np.arange(start, start + n)).cast(pa.string()), ""
        )
        url = os.path.join(root, "predictions", "bench", f"p-{f:06d}.parquet")
        table = pa.Table.from_arrays(
            [
                keys,
                pa.array([f"bench/p-{f:06d}"] * n, pa.string()),
                pa.ListArray.from_arrays(offsets, pa.array(cls.reshape(-1))),
                pa.ListArray.from_arrays(offsets, pa.array(s.reshape(-1))),
            ],
            schema=tables.PREDICTIONS,
        )
        tables.write_parquet(table, url, lin)
        urls.append(url)
    return urls


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_select(root: str, top_p: int, top_k: int) -> dict:
    from cvpipe.core.storage import list_committed
    from cvpipe.label import selection

    urls = list_committed(os.path.join(root, "predictions"), ".parquet", recursive=True)
    rss0 = _peak_rss_mib()
    t0 = time.perf_counter()
    report = selection.select(urls, top_p, top_k, os.path.join(root, "sel"))
    wall = time.perf_counter() - t0
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "rss_before_mib": round(rss0, 1),
        "selected": report["selected"],
        "candidates": report["candidates"],
        "classes_below_k": report["classes_below_k"],
        "selection_bytes": os.path.getsize(os.path.join(root, "sel", "selection.parquet")),
    }


def child_argsort(root: str) -> dict:
    import pyarrow.parquet as pq

    from cvpipe.core.storage import list_committed

    urls = list_committed(os.path.join(root, "predictions"), ".parquet", recursive=True)
    t0 = time.perf_counter()
    parts = [
        pq.read_table(u, columns=["scores"]).column(0).combine_chunks().flatten().to_numpy()
        for u in urls
    ]
    scores = np.concatenate(parts)
    del parts
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    order = np.argsort(scores)
    sort = time.perf_counter() - t0
    return {
        "n": int(len(scores)),
        "load_s": round(load, 2),
        "argsort_s": round(sort, 2),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "check": int(order[0]),
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
    ap.add_argument("--quick", action="store_true", help="1M images instead of 10M")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--top-p", type=int, default=10)
    ap.add_argument("--top-k", type=int, default=None, help="16,000 (1,600 with --quick)")
    ap.add_argument("--classes", type=int, default=1_000)
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", nargs="*")
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "select":
            res = child_select(rest[0], int(rest[1]), int(rest[2]))
        else:
            res = child_argsort(rest[0])
        print(json.dumps(res))
        return
    images = args.images or (1_000_000 if args.quick else 10_000_000)
    # K scales with the corpus so that --quick keeps the same fraction (16%) per class.
    args.top_k = args.top_k or max(1, round(16_000 * images / 10_000_000))
    need = images * args.top_p * 2  # ~1.5 bytes per candidate written, with margin
    free = shutil.disk_usage(args.tmp).free
    if free < need:
        sys.exit(f"need ~{need / 2**30:.1f} GiB free in {args.tmp}, have {free / 2**30:.1f}")
    root = tempfile.mkdtemp(prefix="bench_select_", dir=args.tmp)
    try:
        t0 = time.perf_counter()
        urls = generate(root, images, args.top_p, args.classes)
        gen = time.perf_counter() - t0
        size = sum(os.path.getsize(u) for u in urls)
        print(f"generated {images:,} images x P={args.top_p} in {len(urls)} files "
              f"({size / 2**20:.0f} MiB) in {gen:.1f} s", flush=True)  # fmt: skip
        sel = run_child("select", root, str(args.top_p), str(args.top_k))
        print(f"select: {sel}", flush=True)
        base = run_child("argsort", root)
        print(f"argsort baseline: {base}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "benchmark": "bench_select",
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "images": images,
        "candidates": images * args.top_p,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "classes": args.classes,
        "files": len(urls),
        "predictions_mib": round(size / 2**20, 1),
        "generate_s": round(gen, 1),
        "select": sel,
        "argsort": base,
        "select_vs_argsort": round(base["argsort_s"] / sel["wall_s"], 2),
        "targets": {
            "peak_rss_below_1gib": sel["peak_rss_mib"] < 1024,
            "faster_than_argsort": sel["wall_s"] < base["argsort_s"],
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"\nselect {sel['wall_s']} s, peak RSS {sel['peak_rss_mib']} MiB | "
        f"argsort of {base['n']:,} scores {base['argsort_s']} s -> select is "
        f"{result['select_vs_argsort']}x the argsort speed | targets {result['targets']}"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
