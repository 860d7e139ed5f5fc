"""The index build side by side with autofaiss, then build time and peak RSS vs N.

1. N x 128 synthetic clustered vectors (cvpipe.index.synthetic: cluster centres plus a
   16-d subspace per cluster plus noise), as features Parquet for cvpipe and as .npy
   for autofaiss: the same vectors. Both build under the same memory budget, with the
   same FAISS threads, each in its own process (peak RSS is its own): build time,
   index file size, peak RSS, recall@10 of fresh queries against exact search (the
   intersection measure, and the FAISS wiki's 1-recall@10), queries/s (one batch).
   Targets: cvpipe's IVF-PQ recall@10 >= 0.9 and >= autofaiss's; build time <= 1.0x.
   Build time is reported as wall time and as CPU seconds of the building process: on
   cores shared with other work the wall time says more about the neighbours' load.
2. cvpipe's IVF-PQ build at N = 0.25M, 0.5M, 1M, 2M: build time and peak RSS.

autofaiss pins numpy < 2 and cvpipe needs numpy >= 2: they cannot share an environment,
so autofaiss runs in its own virtualenv (benchmarks/autofaiss_venv.sh makes one; pass
its python with --autofaiss-python or CVPIPE_AUTOFAISS_PYTHON). It reads local files
only and downloads nothing.

    python benchmarks/bench_index.py                       # 1M side by side + sweep to 2M
    python benchmarks/bench_index.py --n 250000 --sweep 250000,500000
    python benchmarks/bench_index.py --quick               # 100k, sweep 50k-200k

Writes benchmarks/results/bench_index.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "bench_index.json"
CHUNK = 250_000  # rows per features file / .npy folder
K = 10
DEFAULT_AUTOFAISS = Path.home() / ".cache" / "cvpipe" / "autofaiss-venv" / "bin" / "python"

PEAK = """
def peak_mb():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024
"""

AUTOFAISS_WORKER = (
    PEAK
    + """
import json, sys, time, os
import numpy as np, faiss
from autofaiss import build_index
args = json.loads(sys.argv[1])
faiss.omp_set_num_threads(args["threads"])
t0, c0 = time.perf_counter(), time.process_time()
index, infos = build_index(
    embeddings=args["npy"], index_path=args["index"], index_infos_path=args["infos"],
    max_index_memory_usage=args["memory"], current_memory_available="16G",
    metric_type="l2", nb_cores=args["threads"], verbose=30,
)
build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - c0
q = np.load(args["queries"])
truth = np.load(args["truth"])
index = faiss.read_index(args["index"])
faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])
faiss.omp_set_num_threads(args["threads"])
t0 = time.perf_counter()
_, found = index.search(q, 10)
search_s = time.perf_counter() - t0
hits = np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth)])
one = np.mean([t[0] in f for f, t in zip(found, truth)])
print(json.dumps({
    "index_key": infos["index_key"], "index_param": infos["index_param"],
    "build_s": build_s, "build_cpu_s": build_cpu_s,
    "file_bytes": os.path.getsize(args["index"]),
    "recall_at_10": float(hits), "one_recall_at_10": float(one),
    "queries_per_s": len(q) / search_s, "peak_rss_mb": peak_mb(),
}))
"""
)

CVPIPE_WORKER = (
    PEAK
    + """
import json, sys, time
import numpy as np
from cvpipe.index import engine, store
from cvpipe.index.config import IndexBuildConfig
args = json.loads(sys.argv[1])
cfg = IndexBuildConfig(embeddings=args["files"], out=args["index"], kind=args["kind"],
                       memory=args["memory"], target_recall=args["target"], threads=args["threads"])
t0, c0 = time.perf_counter(), time.process_time()
stats = store.build_index(cfg)
build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - c0
out = {"factory": stats.factory, "nprobe": stats.nprobe, "tuned_recall": stats.tuned_recall,
       "build_s": build_s, "build_cpu_s": build_cpu_s, "file_bytes": stats.file_bytes,
       "count": stats.count,
       "peak_rss_mb_build": peak_mb()}
if args.get("queries"):
    q = np.load(args["queries"]); truth = np.load(args["truth"])
    opened = store.open_index(args["index"])
    with engine.faiss_threads(args["threads"]):
        t0 = time.perf_counter()
        _, found = opened.search(q, 10)
        search_s = time.perf_counter() - t0
    out.update(recall_at_10=engine.recall_at_k(found, truth, 10),
               one_recall_at_10=engine.nearest_in_k(found, truth, 10),
               queries_per_s=len(q) / search_s)
out["peak_rss_mb"] = peak_mb()
print(json.dumps(out))
"""
)


def run_worker(python: str, code: str, args: dict, env: dict | None = None) -> dict:
    proc = subprocess.run(
        [python, "-c", code, json.dumps(args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_data(
    tmp: Path, n: int, dim: int, queries: int, chunk: int
) -> tuple[list[str], list[str], Path]:
    """Features Parquet and .npy chunks of the same ``n`` vectors; fresh query rows."""
    from cvpipe.index.synthetic import Clustered, write_features

    g = Clustered(dim, clusters=1024, intrinsic=16, seed=0)
    files, npy_dirs = [], []
    for c, s in enumerate(range(0, n, chunk)):
        x, _ = g.rows(s, min(n, s + chunk))
        sid = f"bench/chunk-{c:06d}"
        url = str(tmp / "features" / f"{sid}.parquet")
        write_features(url, [f"v{i}" for i in range(s, s + len(x))], sid, x, model_id="bench")
        d = tmp / "npy" / f"chunk-{c:06d}"
        d.mkdir(parents=True)
        np.save(d / "emb.npy", x)
        files.append(url)
        npy_dirs.append(str(d))
    q, _ = g.rows(50_000_000, 50_000_000 + queries)  # rows no index holds
    np.save(tmp / "queries.npy", q)
    return files, npy_dirs, tmp / "queries.npy"


def exact_truth(files: list[str], queries: np.ndarray, threads: int) -> np.ndarray:
    from cvpipe.index import engine, source

    with engine.faiss_threads(threads):
        knn = engine.ExactKnn(queries, K, "l2")
        for _, _, x in source.iter_embeddings(files):
            knn.add(x)
        return knn.result()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--memory", default="256M", help="the budget both builds get")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="FAISS threads, both sides")
    ap.add_argument("--target", type=float, default=0.95, help="cvpipe's nprobe tuning target")
    ap.add_argument("--sweep", default="250000,500000,1000000,2000000")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-autofaiss", action="store_true")
    ap.add_argument(
        "--autofaiss-python",
        default=os.environ.get("CVPIPE_AUTOFAISS_PYTHON", str(DEFAULT_AUTOFAISS)),
    )
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    a = ap.parse_args()
    if a.quick:
        a.n, a.sweep = 100_000, "50000,100000,200000"
    sweep = [int(s) for s in a.sweep.split(",") if s]
    total = max([a.n, *sweep])
    # Files of `chunk` rows, so every size is a whole number of files.
    chunk = min(CHUNK, a.n, *sweep)
    if any(s % chunk for s in [a.n, *sweep]):
        raise SystemExit(f"--n and --sweep must be multiples of {chunk}")
    need = total * a.dim * 4 * 2.2
    tmp = Path(tempfile.mkdtemp(prefix="bench_index_", dir=a.tmp))
    if shutil.disk_usage(tmp).free < need:
        raise SystemExit(f"need ~{need / 1e9:.1f} GB free in {a.tmp}")
    result: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_start": os.getloadavg(),
        },
        "args": vars(a),
    }
    try:
        t0 = time.perf_counter()
        files, npy_dirs, qpath = make_data(tmp, total, a.dim, a.queries, chunk)
        result["generate_s"] = round(time.perf_counter() - t0, 1)
        chunks = a.n // chunk
        q = np.load(qpath)
        truth = exact_truth(files[:chunks], q, a.threads)
        np.save(tmp / "truth.npy", truth)
        common = {"memory": a.memory, "threads": a.threads, "queries": str(qpath),
                  "truth": str(tmp / "truth.npy")}  # fmt: skip

        side: dict = {"n": a.n}
        side["cvpipe"] = run_worker(
            sys.executable, CVPIPE_WORKER,
            {**common, "files": files[:chunks], "index": str(tmp / "cvpipe-ix"), "kind": "auto",
             "target": a.target},
        )  # fmt: skip
        print("cvpipe", json.dumps(side["cvpipe"]), flush=True)
        if not a.skip_autofaiss:
            if not Path(a.autofaiss_python).exists():
                raise SystemExit(
                    f"no autofaiss python at {a.autofaiss_python}: run "
                    "benchmarks/autofaiss_venv.sh or pass --skip-autofaiss"
                )
            side["autofaiss"] = run_worker(
                a.autofaiss_python, AUTOFAISS_WORKER,
                {**common, "npy": npy_dirs[:chunks], "index": str(tmp / "af.index"),
                 "infos": str(tmp / "af.json")},
            )  # fmt: skip
            print("autofaiss", json.dumps(side["autofaiss"]), flush=True)
            c, f = side["cvpipe"], side["autofaiss"]
            side["build_time_ratio"] = c["build_s"] / f["build_s"]
            # CPU seconds: what the wall time would be on cores nobody else uses.
            side["build_cpu_ratio"] = c["build_cpu_s"] / f["build_cpu_s"]
            side["recall_diff"] = c["recall_at_10"] - f["recall_at_10"]
            side["size_ratio"] = c["file_bytes"] / f["file_bytes"]
        result["side_by_side"] = side

        rows = []
        for n in sweep:
            r = run_worker(
                sys.executable, CVPIPE_WORKER,
                {"files": files[: n // chunk], "index": str(tmp / f"sweep-{n}"),
                 "kind": "ivfpq", "memory": a.memory, "threads": a.threads,
                 "target": a.target},
            )  # fmt: skip
            r["n"] = n
            print("sweep", json.dumps(r), flush=True)
            rows.append(r)
        result["sweep"] = rows
        if len(rows) > 1:
            result["sweep_growth"] = {
                "n_ratio": rows[-1]["n"] / rows[0]["n"],
                "build_s_ratio": rows[-1]["build_s"] / rows[0]["build_s"],
                "build_cpu_ratio": rows[-1]["build_cpu_s"] / rows[0]["build_cpu_s"],
                "peak_rss_ratio": rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"],
            }
        result["machine"]["load_avg_end"] = os.getloadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "args"}, indent=2, default=str))


if __name__ == "__main__":
    main()
