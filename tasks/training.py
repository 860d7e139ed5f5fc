"""Training and evaluation in flows: each call runs the single unit of a TrainStage or
EvaluateStage through the generic stage task (tasks/stage.py), which takes its name,
tags, retries and timeout from the stage and never retries a permanent error."""

from __future__ import annotations

from typing import Any

from cvpipe.core.stage import Stage
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.resume import curves_url
from cvpipe.learn.stages import EvalJob, EvaluateStage, TrainJob, TrainResult, TrainStage
from cvpipe.learn.tasks import TrainTask
from cvpipe.learn.training import EvalResult
from tasks.artifacts import publish_table
from tasks.stage import unit_task


def run_single(stage: Stage) -> Any:
    """Run a one-unit stage as a task run of the calling flow; returns its result."""
    (unit,) = stage.units()
    return unit_task(type(stage))(type(stage), stage.config, unit)


def train_run(job: TrainJob) -> TrainResult:
    """One training run of any task (skipped when committed, resumed after a crash);
    its loss and metric curves go to the UI as a table (the PNG is ``curves.png``)."""
    result = run_single(TrainStage(job))
    if result.metrics:
        publish_table(
            [{k: _rounded(v) for k, v in r.items()} for r in result.metrics],
            "training-curves",
            f"Loss and metrics per epoch of `{result.checkpoint}` (plot: `{curves_url(job.out)}`)",
            location=job.out,
        )
    return result


def _rounded(v: Any) -> Any:
    return round(v, 5) if isinstance(v, float) else v


def train(
    cfg: TrainConfig,
    train_urls: list[str],
    out: str,
    init_checkpoint: str | None = None,
    val_urls: list[str] | None = None,
    task: TrainTask | None = None,
) -> str:
    """Train (or fine-tune from ``init_checkpoint``); returns the final checkpoint URL."""
    job = TrainJob(
        config=cfg,
        shards=list(train_urls),
        out=out,
        val=list(val_urls or ()),
        init_checkpoint=init_checkpoint,
        **({"task": task} if task is not None else {}),
    )
    return train_run(job).checkpoint


def evaluate(
    checkpoint: str, urls: list[str], out: str, device: str = "auto", threads: int | None = None
) -> EvalResult:
    """Score a classifier checkpoint on labeled shards (read back when committed)."""
    job = EvalJob(
        checkpoint=checkpoint, shards=list(urls), out=out, device=device, cpu_threads=threads
    )
    result = run_single(EvaluateStage(job))
    publish_table(
        [{k: _rounded(v) for k, v in r.items()} for r in result.per_class_table().to_pylist()],
        "per-class-accuracy",
        f"Per-class accuracy of `{checkpoint}` on {result.n} images "
        f"(top-1 {result.top1:.4f}, top-5 {result.top5:.4f})",
        location=out,
    )
    return result
