"""Detection training as one flat config: the loop's fields (TrainConfig), the detection
task's fields (DetectionTask: model shape, augmentation) and the run's data, so
``cvpipe detect train SHARDS --out OUT --config detect.yaml`` reads one plain YAML and
every field is a flag.

:meth:`DetectTrainConfig.job` splits it into the :class:`~cvpipe.learn.stages.TrainJob`
the training stage runs (the generic loop with a :class:`DetectionTask`). The number of
trainable backbone stages becomes the loop's ``freeze_stages`` (the first L - n named
stages of the backbone are frozen, BatchNorm statistics included).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, create_model, model_validator

from cvpipe.core.storage import expand_specs
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.stages import TrainJob
from cvpipe.learn.tasks import DetectionTask
from cvpipe.models import DETECTORS, stages_of

# TrainConfig fields that mean nothing to a detector (its augmentation and input size
# are the task's); hidden from the command line, left at their defaults.
NOT_FOR_DETECTION = {
    "input_size",
    "mean",
    "std",
    "augmentation",
    "shift_px",
    "label_smoothing",
    "copy_stages",
    "new_head",
    "freeze_stages",
}

_TASK_FIELDS = {
    name: (info.annotation, info) for name, info in DetectionTask.model_fields.items()
    if name != "kind"
}  # fmt: skip

_DetectBase: type[TrainConfig] = create_model(  # type: ignore[call-overload]
    "_DetectBase", __base__=TrainConfig, **_TASK_FIELDS
)


class DetectTrainConfig(_DetectBase):  # type: ignore[misc, valid-type]
    """Train a Faster R-CNN on boxed shards (from scratch, from a detection checkpoint,
    or with the backbone of a classifier checkpoint the pipeline trained)."""

    shards: str | list[str] = Field(description="boxed training shards (URL, folder, pattern)")
    out: str = Field(description="checkpoints, metrics.parquet and final.pt go here")
    val: str | list[str] | None = Field(None, description="boxed shards scored (mAP) each epoch")
    test: str | list[str] | None = Field(None, description="boxed shards scored after training")
    init: str | None = Field(
        None,
        description="start from a detection checkpoint, or from a classifier checkpoint of "
        "the backbone's architecture (the student: its backbone is copied)",
    )
    trainable_backbone_stages: int | None = Field(
        None, ge=0, description="train only the last n backbone stages (None: all)"
    )
    arch: str = Field(
        "fasterrcnn_mobilenet_v3_large_fpn", description="a key of cvpipe.models.DETECTORS"
    )
    batch_size: int = Field(8, ge=1)
    lr: float = Field(0.02, gt=0, description="base learning rate (for batch_size)")
    weight_decay: float = Field(1e-4, ge=0)
    shuffle_buffer: int = Field(256, ge=0, description="samples held by the shuffle buffer")

    @model_validator(mode="after")
    def _detector(self) -> DetectTrainConfig:
        if self.arch not in DETECTORS:
            raise ValueError(f"arch {self.arch!r} is not a detector; use {sorted(DETECTORS)}")
        n = len(stages_of(self.arch))
        if self.trainable_backbone_stages is not None and self.trainable_backbone_stages > n:
            raise ValueError(f"trainable_backbone_stages: {self.arch} has {n} stages")
        return self

    def train_config(self) -> TrainConfig:
        values = self.model_dump(include=set(TrainConfig.model_fields), exclude_unset=False)
        n = len(stages_of(self.arch))
        trainable = n if self.trainable_backbone_stages is None else self.trainable_backbone_stages
        values["freeze_stages"] = n - trainable
        return TrainConfig(**values)

    def task(self) -> DetectionTask:
        return DetectionTask(**self.model_dump(include=set(_TASK_FIELDS)))

    def job(self) -> TrainJob:
        val = expand_specs(self.val, ".tar") if self.val else []
        return TrainJob(
            config=self.train_config(),
            shards=expand_specs(self.shards, ".tar"),
            out=self.out,
            val=val,
            init_checkpoint=self.init,
            task=self.task(),
        )


def detect_config(**values: Any) -> DetectTrainConfig:
    return DetectTrainConfig(**values)
