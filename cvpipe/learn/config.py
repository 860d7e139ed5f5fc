"""Parameters of a training stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cvpipe.core.config import Strict, runtime


class TrainConfig(Strict):
    """One training stage: from scratch, or fine-tuning from a checkpoint with transfer
    controls (Yosinski et al. 2014: copy the first n stages, freeze them or not).

    The loop (cvpipe.learn.loop) reads the optimization fields; the task (classification,
    multi-label, detection, contrastive) reads the model and data fields it needs."""

    arch: str = Field(
        "small_cnn",
        description="a key of cvpipe.models.ARCHITECTURES (or DETECTORS, for detection)",
    )
    classes: list[str] | None = Field(
        None, description="class names in head order; None: the sorted labels of the data"
    )
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0, description="base learning rate (for batch_size)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (AdamW: beta1)")
    weight_decay: float = Field(5e-4, ge=0)
    scheduler: Literal["cosine", "constant"] = Field(
        "cosine", description="per-epoch learning-rate schedule"
    )
    warmup_epochs: int = Field(0, ge=0, description="linear warm-up epochs before the schedule")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    input_size: int | None = Field(None, ge=8, description="None: the architecture's default")
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    augmentation: Literal["none", "shift", "crop_flip", "strong"] = Field(
        "shift",
        description="none | shift (random shifts of shift_px, for digits) | crop_flip "
        "(random resized crop + horizontal flip, for photos) | strong (crop, rotation, color)",
    )
    shift_px: int = Field(2, ge=0, description="maximum shift of the 'shift' recipe, in pixels")
    shuffle_buffer: int = Field(1000, ge=0, description="samples held by the shuffle buffer")
    seed: int = 0
    device: str = runtime("auto", description="auto | cpu | cuda | cuda:N")
    num_workers: int = runtime(0, ge=0, description="DataLoader workers (capped at shard count)")
    num_streams: int = Field(
        1,
        ge=1,
        description="sample streams the shards are split over; the sample order depends on it "
        "(and on the seed), never on num_workers; workers read whole streams, so more workers "
        "than streams idle",
    )
    amp: bool = Field(True, description="bf16 autocast (CUDA only)")
    channels_last: bool = Field(True, description="channels_last memory format (CUDA only)")
    freeze_stages: int = Field(
        0, ge=0, description="freeze the backbone's first n named stages (weights and BN stats)"
    )
    copy_stages: int | None = Field(
        None,
        ge=0,
        description="with an init checkpoint: copy only its first n stages, the rest start "
        "random (Yosinski's chop); None copies everything",
    )
    new_head: bool = Field(
        False, description="a fresh head even when the init checkpoint's classes match"
    )
    lr_multipliers: dict[str, float] = Field(
        default_factory=dict,
        description="stage name (or 'head') -> learning-rate multiplier; missing: 1.0",
    )
    cpu_threads: int | None = runtime(
        None, ge=1, description="torch threads on CPU (None: torch's default; 1 suits small models)"
    )
    keep_checkpoints: int | None = runtime(
        2,
        ge=1,
        description="keep only the last n epoch checkpoints (None: all); resume needs 1",
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from cvpipe.models import stages_of

        stages_of(v)  # raises ValueError naming the known architectures
        return v

    @field_validator("lr_multipliers")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: m for k, m in v.items() if m < 0}
        if bad:
            raise ValueError(f"learning-rate multipliers must be >= 0, got {bad}")
        return v

    @model_validator(mode="after")
    def _stages_exist(self) -> TrainConfig:
        from cvpipe.models import stages_of

        stages = stages_of(self.arch)
        if self.freeze_stages > len(stages):
            raise ValueError(
                f"freeze_stages={self.freeze_stages} but {self.arch} has {len(stages)} stages"
            )
        if self.copy_stages is not None:
            if self.copy_stages > len(stages):
                raise ValueError(
                    f"copy_stages={self.copy_stages} but {self.arch} has {len(stages)} stages"
                )
            if self.freeze_stages > self.copy_stages:
                raise ValueError(
                    f"freeze_stages={self.freeze_stages} > copy_stages={self.copy_stages}: "
                    "only copied stages can be frozen"
                )
        unknown = sorted(set(self.lr_multipliers) - {*stages, "head"})
        if unknown:
            raise ValueError(
                f"lr_multipliers: unknown stage(s) {unknown} for {self.arch}; "
                f"use {['head', *stages]}"
            )
        return self


class WeakTrainConfig(Strict):
    """Weak supervision from captions and hashtags: word targets over a vocabulary, a
    multi-label model trained on them (Joulin et al. 2016), word prediction scored on
    held-out captioned shards."""

    shards: str | list[str] = Field(description="captioned training shards")
    vocab: str = Field(description="the vocabulary Parquet written by `cvpipe vocab`")
    out: str = Field(description="targets/, the model (final.pt, metrics), eval/")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the training run")
    val: str | list[str] | None = Field(None, description="captioned validation shards")
    test: str | list[str] | None = Field(None, description="held-out captioned shards")
    resample: Literal["none", "sqrt"] = Field(
        "none", description="sqrt: square-root frequency resampling (Mahajan et al. 2018)"
    )
    show: list[str] = Field(
        default_factory=list, description="words whose top images to show (default: first 8)"
    )
    top_images: int = Field(8, ge=1, description="images per shown word")


class ShallowConfig(Strict):
    """A shallow learner on frozen features (cvpipe/learn/shallow.py)."""

    features: str | list[str] = Field(description="training features (the inference stage's)")
    truth: str = Field(description="ingest root whose index/ holds the labels, joined by key")
    test: str | list[str] = Field(description="test features")
    model: Literal["svm", "logistic"] = "svm"
    out: str = Field(description="writes OUT/shallow.parquet and OUT/shallow_head.npz")
    val: str | list[str] | None = Field(
        None, description="validation features: choose C from --c-grid on them"
    )
    test_truth: str | None = Field(None, description="ingest root of the test/val labels")
    per_class: int | None = Field(None, ge=1, description="labels kept per class (None: all)")
    c: float = Field(1.0, gt=0, description="inverse regularization (without --val)")
    c_grid: list[float] = Field(
        default_factory=lambda: [0.01, 0.1, 1.0, 10.0], description="C values tried on --val"
    )
    seed: int = 0
