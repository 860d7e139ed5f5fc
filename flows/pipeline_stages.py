"""The pipeline's later stages as subflows (flows/pipeline.py draws the DAG): weak labels
(vocabulary and word targets) of a partition's captions, anchor labels of a partition,
a detector on the student's backbone, the Siamese embedding net, and the FAISS index of
every image. Each reads earlier stages' committed outputs by URL and skips its own
committed work, so a rerun writes nothing."""

from __future__ import annotations

from typing import Any

from prefect import flow

from cvpipe.core import storage
from cvpipe.data import datasets
from cvpipe.data.config import CanvasesConfig, IngestConfig
from cvpipe.index import evaluate
from cvpipe.index.config import IndexAddConfig, IndexBuildConfig
from cvpipe.index.store import read_manifest
from cvpipe.infer.config import InferConfig
from cvpipe.label.config import AnchorsConfig, LabelConfig, TargetsConfig, VocabConfig
from cvpipe.learn.detect import DetectTrainConfig
from cvpipe.learn.siamese import SiameseTrainConfig
from flows.anchors import anchors_build_flow, label_flow
from flows.datasets import canvases_flow
from flows.detection import detect_train_flow
from flows.index import index_add_flow, index_build_flow
from flows.ingest import ingest_flow
from flows.pipeline_config import PipelineConfig
from flows.pipeline_layout import Layout
from flows.siamese import siamese_train_flow
from flows.teacher import infer_flow
from flows.weak import targets_flow, vocab_flow
from tasks.artifacts import run_name


def require(url: str, stage: str, present: bool | None = None) -> str:
    """``url`` when an earlier run committed it; else a clear error naming the stage."""
    ok = storage.is_committed(url) if present is None else present
    if not ok:
        raise ValueError(
            f"stage {stage!r} is off, and no earlier run committed {url}: enable it once"
        )
    return url


def _no_captions(partition: str, why: str) -> ValueError:
    return ValueError(f"weak: partition {partition!r} has no captions ({why}): set "
                      "data.digits.captions: true, ingest a manifest with caption/hashtags "
                      "columns, or switch weak off")  # fmt: skip


@flow(name="pipeline-weak", flow_run_name=run_name("weak labels {partition} -> {config.root}"))
def weak_flow(config: PipelineConfig, partition: str, shards: str) -> dict[str, Any]:
    """The vocabulary of the partition's captions and hashtags, then every image's word
    targets over it: VOCAB/<partition>.parquet and TARGETS/<partition>/<stem>.parquet."""
    layout, w, digits = Layout(config), config.weak, config.data.digits
    if digits is not None and not digits.captions:
        raise _no_captions(partition, "data.digits.captions is false")
    synonyms = w.synonyms
    if synonyms is None and digits is not None:
        synonyms = layout.join("png", "captions", "synonyms.txt")
    vocab = layout.vocab_url(partition)
    counted = vocab_flow(VocabConfig(shards=shards, out=vocab, size=w.size,
                                     min_count=w.min_count, synonyms=synonyms))  # fmt: skip
    if not counted["samples_with_words"]:
        raise _no_captions(partition, f"no caption or hashtag word in {shards}")
    targets = targets_flow(
        TargetsConfig(shards=shards, vocab=vocab, out=layout.targets_dir, resample=w.resample)
    )
    return {"vocab": vocab, "words": counted["words"], "distinct": counted["distinct_words"],
            "targets": storage.join(layout.targets_dir, partition),
            "images": targets["samples"], "with_target": targets["with_words"]}  # fmt: skip


def _infer(config: PipelineConfig, shards: str, checkpoint: str, out: str, features: bool) -> None:
    i = config.infer
    infer_flow(InferConfig(shards=shards, checkpoint=checkpoint, out=out, top_p=i.top_p,
                           features=features, batch_size=i.batch_size, device=i.device,
                           num_workers=i.num_workers, shards_per_unit=i.shards_per_unit,
                           cpu_threads=i.cpu_threads))  # fmt: skip


def teacher_inference(config: PipelineConfig, shards: str, teacher: str) -> None:
    """The partition's predictions (and its features when anchor labeling reads them)."""
    _infer(config, shards, teacher, Layout(config).infer_dir, config.anchors.enabled)


def _anchor_sources(config: PipelineConfig, layout: Layout) -> dict[str, str]:
    """Anchor name -> its shards: given, or (digits) the classes of D it groups, ingested
    as the partition ``anchor-<name>-<classes>``."""
    a, digits = config.anchors, config.data.digits
    if a.sources or digits is None:
        return dict(a.sources)
    out = {}
    for name, classes in sorted(a.groups.items()):
        part = f"anchor-{name}-{classes}"
        manifest = layout.join("manifests", f"{part}.csv")
        if not storage.is_committed(manifest):
            datasets.class_manifest(layout.join("png", "labeled"), classes, manifest)
        ingest_flow(
            IngestConfig(
                source=manifest,
                root=layout.root,
                partition=part,
                name=config.ingest.name,
                shard_size=digits.shard_size,
            )
        )
        out[name] = layout.shards(part)
    return out


@flow(name="pipeline-anchors", flow_run_name=run_name("anchor labels {partition} -> {config.root}"))
def anchor_labels_flow(config: PipelineConfig, partition: str, teacher: str) -> dict[str, Any]:
    """Anchors in the teacher's feature space, then the partition's features labeled by
    their distances to them: LABELS/<partition>/<stem>.parquet."""
    layout, a, i = Layout(config), config.anchors, config.infer
    anchors_build_flow(AnchorsConfig(sources=_anchor_sources(config, layout), checkpoint=teacher,
                                     out=layout.anchors_url, kind=a.kind, batch_size=i.batch_size,
                                     device=i.device, num_workers=i.num_workers,
                                     cpu_threads=i.cpu_threads))  # fmt: skip
    features = storage.join(layout.infer_dir, "features", partition)
    require(features, "infer", bool(storage.expand_urls(features, ".parquet")))
    stats = label_flow(
        LabelConfig(
            features=features,
            anchors=layout.anchors_url,
            out=layout.labels_dir,
            method=a.method,
            metric=a.metric,
            n=a.n,
            checkpoint=teacher if a.kind == "softmax" else None,
        )
    )
    return {"labels_url": storage.join(layout.labels_dir, partition), "anchors": layout.anchors_url,
            **stats}  # fmt: skip


@flow(name="pipeline-detect", flow_run_name=run_name("detector -> {config.root}"))
def detector_flow(config: PipelineConfig, student: str) -> dict[str, Any]:
    """Canvases of digits with boxes, and a detector trained on them with its backbone
    from the (fine-tuned) student, scored on the test canvases (mAP)."""
    layout, c = Layout(config), config.detect.canvases
    canvases_flow(CanvasesConfig(out=layout.canvases_dir, labeled=c.labeled, unlabeled=0,
                                 test=c.test, size=c.size, min_objects=c.min_objects,
                                 max_objects=c.max_objects, min_digit_px=c.min_digit_px,
                                 max_digit_px=c.max_digit_px, seed=c.seed,
                                 shard_size=c.shard_size))  # fmt: skip
    shards = storage.join(layout.canvases_dir, "shards")
    cfg = DetectTrainConfig.model_validate(
        {
            **config.detect.train,
            "shards": storage.join(shards, "labeled"),
            "test": storage.join(shards, "test"),
            "out": layout.detector_dir,
            "init": student,
        }
    )
    summary = detect_train_flow(cfg)
    return {"checkpoint": summary["checkpoint"], "map": summary["test_map"],
            "map_50": summary["test_map_50"], "images": summary["test_images"],
            "canvases": shards}  # fmt: skip


def siamese_train(config: PipelineConfig, pseudo: str, selection: str) -> str:
    """The embedding net on pairs mined from the selection's pseudo-labels. It reads D^
    (only the selected images, not every partition) with labels from the selection
    table: D^ holds an image selected for two classes once per class, as two samples
    with different labels that would make a "dissimilar" pair of one image; the table
    drops such keys (cvpipe.learn.pairs.read_labels). D^'s copies are keyed
    ``{key}_c{class}`` and found in the table by their ``source_key``."""
    s, layout = config.siamese, Layout(config)
    summary = siamese_train_flow(
        SiameseTrainConfig(shards=pseudo, out=layout.siamese_dir, labels=selection, dim=s.dim,
                           margin=s.margin, train=s.train)
    )  # fmt: skip
    return summary["checkpoint"]


@flow(name="pipeline-index", flow_run_name=run_name("index {partition} -> {config.root}"))
def index_flow(
    config: PipelineConfig, partition: str, shards: dict[str, str], embedder: str
) -> dict[str, Any]:
    """Every image of the partition (and the test split) embedded; the index built on the
    first partition, each later one added without a rebuild (skipped when it is in);
    retrieval (precision@k by label, recall@k against exact search) on the test split."""
    layout, ix = Layout(config), config.index
    for part in (partition, "test"):
        _infer(config, shards[part], embedder, layout.embed_dir, features=True)
    features = storage.join(layout.embed_dir, "features", partition)
    if read_manifest(layout.index_dir) is None:
        index_build_flow(IndexBuildConfig(embeddings=features, out=layout.index_dir, kind=ix.kind,
                                          memory=ix.memory, threads=1))  # fmt: skip
    else:
        index_add_flow(IndexAddConfig(index=layout.index_dir, embeddings=features, threads=1))
    manifest = read_manifest(layout.index_dir)
    test = storage.expand_urls(shards["test"], ".tar")
    rows = evaluate.retrieval_rows(storage.join(layout.embed_dir, "features", "test"),
                                   evaluate.shard_labels(test), layout.retrieval_dir,
                                   name="siamese", seed=0, ks=ix.ks, kind=ix.kind,
                                   memory=ix.memory)  # fmt: skip
    at = {r["k"]: r for r in rows}[max(ix.ks)]
    return {"index": layout.index_dir, "vectors": manifest.count, "parts": len(manifest.parts),
            "embeddings": storage.join(layout.embed_dir, "features"), "k": at["k"],
            "precision": at["precision"], "recall": at["recall"]}  # fmt: skip
