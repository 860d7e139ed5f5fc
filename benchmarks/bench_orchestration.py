"""Orchestration overhead: the same 100-shard stage through Prefect vs a plain loop.

The stage is teacher inference (cvpipe.infer.stage.InferStage: read shards, decode,
forward, write Parquet), one shard per unit, ResNet-18 at 64 px on 128 JPEG crops per
shard. The plain path calls ``run_unit`` for every unit in a Python loop; the Prefect
path runs the same units through ``tasks.stage.run_units`` (the generic task, one task
run per unit, the default thread runner, one unit in flight as the infer flow does)
inside a flow run on the embedded API, after a warm-up flow so the API's cold start is
not counted. Rounds alternate (loop, Prefect, loop, Prefect, ...) on fresh outputs.

    python benchmarks/bench_orchestration.py [--quick]

Prints the ratio and the per-task overhead in ms; writes
benchmarks/results/bench_orchestration.json. Target: overhead <= 5%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT_DIR))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

RESULTS = ROOT_DIR / "benchmarks" / "results" / "bench_orchestration.json"


def make_shards(tmp: str, shards: int, per_shard: int) -> list[str]:
    from cvpipe.core import storage
    from cvpipe.data import ingest
    from cvpipe.data.config import IngestConfig
    from cvpipe.data.datasets import export_photos

    src = os.path.join(tmp, "photos")
    export_photos(src, count=shards * per_shard, size=64)
    root = os.path.join(tmp, "root")
    ingest.ingest_partition(IngestConfig(source=src, root=root, partition="bench",
                                         name="photos", shard_size=per_shard))  # fmt: skip
    return storage.list_committed(storage.join(root, "shards", "bench"), ".tar")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 shards, 1 round")
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.quick:
        args.shards, args.rounds = 20, 1

    import torch
    from prefect import flow

    from cvpipe import models
    from cvpipe.core.stage import run_unit
    from cvpipe.infer.config import InferConfig
    from cvpipe.infer.stage import InferStage
    from flows import local_api
    from tasks.stage import run_units

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="bench_orch_", dir=args.tmp)
    try:
        shards = make_shards(tmp, args.shards, args.per_shard)
        torch.manual_seed(0)
        ckpt = os.path.join(tmp, "teacher.pt")
        models.save_checkpoint(models.build("resnet18", 2),
                               models.ModelInfo("resnet18", ["a", "b"], 64), ckpt)  # fmt: skip

        def config(out: str) -> InferConfig:
            return InferConfig(shards=shards, checkpoint=ckpt, out=out, top_p=2, device="cpu",
                               num_workers=0, shards_per_unit=1, cpu_threads=1)  # fmt: skip

        def plain(out: str) -> float:
            stage = InferStage(config(out))
            t0 = time.perf_counter()
            for unit in stage.units():
                run_unit(stage, unit)
            wall = time.perf_counter() - t0
            stage.close()
            return wall

        @flow(name="bench-orchestration")
        def through_prefect(out: str) -> float:
            stage = InferStage(config(out))
            t0 = time.perf_counter()
            run_units(stage, max_in_flight=1)
            return time.perf_counter() - t0

        loop_s, prefect_s = [], []
        with local_api.owned_api(), local_api.api():
            through_prefect(os.path.join(tmp, "warmup-a"))  # API and model warm
            plain(os.path.join(tmp, "warmup-b"))
            for r in range(args.rounds):
                loop_s.append(plain(os.path.join(tmp, f"loop-{r}")))
                prefect_s.append(through_prefect(os.path.join(tmp, f"prefect-{r}")))
                print(f"round {r}: loop {loop_s[-1]:.2f} s, prefect {prefect_s[-1]:.2f} s",
                      flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    loop, pref = statistics.median(loop_s), statistics.median(prefect_s)
    overhead = pref / loop - 1
    per_task_ms = 1000 * (pref - loop) / args.shards
    result = {
        "benchmark": "bench_orchestration",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "stage": f"InferStage, resnet18 at 64 px, {args.per_shard} JPEG crops per shard, "
        "one shard per unit, 1 torch thread",
        "units": args.shards,
        "rounds": args.rounds,
        "loop_s": loop_s,
        "prefect_s": prefect_s,
        "unit_s": round(loop / args.shards, 4),
        "overhead": round(overhead, 4),
        "per_task_overhead_ms": round(per_task_ms, 1),
        "target": "overhead <= 0.05",
        "target_met": overhead <= 0.05,
        "rates": [
            {
                "stage": "infer",
                "images_per_s": round(args.shards * args.per_shard / loop, 1),
                "device": "cpu",
                "note": "resnet18 at 64 px, 1 thread",
            }
        ],  # fmt: skip
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nplain loop {loop:.2f} s, Prefect {pref:.2f} s for {args.shards} units: overhead "
          f"{100 * overhead:+.1f}% ({per_task_ms:+.1f} ms per task run; a unit takes "
          f"{1000 * loop / args.shards:.0f} ms) -> {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
