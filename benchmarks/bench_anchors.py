"""Anchor labeling throughput and memory on the features contract (.npy + keys Parquet).

1. Label N x 512-d float32 features (2M, 4 GB by default; one features file) against 16
   anchors (Nearest-1, cosine) with the library's labeler, which reads keys and matrix
   through cvpipe.data.features and writes the labels Parquet. Measured against, in the
   same run:
   - the bound: a bare read of the same bytes (keys Parquet + matrix) into memory, plus
     a bare FAISS search (IndexFlatIP, k=N) on the matrix held in memory; target:
     labeler >= 0.8x the bound;
   - in-memory FAISS alone (that search); target: labeler >= 0.5x.
2. Peak RSS of the labeler at 0.5M vs 2M images: it must not grow with the count.
3. ``--layouts``: read speed of the same 200k x 512 matrix in the candidate layouts
   (Parquet fixed_size_list<float32>, Parquet fixed_size_binary, Arrow IPC memory-mapped,
   .npy): why the contract stores an .npy.

4. ``--before REF``: the labeler of an earlier commit (``git archive REF cvpipe``) on the
   same file in the same rounds: the before/after comparison of a change.

Every measurement runs in its own subprocess (each peak RSS is its own), and the rounds
interleave labeler and bound so that a busy machine slows both alike; the best of the
rounds is reported, and the ratio of each round. CPU seconds are reported beside wall
time: where other jobs share the cores, Linux shares CPU out per session (autogroup),
so a process gets about the same CPU time per second with one thread as with three,
and the wall ratio follows the CPU ratio. Data goes to /tmp (disk space checked first),
is generated in batches and deleted afterwards (``--work DIR`` keeps and reuses it).

    python benchmarks/bench_anchors.py            # 2M + 0.5M, ~5 GB in /tmp
    python benchmarks/bench_anchors.py --quick    # 200k + 50k
    python benchmarks/bench_anchors.py --omp-threads 1 --before 84fb3bf

Prints a summary and writes benchmarks/results/bench_anchors.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "bench_anchors.json"
GEN_BATCH = 65_536  # rows per generated batch


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


def _vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    # ReLU-like features: non-negative, some zeros, like penultimate activations.
    return np.maximum(rng.standard_normal((n, dim), dtype=np.float32) + 0.3, 0)


# ------------------------------------------------------------------------------ data


def generate(url: str, rows: int, dim: int, seed: int) -> float:
    """One features file of the contract, written in batches (the library's writer takes
    a whole matrix; this file is larger than a shard's)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from numpy.lib import format as npy_format

    from cvpipe.core import tables
    from cvpipe.data import features

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    m_url = features.matrix_url(url)
    base = features.keys_schema(dim, rows, os.path.basename(m_url))
    lineage = json.dumps(tables.lineage(model_id="bench")).encode()
    schema = base.with_metadata({**base.metadata, tables.LINEAGE_KEY: lineage})
    with (
        open(m_url, "wb") as mf,
        pq.ParquetWriter(url, schema, **tables.parquet_write_options(schema)) as w,
    ):
        header = {"descr": features.DTYPE.str, "fortran_order": False, "shape": (rows, dim)}
        npy_format.write_array_header_1_0(mf, header)
        for start in range(0, rows, GEN_BATCH):
            n = min(GEN_BATCH, rows - start)
            mf.write(_vectors(rng, n, dim).tobytes())
            keys = pa.array([f"bench/{i:010d}" for i in range(start, start + n)])
            shard = pa.array(["bench/part-000000"] * n)
            w.write_table(pa.Table.from_arrays([keys, shard], schema=schema))
    features.features_info(url)  # the file reads as a valid features file
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
    if args.code:  # an earlier commit's library (--before)
        sys.path.insert(0, args.code)
    from cvpipe.label import anchors as an

    assert Path(an.__file__).is_relative_to(args.code or ROOT), an.__file__

    if os.path.exists(args.out):
        os.remove(args.out)
    base = peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
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
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "rows": res.rows,
        "seconds": secs,
        "cpu_seconds": cpu,
        "images_per_s": res.rows / secs,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": base,
    }


def child_bound(args: argparse.Namespace) -> dict:
    """The bare read of the labeler's bytes (keys decoded, matrix read in 16 MiB chunks
    into one reused buffer: no allocation, no processing), then bare FAISS on the
    matrix held in memory (loaded untimed)."""
    import faiss
    import pyarrow.parquet as pq

    from cvpipe.data import features
    from cvpipe.label import anchors as an

    names, mat, _ = an.read_anchors(args.anchors)
    info = features.features_info(args.features)
    rows, dim = info.rows, info.dim
    buf = memoryview(np.empty(16 << 20, np.uint8))
    t0, c0 = time.perf_counter(), time.process_time()
    pf = pq.ParquetFile(args.features, pre_buffer=False)
    key_bytes = sum(b.nbytes for b in pf.iter_batches(batch_size=65_536, columns=["key", "shard"]))
    with open(info.matrix_url, "rb", buffering=0) as f:
        f.seek(info.data_offset)
        while f.readinto(buf):
            pass
    read_s, read_cpu = time.perf_counter() - t0, time.process_time() - c0
    x = np.load(info.matrix_url)
    faiss.normalize_L2(x)
    a = mat.copy()
    faiss.normalize_L2(a)
    index = faiss.IndexFlatIP(dim)
    index.add(a)
    t0, c0 = time.perf_counter(), time.process_time()
    index.search(x, args.n)
    faiss_s, faiss_cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "rows": rows,
        "k": args.n,
        "read_seconds": read_s,
        "read_gb_per_s": (x.nbytes + key_bytes) / read_s / 1e9,
        "faiss_seconds": faiss_s,
        "faiss_images_per_s": rows / faiss_s,
        "seconds": read_s + faiss_s,
        "cpu_seconds": read_cpu + faiss_cpu,
        "faiss_cpu_seconds": faiss_cpu,
        "images_per_s": rows / (read_s + faiss_s),
        "peak_rss_mb": peak_rss_mb(),
    }


def child_layouts(args: argparse.Namespace) -> dict:
    """Read speed (GB/s of float32 matrix) of one matrix in four layouts, warm cache."""
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    from cvpipe.data import features

    rows, dim = args.layout_rows, 512
    x = _vectors(np.random.default_rng(0), rows, dim)
    work = Path(args.out)
    files = {k: str(work / f"layout.{k}") for k in ("list", "binary", "arrow")}
    files["contract"] = str(work / "layout.parquet")
    features.write_features(files["contract"], [str(i) for i in range(rows)], "s", x, {})
    flat = pa.array(x.reshape(-1))
    pq.write_table(
        pa.table({"v": pa.FixedSizeListArray.from_arrays(flat, dim)}),
        files["list"],
        compression="none",
    )
    binary = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(dim * 4), rows, [None, pa.py_buffer(x.tobytes())]
    )
    pq.write_table(pa.table({"v": binary}), files["binary"], compression="none")
    with ipc.new_file(files["arrow"], pa.schema([("v", pa.binary(dim * 4))])) as w:
        w.write_table(pa.table({"v": binary}))

    def read_list() -> None:
        for rb in pq.ParquetFile(files["list"], pre_buffer=False).iter_batches(65_536):
            rb.column(0).flatten().to_numpy()

    def read_binary() -> None:
        for rb in pq.ParquetFile(files["binary"], pre_buffer=False).iter_batches(65_536):
            np.frombuffer(rb.column(0).buffers()[1], np.float32)

    def read_arrow() -> None:
        with pa.memory_map(files["arrow"]) as src:
            t = ipc.open_file(src).read_all()
            for chunk in t.column(0).chunks:
                np.frombuffer(chunk.buffers()[1], np.float32).sum()  # touch the pages

    def read_npy() -> None:  # the contract's reader, matrix only
        for _ in features.iter_features(files["contract"], with_keys=False, prefetch=0):
            pass

    out = {}
    for name, fn in (
        ("parquet_fixed_size_list", read_list),
        ("parquet_fixed_size_binary", read_binary),
        ("arrow_ipc_mmap", read_arrow),
        ("npy_contract_reader", read_npy),
    ):
        fn()
        best = min(_timed(fn) for _ in range(3))
        out[name] = {"seconds": best, "gb_per_s": x.nbytes / best / 1e9}
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def export_code(ref: str, work: str) -> str:
    """The ``cvpipe`` package of commit ``ref`` in ``work/before`` (for --before)."""
    dest = os.path.join(work, "before")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "cvpipe"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


OMP_THREADS: int | None = None  # --omp-threads: FAISS's threads in every child


def run_child(kind: str, **kw: object) -> dict:
    cmd = [sys.executable, __file__, "--child", kind]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(OMP_THREADS)} if OMP_THREADS else {}))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
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
    p.add_argument("--prefetch", type=int, default=1, help="batches read ahead")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    p.add_argument(
        "--omp-threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of every measurement (FAISS's threads; default: all cores). "
        "1 keeps FAISS steady on a machine other jobs share",
    )
    p.add_argument("--layouts", action="store_true", help="also time the candidate layouts")
    p.add_argument("--layout-rows", type=int, default=200_000)
    p.add_argument("--tmp", default="/tmp")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--work", help="folder for the data, kept and reused by later runs")
    p.add_argument("--before", help="git ref: also time the labeler of that commit")
    # internal: one measurement in a subprocess
    p.add_argument("--child", choices=["label", "bound", "layouts"])
    p.add_argument("--features")
    p.add_argument("--anchors")
    p.add_argument("--out")
    p.add_argument("--code", help="import cvpipe from this folder")
    args = p.parse_args()

    if args.child:
        fn = {"label": child_label, "bound": child_bound, "layouts": child_layouts}
        print(json.dumps(fn[args.child](args)))
        return

    global OMP_THREADS
    OMP_THREADS = args.omp_threads
    big = args.rows or (200_000 if args.quick else 2_000_000)
    small = args.small_rows or max(1, big // 4)
    need = (big + small) * args.dim * 4 * 1.1 + 512 * 2**20
    if args.layouts:
        need += args.layout_rows * 512 * 4 * 5
    free = shutil.disk_usage(args.tmp).free
    print(f"disk: {free / 2**30:.1f} GiB free in {args.tmp}, need ~{need / 2**30:.1f} GiB")
    if free < need:
        sys.exit(f"not enough space in {args.tmp}")

    if args.work:
        os.makedirs(args.work, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="bench_anchors_", dir=args.tmp)
    try:
        anchors = os.path.join(work, "anchors.parquet")
        make_anchors(anchors, args.anchor_count, args.dim, seed=1)
        files = {}
        for rows in (big, small):
            url = os.path.join(work, "features", "bench", f"part-{rows}x{args.dim}.parquet")
            os.makedirs(os.path.dirname(url), exist_ok=True)
            if os.path.exists(url):  # --work: generated by an earlier run
                files[rows] = url
                print(f"reusing {url}")
                continue
            secs = generate(url, rows, args.dim, seed=rows)
            files[rows] = url
            size = os.path.getsize(url) + os.path.getsize(url[: -len(".parquet")] + ".npy")
            gib = size / 2**30
            print(f"generated {rows:,} x {args.dim} float32 ({gib:.2f} GiB) in {secs:.1f} s")

        common = dict(
            anchors=anchors,
            method=args.method,
            n=args.n,
            batch_rows=args.batch_rows,
            prefetch=args.prefetch,
        )
        before_code = export_code(args.before, work) if args.before else None
        rounds = []
        for r in range(args.rounds):
            rd = {}
            if before_code:
                rd["label_before"] = run_child(
                    "label",
                    features=files[big],
                    out=os.path.join(work, "labels_before.parquet"),
                    code=before_code,
                    **common,
                )
            rd["label"] = label = run_child(
                "label", features=files[big], out=os.path.join(work, "labels_big.parquet"), **common
            )
            rd["bound"] = bound = run_child("bound", features=files[big], anchors=anchors, n=args.n)
            rd["label_small"] = run_child(
                "label",
                features=files[small],
                out=os.path.join(work, "labels_small.parquet"),
                **common,
            )
            rounds.append(rd)
            before = ""
            if before_code:
                b = rd["label_before"]
                before = f"before {b['images_per_s']:,.0f} img/s ({b['cpu_seconds']:.2f} cpu s), "
            print(
                f"round {r + 1}: {before}labeler {label['images_per_s']:,.0f} img/s, bound "
                f"{bound['images_per_s']:,.0f} img/s (read {bound['read_gb_per_s']:.1f} GB/s, "
                f"FAISS {bound['faiss_images_per_s']:,.0f} img/s); cpu s: labeler "
                f"{label['cpu_seconds']:.2f}, bound {bound['cpu_seconds']:.2f}"
            )
        best = {k: min((rd[k] for rd in rounds), key=lambda m: m["seconds"]) for k in rounds[0]}
        best_faiss = min(rd["bound"]["faiss_seconds"] for rd in rounds)
        faiss_ips = big / best_faiss
        per_round_bound = [
            rd["label"]["images_per_s"] / rd["bound"]["images_per_s"] for rd in rounds
        ]
        per_round_faiss = [
            rd["label"]["images_per_s"] / rd["bound"]["faiss_images_per_s"] for rd in rounds
        ]
        ratio_bound = best["label"]["images_per_s"] / best["bound"]["images_per_s"]
        ratio_faiss = best["label"]["images_per_s"] / faiss_ips
        cpu_ratio_bound = [rd["bound"]["cpu_seconds"] / rd["label"]["cpu_seconds"] for rd in rounds]
        cpu_ratio_faiss = [
            rd["bound"]["faiss_cpu_seconds"] / rd["label"]["cpu_seconds"] for rd in rounds
        ]
        rss_big = max(rd["label"]["peak_rss_mb"] for rd in rounds)
        rss_small = max(rd["label_small"]["peak_rss_mb"] for rd in rounds)
        result = {
            "benchmark": "bench_anchors",
            "contract": "features .npy matrix + keys Parquet (cvpipe.data.features)",
            "quick": args.quick,
            "rows": big,
            "small_rows": small,
            "dim": args.dim,
            "anchors": args.anchor_count,
            "method": f"{args.method}{args.n}" if args.method == "nearest" else args.method,
            "metric": "cosine",
            "batch_rows": args.batch_rows or "default",
            "prefetch": args.prefetch,
            "omp_threads": args.omp_threads or "default",
            "rounds": rounds,
            "best": best,
            "in_memory_faiss_images_per_s": faiss_ips,
            "ratio_label_to_bound": ratio_bound,
            "ratio_label_to_bound_per_round": per_round_bound,
            "target_ratio_bound": 0.8,
            "ratio_bound_ok": ratio_bound >= 0.8,
            "ratio_label_to_in_memory_faiss": ratio_faiss,
            "ratio_label_to_in_memory_faiss_per_round": per_round_faiss,
            "target_ratio_in_memory_faiss": 0.5,
            "ratio_faiss_ok": ratio_faiss >= 0.5,
            "peak_rss_mb_small": rss_small,
            "peak_rss_mb_big": rss_big,
            "peak_rss_ratio_big_to_small": rss_big / rss_small,
            "rss_flat": rss_big <= rss_small * 1.1 + 32,
            "cpu_ratio_label_to_bound_per_round": cpu_ratio_bound,
            "cpu_ratio_label_to_in_memory_faiss_per_round": cpu_ratio_faiss,
            "before": args.before,
            "cpus": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0],
            "machine": platform.platform(),
        }
        if args.layouts:
            result["layouts"] = run_child("layouts", out=work, layout_rows=args.layout_rows)
        lb, bb = best["label"], best["bound"]
        print(
            f"labeler ({result['method']}, cosine, .npy + keys): {lb['images_per_s']:,.0f} img/s "
            f"({lb['seconds']:.2f} s, cpu {lb['cpu_seconds']:.2f} s), peak RSS {rss_big:.0f} MB"
        )
        print(
            f"bound: bare read {bb['read_seconds']:.2f} s ({bb['read_gb_per_s']:.1f} GB/s) + "
            f"bare FAISS IndexFlatIP k={args.n} {bb['faiss_seconds']:.2f} s = "
            f"{bb['images_per_s']:,.0f} img/s; in-memory FAISS best {faiss_ips:,.0f} img/s"
        )
        print(
            f"ratio labeler / bound: {ratio_bound:.2f} (target >= 0.8: {result['ratio_bound_ok']}; "
            f"per round {', '.join(f'{x:.2f}' for x in per_round_bound)}, "
            f"median {statistics.median(per_round_bound):.2f})"
        )
        rounds_faiss = ", ".join(f"{x:.2f}" for x in per_round_faiss)
        print(
            f"ratio labeler / in-memory FAISS: {ratio_faiss:.2f} (target >= 0.5: "
            f"{result['ratio_faiss_ok']}; per round {rounds_faiss})"
        )
        print(
            f"cpu: bound / labeler per round {', '.join(f'{x:.2f}' for x in cpu_ratio_bound)}; "
            f"FAISS / labeler {', '.join(f'{x:.2f}' for x in cpu_ratio_faiss)}"
        )
        if args.before:
            bl = best["label_before"]
            per_round = [
                rd["label"]["images_per_s"] / rd["label_before"]["images_per_s"] for rd in rounds
            ]
            print(
                f"before ({args.before}): {bl['images_per_s']:,.0f} img/s ({bl['seconds']:.2f} s, "
                f"cpu {bl['cpu_seconds']:.2f} s), ratio to the bound "
                f"{bl['images_per_s'] / bb['images_per_s']:.2f}, to FAISS "
                f"{bl['images_per_s'] / faiss_ips:.2f}; after / before per round "
                f"{', '.join(f'{x:.2f}' for x in per_round)}"
            )
        print(
            f"peak RSS labeler: {small:,} images {rss_small:.0f} MB, {big:,} images "
            f"{rss_big:.0f} MB (x{rss_big / rss_small:.2f}, flat: {result['rss_flat']})"
        )
        for name, m in result.get("layouts", {}).items():
            print(f"layout {name}: {m['gb_per_s']:.2f} GB/s")
        load = result["load_average_1m"]
        print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} cpus")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2))
        print(f"wrote {RESULTS}")
    finally:
        if args.work:
            shutil.rmtree(os.path.join(work, "before"), ignore_errors=True)
        elif not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
