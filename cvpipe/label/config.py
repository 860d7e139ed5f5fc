"""Parameters of the labeling stages: top-K selection, materialize, anchors."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cvpipe.core.config import Strict, runtime


class SelectConfig(Strict):
    """Top-K images per class among images whose top-P holds the class (Yalniz et al.)."""

    predictions: str | list[str] = Field(
        description="a folder or prefix of predictions Parquet, or a list of files"
    )
    out: str = Field(description="writes OUT/selection.parquet and OUT/selection_report.md")
    top_p: int = Field(5, ge=1)
    top_k: int = Field(16_000, ge=1)
    # The shape of the merge tree: merging is associative, so it never changes the
    # selection (a runtime field). The CLI's --fan-in default is read from here.
    fan_in: int = runtime(16, ge=2, description="partials merged per reduce task")


class MaterializeConfig(Strict):
    """The selected images as new shards, one output shard per input shard."""

    selection: str = Field(description="selection.parquet written by select")
    shards: str | list[str] = Field(description="the shards the predictions were made on")
    out: str = Field(description="writes OUT/shards/<partition>/<stem>.tar")
    checkpoint: str | None = Field(None, description="teacher checkpoint, to check provenance")


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
    batch_size: int = runtime(256, ge=1)
    device: str = runtime("auto")
    num_workers: int = runtime(2, ge=0)
    cpu_threads: int | None = runtime(None, ge=1, description="torch threads on CPU")


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


class RelabelConfig(Strict):
    """Shards relabeled from a per-shard labels table (e.g. anchor labels)."""

    labels: str = Field(description="a folder of labels tables: LABELS/<partition>/<stem>.parquet")
    shards: str | list[str] = Field(description="the shards the labels were made for")
    out: str = Field(description="writes OUT/shards/<partition>/<stem>.tar")


class LabelCheckConfig(Strict):
    """Samples per shard, and how many carry their true label (pseudo-label precision)."""

    shards: str | list[str] = Field(description="the shards to count and check")
    out: str = Field(description="writes OUT/<partition>/<stem>.parquet, one row per shard")
    truth: str | None = Field(
        None, description="a CSV (image, label) of hidden labels, keyed by source file name"
    )


class PseudoBoxConfig(Strict):
    """A detector run over unlabeled shards: per shard, its boxes above a score
    threshold after NMS (Parquet key, shard, boxes, labels, scores)."""

    checkpoint: str = Field(description="the detection checkpoint (the teacher)")
    shards: str | list[str] = Field(
        description="a shard URL, a folder or prefix of shards, a brace pattern, or a list"
    )
    out: str = Field(description="writes OUT/pseudo_boxes/ and OUT/rejects/pseudo_boxes/")
    threshold: float = Field(
        0.7, ge=0, le=1, description="keep boxes scoring at least this (STAC 0.9, UT 0.7)"
    )
    class_thresholds: dict[str, float] = Field(
        default_factory=dict, description="class name -> its own threshold (else --threshold)"
    )
    nms_iou: float = Field(0.5, gt=0, le=1, description="NMS: drop a box overlapping a better one")
    class_agnostic_nms: bool = Field(
        False, description="NMS across classes (one box per object whatever its class)"
    )
    batch_size: int = runtime(8, ge=1)
    device: str = runtime("auto", description="auto | cpu | cuda | cuda:N")
    num_workers: int = runtime(0, ge=0, description="DataLoader workers per unit")
    cpu_threads: int | None = runtime(None, ge=1, description="torch threads on CPU")


class BoxMaterializeConfig(Strict):
    """Pseudo-boxed images as new shards: each sample's json gets its pseudo-boxes."""

    pseudo_boxes: str = Field(description="OUT of the pseudo-box stage (holds pseudo_boxes/)")
    shards: str | list[str] = Field(description="the shards the pseudo-boxes were made on")
    out: str = Field(description="writes OUT/shards/<partition>/<stem>.tar")
    min_boxes: int = Field(1, ge=0, description="images with fewer pseudo-boxes are left out")


class VocabConfig(Strict):
    """The vocabulary of captions and hashtags: counted per shard, merged as a tree."""

    shards: str | list[str] = Field(description="captioned shards (URL, folder, pattern, list)")
    out: str = Field(description="the vocabulary Parquet to write (word, count, images, index)")
    size: int = Field(ge=1, description="V: the most frequent words kept")
    min_count: int = Field(1, ge=1, description="words seen fewer times are left out")
    synonyms: str | None = Field(None, description="a synonym file (VARIANT, ... => CANONICAL)")
    partial_cap: int = Field(
        1 << 20,
        ge=1,
        description="most words a partial keeps (a shard's counts or a merge); past it the "
        "rarest are cut and the vocabulary's error bound grows (see cvpipe.label.vocab)",
    )
    fan_in: int = Field(16, ge=2, description="partials merged per merge unit")
    work: str | None = Field(
        None, description="partials folder; default: OUT without .parquet, plus .parts"
    )


class TargetsConfig(Strict):
    """Per sample, its normalized multi-hot target over a vocabulary."""

    shards: str | list[str] = Field(description="captioned shards")
    vocab: str = Field(description="the vocabulary Parquet written by `cvpipe vocab`")
    out: str = Field(description="writes OUT/<partition>/<stem>.parquet (tables.WORD_TARGETS)")
    resample: Literal["none", "sqrt"] = Field(
        "none",
        description="none, or sqrt: weight each sample by the mean of 1/sqrt(count) of its "
        "words, so a word is seen about sqrt(count) times per epoch (Mahajan et al. 2018)",
    )


class Candidate(Strict):
    """One candidate source of P2L: its source dataset and model."""

    shards: str | list[str] | None = Field(
        None, description="the source dataset's shards (summarized with the reference model)"
    )
    checkpoint: str | None = Field(None, description="the source model trained on them")
    size: int | None = Field(None, ge=1, description="images of the source (default: counted)")


class CandidatesFile(Strict):
    """CANDIDATES.yaml of ``cvpipe p2l``: the candidates, and optionally their cached
    summaries (an anchors Parquet built with the same reference model, one anchor per
    candidate, e.g. by ``cvpipe anchors build``)."""

    candidates: dict[str, Candidate] = Field(min_length=1)
    summaries: str | None = Field(
        None, description="anchors Parquet of the candidates (skips summarizing their shards)"
    )


class P2LConfig(Strict):
    """P2L-style ranking of candidate sources for a target (cvpipe/label/p2l.py)."""

    target: str | list[str] = Field(description="the target set's shards")
    candidates: str = Field(description="CANDIDATES.yaml: name -> {shards, checkpoint, size}")
    reference: str = Field(description="the reference model whose feature space compares them")
    out: str = Field(description="writes OUT/ranking.parquet and OUT/summaries/")
    kind: Literal["mean", "normalized", "softmax"] = Field(
        "normalized", description="summary vectors (anchors kind); KL needs normalized/softmax"
    )
    metric: Literal["kl", "cosine", "l2"] = "kl"
    kl_direction: Literal["image_anchor", "anchor_image"] = Field(
        "image_anchor", description="image_anchor: KL(target || source)"
    )
    eps: float = Field(1e-8, gt=0, description="KL: added to every entry before renormalizing")
    w_size: float = Field(1.0, description="weight of log(source size)")
    w_div: float = Field(1.0, description="weight of the divergence")
    weights: str | None = Field(
        None,
        description="fitted weights (p2l_weights.parquet of cvpipe transfer): replace "
        "w_size, w_div, metric, kind, kl_direction and eps",
    )
    batch_size: int = runtime(256, ge=1)
    device: str = runtime("auto")
    num_workers: int = runtime(0, ge=0)
    cpu_threads: int | None = runtime(None, ge=1, description="torch threads on CPU")
