"""What a training task supplies to the loop, which knows nothing of classification.

A task is a small config model (its fields are its parameters, so they enter the
run's identity like any config) with methods:

- :meth:`TrainTask.build`: the model to start from (random or from a checkpoint), its
  checkpoint sidecar (:class:`~cvpipe.models.ModelInfo`), its :class:`Parts` for the
  transfer controls, and lineage fields describing how it was made;
- :meth:`TrainTask.dataset` and :meth:`TrainTask.collate`: samples from shards, and a
  list of samples as a :class:`TaskBatch` (inputs, targets, how many samples count,
  how many were skipped for want of a usable target, the rejects met on the way);
- :meth:`TrainTask.to_device`: how a batch goes to the device (by default every
  tensor, 4-D image batches in channels_last when asked);
- :meth:`TrainTask.forward_loss`: the forward pass and the mean loss of a training
  batch, and :meth:`TrainTask.eval_step` the same for validation;
- :meth:`TrainTask.meter`: the metrics of an epoch, accumulated batch by batch on the
  device (no host sync per step) and computed once;
- :meth:`TrainTask.load`: a checkpoint of this task as a model ready to run.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from cvpipe.core.config import Strict
from cvpipe.learn.transfer import Parts
from cvpipe.models import ModelInfo

if TYPE_CHECKING:
    from torch.utils.data import IterableDataset

    from cvpipe.learn.config import TrainConfig


def apply_to_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor inside nested lists, tuples and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: apply_to_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(apply_to_tensors(v, fn) for v in obj)
    return obj


@dataclass
class TaskBatch:
    """One collated batch: what the model takes, what the loss compares with, and the
    bookkeeping the loop reports (``size`` samples count toward loss and images/s)."""

    inputs: Any
    targets: Any
    size: int
    skipped: int = 0  # samples without a usable target (no known label, no word...)
    rejects: list[dict[str, str]] = field(default_factory=list)

    def pin_memory(self) -> TaskBatch:
        # DataLoader(pin_memory=True) pins custom batch types only through this method.
        self.inputs = apply_to_tensors(self.inputs, torch.Tensor.pin_memory)
        self.targets = apply_to_tensors(self.targets, torch.Tensor.pin_memory)
        return self


@dataclass
class Built:
    """The model a run starts from, with what the loop needs around it."""

    model: nn.Module
    info: ModelInfo  # the checkpoint sidecar; the loop adds the run's lineage
    parts: Parts
    lineage: dict[str, Any] = field(default_factory=dict)


class Meter(Protocol):
    """Epoch metrics: ``update`` per batch (device tensors, no host sync), ``compute``
    once at the end (names of the task's ``metric_names``)."""

    def update(self, outputs: Any, batch: TaskBatch) -> None: ...

    def compute(self) -> dict[str, float]: ...


class TrainTask(Strict, abc.ABC):
    """Base of the training tasks; a subclass sets ``kind`` (a Literal field) and
    ``metric_names`` and implements the abstract methods."""

    kind: str
    metric_names: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def build(
        self, cfg: TrainConfig, train_urls: Sequence[str], init_checkpoint: str | None
    ) -> Built:
        """The starting model, seeded (the loop has called seed_everything)."""

    @abc.abstractmethod
    def dataset(
        self, cfg: TrainConfig, urls: Sequence[str], info: ModelInfo, *, stage: str, train: bool
    ) -> IterableDataset:
        """Samples of ``urls``: augmented and shuffled (seeded, with ``set_epoch``) when
        ``train``, deterministic otherwise; ``stage`` names the reject rows."""

    @abc.abstractmethod
    def collate(self, items: list[dict[str, Any]]) -> TaskBatch:
        """The DataLoader's collate_fn (runs in loader workers: no device work)."""

    def to_device(self, batch: TaskBatch, device: torch.device, channels_last: bool) -> TaskBatch:
        """Move every tensor of the batch (on CPU: leave it); 4-D float batches go
        channels_last when asked."""
        if device.type == "cpu":
            return batch

        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device, non_blocking=True)
            if channels_last and t.dim() == 4 and t.is_floating_point():
                t = t.contiguous(memory_format=torch.channels_last)
            return t

        batch.inputs = apply_to_tensors(batch.inputs, move)
        batch.targets = apply_to_tensors(batch.targets, move)
        return batch

    @abc.abstractmethod
    def forward_loss(
        self, model: nn.Module, batch: TaskBatch, cfg: TrainConfig
    ) -> tuple[torch.Tensor, Any]:
        """Training forward pass under autocast: (mean loss over the batch, outputs for
        the meter)."""

    @abc.abstractmethod
    def eval_step(self, model: nn.Module, batch: TaskBatch) -> tuple[torch.Tensor | None, Any]:
        """Validation forward pass (model in eval mode, no gradients, under autocast):
        (the loss summed over the batch's ``size`` samples, or None when the model gives
        none in eval mode; outputs for the meter)."""

    @abc.abstractmethod
    def meter(self, split: str, info: ModelInfo, device: torch.device) -> Meter:
        """A fresh meter for one epoch of ``split`` (train, val, test)."""

    @abc.abstractmethod
    def load(self, url: str, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
        """A committed checkpoint of this task as a model on ``device``."""
