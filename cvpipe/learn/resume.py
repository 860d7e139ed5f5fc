"""A training run's files: where they go, the per-epoch commit, exact resume, and how
many epochs are kept.

Layout under a training output ``out``::

    out/checkpoints/epoch-001.pt  (+ .json sidecar)   weights after each epoch
    out/checkpoints/state-001.pt                      optimizer, scheduler, RNG, metrics
    out/metrics.parquet                               one row per epoch and split
    out/rejects.parquet                               only when the shards held rejects
    out/final.pt  (+ final.json)                      published last: the run's commit

An epoch publishes its weights, then its state file (optimizer, scheduler, epoch, every
RNG, the metric rows so far), as torchvision's references checkpoint model, optimizer,
lr_scheduler and epoch together: the state file is the epoch's commit, and a run
resumed from it continues exactly. The state holds only tensors and primitives and is
read with ``torch.load(weights_only=True)``; nothing here unpickles.
"""

from __future__ import annotations

import io
import random
import re
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from cvpipe import models
from cvpipe.core import tables
from cvpipe.core.storage import (
    COMMIT_SUFFIX,
    join,
    list_committed,
    read_bytes,
    url_to_fs,
    write_bytes_atomic,
)
from cvpipe.learn.errors import TrainingError


def final_url(out: str) -> str:
    return join(out, "final.pt")


def epoch_checkpoint_url(out: str, epoch: int) -> str:
    return join(out, "checkpoints", f"epoch-{epoch:03d}.pt")


def state_url(out: str, epoch: int) -> str:
    return join(out, "checkpoints", f"state-{epoch:03d}.pt")


def metrics_url(out: str) -> str:
    return join(out, "metrics.parquet")


def curves_url(out: str) -> str:
    return join(out, "curves.png")


def _epochs_on_disk(out: str) -> dict[int, set[str]]:
    """epoch -> the kinds ('epoch', 'state') of its committed files."""
    found: dict[int, set[str]] = {}
    for url in list_committed(join(out, "checkpoints"), suffix=".pt"):
        m = re.search(r"(epoch|state)-(\d+)\.pt$", url)
        if m:
            found.setdefault(int(m.group(2)), set()).add(m.group(1))
    return found


def last_epoch(out: str) -> int:
    """The last epoch whose weights and state are both committed (0: none)."""
    done = [e for e, kinds in _epochs_on_disk(out).items() if kinds == {"epoch", "state"}]
    return max(done, default=0)


# --------------------------------------------------------------------------- RNG state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG training touches, as tensors and primitives (weights_only-loadable).

    Python's global ``random`` is not among them: the loader and the tasks draw from
    their own seeded ``random.Random``, and the global one is shared with Prefect's
    threads (retry jitter), so its state would record their draws, not training's."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if "python" in state:  # states written by earlier versions
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def commit_epoch(
    out: str,
    epoch: int,
    model: nn.Module,
    info: models.ModelInfo,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    chash: str,
    rows: list[dict[str, Any]],
    schema: pa.Schema,
) -> None:
    """Publish epoch ``epoch``: weights, then the state file (the commit), then the
    metrics table so far."""
    models.save_checkpoint(model, info, epoch_checkpoint_url(out, epoch))
    buf = io.BytesIO()
    torch.save(
        {
            "epoch": epoch,
            "run_hash": chash,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "metrics": rows,
        },
        buf,
    )
    write_bytes_atomic(state_url(out, epoch), buf.getvalue())
    tables.write_parquet(tables.from_rows(rows, schema), metrics_url(out), info.lineage)


def resume(
    out: str,
    epoch: int,
    chash: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> list[dict[str, Any]]:
    """Restore model, optimizer, scheduler and every RNG after ``epoch`` of the run
    ``chash``; returns the metric rows so far."""
    url = state_url(out, epoch)
    try:
        state = torch.load(io.BytesIO(read_bytes(url)), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise TrainingError(
            f"training state {url} is unreadable: {type(e).__name__}: {e}"
        ) from None
    if state.get("run_hash") != chash:
        raise TrainingError(
            f"{out} holds epochs of another run (hash {state.get('run_hash')}, now "
            f"{chash}): use a new output folder"
        )
    weights, _ = models.load_state(epoch_checkpoint_url(out, epoch))
    model.load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return list(state["metrics"])


def _remove(url: str) -> None:
    fs, path = url_to_fs(url)
    for p in (path + COMMIT_SUFFIX, path):  # withdraw the commit before the data
        if fs.exists(p):
            fs.rm(p)


def prune(out: str, keep_from: int) -> None:
    """Drop every epoch before ``keep_from`` (state first: an epoch without state is
    never resumed from). Listing, not arithmetic, so epochs a crash left behind go too."""
    for epoch in sorted(_epochs_on_disk(out)):
        if epoch >= keep_from:
            break
        ckpt = epoch_checkpoint_url(out, epoch)
        for url in (state_url(out, epoch), ckpt, models.sidecar_url(ckpt)):
            _remove(url)
