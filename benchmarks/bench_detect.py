"""Faster R-CNN throughput: training and inference images/s, from shards vs in memory.

Two measurements, each a ratio or a rate taken in one run:

- ``shards`` (the default on CPU): digit canvases (cvpipe.data.canvases) ingested as
  shards, streamed through the real detection path (ShardDataset, the detection task's
  box-aware transform and collate, the loop's train step; inference over the same
  loader) against the same batches replayed from memory, epochs interleaved so load
  from other processes hits both alike. Target on CPU: shards >= 0.9x memory.
- ``memory`` (GPU hosts): torchvision's Faster R-CNN (ResNet-50-FPN or MobileNetV3-FPN,
  weights=None) on synthetic in-memory canvases already on the device, fp32 and bf16.

    python benchmarks/bench_detect.py --config flows/examples/detect.yaml  # CPU, 128 px
    python benchmarks/bench_detect.py --device cuda --mode both --arch resnet50_fpn

Prints a summary and writes benchmarks/results/bench_detect.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT_DIR))

RESULTS = ROOT_DIR / "benchmarks" / "results" / "bench_detect.json"


def synthetic_canvases(n: int, size: int, classes: int, seed: int = 0):
    """``n`` canvases with 1-5 boxes each: textured noise with brighter box interiors."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        img = torch.rand(3, size, size, generator=g) * 0.5
        k = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * size * 0.7
        wh = size * (0.1 + 0.2 * torch.rand(k, 2, generator=g))
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1)
        for x1, y1, x2, y2 in boxes.round().int().tolist():
            img[:, y1:y2, x1:x2] += 0.5
        labels = torch.randint(1, classes + 1, (k,), generator=g)
        images.append(img.clamp(0, 1))
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


DETECTOR = {"resnet50_fpn": "fasterrcnn_resnet50_fpn",
            "mobilenet_v3_fpn": "fasterrcnn_mobilenet_v3_large_fpn"}  # fmt: skip


def shards_vs_memory(args: argparse.Namespace, device: torch.device) -> dict:
    """Train and inference images/s of the real shard path and of its batches replayed
    from memory, in the same process, timed epochs interleaved."""
    import statistics
    import tempfile

    from cvpipe.core import storage
    from cvpipe.data import canvases, ingest
    from cvpipe.data.config import IngestConfig
    from cvpipe.data.loader import make_loader
    from cvpipe.learn import loop, transfer
    from cvpipe.learn.config import TrainConfig
    from cvpipe.learn.tasks import DetectionTask

    root = tempfile.mkdtemp(prefix="bench-detect-")
    canvases.export_canvases(root, {"labeled": args.images}, size=args.size,
                             digit_px=(args.size // 5, args.size * 3 // 8))  # fmt: skip
    ingest.ingest_partition(IngestConfig(source=canvases.manifest_path(root, "labeled"),
                                         root=root, partition="bench", name="canvases",
                                         shard_size=args.shard_size))  # fmt: skip
    urls = storage.list_committed(storage.join(root, "shards", "bench"), ".tar")
    cuda = device.type == "cuda"
    shape = {}
    if args.config:  # the model shape of a detection config (e.g. flows/examples/detect.yaml)
        import yaml

        raw = yaml.safe_load(Path(args.config).read_text())
        shape = {k: v for k, v in raw.items() if k in DetectionTask.model_fields}
    task = DetectionTask(**{**shape, "min_size": args.size, "max_size": args.size + 1})
    cfg = TrainConfig(arch=DETECTOR[args.arch[0]], classes=[str(i) for i in range(10)],
                      batch_size=args.batch_size, lr=0.01, num_workers=args.num_workers,
                      shuffle_buffer=min(256, args.images), device=str(device))  # fmt: skip
    loop.seed_everything(0)
    built = task.build(cfg, urls, None)
    model = built.model.to(device)
    opt = loop.build_optimizer(transfer.param_groups(model, built.parts, cfg.lr, {}), cfg)
    ds = task.dataset(cfg, urls, built.info, stage="bench", train=True)
    loader = make_loader(ds, cfg.batch_size, cfg.num_workers, pin_memory=cuda,
                         collate_fn=task.collate)  # fmt: skip
    cached = [task.to_device(b, device, False) if cuda else b for b in loader]

    def train(batches) -> float:
        meter = task.meter("train", built.info, device)
        return loop.train_one_epoch(model, opt, batches, task, meter, device, cfg).images_per_s

    @torch.inference_mode()
    def infer(batches) -> float:
        model.eval()
        n, t0 = 0, time.perf_counter()
        for b in batches:
            b = task.to_device(b, device, False)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                model(b.inputs)
            n += b.size
        if cuda:
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)

    rates: dict[str, list[float]] = {k: [] for k in ("train_shards", "train_memory",
                                                     "infer_shards", "infer_memory")}  # fmt: skip
    train(cached)  # warm-up
    for e in range(args.epochs):
        ds.set_epoch(e + 1)
        rates["train_shards"].append(train(loader))
        rates["train_memory"].append(train(cached))
        rates["infer_shards"].append(infer(loader))
        rates["infer_memory"].append(infer(cached))
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {
        "arch": args.arch[0], "size": args.size, "images": args.images, "config": args.config,
        "batch_size": args.batch_size, "num_workers": args.num_workers,
        "epochs_per_path": args.epochs, "torch_threads": torch.get_num_threads(),
        **{f"{k}_images_per_s": round(v, 2) for k, v in med.items()},
        "rates": rates,
        "train_ratio_shards_over_memory": round(med["train_shards"] / med["train_memory"], 3),
        "infer_ratio_shards_over_memory": round(med["infer_shards"] / med["infer_memory"], 3),
        "target_ratio": 0.9,
    }  # fmt: skip
    out["meets_target"] = min(out["train_ratio_shards_over_memory"],
                              out["infer_ratio_shards_over_memory"]) >= 0.9  # fmt: skip
    return out


def build(arch: str, num_classes: int, size: int):
    from torchvision.models import detection

    fn = {
        "resnet50_fpn": detection.fasterrcnn_resnet50_fpn,
        "mobilenet_v3_fpn": detection.fasterrcnn_mobilenet_v3_large_fpn,
    }[arch]
    return fn(weights=None, weights_backbone=None, num_classes=num_classes + 1,
              min_size=size, max_size=size)  # fmt: skip


def measure(arch: str, device: torch.device, size: int, batch: int, steps: int, amp: bool):
    torch.manual_seed(0)
    model = build(arch, 10, size).to(device)
    images, targets = synthetic_canvases(batch * 4, size, 10)
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    batches = [
        (images[i : i + batch], targets[i : i + batch]) for i in range(0, len(images), batch)
    ]
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_steps(n: int) -> float:
        model.train()
        sync()
        t0 = time.perf_counter()
        for i in range(n):
            x, y = batches[i % len(batches)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = sum(model(x, y).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        return time.perf_counter() - t0

    def infer_steps(n: int) -> float:
        model.eval()
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
            for i in range(n):
                model(batches[i % len(batches)][0])
        sync()
        return time.perf_counter() - t0

    train_steps(3)  # warm-up: cuDNN, allocator
    t_train = train_steps(steps)
    infer_steps(3)
    t_infer = infer_steps(steps)
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {
        "arch": arch, "size": size, "batch_size": batch, "steps": steps, "bf16": amp,
        "train_images_per_s": round(steps * batch / t_train, 1),
        "infer_images_per_s": round(steps * batch / t_infer, 1),
        "peak_gpu_mem_gib": round(mem, 2) if mem is not None else None,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", nargs="+", default=None,
                    help="resnet50_fpn | mobilenet_v3_fpn (shards mode: the first)")  # fmt: skip
    ap.add_argument("--mode", choices=["shards", "memory", "both"], default=None)
    ap.add_argument("--size", type=int, default=None, help="canvas side (CPU 128, GPU 512)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="memory mode: timed steps")
    ap.add_argument("--images", type=int, default=64, help="shards mode: canvases per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="shards mode: timed epochs per path")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--config", default=None, help="shards mode: take the detector's shape "
                    "from a detection config, e.g. flows/examples/detect.yaml")  # fmt: skip
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.mode = args.mode or ("both" if cuda else "shards")
    args.size = args.size or (512 if cuda else 128)
    args.arch = args.arch or (
        ["resnet50_fpn", "mobilenet_v3_fpn"] if cuda else ["mobilenet_v3_fpn"]
    )
    result = {
        "benchmark": "bench_detect",
        "device": str(device),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "torch": torch.__version__,
        },
    }
    if args.mode in ("shards", "both"):
        r = shards_vs_memory(args, device)
        print(f"{r['arch']} @ {r['size']}px on {device}: train shards "
              f"{r['train_shards_images_per_s']} vs memory {r['train_memory_images_per_s']} img/s "
              f"(x{r['train_ratio_shards_over_memory']}), infer shards "
              f"{r['infer_shards_images_per_s']} vs memory {r['infer_memory_images_per_s']} img/s "
              f"(x{r['infer_ratio_shards_over_memory']}); target >= 0.9: "
              f"{'met' if r['meets_target'] else 'NOT met'}", flush=True)  # fmt: skip
        result["shards_vs_memory"] = r
    if args.mode in ("memory", "both"):
        rows = []
        for arch in args.arch:
            for amp in [False, True] if cuda else [False]:
                r = measure(arch, device, args.size, args.batch_size, args.steps, amp)
                print(r, flush=True)
                rows.append(r)
        result["in_memory"] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
