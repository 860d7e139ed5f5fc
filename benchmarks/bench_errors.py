"""Bad input on the command line: the time to the error line, the lines printed, the
line itself; this tree against a baseline checkout in the same run.

Each case is a fresh ``python -m flows.cli`` process (the issue's measured cases and a
few more). Target: one line each, under 10 s (S3 under 30 s).

    python benchmarks/bench_errors.py [--rounds 1] [--baseline-tree /path/to/main]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cases(w: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    dead = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}",
            "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}  # fmt: skip
    no_keys = {"AWS_ENDPOINT_URL": dead["AWS_ENDPOINT_URL"], "AWS_EC2_METADATA_DISABLED": "true",
               "AWS_SHARED_CREDENTIALS_FILE": str(w / "none"),
               "AWS_CONFIG_FILE": str(w / "none")}  # fmt: skip
    shards, out = str(w / "root" / "shards" / "p"), str(w / "out")
    return {
        "missing checkpoint": (["infer", shards, "--model", "nope.pt", "--out", out,
                                "--shards-per-unit", "1"], {}),
        "dead S3 endpoint": (["ingest", "s3://b/in/", "--out", out, "--partition", "p"], dead),
        "S3 without credentials": (["ingest", "s3://b/in/", "--out", out, "--partition", "p"],
                                   no_keys),
        "text file as checkpoint": (["infer", shards, "--model", str(w / "text.pt"),
                                     "--out", out], {}),
        "flag out of range": (["select", shards, "--out", out, "--top-k", "0"], {}),
        "no CUDA device": (["train", "--shards", shards, "--out", out, "--device", "cuda"], {}),
        "output under a file": (["ingest", str(w / "images"), "--out", str(w / "text.pt/o"),
                                 "--partition", "p"], {}),
        "empty source folder": (["ingest", str(w / "empty"), "--out", out, "--partition", "p"],
                                {}),
    }  # fmt: skip


def run_case(tree: Path, args: list[str], extra: dict[str, str], home: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_API_URL"))}
    env.update(PYTHONPATH=str(tree), PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.update(extra)
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=tree,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"seconds": 600.0, "rc": None, "lines": None, "last": "(timed out)"}
    seconds = time.perf_counter() - t
    lines = (r.stdout + r.stderr).strip().splitlines()
    errors = [x for x in lines if x.startswith("error:")]
    return {
        "seconds": seconds,
        "rc": r.returncode,
        "lines": len(lines),
        "tracebacks": sum("Traceback" in x for x in lines),
        "last": (errors[-1] if errors else lines[-1] if lines else "")[:400],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--baseline-tree", default=None)
    p.add_argument("--out", default="benchmarks/results/bench_errors.json")
    args = p.parse_args(argv)
    trees = {"this": HERE}
    if args.baseline_tree:
        trees["baseline"] = Path(args.baseline_tree).resolve()
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as work:
        w = Path(work)
        (w / "text.pt").write_text("not a model\n")
        (w / "empty").mkdir()
        (w / "images").mkdir()
        (w / "images" / "a.jpg").write_bytes(b"x")
        setup = (
            "from cvpipe.data import datasets, ingest\n"
            "from cvpipe.data.config import IngestConfig\n"
            f"datasets.export_photos('{w}/photos', count=20, size=64)\n"
            f"ingest.ingest_partition(IngestConfig(source='{w}/photos', root='{w}/root',"
            " partition='p', shard_size=10))\n"
        )
        subprocess.run([sys.executable, "-c", setup], check=True, cwd=HERE,
                       env={**os.environ, "PYTHONPATH": str(HERE)})  # fmt: skip
        for r in range(args.rounds):
            for name, (cmd, extra) in cases(w).items():
                for label, tree in trees.items():
                    res = run_case(tree, cmd, extra, str(w / f"home-{label}-{r}"))
                    results.setdefault(name, {}).setdefault(label, []).append(res)
                    print(f"{name:>24} {label:>8}: {res['seconds']:6.1f} s, rc {res['rc']}, "
                          f"{res['lines']} line(s): {res['last'][:150]}", flush=True)  # fmt: skip
    summary = {
        name: {
            label: {
                "median_s": statistics.median(x["seconds"] for x in runs),
                "lines": runs[-1]["lines"],
                "tracebacks": runs[-1].get("tracebacks"),
                "rc": runs[-1]["rc"],
                "error_line": runs[-1]["last"],
            }
            for label, runs in by_tree.items()
        }
        for name, by_tree in results.items()
    }
    for by_tree in summary.values():
        if "baseline" in by_tree:
            by_tree["this"]["speedup_vs_baseline"] = (
                by_tree["baseline"]["median_s"] / by_tree["this"]["median_s"]
            )
    met = all(
        s["this"]["lines"] == 1 and s["this"]["median_s"] < (30 if "S3" in n else 10)
        for n, s in summary.items()
    )
    print(f"target (one line, < 10 s, S3 < 30 s): {'met' if met else 'NOT met'}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "bench_errors", "cases": summary, "target_met": met}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
