"""``cvpipe plan``: what a run over N images costs, from the rates the benchmarks measured.

Every benchmark writes JSON (benchmarks/results/ for runs on this machine; the
committed benchmarks/reference/<card>/ for GPU hosts). The planner reads those files,
takes each stage's measured rate (images per second per worker: a process on CPU, a
GPU on a GPU host) with the machine it was measured on, and prints, for N images:
shards, partitions, flow runs, task runs per flow run (warned past ~2,000), GPU- or
CPU-hours and wall time per stage, and storage per stage. A stage with no measurement
says so; nothing is invented.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass
from typing import Any

MAX_TASK_RUNS = 2_000  # a flow run past this strains a Prefect server and its UI


@dataclass
class Rate:
    stage: str
    images_per_s: float
    device: str  # "gpu" or "cpu"
    machine: str
    source: str


def _machine(d: dict[str, Any]) -> str:
    m = d.get("machine") or {}
    gpu = m.get("gpu") or d.get("device_name")
    cpus = m.get("cpus") or d.get("cpus") or d.get("cpu_count")
    if gpu:
        return str(gpu)
    return f"{cpus}-core CPU" if cpus else "CPU (machine not recorded)"


def _rates_of(d: dict[str, Any], source: str) -> list[Rate]:
    """The stage rates of one benchmark's JSON (each benchmark names its figures)."""
    name, out = d.get("benchmark"), []
    dev = "gpu" if str(d.get("device", "")).startswith("cuda") else "cpu"
    if name == "bench_teacher":
        out.append(Rate("infer", d["stage"]["images_per_s"], dev, _machine(d), source))
    elif name == "bench_train":
        out.append(Rate("train (per epoch)", d["shard_images_per_s"], dev, _machine(d), source))
    elif name == "bench_shards":
        for r in d.get("results", []):
            if "jpeg" in r.get("dataset", ""):
                out.append(Rate("ingest", r["ingest_images_per_s"], "cpu", _machine(d), source))
    elif name == "bench_select":
        out.append(Rate("select", d["images"] / d["select"]["wall_s"], "cpu", _machine(d),
                        source))  # fmt: skip
    elif name == "bench_anchors":
        rate = d["best"]["label"]["images_per_s"]
        out.append(Rate("anchor labels", rate, "cpu", f"{d.get('cpus')}-core CPU", source))
    elif name == "bench_detect":
        rows = [r for r in d.get("in_memory", []) if r.get("bf16")] or d.get("in_memory", [])
        if rows:
            best = max(rows, key=lambda r: r["train_images_per_s"])
            out.append(Rate("detection train (per epoch)", best["train_images_per_s"], dev,
                            _machine(d), source))  # fmt: skip
            out.append(Rate("detection pseudo-boxes", best["infer_images_per_s"], dev,
                            _machine(d), source))  # fmt: skip
    for r in d.get("rates", []):  # benchmarks that name their rates directly
        out.append(Rate(r["stage"], r["images_per_s"], "gpu" if r.get("device") == "cuda"
                        else "cpu", _machine(d), source))  # fmt: skip
    return out


def load_rates(folders: list[str]) -> dict[str, Rate]:
    """The best measured rate per stage, GPU measurements first."""
    best: dict[str, Rate] = {}
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "**", "*.json"), recursive=True)):
            try:
                with open(path) as f:
                    d = json.load(f)
                rates = _rates_of(d, os.path.relpath(path))
            except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
                continue  # not a benchmark result, or one of another shape
            for r in rates:
                have = best.get(r.stage)
                if have is None or (r.device, r.images_per_s) > (have.device, have.images_per_s):
                    best[r.stage] = r
    return best


# Bytes per image of each stage's outputs (Parquet and tars as cvpipe writes them).
STORAGE = {
    "ingest": ("shards (JPEG ~30 KB at web sizes) + index", 30_000 + 60),
    "infer": ("predictions (top-5) + rejects", 80),
    "features": ("features (512 float32 + keys)", 512 * 4 + 40),
    "select": ("selection (the top-K only)", 0),
    "anchor labels": ("labels + distances", 60),
}

STAGES = ["ingest", "infer", "select", "anchor labels", "train (per epoch)",
          "detection train (per epoch)", "detection pseudo-boxes"]  # fmt: skip


def plan(
    images: int,
    shard_size: int = 10_000,
    gpus: int = 8,
    cpus: int = 64,
    partition_images: int = 10_000_000,
    shards_per_unit: int = 4,
    folders: list[str] | None = None,
) -> dict[str, Any]:
    rates = load_rates(folders or ["benchmarks/results", "benchmarks/reference"])
    shards = math.ceil(images / shard_size)
    partitions = math.ceil(images / partition_images)
    shards_per_partition = math.ceil(shards / partitions)
    units = {
        "ingest": shards_per_partition,
        "infer": math.ceil(shards_per_partition / shards_per_unit),
        "select": shards_per_partition + math.ceil(shards_per_partition / 16) + 1,
        "anchor labels": shards_per_partition,
        "train (per epoch)": 1,
        "detection train (per epoch)": 1,
        "detection pseudo-boxes": math.ceil(shards_per_partition / shards_per_unit),
    }
    rows = []
    for stage in STAGES:
        r = rates.get(stage)
        workers = (gpus if r and r.device == "gpu" else cpus) if r else None
        row: dict[str, Any] = {"stage": stage, "task runs per flow run": units[stage]}
        if r is None:
            row.update({"rate (img/s per worker)": "not measured", "measured on": "-",
                        "worker-hours": "-", "wall (h)": "-"})  # fmt: skip
        else:
            hours = images / r.images_per_s / 3600
            row.update({
                "rate (img/s per worker)": round(r.images_per_s),
                "measured on": f"{r.machine} ({r.source})",
                "worker-hours": f"{hours:,.1f} {'GPU' if r.device == 'gpu' else 'CPU'}-h",
                "wall (h)": round(hours / workers, 2),
            })  # fmt: skip
        store = STORAGE.get(stage)
        row["storage"] = _bytes(images * store[1]) if store and store[1] else "-"
        rows.append(row)
    advice = "use bigger shards, more shards per unit or more partitions"
    warnings = [
        f"{r['stage']}: {r['task runs per flow run']:,} task runs per flow run > "
        f"{MAX_TASK_RUNS:,}: {advice}"
        for r in rows
        if r["task runs per flow run"] > MAX_TASK_RUNS
    ]
    return {
        "images": images, "shard_size": shard_size, "shards": shards,
        "partitions": partitions, "shards_per_partition": shards_per_partition,
        "flow_runs": partitions, "gpus": gpus, "cpus": cpus, "rows": rows,
        "warnings": warnings,
        "features_storage": _bytes(images * STORAGE["features"][1]),
    }  # fmt: skip


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} EB"


def markdown(p: dict[str, Any]) -> str:
    head = (f"{p['images']:,} images in {p['shards']:,} shards of {p['shard_size']:,}; "
            f"{p['partitions']:,} partitions of {p['shards_per_partition']:,} shards "
            f"({p['flow_runs']:,} pipeline flow runs); {p['gpus']} GPUs, {p['cpus']} CPU "
            f"workers. Features, if written: {p['features_storage']}.")  # fmt: skip
    cols = list(p["rows"][0])
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in p["rows"]]
    lines += [""] + [f"warning: {w}" for w in p["warnings"]]
    return "\n".join(lines)
