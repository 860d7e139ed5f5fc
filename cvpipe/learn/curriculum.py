"""Curricula: a chain of fine-tunings, source -> intermediate -> ... -> target.

Each step is one training stage that starts from the previous step's final checkpoint
(the first from ``init``, a trained source model, or from scratch) and trains on its own
shards with its own :class:`~cvpipe.learn.config.TrainConfig` (a new head where the
class set changes). Steps publish under ``out/NN-<name>/`` and skip when committed, so
a chain that crashed resumes at the step it was in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cvpipe.core.storage import join
from cvpipe.learn import training
from cvpipe.learn.config import TrainConfig


@dataclass(frozen=True)
class Step:
    """One fine-tuning of a curriculum."""

    name: str
    config: TrainConfig
    shards: tuple[str, ...]


def step_dir(out: str, index: int, name: str) -> str:
    return join(out, f"{index:02d}-{name}")


def run_curriculum(steps: Sequence[Step], out: str, init: str | None = None) -> list[str]:
    """Train every step in order, each from the last one's final checkpoint; returns the
    final checkpoint of every step (the last is the curriculum's model)."""
    if not steps:
        raise ValueError("a curriculum needs at least one step")
    checkpoints: list[str] = []
    previous = init
    for i, step in enumerate(steps):
        previous = training.train(
            step.config, list(step.shards), step_dir(out, i, step.name), init_checkpoint=previous
        )
        checkpoints.append(previous)
    return checkpoints
