"""Training and evaluation as stages (cvpipe.core.stage): one unit each, so the generic
Prefect task (tasks/stage.py) runs them with the stage's retries, tags and timeout, and
a committed run is read back rather than redone.

- :class:`TrainStage`: the single unit is one training run of any task (a
  :class:`TrainJob`); its output is the final checkpoint, its read-back the checkpoint
  and the metrics table. Its identity is the run's (the config's identity, the data,
  the init checkpoint and the task: :func:`cvpipe.learn.loop.run_identity`), so runtime
  fields (device, workers, threads, checkpoint retention) never make a run new.
- :class:`EvaluateStage`: a classifier checkpoint scored on labeled shards (top-1/top-5
  and per class); committed scores of the same weights on the same shards are read back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from cvpipe import models
from cvpipe.core import tables
from cvpipe.core.config import Strict, runtime
from cvpipe.core.stage import Resources, Stage, Unit
from cvpipe.learn import loop, training
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.errors import TrainingError
from cvpipe.learn.resume import final_url, metrics_url
from cvpipe.learn.tasks import AnyTask, ClassificationTask
from cvpipe.learn.training import EvalResult


class TrainJob(Strict):
    """One training run: the unit of a :class:`TrainStage`."""

    config: TrainConfig
    shards: list[str] = Field(min_length=1, description="training shard URLs")
    out: str = Field(description="the run's folder (checkpoints, metrics, final.pt)")
    val: list[str] = Field(default_factory=list, description="validation shards")
    init_checkpoint: str | None = Field(None, description="fine-tune from this checkpoint")
    task: AnyTask = Field(default_factory=ClassificationTask)


@dataclass(frozen=True)
class TrainResult:
    checkpoint: str
    model_id: str
    run_hash: str
    metrics: list[dict[str, Any]] = field(default_factory=list)  # rows of metrics.parquet

    @property
    def last(self) -> dict[str, Any]:
        """The last epoch's training row."""
        return next((r for r in reversed(self.metrics) if r["split"] == "train"), {})


class TrainStage(Stage[TrainJob, TrainResult]):
    name = "train"
    resources = Resources(cpus=1, gpus=1)
    retries = 1  # a retry resumes after the last committed epoch
    retry_delay_s = 5.0

    def identity(self) -> dict[str, Any]:
        j = self.config
        return loop.run_identity(j.task, j.config, j.shards, j.val, j.init_checkpoint)

    def units(self) -> list[Unit]:
        j = self.config
        inputs = (*j.shards, *j.val, *([j.init_checkpoint] if j.init_checkpoint else []))
        return [Unit(f"{j.config.arch} -> {j.out}", inputs)]

    def outputs(self, unit: Unit) -> list[str]:
        return [metrics_url(self.config.out), final_url(self.config.out)]

    def process(self, unit: Unit) -> TrainResult:
        j = self.config
        with models.cpu_threads(j.config.cpu_threads):
            loop.train(j.task, j.config, j.shards, j.out, j.val, j.init_checkpoint)
        return self.read_back(unit)

    def read_back(self, unit: Unit) -> TrainResult:
        out, want = self.config.out, self.identity_hash()
        have = loop.committed_run_hash(out)
        if have != want:
            raise TrainingError(
                f"{final_url(out)} was trained by another run (hash {have}, now {want}): "
                "use a new output folder"
            )
        return TrainResult(
            checkpoint=final_url(out),
            model_id=models.model_id(final_url(out)),
            run_hash=want,
            metrics=tables.read_parquet(metrics_url(out)).to_pylist(),
        )

    def describe(self, stats: TrainResult) -> str:
        last = stats.last
        return f"{stats.checkpoint}: epoch {last.get('epoch')}, train loss {last.get('loss')}"


class EvalJob(Strict):
    """A classifier checkpoint to score on labeled shards: the unit of an
    :class:`EvaluateStage`."""

    checkpoint: str
    shards: list[str] = Field(min_length=1)
    out: str = Field(description="writes {out}/{split}_per_class.parquet and _metrics.parquet")
    split: str = "test"
    batch_size: int = runtime(256, ge=1)
    device: str = runtime("auto", description="auto | cpu | cuda | cuda:N")
    num_workers: int = runtime(0, ge=0)
    cpu_threads: int | None = runtime(None, ge=1)


class EvaluateStage(Stage[EvalJob, EvalResult]):
    name = "evaluate"
    resources = Resources(cpus=1, gpus=1)
    retries = 1

    def units(self) -> list[Unit]:
        j = self.config
        return [Unit(f"{j.split} {j.checkpoint}", (j.checkpoint, *j.shards))]

    def outputs(self, unit: Unit) -> list[str]:
        j = self.config
        return list(training.eval_urls(j.out, j.split))

    def committed(self, unit: Unit) -> bool:
        # Scores in the folder count only for these weights on these shards.
        j = self.config
        return training.evaluated(j.checkpoint, j.shards, j.out, j.split)

    def process(self, unit: Unit) -> EvalResult:
        j = self.config
        with models.cpu_threads(j.cpu_threads):
            return training.evaluate(
                j.checkpoint,
                j.shards,
                j.out,
                split=j.split,
                batch_size=j.batch_size,
                device=j.device,
                num_workers=j.num_workers,
            )

    def read_back(self, unit: Unit) -> EvalResult:
        j = self.config
        return training.read_eval(j.checkpoint, j.out, j.split)

    def describe(self, stats: EvalResult) -> str:
        return f"{stats.checkpoint}: top-1 {stats.top1:.4f} on {stats.n} images"
