"""A weakly supervised teacher (Mahajan et al. 2018; Yalniz et al. 2019) on the bundled
digits: per seed, synthetic captions of U -> vocabulary -> weak pretraining (its length
chosen by precision@1 on held-out captioned shards of U) -> the semi-supervised loop
with the teacher initialized from it, against the same loop with a teacher from scratch.

Layout under ``config.root``: ``weak_init/`` (the loop with the weak teacher, and per
seed ``seed-S/weak/``: vocabulary, candidate runs, the chosen checkpoint), ``scratch/``
(the loop from scratch), ``comparison.{parquet,md}`` and ``word_precision.{parquet,md}``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from cvpipe.core import storage, tables
from cvpipe.data.captions import write_caption_manifests
from cvpipe.data.config import IngestConfig
from cvpipe.experiments import weak_teacher as report
from cvpipe.experiments.config import WeakTeacherConfig
from cvpipe.label.config import VocabConfig
from cvpipe.learn.config import WeakTrainConfig
from flows.ingest import ingest_flow
from flows.semi_supervised import digits_data_flow, semi_supervised_flow
from flows.weak import train_weak_flow, vocab_flow
from tasks.artifacts import publish_markdown, run_name


def chosen_url(ssl_root: str, seed: int | str) -> str:
    return storage.join(ssl_root, f"seed-{seed}", "weak", "chosen.pt")


def _captioned(data_root: str, seed: int, q: float) -> dict[str, list[str]]:
    """Caption manifests of the seed's split, ingested: U and test with captions."""
    png = storage.join(data_root, "png")
    if not storage.is_committed(storage.join(png, "captions", "README.md")):
        write_caption_manifests(png, seed=seed, q=q)
    urls = {}
    for part in ("unlabeled", "test"):
        partition = f"captioned_{part}"
        ingest_flow(
            IngestConfig(source=storage.join(png, "captions", f"{part}.csv"), root=data_root,
                         partition=partition, name="digits", shard_size=250)
        )  # fmt: skip
        urls[part] = storage.list_committed(storage.join(data_root, "shards", partition), ".tar")
    return urls


@flow(name="weak-pretraining", flow_run_name="weak pretraining seed {seed}")
def weak_pretraining_flow(config: WeakTeacherConfig, ssl_root: str, seed: int) -> list[dict]:
    """One seed: captions, vocabulary, candidate runs chosen on validation shards, the
    chosen checkpoint copied to ``chosen.pt``; returns its word-precision rows on the
    captioned test split (reported, never used to choose)."""
    ssl = config.semi_supervised
    data_root = storage.join(ssl_root, f"seed-{seed}", "data")
    digits_data_flow(data_root, ssl.digits, seed)  # the split the loop will use
    caps = _captioned(data_root, seed, config.captions.q)
    if len(caps["unlabeled"]) <= config.val_shards:
        raise ValueError(f"{len(caps['unlabeled'])} captioned shard(s) of U: too few to hold "
                         f"out {config.val_shards} for validation")  # fmt: skip
    train, val = caps["unlabeled"][: -config.val_shards], caps["unlabeled"][-config.val_shards :]
    weak_root = storage.join(ssl_root, f"seed-{seed}", "weak")
    synonyms = storage.join(data_root, "png", "captions", "synonyms.txt")
    vocab = storage.join(weak_root, "vocab.parquet")
    vocab_flow(VocabConfig(shards=train, out=vocab, size=config.captions.vocab_size,
                           min_count=config.captions.min_count,
                           synonyms=synonyms if config.captions.synonyms else None))  # fmt: skip

    def run(epochs: int, test: list[str] | None = None) -> dict[str, Any]:
        return train_weak_flow(
            WeakTrainConfig(
                shards=train, vocab=vocab, out=storage.join(weak_root, f"epochs-{epochs}"),
                train=config.weak.model_copy(update={"epochs": epochs, "seed": seed}),
                val=val, test=test,
            )
        )  # fmt: skip

    scores = {}
    for epochs in config.weak_epochs:
        result = run(epochs)
        scores[epochs] = (result["last_val"]["precision_at_1"], result["checkpoint"])
    best = max(scores, key=lambda e: (scores[e][0], -e))  # ties: the shorter run
    ckpt = scores[best][1]
    get_run_logger().info("seed %d: val P@1 %s -> %d epochs", seed,
                          {e: round(p, 3) for e, (p, _) in scores.items()}, best)  # fmt: skip
    chosen = chosen_url(ssl_root, seed)
    for src, dst in ((ckpt[:-3] + ".json", chosen[:-3] + ".json"), (ckpt, chosen)):
        storage.write_bytes_atomic(dst, storage.read_bytes(src))
    tested = run(best, test=caps["test"])  # the chosen run, read back, scored on test
    return [{"seed": seed, "epochs": best, **r} for r in tested["precision"]]


@flow(name="weak-teacher", flow_run_name=run_name("weak teacher -> {config.root}"))
def weak_teacher_flow(config: WeakTeacherConfig) -> dict[str, Any]:
    """The comparison for every seed; returns both tables as markdown."""
    weak_root = storage.join(config.root, "weak_init")
    precision = []
    for seed in config.semi_supervised.seeds:
        precision += weak_pretraining_flow(config, weak_root, seed)
    weak_cfg = config.semi_supervised.model_copy(
        update={"root": weak_root, "teacher_init": chosen_url(weak_root, "{seed}")}
    )
    scratch_cfg = config.semi_supervised.model_copy(
        update={"root": storage.join(config.root, "scratch"), "teacher_init": None}
    )
    semi_supervised_flow(scratch_cfg)
    semi_supervised_flow(weak_cfg)
    rows = report.comparison_rows(
        tables.read_parquet(storage.join(scratch_cfg.root, "results.parquet")).to_pylist(),
        tables.read_parquet(storage.join(weak_cfg.root, "results.parquet")).to_pylist(),
    )
    comparison = report.comparison_markdown(rows)
    words = report.precision_markdown(precision)
    lineage = tables.lineage(config, stage="weak_teacher")
    for name, text in (("comparison.md", comparison), ("word_precision.md", words)):
        storage.write_bytes_atomic(storage.join(config.root, name), text.encode())
    tables.write_parquet(
        tables.from_rows([{"method": r["method"], "images": r["images"],
                           **{f"p_at_{k}": r[f"p_at_{k}"] for k in (1, 5, 10)}}
                          for r in precision], tables.WORD_PRECISION),
        storage.join(config.root, "word_precision.parquet"), lineage,
    )  # fmt: skip
    publish_markdown(comparison, "weak-teacher", "Teacher from scratch vs weak initialization",
                     location=config.root)  # fmt: skip
    publish_markdown(words, "weak-word-precision", "Word prediction of the weak models",
                     location=config.root)  # fmt: skip
    return {"comparison": comparison, "word_precision": words, "rows": rows}
