"""What a model costs to deploy: parameters, checkpoint size, peak memory at inference
and latency per image (batch 1 and batched) on a given device.

- Latency is measured in this process on random inputs of the checkpoint's input size,
  under ``torch.inference_mode``: a few warm-up calls, then calls until ``min_seconds``
  have passed (at least ``min_repeats``); the median call time divided by the batch
  size is the per-image latency. CUDA calls are synchronized.
- Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` around one batched
  forward (kind ``cuda_allocated``: weights, activations and workspace). On the CPU
  the allocator keeps no statistics, so a fresh Python process loads the checkpoint,
  resets its resident high-water mark (the transient of loading is not inference),
  runs one batched forward, and reports the high-water mark (``VmHWM``) minus its
  resident size before loading the model (kind ``process_rss``): what the model adds
  at its peak, weights and activations and allocator slack, without the
  interpreter, torch's and torchvision's libraries and the first convolution's set-up
  (paid before the baseline). Linux only (``/proc/self/status``).

Run as ``python -m cvpipe.models.costs CKPT --batch N`` it is that child process.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvpipe.core.storage import url_to_fs
from cvpipe.models.checkpoints import load_checkpoint
from cvpipe.models.device import cpu_threads, resolve_device


@dataclass
class ModelCosts:
    """One row of tables.MODEL_COSTS."""

    model: str
    arch: str
    input_size: int
    params: int
    checkpoint_bytes: int
    peak_memory_mb: float
    memory_kind: str
    latency_ms_b1: float
    batch: int
    latency_ms_batched: float
    device: str
    threads: int

    def row(self) -> dict[str, Any]:
        return asdict(self)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def checkpoint_bytes(url: str) -> int:
    fs, path = url_to_fs(url)
    return int(fs.size(path))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def latency_ms(
    model: nn.Module,
    input_size: int,
    batch: int,
    device: torch.device,
    *,
    warmup: int = 3,
    min_repeats: int = 5,
    min_seconds: float = 0.5,
    max_repeats: int = 1000,
) -> float:
    """Median milliseconds per image of ``model`` on batches of ``batch`` random images."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, input_size, input_size, generator=gen).to(device)
    for _ in range(warmup):
        model(x)
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_repeats and (
        len(times) < min_repeats or time.perf_counter() - start < min_seconds
    ):
        t0 = time.perf_counter()
        model(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times) / batch


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _cpu_peak_child(checkpoint: str, batch: int, threads: int) -> dict[str, Any]:
    """In a fresh process: resident memory the model adds at its peak (see module doc)."""
    torch.set_num_threads(threads)
    # Pay the one-time costs that are no model's (torchvision's import, the first
    # convolution's kernel set-up) before the baseline is read.
    import torchvision  # noqa: F401

    with torch.inference_mode():
        warm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Linear(6, 2))
        warm.eval()(torch.zeros(2, 3, 8, 8))
    before = _status_kb("VmRSS")
    model, info = load_checkpoint(checkpoint)
    model.eval()
    x = torch.randn(batch, 3, info.input_size, info.input_size)
    gc.collect()
    # Forget the transient peak of loading (file bytes + state_dict + model): writing 5
    # to clear_refs resets VmHWM to the current resident size (Linux >= 4.0).
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    with torch.inference_mode():
        model(x)
    return {"peak_kb": _status_kb("VmHWM") - before, "before_kb": before, "hwm_reset": reset}


def peak_memory_mb(
    checkpoint: str, batch: int, device: torch.device, threads: int = 1
) -> tuple[float, str]:
    """``(megabytes, kind)`` of one batched forward; see the module docstring."""
    if device.type == "cuda":
        model, info = load_checkpoint(checkpoint, device)
        model.eval()
        x = torch.randn(batch, 3, info.input_size, info.input_size, device=device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            model(x)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_allocated"
    root = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cvpipe.models.costs",
            checkpoint,
            "--batch",
            str(batch),
            "--threads",
            str(threads),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe of {checkpoint} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kb"] / 1024, "process_rss"


def measure(
    checkpoint: str,
    name: str | None = None,
    *,
    batch: int = 64,
    device: str = "cpu",
    threads: int = 1,
    memory: bool = True,
    min_seconds: float = 0.5,
) -> ModelCosts:
    """Every cost of one checkpoint on ``device`` (CPU runs use ``threads`` torch threads)."""
    dev = resolve_device(device)
    model, info = load_checkpoint(checkpoint, dev)
    with cpu_threads(threads if dev.type == "cpu" else None):
        b1 = latency_ms(model, info.input_size, 1, dev, min_seconds=min_seconds)
        bn = latency_ms(model, info.input_size, batch, dev, min_seconds=min_seconds)
    mem, kind = peak_memory_mb(checkpoint, batch, dev, threads) if memory else (float("nan"), "")
    return ModelCosts(
        model=name or checkpoint,
        arch=info.arch,
        input_size=info.input_size,
        params=parameter_count(model),
        checkpoint_bytes=checkpoint_bytes(checkpoint),
        peak_memory_mb=float(mem),
        memory_kind=kind,
        latency_ms_b1=b1,
        batch=batch,
        latency_ms_batched=bn,
        device=str(dev),
        threads=threads if dev.type == "cpu" else 0,
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="peak memory of one batched forward (CPU)")
    parser.add_argument("checkpoint")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(_cpu_peak_child(args.checkpoint, args.batch, args.threads)))
