"""Weak supervision from captions and hashtags as flows: the vocabulary (count per shard
-> merge tree -> finalize), the word targets of a set of shards, training on them with
word prediction scored on held-out shards, and nearest words of a trained model."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from cvpipe.core import tables
from cvpipe.core.storage import expand_specs, is_committed, join
from cvpipe.data.config import IngestConfig
from cvpipe.label.config import TargetsConfig, VocabConfig
from cvpipe.label.targets import TargetsStage, resample_scale
from cvpipe.label.vocab import (
    VocabCountStage,
    VocabFinalizeStage,
    VocabMergeStage,
    read_vocab,
    vocab_markdown,
)
from cvpipe.learn.config import TrainConfig, WeakTrainConfig
from cvpipe.learn.stages import TrainJob
from cvpipe.learn.tasks.weak import WeakTask
from cvpipe.learn.weak import WordEvalJob, WordEvalStage, nearest_words
from flows.datasets import export_digits_flow
from flows.ingest import ingest_flow
from tasks.artifacts import publish_markdown, publish_table, run_name, summary_rows
from tasks.stage import run_units
from tasks.training import run_single, train_run


@flow(name="vocab", flow_run_name=run_name("vocab {config.out}"))
def vocab_flow(config: VocabConfig) -> dict[str, Any]:
    """Count every shard's words (one task run per shard), merge the partials
    ``fan_in`` at a time, level by level, and publish the ``size`` most frequent words.
    Committed partials and merges are reused; returns the summary."""
    logger = get_run_logger()
    counting = VocabCountStage(config)
    summary = counting.summarize(run_units(counting, what="vocab count"))
    merging = VocabMergeStage(config)
    levels = merging.merge_levels()
    for level in levels:
        run_units(merging, level, what=f"vocab merge level {level[0].index}")
    facts = run_units(VocabFinalizeStage(config), what="vocab finalize")[0]
    logger.info(
        "vocab %s: %s words of %s distinct, %d merge level(s), error bound %s",
        config.out, facts["words"], facts["distinct_words"], len(levels), facts["error_bound"],
    )  # fmt: skip
    result = {**summary, **facts}
    publish_table(summary_rows(result), "vocab-summary", f"Vocabulary `{config.out}`",
                  location=config.out)  # fmt: skip
    publish_markdown(vocab_markdown(config.out), "vocab", f"The head of `{config.out}`",
                     location=config.out)  # fmt: skip
    return result


@flow(name="word-targets", flow_run_name=run_name("word targets {config.out}"))
def targets_flow(config: TargetsConfig) -> dict[str, Any]:
    """Every shard's word targets over the vocabulary (one task run per shard)."""
    stage = TargetsStage(config)
    summary = stage.summarize(run_units(stage, what="word targets"))
    publish_table(summary_rows(summary), "word-targets-summary", f"Word targets `{config.out}`",
                  location=config.out)  # fmt: skip
    return summary


def _urls(spec: str | list[str] | None) -> list[str]:
    return expand_specs(spec, ".tar") if spec else []


@flow(name="train-weak", flow_run_name=run_name("train-weak {config.out}"))
def train_weak_flow(config: WeakTrainConfig) -> dict[str, Any]:
    """Word targets of every shard (train, val, test), a multi-label model on the
    training shards (the vocabulary is its class list), and with test shards the
    precision@k table against the frequency baseline and the top images of some words.

    Layout under ``config.out``: ``targets/`` (tables.WORD_TARGETS per shard), the
    training run (``final.pt``, ``metrics.parquet``, ``checkpoints/``), ``eval/``."""
    logger = get_run_logger()
    vocab = read_vocab(config.vocab)
    if not len(vocab):
        raise ValueError(f"vocabulary {config.vocab} is empty: nothing to predict")
    train, val, test = _urls(config.shards), _urls(config.val), _urls(config.test)
    targets_dir = join(config.out, "targets")
    every = list(dict.fromkeys([*train, *val, *test]))  # a shard listed twice: once
    targeting = TargetsStage(
        TargetsConfig(shards=every, vocab=config.vocab, out=targets_dir, resample=config.resample)
    )
    stats = run_units(targeting, what="word targets")
    summary = targeting.summarize(stats)
    on_train = stats[: len(train)]  # train comes first, without repeats
    with_words = sum(s.with_words for s in on_train)
    scale = (
        resample_scale(with_words, sum(s.weight_sum for s in on_train))
        if config.resample == "sqrt"
        else None
    )
    logger.info("train-weak: %d of %d training samples have a vocabulary word",
                with_words, sum(s.samples for s in on_train))  # fmt: skip
    task = WeakTask(targets=targets_dir, vocab=config.vocab, resample_scale=scale)
    job = TrainJob(
        config=config.train.model_copy(update={"classes": vocab.words}),
        shards=train, out=config.out, val=val, task=task,
    )  # fmt: skip
    trained = train_run(job)
    result: dict[str, Any] = {
        "checkpoint": trained.checkpoint,
        "words": len(vocab),
        "train_samples": sum(s.samples for s in on_train),
        "train_without_words": sum(s.without_words for s in on_train),
        "rejected": summary["rejected"],
        "resample_scale": scale,
        "last_epoch": trained.last,
        "last_val": next((r for r in reversed(trained.metrics) if r["split"] == "val"), None),
    }
    if test:
        t = config.train
        scores = run_single(
            WordEvalStage(
                WordEvalJob(checkpoint=trained.checkpoint, shards=test, targets=targets_dir,
                            out=join(config.out, "eval"), show=config.show,
                            top_images=config.top_images, device=t.device,
                            num_workers=t.num_workers, cpu_threads=t.cpu_threads)
            )
        )  # fmt: skip
        result["precision"] = scores["precision"]
        result["markdown"] = scores["markdown"]
        publish_markdown(scores["markdown"], "word-precision",
                         f"Word prediction of `{config.out}`", location=config.out)  # fmt: skip
        publish_table(
            tables.read_parquet(scores["top_images"]).to_pylist(),
            "word-top-images", f"Top-scoring held-out images per word, `{config.out}`",
            location=config.out,
        )  # fmt: skip
    return result


@flow(name="words", flow_run_name=run_name("words {query} in {checkpoint}"))
def words_flow(checkpoint: str, query: str, k: int = 10) -> list[dict[str, Any]]:
    """The ``k`` words nearest to ``query`` in the output layer of a weakly supervised
    model (cosine of the head's rows), as a table artifact."""
    rows = [
        {"rank": i + 1, "word": w, "cosine": round(c, 4)}
        for i, (w, c) in enumerate(nearest_words(checkpoint, query, k))
    ]
    publish_table(rows, f"words-{query}", f"Nearest words to `{query}` in `{checkpoint}`",
                  location=checkpoint)  # fmt: skip
    return rows


DEMO_WORDS = ("seven", "zero", "one", "odd", "round")


@flow(name="weak-demo", flow_run_name=run_name("weak demo -> {out}"))
def weak_demo_flow(out: str, epochs: int = 15, seed: int = 0) -> dict[str, Any]:
    """The weak-label part of the demo (about 2 minutes on 2 cores): SYNTHETIC captions
    for the digits (70% to train on, 30% held out), the vocabulary with the generator's
    synonym file, a small CNN trained on the words, precision@k against the frequency
    baseline, the top images of a few words, and the words nearest to "seven"."""
    png, root = join(out, "png"), join(out, "root")
    if not is_committed(join(png, "captions", "README.md")):
        export_digits_flow(png, size=16, split="labeled=0,unlabeled=0.7,test=0.3", seed=seed,
                           captions=True)  # fmt: skip
    for part in ("unlabeled", "test"):
        ingest_flow(IngestConfig(source=join(png, "captions", f"{part}.csv"), root=root,
                                 partition=part, name="digits", shard_size=250))  # fmt: skip
    vocab = join(out, "vocab.parquet")
    synonyms = join(png, "captions", "synonyms.txt")
    vocab_flow(VocabConfig(shards=join(root, "shards", "unlabeled"), out=vocab, size=64,
                           min_count=3, synonyms=synonyms))  # fmt: skip
    train = TrainConfig(arch="small_cnn", input_size=16, epochs=epochs, batch_size=64, lr=0.1,
                        augmentation="shift", seed=seed, cpu_threads=1)  # fmt: skip
    result = train_weak_flow(
        WeakTrainConfig(shards=join(root, "shards", "unlabeled"), vocab=vocab,
                        out=join(out, "model"), train=train, test=join(root, "shards", "test"),
                        show=list(DEMO_WORDS), top_images=8)
    )  # fmt: skip
    nearest = words_flow(result["checkpoint"], "seven", 5)
    return {**result, "nearest_seven": nearest}
