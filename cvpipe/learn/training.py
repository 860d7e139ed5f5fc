"""Train, fine-tune and evaluate classifiers streamed from WebDataset shards.

One public call per stage, with small hashable arguments (URLs and a
:class:`~cvpipe.config.TrainConfig`), so an orchestrator can wrap each as a task:

- :func:`train` trains from scratch or fine-tunes from a checkpoint with the transfer
  controls of Yosinski et al. 2014 (copy the first n stages, freeze them, per-stage
  learning-rate multipliers, a new head for a new class set) and returns the URL of
  the final checkpoint. Every epoch publishes a checkpoint and a training-state file,
  so a crashed run resumes from its last epoch; a committed final checkpoint makes a
  rerun a no-op.
- :func:`evaluate` scores a checkpoint on labeled shards: top-1/top-5 and per class.
- :func:`chop_configs` / :func:`chop_report` (or :func:`chop` for both) run the
  "degree of fine-tuning" experiment: retrain above stage n, frozen vs fine-tuned.

Layout under a training output ``out``::

    out/checkpoints/epoch-001.pt  (+ .json sidecar)   weights after each epoch
    out/checkpoints/state-001.pt                      optimizer, scheduler, RNG, metrics
    out/metrics.parquet                               tables.METRICS, rewritten each epoch
    out/rejects.parquet                               only when the shards held rejects
    out/final.pt  (+ final.json)                      published last: the stage's commit

The state file holds only tensors and primitives and is read with
``torch.load(weights_only=True)``; nothing here unpickles.
"""

from __future__ import annotations

import io
import logging
import math
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from cvpipe import models
from cvpipe.core import tables
from cvpipe.core.storage import (
    COMMIT_SUFFIX,
    is_committed,
    join,
    list_committed,
    read_bytes,
    url_to_fs,
    write_bytes_atomic,
)
from cvpipe.data.loader import UNKNOWN_LABEL, Batch, ShardDataset, make_loader
from cvpipe.data.shards import Reject, iter_shard
from cvpipe.learn.config import TrainConfig
from cvpipe.models import ARCHITECTURES, Classifier, ModelInfo, stage_modules

log = logging.getLogger(__name__)

HEAD = "head"
OTHER = "other"  # backbone parameters outside every named stage (e.g. mobilenet's classifier)


class TrainingError(RuntimeError):
    """A training output folder that cannot be resumed, or data that cannot be trained on."""


# --------------------------------------------------------------------------- layout


def final_url(out: str) -> str:
    return join(out, "final.pt")


def epoch_checkpoint_url(out: str, epoch: int) -> str:
    return join(out, "checkpoints", f"epoch-{epoch:03d}.pt")


def state_url(out: str, epoch: int) -> str:
    return join(out, "checkpoints", f"state-{epoch:03d}.pt")


def metrics_url(out: str) -> str:
    return join(out, "metrics.parquet")


def last_epoch(out: str) -> int:
    """The last epoch whose weights and state are both committed (0: none)."""
    found = 0
    for url in list_committed(join(out, "checkpoints"), suffix=".pt"):
        m = re.search(r"state-(\d+)\.pt$", url)
        if m and is_committed(epoch_checkpoint_url(out, int(m.group(1)))):
            found = max(found, int(m.group(1)))
    return found


# --------------------------------------------------------------------------- data


def build_transform(
    recipe: str,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    shift_px: int = 2,
) -> Any:
    """The training transform of an augmentation recipe (RGB PIL -> normalized tensor).

    ``none`` is exactly the eval transform of :func:`cvpipe.models.preprocess`. ``shift``
    pads by ``shift_px`` and crops back: small translations, which keep a digit's
    identity (the field notes found that stronger recipes erase the semi-supervised gain
    on short schedules). Nothing flips in ``shift`` or ``strong``: a mirrored digit is
    another glyph.
    """
    from torchvision.transforms import v2

    ops: list[Any] = [v2.PILToTensor()]
    if recipe in ("none", "shift"):
        ops += [v2.Resize(input_size, antialias=True), v2.CenterCrop(input_size)]
        if recipe == "shift" and shift_px > 0:
            ops.append(v2.RandomCrop(input_size, padding=shift_px))
    elif recipe == "crop_flip":
        ops += [
            v2.RandomResizedCrop(input_size, scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    elif recipe == "strong":
        ops += [
            v2.RandomResizedCrop(input_size, scale=(0.5, 1.0), antialias=True),
            v2.RandomRotation(15),
            v2.ColorJitter(0.4, 0.4, 0.4),
        ]
    else:
        raise ValueError(f"unknown augmentation recipe {recipe!r}")
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


def _natural_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def discover_classes(urls: Sequence[str], label_field: str = "label") -> list[str]:
    """The sorted distinct labels of the shards' json metadata (numbers in numeric order).

    Reads every sample's metadata without decoding images; for a large corpus pass
    ``TrainConfig.classes`` instead.
    """
    found: set[str] = set()
    for url in urls:
        for item in iter_shard(url, decode=False):
            if isinstance(item, Reject):
                continue
            label = item.meta.get(label_field)
            if label is not None:
                found.add(str(label))
    if not found:
        raise TrainingError(f"no labeled sample in {len(urls)} shard(s): nothing to train on")
    return sorted(found, key=_natural_key)


# --------------------------------------------------------------------------- model setup


def stage_of_keys(model: Classifier) -> dict[str, str]:
    """state_dict key -> its stage name, ``head``, or ``other``."""
    owner: dict[int, str] = {}
    for name, mods in stage_modules(model):
        for m in mods:
            for t in [*m.parameters(), *m.buffers()]:
                owner[id(t)] = name
    for t in [*model.head.parameters(), *model.head.buffers()]:
        owner[id(t)] = HEAD
    return {k: owner.get(id(t), OTHER) for k, t in model.state_dict(keep_vars=True).items()}


def initial_model(
    cfg: TrainConfig, classes: Sequence[str], init_checkpoint: str | None
) -> tuple[Classifier, dict[str, Any]]:
    """The model a stage starts from, and lineage fields describing how it was made.

    From scratch: a seeded random model. From a checkpoint: its weights, with a fresh
    head when the class set differs (or ``cfg.new_head``), and with every stage from
    ``cfg.copy_stages`` on (plus the head and non-stage parts) re-initialized.
    """
    torch.manual_seed(cfg.seed)
    if init_checkpoint is None:
        return models.build(cfg.arch, len(classes)), {}
    model, src = models.load_checkpoint(init_checkpoint)
    if src.arch != cfg.arch:
        raise TrainingError(
            f"init checkpoint {init_checkpoint} is a {src.arch}, the config asks for {cfg.arch}"
        )
    same_classes = list(src.classes) == list(classes)
    if not same_classes or cfg.new_head or cfg.copy_stages is not None:
        model.replace_head(len(classes))
    if cfg.copy_stages is not None:
        copied = set(ARCHITECTURES[cfg.arch].stages[: cfg.copy_stages])
        fresh = models.build(cfg.arch, len(classes)).state_dict()
        owners = stage_of_keys(model)
        state = model.state_dict()
        for k, owner in owners.items():
            if owner not in copied:
                state[k] = fresh[k]
        model.load_state_dict(state)
    return model, {
        "init_checkpoint": init_checkpoint,
        "init_model_id": models.model_id(init_checkpoint),
        "init_classes_match": same_classes,
    }


def freeze_stages(model: Classifier, n: int) -> list[nn.Module]:
    """Stop gradients in the backbone's first ``n`` stages; returns their modules, which
    :func:`set_train_mode` keeps in eval mode so BatchNorm statistics stay frozen too."""
    frozen: list[nn.Module] = []
    for _, mods in stage_modules(model)[:n]:
        for m in mods:
            m.requires_grad_(False)
            frozen.append(m)
    return frozen


def set_train_mode(model: nn.Module, frozen: Sequence[nn.Module] = ()) -> None:
    model.train()
    for m in frozen:
        m.eval()


def build_optimizer(model: Classifier, cfg: TrainConfig) -> torch.optim.Optimizer:
    """One param group per stage (then ``other`` and ``head``), each with
    ``lr = cfg.lr * cfg.lr_multipliers.get(name, 1.0)``; frozen parameters are left out."""
    params = dict(model.named_parameters())
    owners = stage_of_keys(model)
    order = [*ARCHITECTURES[model.arch].stages, OTHER, HEAD]
    groups = []
    for name in order:
        ps = [p for k, p in params.items() if owners.get(k) == name and p.requires_grad]
        if not ps:
            continue
        mult = cfg.lr_multipliers.get(name, 1.0)
        groups.append({"params": ps, "lr": cfg.lr * mult, "name": name, "lr_multiplier": mult})
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


# --------------------------------------------------------------------------- RNG state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG training touches, as tensors and primitives (weights_only-loadable)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- loops


@dataclass
class EpochStats:
    loss: float
    top1: float
    top5: float
    images: int
    seconds: float
    skipped: int = 0  # samples without a label of the class set
    rejects: list[dict[str, str]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _labeled(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    keep = batch.labels != UNKNOWN_LABEL
    n_skip = int((~keep).sum())
    if n_skip == 0:
        return batch.images, batch.labels, 0
    return batch.images[keep], batch.labels[keep], n_skip


def _to_device(
    x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type == "cuda":
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(device, non_blocking=True)
    return x, y


def _topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1)


def train_one_epoch(
    model: Classifier,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    device: torch.device,
    *,
    frozen: Sequence[nn.Module] = (),
    amp: bool = True,
    channels_last: bool = True,
    label_smoothing: float = 0.0,
) -> EpochStats:
    """One pass over ``batches`` (any iterable of :class:`~cvpipe.data.loader.Batch`, from
    shards or from memory). Samples with an unknown label are skipped and counted."""
    set_train_mode(model, frozen)
    cuda = device.type == "cuda"
    # Sums stay on the device: a .item() per step would sync the GPU every batch.
    loss_sum = torch.zeros((), device=device)
    c1 = torch.zeros((), dtype=torch.int64, device=device)
    c5 = torch.zeros((), dtype=torch.int64, device=device)
    n = skipped = 0
    rejects: list[dict[str, str]] = []
    start = time.perf_counter()
    for batch in batches:
        rejects.extend(batch.rejects)
        x, y, s = _labeled(batch)
        skipped += s
        if len(y) == 0:
            continue
        x, y = _to_device(x, y, device, channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            loss_sum += loss.detach() * len(y)
            c1 += _topk_correct(logits, y, 1).sum()
            c5 += _topk_correct(logits, y, 5).sum()
        n += len(y)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if n == 0:
        raise TrainingError(f"an epoch saw no labeled sample ({skipped} without a known label)")
    return EpochStats(
        loss=float(loss_sum) / n,
        top1=int(c1) / n,
        top5=int(c5) / n,
        images=n,
        seconds=seconds,
        skipped=skipped,
        rejects=rejects,
    )


@dataclass(frozen=True)
class EvalResult:
    """Scores of one checkpoint on labeled shards. ``per_class`` rows follow
    ``tables.PER_CLASS``; samples whose label is outside the class set are counted in
    ``unknown`` and scored nowhere."""

    checkpoint: str
    n: int
    loss: float
    top1: float
    top5: float
    images_per_s: float
    unknown: int = 0
    rejects: int = 0
    per_class: tuple[tuple[int, str, int, int, float], ...] = ()
    per_class_url: str | None = None
    metrics_url: str | None = None

    def per_class_table(self) -> pa.Table:
        cols = list(zip(*self.per_class, strict=True)) if self.per_class else [[]] * 5
        return pa.Table.from_arrays(
            [pa.array(c, type=f.type) for c, f in zip(cols, tables.PER_CLASS, strict=True)],
            schema=tables.PER_CLASS,
        )


@torch.no_grad()
def evaluate_model(
    model: Classifier,
    batches: Iterable[Batch],
    device: torch.device,
    classes: Sequence[str],
    *,
    amp: bool = True,
    channels_last: bool = True,
    checkpoint: str = "",
) -> EvalResult:
    """Top-1/top-5, mean loss and per-class accuracy of ``model`` over ``batches``."""
    model.eval()
    cuda = device.type == "cuda"
    k = len(classes)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    c5 = torch.zeros((), dtype=torch.int64, device=device)
    count = torch.zeros(k, dtype=torch.int64, device=device)
    correct = torch.zeros(k, dtype=torch.int64, device=device)
    n = unknown = rejects = 0
    start = time.perf_counter()
    for batch in batches:
        rejects += len(batch.rejects)
        x, y, s = _labeled(batch)
        unknown += s
        if len(y) == 0:
            continue
        x, y = _to_device(x, y, device, channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        c5 += _topk_correct(logits, y, 5).sum()
        count += torch.bincount(y, minlength=k)
        correct += torch.bincount(y[logits.argmax(1) == y], minlength=k)
        n += len(y)
    seconds = time.perf_counter() - start
    count_l, correct_l = count.tolist(), correct.tolist()
    per_class = tuple(
        (i, str(c), count_l[i], correct_l[i], correct_l[i] / count_l[i] if count_l[i] else math.nan)
        for i, c in enumerate(classes)
    )
    return EvalResult(
        checkpoint=checkpoint,
        n=n,
        loss=float(loss_sum) / n if n else math.nan,
        top1=sum(correct_l) / n if n else math.nan,
        top5=int(c5) / n if n else math.nan,
        images_per_s=n / seconds if seconds > 0 else 0.0,
        unknown=unknown,
        rejects=rejects,
        per_class=per_class,
    )


# --------------------------------------------------------------------------- stages


def _metric_row(epoch: int, split: str, loss: float, top1: float, top5: float, ips: float):
    return {
        "epoch": epoch,
        "split": split,
        "loss": float(loss),
        "top1": float(top1),
        "top5": float(top5),
        "images_per_s": float(ips),
    }


def _save_state(url: str, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes_atomic(url, buf.getvalue())


def _load_state(url: str) -> dict[str, Any]:
    try:
        return torch.load(io.BytesIO(read_bytes(url)), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise TrainingError(
            f"training state {url} is unreadable: {type(e).__name__}: {e}"
        ) from None


def _remove(url: str) -> None:
    fs, path = url_to_fs(url)
    for p in (path + COMMIT_SUFFIX, path):  # withdraw the commit before the data
        if fs.exists(p):
            fs.rm(p)


def _remove_epoch(out: str, epoch: int) -> None:
    """Drop an old epoch (state first: an epoch without state is never resumed from)."""
    ckpt = epoch_checkpoint_url(out, epoch)
    for url in (state_url(out, epoch), ckpt, models.sidecar_url(ckpt)):
        _remove(url)


def _dedup_rejects(rows: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    seen: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in rows:
        seen.setdefault((r["key"], r["shard"], r["reason"]), r)
    return list(seen.values())


def train(
    cfg: TrainConfig,
    train_urls: Sequence[str],
    out: str,
    val_urls: Sequence[str] | None = None,
    init_checkpoint: str | None = None,
) -> str:
    """Train (or fine-tune from ``init_checkpoint``) on ``train_urls``; returns the URL of
    the final checkpoint ``out/final.pt``.

    Idempotent: a committed final checkpoint is returned without work; otherwise a run
    resumes after the last epoch with committed weights and state. Deterministic for a
    given config on CPU (same seed, same shards: same weights, crash or no crash).
    """
    train_urls = list(train_urls)
    # What the outputs under ``out`` depend on: resuming or skipping with anything else
    # would hand back a model of another run.
    chash = tables.config_hash(
        {
            "config": cfg,
            "train": train_urls,
            "val": list(val_urls or ()),
            "init": init_checkpoint,
        }
    )
    final = final_url(out)
    if is_committed(final):
        have = models.load_info(final).lineage.get("run_hash")
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
    if cuda:
        torch.backends.cudnn.benchmark = True

    if cfg.classes is not None:
        classes = list(cfg.classes)
    elif init_checkpoint is not None and not cfg.new_head and cfg.copy_stages is None:
        # Fine-tuning on the same task (e.g. the student on D) keeps the head's classes.
        classes = models.load_info(init_checkpoint).classes
    else:
        classes = discover_classes(train_urls)
    input_size = cfg.input_size or ARCHITECTURES[cfg.arch].input_size

    seed_everything(cfg.seed)
    model, init_lineage = initial_model(cfg, classes, init_checkpoint)
    frozen = freeze_stages(model, cfg.freeze_stages)
    model.to(device)
    if cuda and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    info = ModelInfo(
        arch=cfg.arch,
        classes=classes,
        input_size=input_size,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        lineage=tables.lineage(
            cfg,
            stage="train",
            run_hash=chash,
            train_config=cfg.model_dump(mode="json"),
            train_shards=len(train_urls),
            val_shards=len(val_urls or ()),
            **init_lineage,
        ),
    )

    rows: list[dict[str, Any]] = []
    start_epoch = last_epoch(out)
    if start_epoch:
        state = _load_state(state_url(out, start_epoch))
        if state.get("run_hash") != chash:
            raise TrainingError(
                f"{out} holds epochs of another run (hash {state.get('run_hash')}, now "
                f"{chash}): use a new output folder"
            )
        weights, _ = models.load_checkpoint(epoch_checkpoint_url(out, start_epoch))
        model.load_state_dict(weights.state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        rows = list(state["metrics"])
        log.info("train: resuming %s after epoch %d", out, start_epoch)

    train_ds = ShardDataset(
        train_urls,
        build_transform(cfg.augmentation, input_size, cfg.mean, cfg.std, cfg.shift_px),
        classes=classes,
        stage="train",
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
    )
    train_loader = make_loader(train_ds, cfg.batch_size, cfg.num_workers, pin_memory=cuda)
    val_loader = None
    if val_urls:
        val_ds = ShardDataset(
            list(val_urls), models.preprocess(info), classes=classes, stage="validate"
        )
        val_loader = make_loader(val_ds, cfg.batch_size, cfg.num_workers, pin_memory=cuda)

    rejects: list[dict[str, str]] = []
    for epoch in range(start_epoch, cfg.epochs):
        train_ds.set_epoch(epoch)
        stats = train_one_epoch(
            model,
            optimizer,
            train_loader,
            device,
            frozen=frozen,
            amp=cfg.amp,
            channels_last=cfg.channels_last,
            label_smoothing=cfg.label_smoothing,
        )
        scheduler.step()
        rejects = stats.rejects
        e = epoch + 1
        rows.append(_metric_row(e, "train", stats.loss, stats.top1, stats.top5, stats.images_per_s))
        msg = f"epoch {e}/{cfg.epochs} loss {stats.loss:.4f} top1 {stats.top1:.4f}"
        if val_loader is not None:
            v = evaluate_model(
                model, val_loader, device, classes, amp=cfg.amp, channels_last=cfg.channels_last
            )
            rows.append(_metric_row(e, "val", v.loss, v.top1, v.top5, v.images_per_s))
            msg += f" val top1 {v.top1:.4f}"
        log.info("train %s: %s (%.0f img/s)", out, msg, stats.images_per_s)
        # Weights first, then the state file: the state is the epoch's commit.
        models.save_checkpoint(model, info, epoch_checkpoint_url(out, e))
        _save_state(
            state_url(out, e),
            {
                "epoch": e,
                "run_hash": chash,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "metrics": rows,
            },
        )
        tables.write_parquet(tables.from_rows(rows, tables.METRICS), metrics_url(out), info.lineage)
        if cfg.keep_checkpoints is not None and e > cfg.keep_checkpoints:
            _remove_epoch(out, e - cfg.keep_checkpoints)

    if not rows:
        raise TrainingError(f"{out}: no epoch was trained")
    tables.write_parquet(tables.from_rows(rows, tables.METRICS), metrics_url(out), info.lineage)
    if rejects:
        tables.write_parquet(
            tables.from_rows(_dedup_rejects(rejects), tables.REJECTS),
            join(out, "rejects.parquet"),
            info.lineage,
        )
    models.save_checkpoint(model, info, final)
    return final


def _eval_urls(out: str, split: str) -> tuple[str, str]:
    return join(out, f"{split}_per_class.parquet"), join(out, f"{split}_metrics.parquet")


def evaluate(
    checkpoint_url: str,
    urls: Sequence[str],
    out: str | None = None,
    *,
    split: str = "test",
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int = 0,
) -> EvalResult:
    """Score a checkpoint on labeled shards with its own eval transform.

    With ``out``, publishes ``{out}/{split}_per_class.parquet`` (tables.PER_CLASS) and
    ``{out}/{split}_metrics.parquet`` (one tables.METRICS row); when both are committed
    for the same weights and shards, a rerun reads them back instead of evaluating.
    """
    if out is not None:
        pc_url, m_url = _eval_urls(out, split)
        if (
            is_committed(pc_url)
            and is_committed(m_url)
            and tables.read_lineage(m_url).get("model_id") == models.model_id(checkpoint_url)
            and tables.read_lineage(m_url).get("shard_urls") == list(urls)
        ):
            return _read_eval(checkpoint_url, pc_url, m_url)
    dev = models.resolve_device(device)
    model, info = models.load_checkpoint(checkpoint_url, dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    ds = ShardDataset(list(urls), models.preprocess(info), classes=info.classes, stage="evaluate")
    loader = make_loader(ds, batch_size, num_workers, pin_memory=dev.type == "cuda")
    result = evaluate_model(model, loader, dev, info.classes, checkpoint=checkpoint_url)
    if out is None:
        return result
    lin = tables.lineage(
        None,
        stage="evaluate",
        split=split,
        model_id=models.model_id(checkpoint_url),
        checkpoint=checkpoint_url,
        shard_urls=list(urls),
        n=result.n,
        unknown=result.unknown,
        rejects=result.rejects,
    )
    epochs = int(info.lineage.get("train_config", {}).get("epochs", 0) or 0)
    row = _metric_row(epochs, split, result.loss, result.top1, result.top5, result.images_per_s)
    tables.write_parquet(result.per_class_table(), pc_url, lin)
    tables.write_parquet(tables.from_rows([row], tables.METRICS), m_url, lin)
    return EvalResult(**{**result.__dict__, "per_class_url": pc_url, "metrics_url": m_url})


def _read_eval(checkpoint_url: str, pc_url: str, m_url: str) -> EvalResult:
    m = tables.read_parquet(m_url).to_pylist()[0]
    lin = tables.read_lineage(m_url)
    pc = tables.read_parquet(pc_url).to_pylist()
    per_class = tuple(
        (r["class_index"], r["class_name"], r["count"], r["correct"], r["top1"]) for r in pc
    )
    return EvalResult(
        checkpoint=checkpoint_url,
        n=int(lin.get("n", sum(r["count"] for r in pc))),
        loss=m["loss"],
        top1=m["top1"],
        top5=m["top5"],
        images_per_s=m["images_per_s"],
        unknown=int(lin.get("unknown", 0)),
        rejects=int(lin.get("rejects", 0)),
        per_class=per_class,
        per_class_url=pc_url,
        metrics_url=m_url,
    )


# --------------------------------------------------------------------------- chop


def chop_configs(
    cfg: TrainConfig, modes: Sequence[str] = ("frozen", "finetuned")
) -> list[tuple[int, str, TrainConfig]]:
    """The runs of the chop experiment: for n = 0..L (L = the architecture's stage
    count), copy the base model's first n stages and retrain everything above them,
    with the copied stages ``frozen`` (Yosinski's AnB) or ``finetuned`` (AnB+).
    n = 0 trains from scratch, so it runs once (as ``finetuned``) whatever the modes."""
    bad = set(modes) - {"frozen", "finetuned"}
    if bad:
        raise ValueError(f"unknown chop mode(s) {sorted(bad)}; use frozen, finetuned")
    runs = []
    for n in range(len(ARCHITECTURES[cfg.arch].stages) + 1):
        for mode in modes:
            if n == 0 and mode == "frozen" and "finetuned" in modes:
                continue
            freeze = n if mode == "frozen" else 0
            runs.append(
                (n, mode, cfg.model_copy(update={"copy_stages": n, "freeze_stages": freeze}))
            )
    return runs


def chop_run_dir(out: str, n: int, mode: str) -> str:
    return join(out, "runs", f"n{n}-{mode}")


def chop_report(rows: Sequence[dict[str, Any]], out: str, arch: str) -> dict[str, str]:
    """Publish the chop table (``chop.parquet``, tables.CHOP), ``chop.md`` and
    ``chop.png`` under ``out``; ``rows`` carry n, mode, top1, top5. Returns the URLs."""
    stages = ARCHITECTURES[arch].stages
    rows = [{**r, "stage": stages[r["n"] - 1] if r["n"] > 0 else ""} for r in rows]
    if any(r["n"] == 0 for r in rows):
        # n = 0 is the same run in both modes (nothing copied, nothing frozen).
        base = next(r for r in rows if r["n"] == 0)
        have = {(r["n"], r["mode"]) for r in rows}
        for mode in sorted({r["mode"] for r in rows}):
            if (0, mode) not in have:
                rows.append({**base, "mode": mode})
    rows.sort(key=lambda r: (r["mode"], r["n"]))
    lin = tables.lineage(None, stage="chop", arch=arch)
    urls = {
        "parquet": join(out, "chop.parquet"),
        "markdown": join(out, "chop.md"),
        "png": join(out, "chop.png"),
    }
    tables.write_parquet(tables.from_rows(rows, tables.CHOP), urls["parquet"], lin)

    modes = sorted({r["mode"] for r in rows})
    by = {(r["n"], r["mode"]): r for r in rows}
    ns = sorted({r["n"] for r in rows})
    lines = [
        f"# Chop experiment ({arch}): retrain above stage n",
        "",
        "| n | stage | " + " | ".join(f"{m} top-1" for m in modes) + " |",
        "|---|---|" + "---|" * len(modes),
    ]
    for n in ns:
        cells = [f"{by[(n, m)]['top1']:.4f}" if (n, m) in by else "" for m in modes]
        lines.append(f"| {n} | {stages[n - 1] if n else '(scratch)'} | " + " | ".join(cells) + " |")
    write_bytes_atomic(urls["markdown"], ("\n".join(lines) + "\n").encode())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in modes:
        pts = [(n, by[(n, m)]["top1"]) for n in ns if (n, m) in by]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xticks(ns, ["0"] + [f"{n}\n{stages[n - 1]}" for n in ns if n], fontsize=8)
    ax.set_xlabel("stages copied from the base model (n)")
    ax.set_ylabel("top-1 on the target test set")
    ax.set_title(f"{arch}: frozen vs fine-tuned transfer")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(urls["png"], buf.getvalue())
    return urls


def chop(
    base_checkpoint: str,
    cfg: TrainConfig,
    train_urls: Sequence[str],
    test_urls: Sequence[str],
    out: str,
    modes: Sequence[str] = ("frozen", "finetuned"),
) -> dict[str, str]:
    """The whole chop experiment in one call (each run is skipped when committed)."""
    rows = []
    for n, mode, run_cfg in chop_configs(cfg, modes):
        run_out = chop_run_dir(out, n, mode)
        ckpt = train(run_cfg, train_urls, run_out, init_checkpoint=base_checkpoint)
        res = evaluate(ckpt, test_urls, run_out, device=cfg.device)
        rows.append({"n": n, "mode": mode, "top1": res.top1, "top5": res.top5})
    return chop_report(rows, out, cfg.arch)
