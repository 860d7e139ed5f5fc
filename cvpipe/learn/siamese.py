"""One Siamese training run as a config: the shards, the (pseudo-)labels, the contrastive
task's parameters and the training config, turned into the TrainJob the shared loop
runs (``cvpipe siamese train``; ``--config siamese.yaml`` holds these fields)."""

from __future__ import annotations

from pydantic import Field

from cvpipe.core.config import Strict
from cvpipe.core.storage import expand_specs
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.stages import TrainJob
from cvpipe.learn.tasks import ContrastiveTask


def _small_digits() -> TrainConfig:
    return TrainConfig(arch="small_cnn", epochs=20, batch_size=64, lr=0.05, input_size=16)


class SiameseTrainConfig(Strict):
    """Train an embedding net on pairs mined from labels (Hadsell et al. 2006)."""

    shards: str | list[str] = Field(description="training shards (a URL, folder, pattern, list)")
    out: str = Field(description="the run's folder: checkpoints, metrics.parquet, final.pt")
    labels: str | list[str] | None = Field(
        None, description="labels table(s) with key and label (a selection, anchor labels); "
        "None: the shards' own labels",
    )  # fmt: skip
    init: str | None = Field(None, description="start the backbone from this checkpoint")
    val: str | list[str] | None = Field(None, description="validation shards")
    dim: int = Field(32, ge=1, description="embedding dimensions")
    margin: float = Field(1.0, gt=0, description="contrastive margin m")
    normalize: bool = Field(True, description="L2-normalize the embeddings")
    positive_fraction: float | None = Field(
        0.5, ge=0, le=1, description="share of similar pairs (None: next-sample pairs)"
    )
    pairs_per_sample: float = Field(2.0, gt=0, description="pairs drawn per batch sample")
    hard_negatives: float = Field(0.0, ge=0, le=1, description="share of hardest negatives")
    train: TrainConfig = Field(default_factory=_small_digits, description="the loop's config")

    def task(self) -> ContrastiveTask:
        return ContrastiveTask(
            dim=self.dim, margin=self.margin, normalize=self.normalize,
            positive_fraction=self.positive_fraction, pairs_per_sample=self.pairs_per_sample,
            hard_negatives=self.hard_negatives, labels=self.labels,
        )  # fmt: skip

    def job(self) -> TrainJob:
        return TrainJob(
            config=self.train,
            shards=expand_specs(self.shards, ".tar"),
            out=self.out,
            val=expand_specs(self.val, ".tar") if self.val else [],
            init_checkpoint=self.init,
            task=self.task(),
        )
