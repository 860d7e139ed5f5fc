"""The whole DAG's config: one section per stage, each with an on/off switch.

``flows/examples/pipeline.yaml`` is a complete example on the bundled digits. Every
location is derived from ``root`` (see flows/pipeline.py for the layout), so a config
names data sources and settings, never output paths.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from cvpipe.core.config import Strict, runtime
from cvpipe.experiments.config import DigitsSplit
from cvpipe.learn.config import TrainConfig

STAGES = ("ingest", "teacher", "infer", "select", "materialize", "student", "finetune")


class Section(Strict):
    enabled: bool = Field(True, description="run this stage (off: skipped, later stages use "
                          "what earlier runs committed)")  # fmt: skip


class DataSection(Strict):
    """Where the images come from: the bundled digits, or sources of your own."""

    digits: DigitsSplit | None = Field(
        None, description="the bundled digits, split into labeled D, the partition (U) and test"
    )
    labeled: str | None = Field(None, description="clean labeled images D: a folder or manifest")
    test: str | None = Field(None, description="held-out labeled images: a folder or manifest")
    unlabeled: str | None = Field(
        None,
        description="the partition's images; '{partition}' is replaced, e.g. s3://in/{partition}/",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        own = (self.labeled, self.test, self.unlabeled)
        if self.digits is not None and any(p is not None for p in own):
            raise ValueError("data: give digits, or labeled/test/unlabeled sources, not both")
        if self.digits is None and not all(p is not None for p in own):
            raise ValueError("data: give digits, or all of labeled, test and unlabeled")
        return self


class IngestSection(Section):
    shard_size: int = Field(10_000, ge=1, description="samples per shard")
    name: str = Field("img", pattern=r"^[A-Za-z0-9_-]+$", description="shard file name prefix")


class TeacherSection(Section):
    train: TrainConfig = Field(description="the teacher, trained on D")
    init: str | None = Field(
        None, description="a checkpoint to start the teacher from (e.g. weakly supervised)"
    )


class InferSection(Section):
    top_p: int = Field(1, ge=1, description="classes kept per image")
    batch_size: int = runtime(256, ge=1)
    device: str = runtime("auto", description="auto | cpu | cuda | cuda:N")
    num_workers: int = runtime(0, ge=0, description="DataLoader workers per unit")
    shards_per_unit: int = runtime(4, ge=1, description="shards per task run")
    cpu_threads: int | None = runtime(None, ge=1, description="torch threads on CPU")


class SelectSection(Section):
    top_k: int = Field(16_000, ge=1, description="images kept per class")


class StudentSection(Section):
    train: TrainConfig = Field(description="training on the pseudo-labeled set D^")


class FinetuneSection(Section):
    train: TrainConfig = Field(description="fine-tuning the student on D")


class PipelineConfig(Strict):
    """The mission as one scheduled DAG over a partition: ingest -> teacher inference
    -> top-K selection -> materialize -> student pretraining -> fine-tuning."""

    root: str = Field(description="output root of every stage")
    partition: str = Field("digits", description="the partition this run processes")
    data: DataSection
    ingest: IngestSection = Field(default_factory=IngestSection)
    teacher: TeacherSection
    infer: InferSection = Field(default_factory=InferSection)
    select: SelectSection = Field(default_factory=SelectSection)
    materialize: Section = Field(default_factory=Section)
    student: StudentSection
    finetune: FinetuneSection
