"""Teacher inference stage throughput vs the bare model forward, in the same run.

Data: ``datasets.export_photos`` JPEG crops of two real photos, ingested into shards.
The stage (:class:`cvpipe.infer.teacher.Teacher`: reading shards, decoding, preprocessing,
batching, forward, top-P, writing Parquet) is compared with the bare forward of the same
model on pre-decoded, preprocessed tensors already in memory (same batch size, same
threads). Target: stage / bare >= 0.9 on CPU. The stage's decode, H2D, forward and
write times are reported separately.

- CPU (default): resnet18 at 96 px, batch 64, 1 loader worker (2 cores in all here).
- ``--device cuda``: ResNet-50 at 224 px, bf16 autocast, channels_last, nvjpeg decoding
  from 256 px JPEG shards, batch 256, 8 workers (target >= 8000 img/s on one H100).

    python benchmarks/bench_teacher.py [--quick] [--device cuda]

Prints a summary and writes benchmarks/results/bench_teacher.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "bench_teacher.json"


def make_shards(tmp: str, count: int, size: int, shard_size: int) -> list[str]:
    from cvpipe.core import storage
    from cvpipe.data import ingest
    from cvpipe.data.config import IngestConfig
    from cvpipe.data.datasets import export_photos

    src = os.path.join(tmp, "photos")
    export_photos(src, count=count, size=size)
    root = os.path.join(tmp, "root")
    cfg = IngestConfig(source=src, root=root, partition="bench", name="photos",
                       shard_size=shard_size)  # fmt: skip
    ingest.ingest_partition(cfg)
    return storage.list_committed(storage.join(root, "shards", "bench"), ".tar")


def bare_forward(model, info, shards, batch_size, device) -> dict:
    """The model alone: every image decoded and preprocessed beforehand, in memory."""
    import torch

    from cvpipe import models
    from cvpipe.data.shards import read_shard_samples

    tf = models.preprocess(info)
    xs = [tf(s.image) for u in shards for s in read_shard_samples(u)[0]]
    batches = [torch.stack(xs[i : i + batch_size]) for i in range(0, len(xs), batch_size)]
    cuda = device.type == "cuda"
    if cuda:
        batches = [b.to(device).contiguous(memory_format=torch.channels_last) for b in batches]
    model.eval()

    def run() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            for b in batches:
                out = torch.softmax(model(b).float(), 1).topk(min(5, out_dim), 1)
        if cuda:
            torch.cuda.synchronize()
        del out
        return time.perf_counter() - t0

    out_dim = info.num_classes
    run()  # warm-up (cuDNN autotuning, allocator)
    wall = run()
    return {"images": len(xs), "wall_s": round(wall, 3), "images_per_s": round(len(xs) / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    import torch

    from cvpipe import models
    from cvpipe.infer.teacher import Teacher, summarize

    cuda = args.device == "cuda"
    arch, input_size, photo_size = ("resnet50", 224, 256) if cuda else ("resnet18", 96, 112)
    batch_size = args.batch_size or (256 if cuda else 64)
    workers = args.workers if args.workers is not None else (8 if cuda else 1)
    count = args.images or ((20_000 if cuda else 640) if args.quick else (80_000 if cuda else 2560))
    shard_size = 2_000 if cuda else 320
    tmp = tempfile.mkdtemp(prefix="bench_teacher_", dir=args.tmp)
    try:
        t0 = time.perf_counter()
        shards = make_shards(tmp, count, photo_size, shard_size)
        print(f"{count} JPEG crops ({photo_size} px) in {len(shards)} shards, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
        torch.manual_seed(0)
        info = models.ModelInfo(arch, ["china", "flower"], input_size)
        ckpt = os.path.join(tmp, "teacher.pt")
        models.save_checkpoint(models.build(arch, 2), info, ckpt)
        device = models.resolve_device(args.device)
        model, info = models.load_checkpoint(ckpt, device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        bare1 = bare_forward(model, info, shards, batch_size, device)
        print(f"bare forward: {bare1}", flush=True)
        teacher = Teacher(ckpt, device=args.device, batch_size=batch_size, top_p=2,
                          num_workers=workers)  # fmt: skip
        teacher.process(shards[:1], os.path.join(tmp, "warmup"))
        t0 = time.perf_counter()
        stats = teacher.process(shards, os.path.join(tmp, "out"))
        wall = time.perf_counter() - t0
        summary = summarize(stats)
        stage = {"images": summary["images"], "wall_s": round(wall, 3),
                 "images_per_s": round(summary["images"] / wall, 1)}  # fmt: skip
        print(f"stage: {stage}", flush=True)
        bare2 = bare_forward(model, info, shards, batch_size, device)
        print(f"bare forward again: {bare2}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bare_ips = (bare1["images_per_s"] + bare2["images_per_s"]) / 2
    ratio = stage["images_per_s"] / bare_ips
    result = {
        "benchmark": "bench_teacher",
        "quick": args.quick,
        "device": str(device),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if cuda else None,
        },
        "model": f"{arch} at {input_size} px from {photo_size} px JPEG shards"
        + (" (bf16, channels_last, nvjpeg)" if cuda else ""),
        "batch_size": batch_size,
        "loader_workers": workers,
        "images": count,
        "shards": len(shards),
        "stage": stage,
        "stage_times_s": {k: summary[k] for k in ("decode_s", "h2d_s", "forward_s", "write_s")},
        "bare_forward": [bare1, bare2],
        "bare_images_per_s": round(bare_ips, 1),
        "stage_vs_bare": round(ratio, 3),
        "target": ">= 0.9 on CPU" if not cuda else ">= 8000 img/s on one H100",
        "target_met": ratio >= 0.9 if not cuda else stage["images_per_s"] >= 8000,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nstage {stage['images_per_s']} img/s vs bare forward {bare_ips:.1f} img/s -> "
          f"{ratio:.3f} | times {result['stage_times_s']}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
