"""Faster R-CNN throughput: training and inference images/s.

GPU hosts: torchvision's Faster R-CNN (ResNet-50-FPN or MobileNetV3-FPN, weights=None)
on in-memory canvases already on the device, bf16 autocast, timed after warm-up:

    python benchmarks/bench_detect.py --device cuda --arch resnet50_fpn

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
    ap.add_argument("--arch", nargs="+", default=["resnet50_fpn", "mobilenet_v3_fpn"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for arch in args.arch:
        for amp in [False, True] if device.type == "cuda" else [False]:
            r = measure(arch, device, args.size, args.batch_size, args.steps, amp)
            print(r, flush=True)
            rows.append(r)
    result = {
        "benchmark": "bench_detect",
        "device": str(device),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "torch": torch.__version__,
        },
        "in_memory": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
