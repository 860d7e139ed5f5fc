"""Parameters of the studies: semi-supervised and anchor transfer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cvpipe.core.config import Strict, runtime
from cvpipe.label.anchor_labels import method_tag
from cvpipe.learn.config import TrainConfig


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
    inference_batch_size: int = runtime(256, ge=1)
    sweep_top_k: list[int] = Field(default_factory=list, description="extra K values to try")
    sweep_unlabeled_fraction: list[float] = Field(
        default_factory=list, description="extra |U| fractions (0, 1] to try"
    )
    teacher_init: str | None = Field(
        None,
        description="a weakly supervised checkpoint the teacher starts from (its head "
        "replaced, then trained on D with the teacher's schedule); '{seed}' is replaced "
        "by the seed",
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


class LabelMethod(Strict):
    """One pseudo-labeling method of the anchor experiment."""

    method: Literal["nearest", "cfa", "uniform", "random", "vanilla"]
    n: int = Field(1, ge=1, description="Nearest-N")
    metric: Literal["cosine", "l2", "kl"] = "cosine"
    ordered: bool = True
    n_labels: int | None = Field(None, ge=1, description="uniform/random: labels wanted")

    @property
    def tag(self) -> str:
        """The method column of its labels (``nearest-2``, ``cfa``, ...): one definition."""
        return method_tag(self.method, self.n, self.ordered)


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


class DetectionStudyConfig(Strict):
    """The detection teacher-student loop in miniature (STAC-like), per seed: a teacher
    detector on the labeled canvases (the supervised baseline) -> pseudo-boxes on the
    unlabeled canvases -> a student detector pretrained on them -> fine-tuned on the
    labeled canvases; every detector scored (mAP, mAP@.5) on the test canvases."""

    root: str = Field(description="output root of the study")
    labeled: str | list[str] = Field(description="boxed training shards")
    unlabeled: str | list[str] = Field(description="shards without boxes")
    test: str | list[str] = Field(description="boxed test shards")
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    detector: dict[str, Any] = Field(
        default_factory=dict,
        description="detection training fields (cvpipe.learn.detect.DetectTrainConfig) "
        "shared by every detector; shards, out, seed and init are set per run",
    )
    backbone: str | None = Field(
        None, description="a classifier checkpoint (the student stage's) every detector starts from"
    )
    threshold: float = Field(0.7, ge=0, le=1, description="pseudo-box score threshold")
    class_thresholds: dict[str, float] = Field(default_factory=dict)
    nms_iou: float = Field(0.5, gt=0, le=1)
    student_epochs: int | None = Field(None, ge=1, description="pretraining epochs (None: same)")
    finetune_epochs: int | None = Field(None, ge=1, description="fine-tuning epochs (None: same)")
    finetune_lr_factor: float = Field(0.5, gt=0, description="fine-tuning lr = lr x this")


class WeakCaptions(Strict):
    """Synthetic captions of the digits (cvpipe.data.captions) and their vocabulary."""

    q: float = Field(0.6, ge=0, le=1, description="P(a caption names the digit)")
    vocab_size: int = Field(64, ge=1)
    min_count: int = Field(3, ge=1)
    synonyms: bool = Field(True, description="merge the digit's forms (7, sept, #Seven)")


class WeakTeacherConfig(Strict):
    """Teacher from scratch vs teacher initialized from weak pretraining on the captions
    of U (Mahajan et al. 2018; Yalniz et al. 2019), each followed by the usual
    teacher -> top-K -> student loop, on the bundled digits, for every seed."""

    root: str
    semi_supervised: SemiSupervisedConfig = Field(
        description="the loop (digits only); its root is set to ROOT/scratch and ROOT/weak_init"
    )
    captions: WeakCaptions = Field(default_factory=WeakCaptions)
    weak: TrainConfig = Field(description="weak pretraining on the captions of U")
    weak_epochs: list[int] = Field(
        default_factory=lambda: [15, 40],
        min_length=1,
        description="candidate pretraining lengths, chosen per seed by precision@1 on "
        "held-out captioned shards of U (never on the test split)",
    )
    val_shards: int = Field(1, ge=1, description="captioned shards of U held out for choosing")

    @model_validator(mode="before")
    @classmethod
    def _nested_root(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("semi_supervised"), dict):
            ssl = dict(data["semi_supervised"])
            ssl.setdefault("root", str(data.get("root", "")))
            data = {**data, "semi_supervised": ssl}
        return data

    @model_validator(mode="after")
    def _digits_only(self) -> WeakTeacherConfig:
        if self.semi_supervised.digits is None:
            raise ValueError("weak_teacher runs on the bundled digits (semi_supervised.digits)")
        if self.weak.arch != self.semi_supervised.teacher.arch:
            raise ValueError("weak pretraining and the teacher must share one architecture")
        return self


class DigitsGroup(Strict):
    """A dataset of some digit classes, with at most ``per_class`` images of each."""

    classes: str = Field(description='its digit classes, e.g. "0123"')
    per_class: int | None = Field(None, ge=1, description="images per class (None: all)")


def _default_sources() -> dict[str, DigitsGroup]:
    return {
        "s0123": DigitsGroup(classes="0123"),
        "s4567": DigitsGroup(classes="4567", per_class=70),
        "s89": DigitsGroup(classes="89"),
        "s01234": DigitsGroup(classes="01234", per_class=40),
        "s56789": DigitsGroup(classes="56789", per_class=24),
        "s_all": DigitsGroup(classes="0123456789", per_class=10),
    }


class TransferDigits(Strict):
    """The bundled digits as a transfer study. Each class is split (stratified, seeded)
    into a source pool and a target pool. Sources are groups of classes of different
    sizes drawn from the source pool; each target is a group of classes whose target
    pool images are cut into test, validation and training slices."""

    sources: dict[str, DigitsGroup] = Field(default_factory=_default_sources, min_length=2)
    targets: dict[str, str] = Field(
        default_factory=lambda: {
            "t_odd": "13579",
            "t_even": "02468",
            "t147": "147",
            "t258": "258",
            "t369": "369",
            "t0to9": "0123456789",
        },
        description="target name -> its digit classes",
        min_length=1,
    )
    source_fraction: float = Field(0.5, gt=0, lt=1, description="share of each class for sources")
    test_per_class: int = Field(30, ge=1)
    val_per_class: int = Field(15, ge=1)
    size: int = Field(16, ge=8)
    shard_size: int = Field(200, ge=1)
    seed: int = Field(0, description="seed of the source/target split (data, not training)")


class P2LSettings(Strict):
    """How the transfer study summarizes datasets and measures D(target, source)."""

    kind: Literal["mean", "normalized", "softmax"] = "normalized"
    metric: Literal["kl", "cosine", "l2"] = "kl"
    kl_direction: Literal["image_anchor", "anchor_image"] = "image_anchor"
    eps: float = Field(1e-8, gt=0)
    fit_on: Literal["test", "val"] = Field(
        "test",
        description="which top-1 of the *other* targets the leave-one-target-out weights "
        "are fitted on (the held-out target's results never are)",
    )


class CostCandidate(Strict):
    """An architecture whose footprint and accuracy the study puts side by side."""

    arch: str
    input_size: int = Field(ge=8)
    lr: float | None = Field(None, gt=0, description="learning rate (default: the configs')")


class TransferStudyConfig(Strict):
    """The "learn to transfer" study on one set of sources and targets: which source
    (P2L, validated against exhaustive fine-tuning), which method (shallow learners on
    frozen features vs fine-tuning at each freezing depth, with LR multipliers), which
    curriculum, and what each choice costs; recommends for ``target``."""

    root: str = Field(description="output root URL (data, models, tables, the report)")
    digits: TransferDigits = Field(default_factory=TransferDigits)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    reference: TrainConfig = Field(description="the reference model, on the union of sources")
    source: TrainConfig = Field(description="pretraining of each source model")
    finetune: TrainConfig = Field(description="fine-tuning on a target (the grid's method)")
    finetune_min_steps: int = Field(
        100,
        ge=1,
        description="optimizer steps every run on a target's labels takes at least "
        "(smaller batches, then more epochs, for small label counts)",
    )
    p2l: P2LSettings = Field(default_factory=P2LSettings)
    grid_per_class: int | None = Field(
        5, ge=1, description="target labels per class in the exhaustive grid (None: all)"
    )
    target: str = Field(description="the target the report recommends for")
    method_targets: list[str] = Field(
        default_factory=list, description="targets of the methods table (besides target)"
    )
    label_counts: list[int | None] = Field(
        default_factory=lambda: [5, 20, None], description="labels per class (null: all)"
    )
    freeze_depths: list[int] = Field(
        default_factory=lambda: [0, 1, 2, 3], description="backbone stages frozen per fine-tune"
    )
    lr_multipliers: dict[str, float] = Field(
        default_factory=lambda: {"conv1": 0.1, "conv2": 0.3},
        description="stage -> LR multiplier of the 'lr-mult' fine-tune (nothing frozen)",
    )
    shallow: list[Literal["svm", "logistic"]] = Field(default_factory=lambda: ["svm", "logistic"])
    c_grid: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])
    curricula: dict[str, list[str]] = Field(
        default_factory=dict,
        description="name -> datasets fine-tuned in turn before the target ('reference': the "
        "reference model, else a source); compared with the direct fine-tune from the first",
    )
    archs: list[CostCandidate] = Field(
        default_factory=lambda: [CostCandidate(arch="small_cnn", input_size=16)],
        description="architectures in the cost table (trained on the recommended source)",
    )
    cost_batch: int = Field(64, ge=1, description="batch size of the batched latency")
    latency_budget_ms: float | None = Field(
        None, gt=0, description="recommend the most accurate architecture under this latency"
    )
    cost_threads: int = runtime(1, ge=1, description="torch threads of the CPU cost probe")

    @model_validator(mode="after")
    def _names_exist(self) -> TransferStudyConfig:
        targets = set(self.digits.targets)
        unknown = sorted({self.target, *self.method_targets} - targets)
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}; the study has {sorted(targets)}")
        steps = {"reference", *self.digits.sources}
        for name, chain in self.curricula.items():
            bad = [s for s in chain if s not in steps]
            if not chain or bad:
                raise ValueError(
                    f"curriculum {name!r}: steps must be 'reference' or sources, got {chain}"
                )
        if len(self.digits.sources) < 2:
            raise ValueError("P2L needs two or more sources")
        return self
