"""Parameters of every flow, as pydantic models.

Flows take these models as parameters, so the Prefect UI renders them as forms, and the
CLI reads the same models from YAML or flags. Unknown fields are errors, so a typo in a
config file is caught before any work starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cvpipe.images import DEFAULT_MAX_PIXELS


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngestConfig(Strict):
    """Ingest an image folder tree or a manifest into one partition of shards."""

    source: str = Field(description="image folder tree or manifest (.parquet/.jsonl/.csv)")
    root: str = Field(description="output root: shards/, index/, rejects/ and plans/ go here")
    partition: str = Field(description="partition name, e.g. a date 2026-11-25 or a batch name")
    name: str = Field("shard", pattern=r"^[A-Za-z0-9_-]+$", description="shard file name prefix")
    shard_size: int = Field(10_000, ge=1, description="samples per shard")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="larger images are rejected")


# --------------------------------------------------------------------------- training


class TrainConfig(Strict):
    """One training stage: from scratch, or fine-tuning from a checkpoint with transfer
    controls (Yosinski et al. 2014: copy the first n stages, freeze them or not)."""

    arch: str = Field("small_cnn", description="a key of cvpipe.models.ARCHITECTURES")
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
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    num_workers: int = Field(0, ge=0, description="DataLoader workers (capped at shard count)")
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
    keep_checkpoints: int | None = Field(
        None,
        ge=1,
        description="keep only the last n epoch checkpoints (None: all); resume needs 1",
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from cvpipe.models import ARCHITECTURES

        if v not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {v!r}; choose from {sorted(ARCHITECTURES)}")
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
        from cvpipe.models import ARCHITECTURES

        stages = ARCHITECTURES[self.arch].stages
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


class DigitsSplit(Strict):
    """The bundled scikit-learn digits, split per seed into labeled / unlabeled / test."""

    labeled_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of the non-test pool that keeps its labels"
    )
    test_fraction: float = Field(0.3, gt=0, lt=1)
    size: int = Field(16, ge=8, description="exported image side, in pixels")
    shard_size: int = Field(250, ge=1)


class SemiSupervisedConfig(Strict):
    """The teacher-student loop (Yalniz et al. 2019), repeated for every seed, with the
    supervised baseline (the student's architecture trained on D only)."""

    root: str = Field(description="output root URL (data, models, tables)")
    digits: DigitsSplit | None = Field(None, description="use the bundled digits")
    labeled: str | None = Field(None, description="shards of D (folder, file or brace spec)")
    unlabeled: str | None = Field(None, description="shards of U")
    test: str | None = Field(None, description="held-out labeled shards")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    teacher: TrainConfig
    student: TrainConfig = Field(description="student pretraining on the pseudo-labeled set")
    finetune: TrainConfig = Field(description="student fine-tuning on D")
    baseline: TrainConfig = Field(description="supervised baseline on D")
    top_p: int = Field(1, ge=1, description="classes kept per unlabeled image")
    top_k: int = Field(50, ge=1, description="images kept per class")
    inference_batch_size: int = Field(256, ge=1)
    sweep_top_k: list[int] = Field(default_factory=list, description="extra K values to try")
    sweep_unlabeled_fraction: list[float] = Field(
        default_factory=list, description="extra |U| fractions (0, 1] to try"
    )

    @field_validator("sweep_unlabeled_fraction")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0 < f <= 1]
        if bad:
            raise ValueError(f"fractions must be in (0, 1], got {bad}")
        return v

    @field_validator("sweep_top_k")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError(f"K values must be >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _one_data_source(self) -> SemiSupervisedConfig:
        paths = (self.labeled, self.unlabeled, self.test)
        if self.digits is not None and any(p is not None for p in paths):
            raise ValueError("give either digits or labeled/unlabeled/test shards, not both")
        if self.digits is None and not all(p is not None for p in paths):
            raise ValueError("give digits, or all of labeled, unlabeled and test")
        if self.student.arch != self.baseline.arch or self.finetune.arch != self.student.arch:
            raise ValueError(
                "student, finetune and baseline must share one architecture (a fair comparison)"
            )
        return self


# ---------------------------------------------------------------- teacher and selection


class InferConfig(Strict):
    """Teacher inference over shards: top-P predictions (and features) per shard."""

    shards: str | list[str] = Field(
        description="a shard URL, a folder or prefix of shards, a brace pattern, or a list"
    )
    checkpoint: str = Field(description="teacher checkpoint (NAME.pt with its NAME.json)")
    out: str = Field(description="writes OUT/predictions/, OUT/features/, OUT/rejects/infer/")
    top_p: int = Field(5, ge=1, description="classes kept per image")
    features: bool = Field(False, description="also write penultimate-layer embeddings")
    batch_size: int = Field(256, ge=1)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    num_workers: int = Field(2, ge=0, description="DataLoader workers per inference unit")
    shards_per_unit: int = Field(4, ge=1, description="shards per task run (one DataLoader)")
    parallel_units: int = Field(
        1, ge=1, description="inference units in flight; 1 = one teacher per machine/GPU"
    )


class SelectConfig(Strict):
    """Top-K images per class among images whose top-P holds the class (Yalniz et al.)."""

    predictions: str | list[str] = Field(
        description="a folder or prefix of predictions Parquet, or a list of files"
    )
    out: str = Field(description="writes OUT/selection.parquet and OUT/selection_report.md")
    top_p: int = Field(5, ge=1)
    top_k: int = Field(16_000, ge=1)
    fan_in: int = Field(16, ge=2, description="partials merged per reduce task")


class MaterializeConfig(Strict):
    """The selected images as new shards, one output shard per input shard."""

    selection: str = Field(description="selection.parquet written by select")
    shards: str | list[str] = Field(description="the shards the predictions were made on")
    out: str = Field(description="writes OUT/shards/<partition>/<stem>.tar")
    checkpoint: str | None = Field(None, description="teacher checkpoint, to check provenance")


# ------------------------------------------------------------------- anchor pseudo-labels


class AnchorsConfig(Strict):
    """Named anchor datasets summarized in a reference model's feature space."""

    sources: dict[str, str] = Field(
        description="anchor name -> its shards (URL, folder or prefix, or brace pattern)",
        min_length=1,
    )
    checkpoint: str = Field(description="the reference model")
    out: str = Field(description="the anchors Parquet (anchor, count, vector) to write")
    kind: Literal["mean", "normalized", "softmax"] = Field(
        "mean",
        description="mean feature, mean of per-image normalized non-negative features, or "
        "mean softmax of the reference head (the last two are distributions, for KL)",
    )
    work: str | None = Field(None, description="features of the anchors; default OUT's folder")
    batch_size: int = Field(256, ge=1)
    device: str = "auto"
    num_workers: int = Field(2, ge=0)


class LabelConfig(Strict):
    """Anchor-distance pseudo-labels for every features file of an unlabeled set."""

    features: str = Field(description="a folder or prefix of features Parquet")
    anchors: str = Field(description="the anchors Parquet")
    out: str = Field(description="writes OUT/<partition>/<stem>.parquet (anchor labels)")
    method: Literal["nearest", "cfa", "uniform", "random", "vanilla"] = "nearest"
    n: int = Field(1, ge=1, description="Nearest-N: how many closest anchors name the label")
    metric: Literal["cosine", "l2", "kl"] = "cosine"
    ordered: bool = Field(True, description="Nearest-N: keep the order of the anchors")
    n_labels: int | None = Field(
        None, ge=1, description="uniform/random: labels wanted (default: number of anchors)"
    )
    seed: int = 0
    truth: str | None = Field(None, description="vanilla: the ingest root holding index/")
    checkpoint: str | None = Field(None, description="softmax anchors: the reference model")
    kl_direction: Literal["image_anchor", "anchor_image"] = "image_anchor"
    eps: float = Field(1e-8, gt=0, description="KL: added to every probability before renorm")
