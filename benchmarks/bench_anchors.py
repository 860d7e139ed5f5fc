"""Anchor labeling throughput and memory: streamed from Parquet vs a bare FAISS search.

1. Label N x 512-d float32 embeddings (2M, 4 GB by default) streamed from a features
   Parquet file against 16 anchors (Nearest-1, cosine): images/s and peak RSS, and the
   ratio to a bare FAISS search (IndexFlatIP, the same k) of the same matrix held in
   memory, measured in the same run. Target ratio >= 0.8.
2. Peak RSS of the labeler at 0.5M vs 2M images: it must not grow with the count.

Every measurement runs in its own subprocess, so each peak RSS is its own. Data goes to
/tmp (disk space checked first), is generated in batches and deleted afterwards.

    python benchmarks/bench_anchors.py            # 2M + 0.5M, ~5 GB in /tmp
    python benchmarks/bench_anchors.py --quick    # 200k + 50k

Prints a summary and writes benchmarks/results/bench_anchors.json.
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

RESULTS = ROOT / "benchmarks" / "results" / "bench_anchors.json"
GEN_BATCH = 16_384  # rows per generated batch and per Parquet row group


def peak_rss_mb() -> float:
    """Peak RSS of this process image. VmHWM, not ru_maxrss: after fork + exec,
    ru_maxrss still holds the parent's high-water mark at fork time (seen here: every
    child reported the generator's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------ data


CODECS = {
    # What tables.write_parquet does: dictionary on strings only, float vectors plain.
    "pipeline": "pipeline",
    # The encoding the pipeline used before: zstd and dictionary on every column.
    "zstd-dict": {"compression": "zstd", "use_dictionary": True},
}


def _codec(codec: str, schema) -> dict:
    from cvpipe.core import tables

    return tables.parquet_write_options(schema) if codec == "pipeline" else CODECS[codec]


def generate(url: str, rows: int, dim: int, seed: int, codec: str = "pipeline") -> float:
    """A features Parquet file (features_schema), generated in batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cvpipe.core import tables

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    schema = tables.features_schema(dim).with_metadata(
        {tables.LINEAGE_KEY: json.dumps(tables.lineage(model_id="bench")).encode()}
    )
    with pq.ParquetWriter(url, schema, **_codec(codec, schema)) as w:
        for start in range(0, rows, GEN_BATCH):
            n = min(GEN_BATCH, rows - start)
            # ReLU-like features: non-negative, some zeros, like penultimate activations.
            emb = np.maximum(rng.standard_normal((n, dim), dtype=np.float32) + 0.3, 0)
            keys = pa.array([f"bench/{i:010d}" for i in range(start, start + n)])
            col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)
            shard = pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(n, np.int32)), pa.array(["bench/part-000000"])
            ).cast(pa.string())
            w.write_table(pa.Table.from_arrays([keys, shard, col], schema=schema))
    return time.perf_counter() - t0


def make_anchors(url: str, count: int, dim: int, seed: int) -> None:
    from cvpipe.label import anchors as an

    rng = np.random.default_rng(seed)
    sums = an.AnchorSums("mean", dim, model="bench")
    for i in range(count):
        sums.sums[f"anchor{i:02d}"] = np.maximum(rng.standard_normal(dim) + 0.3, 0) * 100
        sums.counts[f"anchor{i:02d}"] = 100
    an.write_anchors(sums, url)


# --------------------------------------------------------------------------- children


def child_label(args: argparse.Namespace) -> dict:
    from cvpipe.label import anchors as an

    base = peak_rss_mb()
    t0 = time.perf_counter()
    res = an.label_file(
        args.features,
        args.anchors,
        args.out,
        args.method,
        n=args.n,
        metric="cosine",
        batch_rows=args.batch_rows or None,
        prefetch=args.prefetch,
        gpu=False,
    )
    secs = time.perf_counter() - t0
    return {
        "rows": res["rows"],
        "seconds": secs,
        "images_per_s": res["rows"] / secs,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": base,
    }


def child_bare(args: argparse.Namespace) -> dict:
    import faiss
    import pyarrow.parquet as pq

    from cvpipe.label import anchors as an

    names, mat, _ = an.read_anchors(args.anchors)
    pf = pq.ParquetFile(args.features)
    rows, dim = pf.metadata.num_rows, mat.shape[1]
    x = np.empty((rows, dim), np.float32)
    i = 0
    for _, _, emb in an.iter_features(args.features, with_keys=False):
        x[i : i + len(emb)] = emb
        i += len(emb)
    faiss.normalize_L2(x)
    a = mat.copy()
    faiss.normalize_L2(a)
    index = faiss.IndexFlatIP(dim)
    index.add(a)
    out = {"rows": rows}
    for k in sorted({1, args.n, args.n + 1, len(names)}):
        if k > len(names):
            continue
        t0 = time.perf_counter()
        index.search(x, k)
        secs = time.perf_counter() - t0
        out[f"k{k}_seconds"] = secs
        out[f"k{k}_images_per_s"] = rows / secs
    # The baseline is the least a Nearest-N labeler must search: the top N.
    out["k"] = args.n
    out["seconds"] = out[f"k{args.n}_seconds"]
    out["images_per_s"] = out[f"k{args.n}_images_per_s"]
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_child(kind: str, **kw: object) -> dict:
    cmd = [sys.executable, __file__, "--child", kind]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="200k and 50k images instead of 2M and 0.5M"
    )
    p.add_argument("--rows", type=int, default=None, help="images of the large run")
    p.add_argument("--small-rows", type=int, default=None, help="images of the small run")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--anchor-count", type=int, default=16)
    p.add_argument("--method", default="nearest")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--batch-rows", type=int, default=0, help="0: the library's default")
    p.add_argument("--prefetch", type=int, default=1, help="batches decoded ahead")
    p.add_argument(
        "--codec",
        choices=sorted(CODECS),
        default="pipeline",
        help="how the features Parquet is written: pipeline = tables.write_parquet's "
        "encoding (embedding plain), zstd-dict = zstd + dictionary on every column",
    )
    p.add_argument("--tmp", default="/tmp")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    # internal: one measurement in a subprocess
    p.add_argument("--child", choices=["label", "bare"])
    p.add_argument("--features")
    p.add_argument("--anchors")
    p.add_argument("--out")
    args = p.parse_args()

    if args.child:
        res = child_label(args) if args.child == "label" else child_bare(args)
        print(json.dumps(res))
        return

    big = args.rows or (200_000 if args.quick else 2_000_000)
    small = args.small_rows or max(1, big // 4)
    need = (big + small) * args.dim * 4 * 1.1 + 512 * 2**20
    free = shutil.disk_usage(args.tmp).free
    print(f"disk: {free / 2**30:.1f} GiB free in {args.tmp}, need ~{need / 2**30:.1f} GiB")
    if free < need:
        sys.exit(f"not enough space in {args.tmp}")

    work = tempfile.mkdtemp(prefix="bench_anchors_", dir=args.tmp)
    try:
        anchors = os.path.join(work, "anchors.parquet")
        make_anchors(anchors, args.anchor_count, args.dim, seed=1)
        files = {}
        for rows in (big, small):
            url = os.path.join(work, "features", "bench", f"part-{rows}.parquet")
            os.makedirs(os.path.dirname(url), exist_ok=True)
            secs = generate(url, rows, args.dim, seed=rows, codec=args.codec)
            files[rows] = url
            print(
                f"generated {rows:,} x {args.dim} float32 "
                f"({os.path.getsize(url) / 2**30:.2f} GiB Parquet) in {secs:.1f} s"
            )

        common = dict(
            anchors=anchors,
            method=args.method,
            n=args.n,
            batch_rows=args.batch_rows,
            prefetch=args.prefetch,
        )
        label_big = run_child(
            "label", features=files[big], out=os.path.join(work, "labels_big.parquet"), **common
        )
        bare = run_child("bare", features=files[big], anchors=anchors, n=args.n)
        label_small = run_child(
            "label", features=files[small], out=os.path.join(work, "labels_small.parquet"), **common
        )
        ratio = label_big["images_per_s"] / bare["images_per_s"]
        ratio_full = label_big["images_per_s"] / bare[f"k{args.anchor_count}_images_per_s"]
        rss_growth = label_big["peak_rss_mb"] / label_small["peak_rss_mb"]
        result = {
            "benchmark": "bench_anchors",
            "quick": args.quick,
            "rows": big,
            "small_rows": small,
            "dim": args.dim,
            "anchors": args.anchor_count,
            "method": f"{args.method}{args.n}" if args.method == "nearest" else args.method,
            "metric": "cosine",
            "batch_rows": args.batch_rows or "default",
            "prefetch": args.prefetch,
            "codec": args.codec,
            "label": label_big,
            "bare_faiss_in_memory": bare,
            "label_small": label_small,
            "ratio_label_to_bare": ratio,
            "ratio_label_to_bare_full_ranking": ratio_full,
            "target_ratio": 0.8,
            "ratio_ok": ratio >= 0.8,
            "peak_rss_ratio_big_to_small": rss_growth,
            "rss_flat": label_big["peak_rss_mb"] <= label_small["peak_rss_mb"] * 1.1 + 32,
            "cpus": os.cpu_count(),
            "machine": platform.platform(),
        }
        print(
            f"labeler (streamed from Parquet, {result['method']}, cosine): "
            f"{label_big['images_per_s']:,.0f} img/s, {label_big['seconds']:.2f} s, "
            f"peak RSS {label_big['peak_rss_mb']:.0f} MB"
        )
        print(
            f"bare FAISS IndexFlatIP search k={bare['k']}, matrix in memory: "
            f"{bare['images_per_s']:,.0f} img/s, {bare['seconds']:.2f} s "
            f"(k={args.anchor_count}: {bare[f'k{args.anchor_count}_images_per_s']:,.0f} img/s), "
            f"peak RSS {bare['peak_rss_mb']:.0f} MB"
        )
        print(
            f"ratio labeler / bare search k={bare['k']}: {ratio:.2f} "
            f"(target >= 0.8: {result['ratio_ok']}); / k={args.anchor_count}: {ratio_full:.2f}"
        )
        print(
            f"peak RSS labeler: {small:,} images {label_small['peak_rss_mb']:.0f} MB, "
            f"{big:,} images {label_big['peak_rss_mb']:.0f} MB "
            f"(x{rss_growth:.2f}, flat: {result['rss_flat']})"
        )
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        out = (
            RESULTS
            if args.codec == "pipeline"
            else RESULTS.with_name(f"bench_anchors_{args.codec}.json")
        )
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
