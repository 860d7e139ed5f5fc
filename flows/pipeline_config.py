"""The whole DAG's config: one section per stage, each with an on/off switch.

``flows/examples/pipeline.yaml`` is a complete example on the bundled digits. Every
location is derived from ``root`` (see flows/pipeline.py for the layout), so a config
names data sources and settings, never output paths.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cvpipe.core.config import Strict, runtime
from cvpipe.experiments.config import DigitsSplit
from cvpipe.learn.config import TrainConfig

STAGES = ("ingest", "weak", "teacher", "infer", "anchors", "select", "materialize", "student",
          "finetune", "detect", "siamese", "index")  # fmt: skip

# What each stage reads: running a stage needs these stages' outputs (run now, or
# committed by an earlier run).
NEEDS: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "weak": ("ingest",),
    "teacher": ("ingest",),
    "infer": ("teacher",),
    "anchors": ("infer",),
    "select": ("infer",),
    "materialize": ("select",),
    "student": ("materialize",),
    "finetune": ("student",),
    "detect": ("finetune",),
    "siamese": ("materialize",),  # D^'s images, labeled by the selection
    "index": ("siamese",),
}


class Section(Strict):
    enabled: bool = Field(True, description="run this stage (off: skipped, later stages use "
                          "what earlier runs committed)")  # fmt: skip


class OptionalSection(Section):
    enabled: bool = Field(False, description="run this stage (off by default)")


class DigitsData(DigitsSplit):
    """The bundled digits, optionally with SYNTHETIC captions (cvpipe/data/captions.py)."""

    captions: bool = Field(
        False, description="ingest the partition with synthetic captions and hashtags (for weak)"
    )


class DataSection(Strict):
    """Where the images come from: the bundled digits, or sources of your own (a manifest
    with caption/hashtags columns gives the partition captions)."""

    digits: DigitsData | None = Field(
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


class AnchorsSection(OptionalSection):
    """Anchor labeling: named anchor datasets summarized in the teacher's feature space,
    the partition's features labeled by their distances to them."""

    groups: dict[str, str] = Field(
        default_factory=dict,
        description="digits data: anchor name -> digit classes of D, e.g. {round: '0689'}",
    )
    sources: dict[str, str] = Field(
        default_factory=dict, description="own data: anchor name -> its shards or folder"
    )
    kind: Literal["mean", "normalized", "softmax"] = "mean"
    method: Literal["nearest", "cfa", "uniform", "random"] = "nearest"
    metric: Literal["cosine", "l2", "kl"] = "cosine"
    n: int = Field(1, ge=1, description="Nearest-N: closest anchors that name the label")

    @model_validator(mode="after")
    def _anchors(self) -> AnchorsSection:
        if self.enabled and not (self.groups or self.sources):
            raise ValueError("anchors: give groups (digits data) or sources")
        return self


class WeakSection(OptionalSection):
    """Weak labels from the partition's captions and hashtags: its vocabulary (counted per
    shard, merged as a tree) and every image's word targets over it (flows/weak.py)."""

    size: int = Field(64, ge=1, description="V: the most frequent words kept")
    min_count: int = Field(3, ge=1, description="words seen fewer times are left out")
    synonyms: str | None = Field(
        None, description="a synonym file (VARIANT, ... => CANONICAL); digits with captions: "
        "the generator's synonyms.txt when not given",
    )  # fmt: skip
    resample: Literal["none", "sqrt"] = Field("none", description="targets' sample weights")


class CanvasesSection(Strict):
    """Digits on photo canvases with exact boxes (flows/datasets.py canvases_flow)."""

    labeled: int = Field(120, ge=1, description="canvases with boxes, for training")
    test: int = Field(40, ge=1, description="canvases with boxes, from held-out digit scans")
    size: int = Field(64, ge=32, description="canvas side in pixels")
    min_objects: int = Field(1, ge=1)
    max_objects: int = Field(2, ge=1)
    min_digit_px: int = Field(16, ge=8)
    max_digit_px: int = Field(28, ge=8)
    shard_size: int = Field(100, ge=1)
    seed: int = 0


# A CPU-cheap Faster R-CNN on the student's small_cnn backbone for 64-pixel canvases.
SMALL_DETECTOR: dict[str, Any] = {
    "arch": "fasterrcnn_small_cnn", "min_size": 64, "max_size": 96, "epochs": 4,
    "batch_size": 8, "lr": 0.01, "rpn_post_nms_top_n_train": 100,
    "rpn_post_nms_top_n_test": 50, "box_batch_size_per_image": 32, "cpu_threads": 1,
}  # fmt: skip
DETECT_DATA_FIELDS = {"shards", "out", "val", "test", "init"}


class DetectSection(OptionalSection):
    """A detector trained on canvases with its backbone from the fine-tuned student,
    scored (mAP) on the test canvases."""

    canvases: CanvasesSection = Field(default_factory=CanvasesSection)
    train: dict[str, Any] = Field(
        default_factory=lambda: dict(SMALL_DETECTOR),
        description="DetectTrainConfig fields (not shards/out/val/test/init: the DAG's)",
    )

    @model_validator(mode="after")
    def _train(self) -> DetectSection:
        from cvpipe.learn.detect import DetectTrainConfig

        given = DETECT_DATA_FIELDS & set(self.train)
        if given:
            raise ValueError(f"detect.train: {sorted(given)} are set by the pipeline")
        DetectTrainConfig.model_validate({**self.train, "shards": "-", "out": "-"})
        return self


class SiameseSection(OptionalSection):
    """An embedding net trained on pairs mined from the top-K selection's pseudo-labels
    (the images of D^, each labeled by the selection; one selected for two classes is
    left out)."""

    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(arch="small_cnn", epochs=20, batch_size=64, lr=0.05,
                                            input_size=16),
        description="the loop's config (arch, epochs, ...)",
    )  # fmt: skip
    dim: int = Field(32, ge=1, description="embedding dimensions")
    margin: float = Field(1.0, gt=0, description="contrastive margin")


class IndexSection(OptionalSection):
    """Every image of each partition embedded, a FAISS index built on the first partition
    and each later one added (no rebuild); retrieval scored on the test split."""

    kind: Literal["auto", "flat", "ivf", "ivfpq"] = "auto"
    memory: str = Field("1G", description="memory budget of the index")
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1)


class PipelineConfig(Strict):
    """The mission as one scheduled DAG over a partition: ingest -> weak labels (from
    captions); ingest -> teacher inference -> anchor labels, top-K selection ->
    materialize -> student pretraining -> fine-tuning -> detection; selection -> Siamese
    embedding -> FAISS index."""

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
    anchors: AnchorsSection = Field(default_factory=AnchorsSection)
    weak: WeakSection = Field(default_factory=WeakSection)
    detect: DetectSection = Field(default_factory=DetectSection)
    siamese: SiameseSection = Field(default_factory=SiameseSection)
    index: IndexSection = Field(default_factory=IndexSection)

    @model_validator(mode="after")
    def _sources(self) -> PipelineConfig:
        if self.anchors.groups and self.data.digits is None:
            raise ValueError("anchors.groups names digit classes: use sources with own data")
        return self
