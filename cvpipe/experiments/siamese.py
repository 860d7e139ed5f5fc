"""The Siamese study's parameters: train -> embed -> index -> evaluate (flows/siamese.py).

Per seed: a Siamese embedding net trained on pairs mined from the training set's labels
(or a pseudo-label table), a teacher classifier (penultimate features) and a
random-init network; each embeds the evaluation shards through the inference stage,
each embedding set is indexed, and retrieval precision@k by label and the index's
recall@k against exact search go in one table (mean +- std over seeds, paired wins).
"""

from __future__ import annotations

from pydantic import Field

from cvpipe.core.config import Strict, runtime
from cvpipe.experiments.config import DigitsSplit
from cvpipe.learn.config import TrainConfig


def _siamese_train() -> TrainConfig:
    return TrainConfig(arch="small_cnn", input_size=16, epochs=30, batch_size=64, lr=0.05,
                       augmentation="shift", cpu_threads=1)  # fmt: skip


def _teacher_train() -> TrainConfig:
    return TrainConfig(arch="small_cnn", input_size=16, epochs=30, batch_size=32, lr=0.02,
                       augmentation="shift", cpu_threads=1)  # fmt: skip


class SiameseConfig(Strict):
    """Siamese embeddings vs the teacher's penultimate features vs random-init features."""

    root: str = Field(description="output root URL (data, models, embeddings, indexes, tables)")
    digits: DigitsSplit | None = Field(
        default_factory=lambda: DigitsSplit(labeled_fraction=0.5, test_fraction=0.4),
        description="the bundled digits (labeled part trains, test part evaluates); "
        "None: give train_shards and eval_shards",
    )  # fmt: skip
    train_shards: str | list[str] | None = Field(None, description="labeled training shards")
    eval_shards: str | list[str] | None = Field(None, description="labeled evaluation shards")
    labels: str | list[str] | None = Field(
        None, description="pseudo-label table(s) (key, label) for the pairs; None: shard labels"
    )
    teacher: str | None = Field(
        None, description="teacher checkpoint; None: one is trained per seed on the train shards"
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    dim: int = Field(32, ge=1)
    margin: float = Field(1.0, gt=0)
    positive_fraction: float = Field(0.5, ge=0, le=1)
    hard_negatives: float = Field(0.25, ge=0, le=1)
    siamese: TrainConfig = Field(default_factory=_siamese_train)
    teacher_train: TrainConfig = Field(default_factory=_teacher_train)
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1)
    index_kind: str = Field("ivf", description="the approximate index scored against exact")
    memory: str = Field("4G")
    batch_size: int = runtime(256, ge=1, description="inference batch size")
    device: str = runtime("auto")
