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
    cpu_threads: int | None = Field(
        None, ge=1, description="torch threads on CPU (None: torch's default; 1 suits small models)"
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
    cpu_threads: int | None = Field(
        None, ge=1, description="torch threads on CPU (None: torch's default; 1 suits small models)"
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

    sources: dict[str, str | list[str]] = Field(
        description="anchor name -> its shards (URL, folder or prefix, brace pattern, list)",
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
    cpu_threads: int | None = Field(None, ge=1, description="torch threads on CPU")


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


class LabelMethod(Strict):
    """One pseudo-labeling method of the anchor experiment."""

    method: Literal["nearest", "cfa", "uniform", "random", "vanilla"]
    n: int = Field(1, ge=1, description="Nearest-N")
    metric: Literal["cosine", "l2", "kl"] = "cosine"
    ordered: bool = True
    n_labels: int | None = Field(None, ge=1, description="uniform/random: labels wanted")

    @property
    def tag(self) -> str:
        name = f"{self.method}-{self.n}" if self.method == "nearest" else self.method
        return name if self.ordered else f"{name}-unordered"


class TransferTarget(Strict):
    train: str | list[str] = Field(description="labeled shards of the target task")
    test: str | list[str] = Field(description="held-out labeled shards of the target task")


class DigitsAnchors(Strict):
    """The bundled digits as an anchor experiment: anchor datasets are groups of digit
    classes, target tasks are other groups, U is the unlabeled split of all digits."""

    anchor_groups: dict[str, str] = Field(
        default_factory=lambda: {"d01": "01", "d23": "23", "d45": "45", "d67": "67"},
        description="anchor name -> its digit classes",
    )
    target_groups: dict[str, str] = Field(
        default_factory=lambda: {"d89": "89", "d0to9": "0123456789"},
        description="target name -> its digit classes",
    )
    split: str = Field("labeled=0.25,unlabeled=0.45,test=0.3", description="digits split")
    target_per_class: int | None = Field(
        5, ge=1, description="labeled images per class of each target (None: all)"
    )
    size: int = Field(16, ge=8)
    shard_size: int = Field(200, ge=1)


class AnchorTransferConfig(Strict):
    """Anchors -> pseudo-labels per method -> one source model per method -> fine-tuned
    on each target -> the transfer table (targets x methods)."""

    root: str
    digits: DigitsAnchors | None = None
    anchors: dict[str, str | list[str]] | None = Field(None, description="name -> shards")
    unlabeled: str | list[str] | None = Field(None, description="shards to pseudo-label")
    targets: dict[str, TransferTarget] | None = None
    reference: TrainConfig = Field(
        description="the reference model, trained on the union of the anchor datasets"
    )
    anchor_kind: Literal["mean", "normalized", "softmax"] = "normalized"
    methods: list[LabelMethod] = Field(min_length=1)
    source: TrainConfig = Field(description="pretraining of a source model on pseudo-labels")
    finetune: TrainConfig = Field(description="fine-tuning of each source on each target")
    scratch: bool = Field(True, description="also train each target from scratch")
    seed: int = 0

    @model_validator(mode="after")
    def _one_data_source(self) -> AnchorTransferConfig:
        given = [x is not None for x in (self.anchors, self.unlabeled, self.targets)]
        if self.digits is not None and any(given):
            raise ValueError("give either digits or anchors/unlabeled/targets, not both")
        if self.digits is None and not all(given):
            raise ValueError("give digits, or all of anchors, unlabeled and targets")
        tags = [m.tag for m in self.methods]
        if len(set(tags)) != len(tags):
            raise ValueError(f"methods must differ, got {tags}")
        return self
