"""Where a model runs: the device, and torch's CPU threads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from cvpipe.core.stage import PermanentError


class DeviceError(PermanentError, RuntimeError):
    """The device asked for is not there (no retry brings a GPU back)."""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads (None: leave torch's setting).

    Small models on CPU train several times faster on one thread: synchronizing threads
    costs more than their math, and spinning threads stall when other processes share
    the cores. The setting is process-wide, so it is restored afterwards."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def cudnn_autotune(on: bool) -> Iterator[None]:
    """cuDNN autotuning (``benchmark``) for one block only, every other cuDNN setting
    left as it is. The flag is process-wide: set for good, it would leak into other code
    in the process (evaluation, inference of another model). ``cudnn.flags`` is not used
    because it resets the settings it is not given and its arguments vary across torch
    releases."""
    if not on:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
