"""Ingest and read+decode throughput against bare loops doing the same work, same run.

- ingest: cvpipe's plan + shard writer (header/trailer validation, metadata, index and
  rejects tables, atomic publish) vs a bare loop that reads the same files and writes the
  same bytes with tarfile;
- read: cvpipe's safe streaming reader with decoding to RGB vs PIL decoding the same
  image bytes from memory.

Rounds alternate cvpipe and baseline and the ratio is the median over rounds, so other
load on the machine hits both sides alike. Target on 2 cores: both ratios >= 0.8.

    python benchmarks/bench_shards.py [--quick] [--out benchmarks/results/bench_shards.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

from cvpipe.data import datasets, ingest, shards
from cvpipe.data.config import IngestConfig


def bare_ingest(files: list[str], out: str) -> int:
    with open(out, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
        for i, path in enumerate(files):
            with open(path, "rb") as src:
                data = src.read()
            for name, blob in ((f"{i:08d}.jpg", data), (f"{i:08d}.json", b"{}")):
                ti = tarfile.TarInfo(name)
                ti.size = len(blob)
                tar.addfile(ti, io.BytesIO(blob))
    return len(files)


def cvpipe_ingest(source: str, root: str, shard_size: int) -> int:
    cfg = IngestConfig(source=source, root=root, partition="bench", shard_size=shard_size)
    return sum(s.written for s in ingest.ingest_partition(cfg))


def bare_decode(blobs: list[bytes]) -> int:
    for data in blobs:
        Image.open(io.BytesIO(data)).convert("RGB").load()
    return len(blobs)


def cvpipe_read(urls: list[str]) -> int:
    n = 0
    for url in urls:
        for item in shards.iter_shard(url):
            n += isinstance(item, shards.Sample)
    return n


def timed(fn, *args) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t, n


def bench_dataset(name: str, source: str, work: str, rounds: int, shard_size: int) -> dict:
    files = sorted(str(p) for p in Path(source).rglob("*") if p.is_file())
    ingest_ratios, read_ratios = [], []
    ingest_rates, bare_ingest_rates, read_rates, bare_read_rates = [], [], [], []
    urls: list[str] = []
    for r in range(rounds):
        root = os.path.join(work, f"{name}-root-{r}")
        t_bare, n_bare = timed(bare_ingest, files, os.path.join(work, f"{name}-bare-{r}.tar"))
        t_cv, n_cv = timed(cvpipe_ingest, source, root, shard_size)
        assert n_cv == n_bare == len(files), (n_cv, n_bare)
        bare_ingest_rates.append(n_bare / t_bare)
        ingest_rates.append(n_cv / t_cv)
        ingest_ratios.append(t_bare / t_cv)

        urls = shards_of(root)
        blobs = [s.data for u in urls for s in shards.read_shard_samples(u, decode=False)[0]]
        t_bare, n_bare = timed(bare_decode, blobs)
        t_cv, n_cv = timed(cvpipe_read, urls)
        assert n_cv == n_bare
        bare_read_rates.append(n_bare / t_bare)
        read_rates.append(n_cv / t_cv)
        read_ratios.append(t_bare / t_cv)
    return {
        "dataset": name,
        "images": len(files),
        "shards": len(urls),
        "ingest_images_per_s": statistics.median(ingest_rates),
        "bare_tarfile_images_per_s": statistics.median(bare_ingest_rates),
        "ingest_ratio": statistics.median(ingest_ratios),
        "read_decode_images_per_s": statistics.median(read_rates),
        "bare_pil_decode_images_per_s": statistics.median(bare_read_rates),
        "read_ratio": statistics.median(read_ratios),
        "rounds": rounds,
    }


def shards_of(root: str) -> list[str]:
    from cvpipe.core.storage import list_committed

    return list_committed(os.path.join(root, "shards", "bench"), ".tar")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer images and rounds")
    p.add_argument("--out", default="benchmarks/results/bench_shards.json")
    args = p.parse_args(argv)
    photos, rounds = (400, 3) if args.quick else (3000, 5)
    results = []
    with tempfile.TemporaryDirectory() as work:
        photo_dir, digit_dir = os.path.join(work, "photos"), os.path.join(work, "digits")
        datasets.export_photos(photo_dir, count=photos, size=256)
        datasets.export_digits(digit_dir, size=32)
        results.append(bench_dataset("photos-256px-jpeg", photo_dir, work, rounds, 1000))
        results.append(bench_dataset("digits-32px-png", digit_dir, work, rounds, 1000))
    for r in results:
        print(
            f"{r['dataset']:>18}: ingest {r['ingest_images_per_s']:8.0f} img/s "
            f"(bare tarfile {r['bare_tarfile_images_per_s']:8.0f}) ratio {r['ingest_ratio']:.2f} | "
            f"read+decode {r['read_decode_images_per_s']:7.0f} img/s "
            f"(bare PIL {r['bare_pil_decode_images_per_s']:7.0f}) ratio {r['read_ratio']:.2f}"
        )
    target_met = all(r["ingest_ratio"] >= 0.8 and r["read_ratio"] >= 0.8 for r in results)
    print(f"target (both ratios >= 0.8): {'met' if target_met else 'NOT met'}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "benchmark": "bench_shards",
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "results": results,
                "target_met": target_met,
            },
            f,
            indent=2,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
