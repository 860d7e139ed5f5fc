"""The training loop: epochs, optimizer and schedule, checkpoints with exact resume,
transfer controls, bf16 autocast, logging and the metrics table, for any task.

The loop knows nothing of classification: a :class:`~cvpipe.learn.tasks.TrainTask`
supplies the model, the data, the loss and the metrics. :func:`train` is one run:

- idempotent: a committed final checkpoint of the same run is returned without work,
  one of another run is refused;
- resumable: every epoch publishes its weights, then a state file (optimizer,
  scheduler, epoch, every RNG, the metrics so far), as torchvision's references do, so
  a crashed run resumes after its last committed epoch and ends with the same weights
  as an uninterrupted one (on CPU, same seed and shards: the same bytes);
- bounded on disk: only the last ``keep_checkpoints`` epochs are kept (default 2);
- stopped with a :class:`TrainingError` naming the epoch, step and value as soon as the
  loss is not finite, as torchvision's engine does.

The files of a run, and how an epoch is committed and resumed: :mod:`cvpipe.learn.resume`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cvpipe import models
from cvpipe.core import tables
from cvpipe.core.config import identity
from cvpipe.core.storage import is_committed, join, write_bytes_atomic
from cvpipe.data.loader import make_loader
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.curves import curves_png
from cvpipe.learn.errors import TrainingError
from cvpipe.learn.resume import (
    commit_epoch,
    curves_url,
    final_url,
    last_epoch,
    metrics_url,
    prune,
    resume,
    seed_everything,
)
from cvpipe.learn.tasks.base import Meter, TaskBatch, TrainTask, apply_to_tensors
from cvpipe.learn.transfer import freeze_stages, param_groups, set_train_mode

log = logging.getLogger(__name__)

# On CUDA the loss is checked for finiteness every this many steps (a check syncs the
# device); on CPU every step, before its backward pass.
CUDA_CHECK_EVERY = 50
# A run logs its first and last epoch and about this many in between (a 320-epoch run
# on a terminal is 12 lines, not 320).
EPOCH_LINES = 10


# --------------------------------------------------------------------------- optimizer


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over ``groups`` (see :func:`~cvpipe.learn.transfer.param_groups`)."""
    if not groups:
        raise TrainingError("every parameter is frozen: nothing to train")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay
    )


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """The schedule's multiplier of every group's base lr during ``epoch`` (0-based)."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    if cfg.scheduler == "constant":
        return 1.0
    span = max(1, cfg.epochs - cfg.warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    # LambdaLR scales each group's own initial lr, so the stage multipliers survive.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(cfg, e))


# --------------------------------------------------------------------------- epochs


@dataclass
class EpochStats:
    loss: float
    metrics: dict[str, float]
    images: int
    seconds: float
    skipped: int = 0  # samples without a usable target
    rejects: list[dict[str, str]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _not_finite(epoch: int, step: int, value: float) -> TrainingError:
    return TrainingError(
        f"epoch {epoch}, step {step}: the loss is {value}, not finite: training stopped "
        "(lower the learning rate, or look for broken targets)"
    )


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[TaskBatch],
    task: TrainTask,
    meter: Meter,
    device: torch.device,
    cfg: TrainConfig,
    *,
    frozen: Sequence[nn.Module] = (),
    epoch: int = 1,
) -> EpochStats:
    """One pass over ``batches`` (any iterable of the task's batches, from shards or
    from memory). Samples without a usable target are skipped and counted."""
    set_train_mode(model, frozen)
    cuda = device.type == "cuda"
    # Sums stay on the device: a .item() per step would sync the GPU every batch.
    loss_sum = torch.zeros((), device=device)
    bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    bad_loss = torch.zeros((), device=device)
    n = skipped = step = 0
    rejects: list[dict[str, str]] = []
    start = time.perf_counter()
    for batch in batches:
        rejects.extend(batch.rejects)
        skipped += batch.skipped
        if batch.size == 0:
            continue
        step += 1
        batch = task.to_device(batch, device, cfg.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and cfg.amp):
            loss, outputs = task.forward_loss(model, batch, cfg)
        if cuda:  # remember the first bad step; checked every CUDA_CHECK_EVERY steps
            first = ~torch.isfinite(loss.detach()) & (bad_step < 0)
            bad_loss = torch.where(first, loss.detach().float(), bad_loss)
            bad_step = torch.where(first, step, bad_step)
            if step % CUDA_CHECK_EVERY == 0 and int(bad_step) >= 0:
                raise _not_finite(epoch, int(bad_step), float(bad_loss))
        elif not math.isfinite(value := float(loss.detach())):
            raise _not_finite(epoch, step, value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            loss_sum += loss.detach().float() * batch.size
            meter.update(apply_to_tensors(outputs, torch.Tensor.detach), batch)
        n += batch.size
    if cuda:
        torch.cuda.synchronize(device)
        if int(bad_step) >= 0:
            raise _not_finite(epoch, int(bad_step), float(bad_loss))
    seconds = time.perf_counter() - start
    if n == 0:
        raise TrainingError(f"an epoch saw no usable sample ({skipped} without a target)")
    return EpochStats(float(loss_sum) / n, meter.compute(), n, seconds, skipped, rejects)


@torch.no_grad()
def evaluate_epoch(
    model: nn.Module,
    batches: Iterable[TaskBatch],
    task: TrainTask,
    meter: Meter,
    device: torch.device,
    *,
    amp: bool = True,
    channels_last: bool = True,
) -> EpochStats:
    """The task's eval pass over ``batches`` with the model in eval mode: mean loss (NaN
    when the task's model gives none in eval mode) and the meter's metrics."""
    model.eval()
    cuda = device.type == "cuda"
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    has_loss = False
    n = skipped = 0
    rejects: list[dict[str, str]] = []
    start = time.perf_counter()
    for batch in batches:
        rejects.extend(batch.rejects)
        skipped += batch.skipped
        if batch.size == 0:
            continue
        batch = task.to_device(batch, device, channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and amp):
            loss, outputs = task.eval_step(model, batch)
        if loss is not None:
            loss_sum += loss.double()
            has_loss = True
        meter.update(outputs, batch)
        n += batch.size
    metrics = meter.compute()
    seconds = time.perf_counter() - start
    loss = float(loss_sum) / n if n and has_loss else math.nan
    return EpochStats(loss, metrics, n, seconds, skipped, rejects)


# --------------------------------------------------------------------------- the run


def run_identity(
    task: TrainTask,
    cfg: TrainConfig,
    train_urls: Sequence[str],
    val_urls: Sequence[str] = (),
    init_checkpoint: str | None = None,
) -> dict[str, Any]:
    """What a run's outputs depend on: the config (its identity: runtime fields and
    defaults drop out when hashed), the data, the starting checkpoint, and the task
    (left out for plain classification, so runs trained before tasks existed keep
    their hash)."""
    what: dict[str, Any] = {
        "config": cfg,
        "train": list(train_urls),
        "val": list(val_urls),
        "init": init_checkpoint,
    }
    task_id = identity(task)
    if task.kind != "classification" or task_id:
        what["task"] = {**task_id, "kind": task.kind}
    return what


def run_hash(
    task: TrainTask,
    cfg: TrainConfig,
    train_urls: Sequence[str],
    val_urls: Sequence[str] = (),
    init_checkpoint: str | None = None,
) -> str:
    return tables.config_hash(run_identity(task, cfg, train_urls, val_urls, init_checkpoint))


def committed_run_hash(out: str) -> str | None:
    return models.load_info(final_url(out)).lineage.get("run_hash")


def train(
    task: TrainTask,
    cfg: TrainConfig,
    train_urls: Sequence[str],
    out: str,
    val_urls: Sequence[str] | None = None,
    init_checkpoint: str | None = None,
) -> str:
    """Train ``task`` on ``train_urls`` (from ``init_checkpoint`` when given); returns
    the URL of the final checkpoint ``out/final.pt``.

    Idempotent: a committed final checkpoint is returned without work; otherwise a run
    resumes after the last epoch with committed weights and state. Deterministic for a
    given config on CPU (same seed, same shards: same weights, crash or no crash).
    """
    train_urls, val_urls = list(train_urls), list(val_urls or ())
    chash = run_hash(task, cfg, train_urls, val_urls, init_checkpoint)
    final = final_url(out)
    if is_committed(final):
        have = committed_run_hash(out)
        if have != chash:
            raise TrainingError(
                f"{final} was trained by another run (hash {have}, now {chash}): "
                "use a new output folder"
            )
        log.info("train: %s is committed, skipping", final)
        return final
    if not train_urls:
        raise TrainingError("no training shards")
    device = models.resolve_device(cfg.device)
    cuda = device.type == "cuda"

    seed_everything(cfg.seed)
    built = task.build(cfg, train_urls, init_checkpoint)
    model = built.model
    frozen = freeze_stages(built.parts, cfg.freeze_stages)
    model.to(device)
    if cuda and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(param_groups(model, built.parts, cfg.lr, cfg.lr_multipliers), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    info = dataclasses.replace(
        built.info,
        lineage=tables.lineage(
            cfg,
            stage="train",
            run_hash=chash,
            task=task.model_dump(mode="json"),
            train_config=cfg.model_dump(mode="json"),
            train_shards=len(train_urls),
            val_shards=len(val_urls),
            **built.lineage,
        ),
    )

    rows: list[dict[str, Any]] = []
    start_epoch = last_epoch(out)
    if start_epoch:
        rows = resume(out, start_epoch, chash, model, optimizer, scheduler)
        log.info("train: resuming %s after epoch %d", out, start_epoch)

    train_ds = task.dataset(cfg, train_urls, info, stage="train", train=True)
    loader = make_loader(
        train_ds, cfg.batch_size, cfg.num_workers, pin_memory=cuda, collate_fn=task.collate
    )
    val_loader = None
    if val_urls:
        val_ds = task.dataset(cfg, val_urls, info, stage="validate", train=False)
        val_loader = make_loader(
            val_ds, cfg.batch_size, cfg.num_workers, pin_memory=cuda, collate_fn=task.collate
        )

    schema = tables.metrics_schema(task.metric_names)
    rejects: list[dict[str, str]] = []
    with models.cudnn_autotune(cuda):
        for epoch in range(start_epoch, cfg.epochs):
            e = epoch + 1
            train_ds.set_epoch(epoch)
            meter = task.meter("train", info, device)
            stats = train_one_epoch(
                model, optimizer, loader, task, meter, device, cfg, frozen=frozen, epoch=e
            )
            scheduler.step()
            rejects = stats.rejects
            rows.append(_metric_row(e, "train", stats))
            msg = f"epoch {e}/{cfg.epochs} {_fmt(stats)}"
            if val_loader is not None:
                v = evaluate_epoch(
                    model,
                    val_loader,
                    task,
                    task.meter("val", info, device),
                    device,
                    amp=cfg.amp,
                    channels_last=cfg.channels_last,
                )
                rows.append(_metric_row(e, "val", v))
                msg += f" | val {_fmt(v)}"
            if logs_epoch(e, start_epoch, cfg.epochs):
                log.info("train %s: %s (%.0f img/s)", short_run(out), msg, stats.images_per_s)
            commit_epoch(out, e, model, info, optimizer, scheduler, chash, rows, schema)
            if cfg.keep_checkpoints is not None:
                prune(out, keep_from=e - cfg.keep_checkpoints + 1)

    if not rows:
        raise TrainingError(f"{out}: no epoch was trained")
    tables.write_parquet(tables.from_rows(rows, schema), metrics_url(out), info.lineage)
    write_bytes_atomic(curves_url(out), curves_png(rows))
    if rejects:
        tables.write_parquet(
            tables.from_rows(_dedup_rejects(rejects), tables.REJECTS),
            join(out, "rejects.parquet"),
            info.lineage,
        )
    models.save_checkpoint(model, info, final)
    return final


def logs_epoch(epoch: int, start_epoch: int, epochs: int) -> bool:
    """Whether 1-based ``epoch`` gets a log line: the first of this process, the last,
    and every ``epochs / EPOCH_LINES``-th."""
    return epoch == start_epoch + 1 or epoch == epochs or epoch % max(1, epochs // EPOCH_LINES) == 0


def short_run(out: str) -> str:
    """A run folder as a log line shows it: its last two parts."""
    parts = str(out).rstrip("/").split("/")
    return "/".join(parts[-2:])


def _metric_row(epoch: int, split: str, stats: EpochStats) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "split": split,
        "loss": float(stats.loss),
        **{k: float(v) for k, v in stats.metrics.items()},
        "images_per_s": float(stats.images_per_s),
    }


def _fmt(stats: EpochStats) -> str:
    return " ".join([f"loss {stats.loss:.4f}", *(f"{k} {v:.4f}" for k, v in stats.metrics.items())])


def _dedup_rejects(rows: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    seen: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in rows:
        seen.setdefault((r["key"], r["shard"], r["reason"]), r)
    return list(seen.values())
