"""Single training stages as flows: train (or fine-tune) and evaluate."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from cvpipe.core import storage
from cvpipe.experiments import chop
from cvpipe.learn.config import TrainConfig
from tasks.artifacts import publish_table, run_name
from tasks.training import evaluate, train


@flow(name="train", flow_run_name=run_name("train {cfg.arch} -> {out}"))
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
    get_run_logger().info("trained %s", result)
    return result


@flow(name="chop", flow_run_name=run_name("chop {cfg.arch} from {base_checkpoint}"))
def chop_flow(
    base_checkpoint: str,
    cfg: TrainConfig,
    shards: str | list[str],
    test: str | list[str],
    out: str,
    modes: list[str] | None = None,
) -> dict[str, str]:
    """The degree-of-fine-tuning experiment (Yosinski et al. 2014): for n = 0..L copy the
    base model's first n stages, retrain above them with the copy frozen or fine-tuned,
    and score each on ``test``. Writes ``chop.{parquet,md,png}`` under ``out``."""
    train_urls = storage.expand_specs(shards, ".tar")
    test_urls = storage.expand_specs(test, ".tar")
    rows = []
    for n, mode, run_cfg in chop.chop_configs(cfg, modes or ["frozen", "finetuned"]):
        run_out = chop.chop_run_dir(out, n, mode)
        ckpt = train(run_cfg, train_urls, run_out, base_checkpoint)
        scores = evaluate(
            ckpt,
            test_urls,
            storage.join(run_out, "eval"),
            device=cfg.device,
            threads=cfg.cpu_threads,
        )
        rows.append({"n": n, "mode": mode, "top1": scores.top1, "top5": scores.top5})
    urls = chop.chop_report(rows, out, cfg.arch)
    publish_table(
        rows,
        "chop",
        f"Top-1 after copying the first n stages of `{base_checkpoint}`",
        location=out,
    )
    return urls
