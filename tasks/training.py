"""Prefect tasks of the training stages: train / fine-tune, evaluate."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from cvpipe import models
from cvpipe.learn import training
from cvpipe.learn.config import TrainConfig


@task(
    name="train",
    task_run_name="train {cfg.arch} -> {out}",
    cache_policy=NONE,
    retries=1,  # a retry resumes from the last committed epoch
    retry_delay_seconds=5,
    tags=["gpu"],
)
def train(
    cfg: TrainConfig, train_urls: list[str], out: str, init_checkpoint: str | None = None
) -> str:
    """Train (or fine-tune from ``init_checkpoint``); returns the final checkpoint URL."""
    with models.cpu_threads(cfg.cpu_threads):
        return training.train(cfg, train_urls, out, init_checkpoint=init_checkpoint)


@task(
    name="evaluate",
    task_run_name="evaluate {checkpoint}",
    cache_policy=NONE,
    retries=1,
    tags=["gpu"],
)
def evaluate(
    checkpoint: str, urls: list[str], out: str, device: str = "auto", threads: int | None = None
) -> training.EvalResult:
    with models.cpu_threads(threads):
        return training.evaluate(checkpoint, urls, out, device=device)
