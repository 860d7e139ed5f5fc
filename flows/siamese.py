"""Siamese flows: one training run (``cvpipe siamese train``), and the study
train -> embed -> index -> evaluate (``cvpipe siamese run``).

Per seed the study trains the embedding net on pairs mined from the (pseudo-)labels,
trains a teacher classifier (unless one is given) and builds a random-init network of
the same architecture; the inference stage embeds the evaluation shards with each (the
embedding net's output, the classifiers' penultimate layer); each embedding set is
indexed and every vector queried (approximate and exact), giving precision@k by label
and recall@k of the index. Artifacts: the table (``retrieval.parquet``/``.md``) and
2-D projections coloured by label (``projection-siamese.png``, ``-teacher.png``).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE

from cvpipe import models
from cvpipe.core import storage, tables
from cvpipe.core.storage import join
from cvpipe.experiments.siamese import SiameseConfig
from cvpipe.index import evaluate
from cvpipe.infer.config import InferConfig
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.siamese import SiameseTrainConfig
from flows.teacher import infer_flow
from tasks.artifacts import publish_markdown, publish_table, run_name, summary_rows
from tasks.training import train, train_run

FEATURES = ("siamese", "teacher", "random")


@flow(name="siamese-train", flow_run_name=run_name("siamese train {config.out}"))
def siamese_train_flow(config: SiameseTrainConfig) -> dict[str, Any]:
    """One Siamese run through the shared loop (skipped when committed)."""
    result = train_run(config.job())
    summary = {"checkpoint": result.checkpoint, "model_id": result.model_id, **result.last}
    publish_table(summary_rows(summary), key="siamese-train",
                  description=f"Siamese run `{config.out}`", location=config.out)  # fmt: skip
    return summary


def _seeded(cfg: TrainConfig, seed: int) -> TrainConfig:
    return TrainConfig.model_validate({**cfg.model_dump(), "seed": seed})


@task(name="random-init", cache_policy=NONE)
def random_checkpoint(arch: str, classes: list[str], input_size: int, seed: int, url: str) -> str:
    """A seeded, untrained classifier: the floor any learned feature must beat."""
    if not storage.is_committed(url):
        import torch

        torch.manual_seed(seed)
        lineage = tables.lineage(None, stage="random-init", seed=seed)
        info = models.ModelInfo(arch, list(classes), input_size, lineage=lineage)
        models.save_checkpoint(models.build(arch, len(classes)), info, url)
    return url


@task(name="retrieval", cache_policy=NONE)
def retrieval(features: str, labels: dict[str, str], out: str, name: str, seed: int,
              config: SiameseConfig) -> list[dict[str, Any]]:  # fmt: skip
    return evaluate.retrieval_rows(features, labels, out, name=name, seed=seed, ks=config.ks,
                                   kind=config.index_kind, memory=config.memory)  # fmt: skip


@task(name="projection", cache_policy=NONE)
def projection(features: str, labels: dict[str, str], out_png: str, title: str) -> str:
    return evaluate.projection_png(features, labels, out_png, title)


@task(name="eval-labels", cache_policy=NONE)
def eval_labels(shards: list[str]) -> dict[str, str]:
    return evaluate.shard_labels(shards)


def _data(config: SiameseConfig) -> tuple[list[str], list[str]]:
    if config.digits is None:
        if config.train_shards is None or config.eval_shards is None:
            raise ValueError("without digits, give train_shards and eval_shards")
        return (storage.expand_specs(config.train_shards, ".tar"),
                storage.expand_specs(config.eval_shards, ".tar"))  # fmt: skip
    from flows.semi_supervised import digits_data_flow

    urls = digits_data_flow(join(config.root, "data"), config.digits, 0)
    return urls["labeled"], urls["test"]


@flow(name="siamese", flow_run_name=run_name("siamese -> {config.root}"))
def siamese_flow(config: SiameseConfig) -> dict[str, Any]:
    """The study; returns the markdown table and the artifacts' URLs."""
    train_shards, eval_shards = _data(config)
    labels = eval_labels(eval_shards)
    rows: list[dict[str, Any]] = []
    pngs: dict[str, str] = {}
    for seed in config.seeds:
        base = join(config.root, f"seed-{seed}")
        siamese = train_run(SiameseTrainConfig(
            shards=train_shards, out=join(base, "siamese"), labels=config.labels,
            dim=config.dim, margin=config.margin, positive_fraction=config.positive_fraction,
            hard_negatives=config.hard_negatives, train=_seeded(config.siamese, seed),
        ).job()).checkpoint  # fmt: skip
        teacher = config.teacher or train(
            _seeded(config.teacher_train, seed), train_shards, join(base, "teacher")
        )
        info = models.load_info(teacher)
        rand = random_checkpoint(info.arch, info.classes, info.input_size, seed,
                                 join(base, "random", "random.pt"))  # fmt: skip
        for name, ckpt in zip(FEATURES, (siamese, teacher, rand), strict=True):
            emb = join(base, f"embed-{name}")
            infer_flow(InferConfig(shards=eval_shards, checkpoint=ckpt, out=emb, top_p=1,
                                   features=True, batch_size=config.batch_size,
                                   device=config.device, num_workers=0, cpu_threads=1))  # fmt: skip
            features = join(emb, "features")
            rows += retrieval(features, labels, join(base, f"eval-{name}"), name, seed, config)
            if seed == config.seeds[0] and name in ("siamese", "teacher"):
                pngs[name] = projection(features, labels,
                                        join(config.root, f"projection-{name}.png"),
                                        f"{name} embeddings, seed {seed}")  # fmt: skip
    table_url = join(config.root, "retrieval.parquet")
    tables.write_parquet(tables.from_rows(rows, tables.RETRIEVAL), table_url,
                         tables.lineage(config, stage="siamese-eval"))  # fmt: skip
    markdown = evaluate.retrieval_markdown(rows)
    storage.write_bytes_atomic(join(config.root, "retrieval.md"), markdown.encode())
    publish_markdown(markdown, key="siamese-retrieval",
                     description="precision@k by label and recall@k vs exact search",
                     location=config.root)  # fmt: skip
    return {"markdown": markdown, "table": table_url, "projection": pngs.get("siamese"),
            "projections": pngs, "rows": rows}  # fmt: skip
