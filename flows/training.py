"""Single training stages as flows: train (or fine-tune) and evaluate."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from cvpipe import storage
from cvpipe.config import TrainConfig
from tasks.artifacts import publish_table
from tasks.training import evaluate, train


@flow(name="train", flow_run_name="train {cfg.arch} -> {out}")
def train_flow(
    cfg: TrainConfig,
    shards: str | list[str],
    out: str,
    test: str | list[str] | None = None,
    init_checkpoint: str | None = None,
) -> dict[str, Any]:
    """Train on ``shards`` (fine-tune when ``init_checkpoint`` is given), then evaluate
    on ``test`` if given. Returns the checkpoint URL and the test scores."""
    checkpoint = train(cfg, storage.expand_specs(shards, ".tar"), out, init_checkpoint)
    result: dict[str, Any] = {"checkpoint": checkpoint}
    if test:
        scores = evaluate(
            checkpoint,
            storage.expand_specs(test, ".tar"),
            storage.join(out, "eval"),
            device=cfg.device,
            threads=cfg.cpu_threads,
        )
        result.update(top1=scores.top1, top5=scores.top5, test_images=scores.n)
        publish_table(
            scores.per_class_table().to_pylist(),
            "per-class-accuracy",
            f"Per-class accuracy of `{checkpoint}`",
        )
    get_run_logger().info("trained %s", result)
    return result
