"""The mission as one DAG of dependent subflows, run per partition.

    data -> ingest (D, test, the partition) -> weak labels (vocabulary and word targets of
                                               the partition's captions)
                                            -> teacher (trained on D) -> shard checks and
    inference on the partition -> anchor labels of the partition
                               -> top-K selection over every partition so far
                                  -> materialize D^ -> student pretrained on D^
                                     -> fine-tuned on D -> evaluated on test
                                        -> detector on canvases, backbone from the student
                                  -> Siamese embedding net on the selection's labels
                                     -> every image embedded -> FAISS index (built on the
                                        first partition, later ones added) -> retrieval

Each stage is a subflow that reads the previous stages' committed outputs by URL and
skips its own committed work, so a rerun after any failure continues where it stopped,
and a rerun of a finished pipeline writes nothing. ``stages`` names the stages to run;
what they need (flows/pipeline_config.py NEEDS) is read from earlier runs when not
named or switched off, and is a clear error only when no earlier run committed it.

Layout under ``root`` (``T``, ``S``, ``P``... are short hashes of the identity of the
settings of each stage: flows/pipeline_layout.py, so changed settings never reuse stale
work):

    png/, manifests/              the bundled digits, exported once (digits data only)
    shards/{labeled,test,<partition>,anchor-*}/   ingested shards + index/ + rejects/
    weak/words-W/                 vocab/<partition>.parquet, targets/<partition>/ (word targets)
    models/teacher-T/             the teacher's checkpoints, metrics and eval/
    infer/teacher-T/              predictions/ (and features/) of every partition
    anchors/teacher-T-A/          anchors.parquet (+ the anchor datasets' features)
    labels/teacher-T-A-L/<partition>/    anchor labels of each partition
    select/teacher-T-S/           selection.parquet, selection_report.{parquet,md}
    pseudo/teacher-T-S/shards/    D^: the selected images with their pseudo-labels
    models/student-T-S-P/, models/finetuned-T-S-P/   the student before and after fine-tuning
    canvases-C/                   digits on canvases with boxes: canvases/, shards/
    models/detector-T-S-P-C-D/    the detector (backbone from the student) and eval/
    models/siamese-T-S-E/         the embedding net
    embed/siamese-T-S-E/features/<partition>/    embeddings of every image (and test/)
    index/siamese-T-S-E-I/        the FAISS index: part 0 the first partition, then adds
    retrieval/siamese-T-S-E-I/    retrieval on the test split (indexes, neighbours)
    reports/<partition>.md        what this run produced, with every path and figure
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from cvpipe.core import storage
from cvpipe.data.captions import write_caption_manifests
from cvpipe.data.config import IngestConfig
from cvpipe.data.integrity import VerifyConfig
from cvpipe.label import selection
from cvpipe.label.config import MaterializeConfig, SelectConfig
from cvpipe.learn.config import TrainConfig
from flows.datasets import export_digits_flow
from flows.ingest import ingest_flow, verify_flow
from flows.pipeline_config import NEEDS, STAGES, PipelineConfig
from flows.pipeline_layout import Layout
from flows.pipeline_stages import (
    anchor_labels_flow,
    detector_flow,
    index_flow,
    require,
    siamese_train,
    teacher_inference,
    weak_flow,
)
from flows.teacher import materialize_flow, select_flow
from tasks.artifacts import publish_markdown
from tasks.training import evaluate, train

__all__ = ["Layout", "pipeline_flow"]


def _committed_checkpoint(out: str, stage: str) -> str:
    return require(storage.join(out, "final.pt"), stage)


def _closure(stages: list[str]) -> set[str]:
    """The named stages and every stage they read from."""
    todo, seen = list(stages), set()
    while todo:
        stage = todo.pop()
        if stage not in seen:
            seen.add(stage)
            todo.extend(NEEDS[stage])
    return seen


def _tars(spec: str) -> list[str]:
    return storage.expand_urls(spec, ".tar")


@flow(name="pipeline-data", flow_run_name="data {partition} -> {root}")
def data_flow(config: PipelineConfig, root: str, partition: str) -> dict[str, str]:
    """Ingest D, the test set and the partition; returns each one's shard folder."""
    layout = Layout(config)
    data, ing = config.data, config.ingest
    if data.digits is not None:
        png = layout.join("png")
        if not storage.is_committed(storage.join(png, "unlabeled_truth.csv")):
            pool = 1.0 - data.digits.test_fraction
            split = {
                "labeled": data.digits.labeled_fraction * pool,
                "unlabeled": (1.0 - data.digits.labeled_fraction) * pool,
                "test": data.digits.test_fraction,
            }
            spec = ",".join(f"{k}={v!r}" for k, v in split.items())
            export_digits_flow(png, size=data.digits.size, split=spec, seed=0)
        unlabeled = storage.join(png, "unlabeled")
        if data.digits.captions:  # the partition from the manifest that carries the captions
            if not storage.is_committed(storage.join(png, "captions", "README.md")):
                write_caption_manifests(png, seed=0)  # the README is written last
            unlabeled = storage.join(png, "captions", "unlabeled.csv")
        sources = {
            "labeled": storage.join(png, "labeled"),
            "test": storage.join(png, "test"),
            partition: unlabeled,
        }
        shard_size = data.digits.shard_size
    else:
        sources = {
            "labeled": data.labeled,
            "test": data.test,
            partition: data.unlabeled.replace("{partition}", partition),
        }
        shard_size = ing.shard_size
    out = {}
    for part, source in sources.items():
        if ing.enabled:
            ingest_flow(IngestConfig(source=source, root=root, partition=part, name=ing.name,
                                     shard_size=shard_size))  # fmt: skip
        out[part] = layout.shards(part)
    return out


def _train(cfg: TrainConfig, shards: list[str], out: str, init: str | None = None,
           classes: list[str] | None = None) -> str:  # fmt: skip
    if classes is not None and cfg.classes is None:
        cfg = TrainConfig.model_validate({**cfg.model_dump(), "classes": classes})
    return train(cfg, shards, out, init)


def _score(checkpoint: str, test: list[str], cfg: TrainConfig) -> dict[str, float]:
    result = evaluate(checkpoint, test, storage.join(checkpoint.rsplit("/", 1)[0], "eval"),
                      device=cfg.device, threads=cfg.cpu_threads)  # fmt: skip
    return {"top1": result.top1, "top5": result.top5, "images": result.n}


@flow(name="pipeline", flow_run_name="pipeline {config.partition}")
def pipeline_flow(config: PipelineConfig, stages: list[str] | None = None) -> dict[str, Any]:
    """Run the DAG for ``config.partition``. ``stages`` (default: all) names the stages
    to run; what they read from a stage not named (or switched off) is what an earlier
    run committed, and nothing past them runs."""
    unknown = sorted(set(stages or ()) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {list(STAGES)}")
    logger = get_run_logger()
    layout = Layout(config)
    p = config.partition

    def on(stage: str) -> bool:
        return getattr(config, stage).enabled and (stages is None or stage in stages)

    wanted = _closure(stages if stages is not None else [s for s in STAGES if on(s)])

    def needed(stage: str) -> bool:
        return stage in wanted

    if not on("ingest"):
        config = config.model_copy(update={"ingest": config.ingest.model_copy(
            update={"enabled": False})})  # fmt: skip
    folders = data_flow(config, config.root, p)
    summary: dict[str, Any] = {"partition": p, "root": config.root, "shards": folders}

    # Weak labels of the partition, from its captions and hashtags.
    if on("weak"):
        summary["weak"] = weak_flow(config, p, folders[p])
    if not needed("teacher"):
        return _finish(summary, layout, logger)
    labeled, test = _tars(folders["labeled"]), _tars(folders["test"])

    # Teacher: trained once on D (not per partition).
    t = config.teacher
    if on("teacher"):
        teacher = _train(t.train, labeled, layout.teacher_dir, t.init)
    else:
        teacher = _committed_checkpoint(layout.teacher_dir, "teacher")
    summary["teacher"] = {"checkpoint": teacher, **_score(teacher, test, t.train)}

    # Inference on this partition, after a check of its shards: a corrupt shard is
    # quarantined (and named in the summary) before the GPU stage reads it.
    if on("infer"):
        checks = verify_flow(VerifyConfig(shards=folders[p]))
        summary["quarantined"] = checks["failures"]
        teacher_inference(config, folders[p], teacher)
    summary["predictions"] = storage.join(layout.infer_dir, "predictions", p)

    # Anchor labels of the partition, from its features in the teacher's space.
    if on("anchors"):
        summary["anchor_labels"] = anchor_labels_flow(config, p, teacher)

    # Selection over the predictions of every partition inferred so far.
    predictions = storage.join(layout.infer_dir, "predictions")
    if on("select"):
        select_flow(SelectConfig(predictions=predictions, out=layout.select_dir,
                                 top_p=config.infer.top_p, top_k=config.select.top_k))  # fmt: skip
    if needed("select"):
        summary["selection"] = require(selection.selection_url(layout.select_dir), "select")

    # D^ as shards: every partition with predictions.
    if on("materialize"):
        parts = sorted({u[len(predictions):].strip("/").split("/")[0]
                        for u in storage.expand_urls(predictions, ".parquet")})  # fmt: skip
        unlabeled = [u for part in parts for u in _tars(layout.shards(part))]
        materialize_flow(MaterializeConfig(selection=summary["selection"], shards=unlabeled,
                                           out=layout.pseudo_dir, checkpoint=teacher))  # fmt: skip
    pseudo = storage.join(layout.pseudo_dir, "shards")
    if needed("materialize"):
        summary["pseudo"] = require(pseudo, "materialize", bool(_tars(pseudo)))

    if needed("student"):
        from cvpipe import models

        classes = models.load_info(teacher).classes
        if on("student"):
            student = _train(config.student.train, _tars(pseudo), layout.student_dir,
                             classes=classes)  # fmt: skip
        else:
            student = _committed_checkpoint(layout.student_dir, "student")
        summary["student"] = {"checkpoint": student,
                              **_score(student, test, config.student.train)}  # fmt: skip
    if needed("finetune"):
        if on("finetune"):
            finetuned = _train(config.finetune.train, labeled, layout.finetuned_dir, student)
        else:
            finetuned = _committed_checkpoint(layout.finetuned_dir, "finetune")
        summary["finetuned"] = {"checkpoint": finetuned,
                                **_score(finetuned, test, config.finetune.train)}  # fmt: skip

    # Detection with the fine-tuned student's backbone.
    if on("detect"):
        summary["detector"] = detector_flow(config, finetuned)

    # Siamese embedding net on D^ labeled by the selection, then every image embedded and
    # indexed.
    if on("siamese"):
        embedder = siamese_train(config, pseudo, summary["selection"])
    elif needed("siamese"):
        embedder = _committed_checkpoint(layout.siamese_dir, "siamese")
    if on("index"):
        summary["index"] = index_flow(config, p, folders, embedder)
    return _finish(summary, layout, logger)


def _finish(summary: dict[str, Any], layout: Layout, logger: Any) -> dict[str, Any]:
    p = summary["partition"]
    markdown = report_markdown(summary)
    report = layout.report(p)
    storage.write_bytes_if_changed(report, markdown.encode())
    publish_markdown(markdown, f"pipeline-{p}", f"Pipeline run of `{p}`", location=layout.root)
    logger.info("pipeline %s done: report %s", p, report)
    return {**summary, "report": report}


def report_markdown(summary: dict[str, Any]) -> str:
    """What a run produced: every stage's outputs (paths) and its headline figures."""
    lines = [f"# Pipeline: partition {summary['partition']}", "", f"Root: `{summary['root']}`"]
    if summary.get("quarantined"):
        lines.append(f"Quarantined shards: {summary['quarantined']}")
    models = [(name, summary[key]) for name, key in (
        ("teacher (D only)", "teacher"), ("student (D^ only)", "student"),
        ("student fine-tuned on D", "finetuned")) if key in summary]  # fmt: skip
    if models:
        lines += ["", "| model | top-1 (%) | top-5 (%) | checkpoint |", "|---|---|---|---|"]
        lines += [f"| {name} | {100 * s['top1']:.2f} | {100 * s['top5']:.2f} | "
                  f"`{s['checkpoint']}` |" for name, s in models]  # fmt: skip
    if "detector" in summary:
        d = summary["detector"]
        lines += ["", "| detector (backbone from the fine-tuned student) | mAP@.5 (%) | mAP (%) "
                  "| test canvases | checkpoint |", "|---|---|---|---|---|",
                  f"| {d['checkpoint'].rsplit('/', 2)[-2]} | {100 * d['map_50']:.2f} | "
                  f"{100 * d['map']:.2f} | {d['images']} | `{d['checkpoint']}` |"]  # fmt: skip
    if "index" in summary:
        x = summary["index"]
        lines += ["", f"Index: {x['vectors']} vectors in {x['parts']} part(s); retrieval on the "
                  f"test split: precision@{x['k']} {100 * x['precision']:.2f}%, recall@{x['k']} "
                  f"(approximate vs exact) {100 * x['recall']:.2f}%"]  # fmt: skip
    if "weak" in summary:
        w = summary["weak"]
        lines += ["", f"Weak labels: a vocabulary of {w['words']} words (of {w['distinct']} "
                  f"distinct); {w['with_target']} of {w['images']} images with a word "
                  "target"]  # fmt: skip
    if "anchor_labels" in summary:
        a = summary["anchor_labels"]
        lines += ["", f"Anchor labels ({a['method']}, {a['metric']}): {a['images']} images "
                  f"under {a['labels']} labels ({a['mean']:.1f} per label on average)"]  # fmt: skip
    outputs = [(f"shards: {k}", v) for k, v in summary.get("shards", {}).items()]
    outputs += [(name, _url(summary, key)) for name, key in (
        ("vocabulary", "weak.vocab"), ("word targets", "weak.targets"),
        ("teacher", "teacher"), ("predictions", "predictions"),
        ("anchors", "anchor_labels.anchors"), ("anchor labels", "anchor_labels.labels_url"),
        ("selection", "selection"),
        ("D^ (pseudo-labeled shards)", "pseudo"), ("student", "student"),
        ("fine-tuned student", "finetuned"), ("canvases", "detector.canvases"),
        ("detector", "detector"), ("embeddings", "index.embeddings"),
        ("index", "index.index"))]  # fmt: skip
    lines += ["", "| stage output | location |", "|---|---|"]
    lines += [f"| {name} | `{url}` |" for name, url in outputs if url]
    return "\n".join([*lines, ""])


def _url(summary: dict[str, Any], key: str) -> str | None:
    """``summary[a][b]`` for ``"a.b"``; a model's checkpoint for a model's key."""
    value: Any = summary
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value.get("checkpoint") if isinstance(value, dict) else value
