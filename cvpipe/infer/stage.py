"""Teacher inference as a stage: a work unit is a group of shards through one DataLoader.

The model is loaded once per worker process (:meth:`InferStage.setup`, reached through
:func:`cvpipe.core.stage.cached_stage`), not once per unit. A unit's outputs are every
shard's rejects, features (when asked) and predictions, the predictions of each shard
last: they are its commit. A unit some of whose shards an earlier run committed
processes only the others (:meth:`Teacher.process` skips committed shards).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cvpipe.core.stage import Resources, Stage, Unit, run_stage
from cvpipe.core.storage import expand_specs
from cvpipe.data.shards import shard_id
from cvpipe.infer.config import InferConfig
from cvpipe.infer.teacher import InferStats, Teacher, committed_outputs, committed_stats, summarize
from cvpipe.models import cpu_threads


def shard_groups(urls: Sequence[str], size: int) -> list[list[str]]:
    """Consecutive groups of ``size`` shards (the last may be smaller)."""
    return [list(urls[i : i + size]) for i in range(0, len(urls), size)]


class InferStage(Stage[InferConfig, list[InferStats]]):
    """Top-P predictions (and features) for groups of ``config.shards_per_unit`` shards.

    ``resources`` declares one GPU: an orchestrator places a unit on a GPU host (the task
    carries the ``gpu`` tag); a run on a CPU ignores it."""

    name = "infer"
    resources = Resources(cpus=1, gpus=1)
    retries = 2
    retry_delay_s = 10.0

    def __init__(self, config: InferConfig) -> None:
        super().__init__(config)
        self.teacher: Teacher | None = None

    def units(self) -> list[Unit]:
        urls = expand_specs(self.config.shards, ".tar")
        if len({shard_id(u) for u in urls}) != len(urls):
            raise ValueError("two shard URLs map to the same shard id (partition/stem)")
        return [
            Unit(shard_id(g[0]) + (f" (+{len(g) - 1})" if len(g) > 1 else ""), tuple(g))
            for g in shard_groups(urls, self.config.shards_per_unit)
        ]

    def outputs(self, unit: Unit) -> list[str]:
        c = self.config
        return [
            u for url in unit.inputs for u in committed_outputs(c.out, shard_id(url), c.features)
        ]

    def setup(self) -> None:
        c = self.config
        self.teacher = Teacher(
            c.checkpoint,
            device=c.device,
            batch_size=c.batch_size,
            top_p=c.top_p,
            features=c.features,
            num_workers=c.num_workers,
        )

    def process(self, unit: Unit) -> list[InferStats]:
        assert self.teacher is not None, "setup() first"
        with cpu_threads(self.config.cpu_threads):
            return self.teacher.process(list(unit.inputs), self.config.out)

    def read_back(self, unit: Unit) -> list[InferStats]:
        return [committed_stats(self.config.out, shard_id(u)) for u in unit.inputs]

    def teardown(self) -> None:
        cuda = self.teacher is not None and self.teacher.cuda
        self.teacher = None
        if cuda:
            import torch

            torch.cuda.empty_cache()

    def describe(self, stats: list[InferStats]) -> str:
        return ", ".join(f"{s.shard}: {s.images} img" for s in stats)

    def summarize(self, stats: Sequence[list[InferStats]]) -> dict[str, Any]:
        return summarize([s for group in stats for s in group])


def infer(config: InferConfig) -> list[InferStats]:
    """Inference over every shard of ``config`` in this process (no orchestrator): one
    stats row per shard, committed shards read back."""
    return [s for group in run_stage(InferStage(config)) for s in group]
