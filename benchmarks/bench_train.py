"""Training throughput: streamed from shards vs the same tensors already in memory.

Both paths run in the same process on the same model and optimizer, epochs
interleaved (shards, memory, shards, memory, ...) so that load from other processes hits
both alike. The shard path is the real loop (cvpipe.learn.loop, classification task):
ShardDataset (tar reading, safe decoding, the augmentation recipe, the shuffle buffer)
through a DataLoader with the task's collate. The memory path replays batches that
path produced, so only data loading differs.

    python benchmarks/bench_train.py --quick                       # CPU, ResNet-18 at 64 px
    python benchmarks/bench_train.py --device cuda --arch resnet50 --input-size 224 \\
        --images 4096 --batch-size 128 --num-workers 8             # GPU host: bf16 img/s

Prints a summary and writes benchmarks/results/bench_train.json. Target on CPU: the
shard path reaches >= 0.85 of the in-memory rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT_DIR))

from cvpipe import models  # noqa: E402
from cvpipe.core import storage  # noqa: E402
from cvpipe.data import ingest  # noqa: E402
from cvpipe.data.config import IngestConfig  # noqa: E402
from cvpipe.data.datasets import export_photos  # noqa: E402
from cvpipe.data.loader import make_loader  # noqa: E402
from cvpipe.learn import loop, transfer  # noqa: E402
from cvpipe.learn.config import TrainConfig  # noqa: E402
from cvpipe.learn.tasks import ClassificationTask, TaskBatch  # noqa: E402

RESULTS = ROOT_DIR / "benchmarks" / "results" / "bench_train.json"


def make_shards(root: str, images: int, size: int, shard_size: int) -> list[str]:
    """Real JPEG crops of scikit-learn's two photos, ingested as shards (2 classes)."""
    src = os.path.join(root, "photos")
    export_photos(src, count=images, size=size, seed=0)
    cfg = IngestConfig(
        source=src, root=root, partition="bench", name="photos", shard_size=shard_size
    )
    ingest.ingest_partition(cfg)
    return storage.list_committed(storage.join(root, "shards", "bench"), ".tar")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument(
        "--image-size", type=int, default=None, help="stored JPEG side (default: input)"
    )
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per path")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--augmentation", default="crop_flip")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--quick", action="store_true", help="256 images, 2 timed epochs per path")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.epochs = min(args.images, 256), min(args.epochs, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = models.resolve_device(args.device)
    cuda = device.type == "cuda"

    tmp = tempfile.mkdtemp(prefix="bench-train-")
    urls = make_shards(tmp, args.images, args.image_size or args.input_size, args.shard_size)
    cfg = TrainConfig(
        arch=args.arch,
        input_size=args.input_size,
        batch_size=args.batch_size,
        epochs=2 * args.epochs + 1,
        augmentation=args.augmentation,
        shuffle_buffer=min(1000, args.images),
        num_workers=args.num_workers,
        device=str(device),
        lr=0.01,
    )
    task = ClassificationTask()
    loop.seed_everything(cfg.seed)
    built = task.build(cfg, urls, None)
    model = built.model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    groups = transfer.param_groups(model, built.parts, cfg.lr, cfg.lr_multipliers)
    opt = loop.build_optimizer(groups, cfg)
    ds = task.dataset(cfg, urls, built.info, stage="bench", train=True)
    loader = make_loader(
        ds, cfg.batch_size, cfg.num_workers, pin_memory=cuda, collate_fn=task.collate
    )

    def epoch(batches) -> loop.EpochStats:
        meter = task.meter("train", built.info, device)
        return loop.train_one_epoch(model, opt, batches, task, meter, device, cfg)

    # Warm-up (not timed): first-call costs, cudnn autotuning; it also yields the
    # batches the memory path replays.
    cached: list[TaskBatch] = []
    for b in loader:
        if cuda:  # "in memory" on a GPU host means already on the GPU
            b = task.to_device(b, device, channels_last=False)
        cached.append(b)
    shard_rates, memory_rates = [], []
    with torch.backends.cudnn.flags(enabled=True, benchmark=cuda):  # as the loop does
        epoch(cached)
        for e in range(args.epochs):
            ds.set_epoch(e + 1)
            shard_rates.append(epoch(loader).images_per_s)
            memory_rates.append(epoch(cached).images_per_s)
    shard = statistics.median(shard_rates)
    memory = statistics.median(memory_rates)
    ratio = shard / memory
    result = {
        "benchmark": "bench_train",
        "arch": args.arch,
        "input_size": args.input_size,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor(),
        "amp_bf16": bool(cuda and cfg.amp),
        "channels_last": bool(cuda),
        "images": args.images,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "augmentation": args.augmentation,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "epochs_per_path": args.epochs,
        "shard_images_per_s": shard,
        "memory_images_per_s": memory,
        "shard_rates": shard_rates,
        "memory_rates": memory_rates,
        "ratio_shards_over_memory": ratio,
        "target_ratio_cpu": 0.85,
        "meets_target": ratio >= 0.85,
        "quick": args.quick,
        "torch": torch.__version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(
        f"train {args.arch} @ {args.input_size}px on {device} (batch {args.batch_size}, "
        f"{args.num_workers} workers, {torch.get_num_threads()} threads): "
        f"shards {shard:.1f} img/s, memory {memory:.1f} img/s, ratio {ratio:.3f} "
        f"(target >= 0.85: {'met' if ratio >= 0.85 else 'NOT met'})"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(str(out), json.dumps(result, indent=2).encode())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
