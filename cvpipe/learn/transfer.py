"""Transfer controls (Yosinski et al. 2014), for any model whose task names its stages:
freeze the backbone's first n stages (weights and BatchNorm statistics), and give each
stage its own learning-rate multiplier.

A task describes its model as :class:`Parts`: the backbone's named stages, first to
last, and the head's modules. Every parameter outside both belongs to ``other`` (e.g.
mobilenet's classifier block, a detector's FPN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

HEAD = "head"
OTHER = "other"

NamedStages = list[tuple[str, list[nn.Module]]]


@dataclass
class Parts:
    """The named stages of a model's backbone (first to last) and its head's modules."""

    stages: NamedStages
    head: list[nn.Module] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.stages]


def stage_of_keys(model: nn.Module, parts: Parts) -> dict[str, str]:
    """state_dict key -> its stage name, ``head``, or ``other``."""
    owner: dict[int, str] = {}
    for name, mods in parts.stages:
        for m in mods:
            for t in [*m.parameters(), *m.buffers()]:
                owner[id(t)] = name
    for m in parts.head:
        for t in [*m.parameters(), *m.buffers()]:
            owner[id(t)] = HEAD
    return {k: owner.get(id(t), OTHER) for k, t in model.state_dict(keep_vars=True).items()}


def freeze_stages(parts: Parts, n: int) -> list[nn.Module]:
    """Stop gradients in the backbone's first ``n`` stages; returns their modules, which
    :func:`set_train_mode` keeps in eval mode so BatchNorm statistics stay frozen too."""
    frozen: list[nn.Module] = []
    for _, mods in parts.stages[:n]:
        for m in mods:
            m.requires_grad_(False)
            frozen.append(m)
    return frozen


def set_train_mode(model: nn.Module, frozen: Sequence[nn.Module] = ()) -> None:
    model.train()
    for m in frozen:
        m.eval()


def param_groups(
    model: nn.Module, parts: Parts, lr: float, multipliers: dict[str, float]
) -> list[dict[str, Any]]:
    """One optimizer param group per stage (then ``other`` and ``head``), each with
    ``lr = lr * multipliers.get(name, 1.0)``; frozen parameters are left out."""
    params = dict(model.named_parameters())
    owners = stage_of_keys(model, parts)
    groups = []
    for name in [*parts.names, OTHER, HEAD]:
        ps = [p for k, p in params.items() if owners.get(k) == name and p.requires_grad]
        if not ps:
            continue
        mult = multipliers.get(name, 1.0)
        groups.append({"params": ps, "lr": lr * mult, "name": name, "lr_multiplier": mult})
    return groups
