"""Detection as Prefect flows: train, evaluate, pseudo-box, and the teacher-student
pipeline that starts from the student stage's checkpoint.

- :func:`detect_train_flow`: one detector trained (TrainStage with the detection task),
  then scored on ``test`` when given;
- :func:`detect_eval_flow`: mAP, per-class AP and a PNG of boxes (DetectEvalStage);
- :func:`detect_label_flow`: pseudo-boxes over unlabeled shards (PseudoBoxStage, one
  task run per shard);
- :func:`detection_flow`: per seed, the teacher detector on the labeled shards (its
  backbone from the student checkpoint when given) -> evaluate -> pseudo-boxes on the
  unlabeled shards -> materialized -> a student detector pretrained on them -> fine-tuned
  on the labeled shards -> evaluate; the table (results.md/.parquet/.png), per-class AP
  and the PNG of test canvases are published as artifacts. Every stage skips committed
  work, so a rerun only reads back and reports.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from cvpipe.core import storage, tables
from cvpipe.experiments.config import DetectionStudyConfig
from cvpipe.experiments.detection_study import write_study_report
from cvpipe.label.config import BoxMaterializeConfig, PseudoBoxConfig
from cvpipe.label.materialize import output_url
from cvpipe.label.pseudo_boxes import BoxMaterializeStage, PseudoBoxStage
from cvpipe.learn.detect import DetectTrainConfig
from cvpipe.learn.detect_eval import DetectEvalJob, DetectEvalResult, DetectEvalStage
from tasks.artifacts import publish_markdown, publish_table, run_name
from tasks.stage import run_units
from tasks.training import run_single, train_run


def _publish_eval(res: DetectEvalResult, name: str, out: str) -> None:
    publish_table([res.row("test")], f"{name}-map", f"mAP of `{res.checkpoint}`", location=out)
    publish_table(res.per_class, f"{name}-per-class-ap", f"Per-class AP of `{res.checkpoint}`",
                  location=out)  # fmt: skip
    if res.urls.get("png"):
        publish_markdown(f"Test images with boxes: `{res.urls['png']}` (green: truth, red: "
                         "detections)", f"{name}-boxes", "Detections drawn",
                         location=out)  # fmt: skip


def evaluate(checkpoint: str, shards: list[str], out: str, like: DetectTrainConfig) -> Any:
    job = DetectEvalJob(checkpoint=checkpoint, shards=shards, out=out, device=like.device,
                        num_workers=like.num_workers, cpu_threads=like.cpu_threads)  # fmt: skip
    return run_single(DetectEvalStage(job))


@flow(name="detect-train", flow_run_name=run_name("detect train {config.arch} -> {config.out}"))
def detect_train_flow(config: DetectTrainConfig) -> dict[str, Any]:
    """Train a detector (resumes after a crash, skips a committed run), then score it
    on ``config.test`` when given."""
    result = train_run(config.job())
    last = {k: v for k, v in result.last.items() if k != "split"}
    summary: dict[str, Any] = {"checkpoint": result.checkpoint, "model_id": result.model_id,
                               **last}  # fmt: skip
    if config.test:
        res = evaluate(result.checkpoint, storage.expand_specs(config.test, ".tar"),
                       storage.join(config.out, "eval"), config)  # fmt: skip
        _publish_eval(res, "detect", storage.join(config.out, "eval"))
        summary.update(test_map=res.map, test_map_50=res.map_50, test_images=res.images)
    get_run_logger().info("detector %s", summary)
    return summary


@flow(name="detect-eval", flow_run_name=run_name("detect eval {job.checkpoint}"))
def detect_eval_flow(job: DetectEvalJob) -> DetectEvalResult:
    res = run_single(DetectEvalStage(job))
    _publish_eval(res, "detect-eval", job.out)
    return res


@flow(name="detect-label", flow_run_name=run_name("pseudo-boxes -> {config.out}"))
def detect_label_flow(config: PseudoBoxConfig) -> dict[str, Any]:
    stage = PseudoBoxStage(config)
    stats = run_units(stage, what="pseudo-boxes")
    summary = stage.summarize(stats)
    publish_table([{"metric": k, "value": str(v)} for k, v in summary.items()],
                  "pseudo-boxes", f"Pseudo-boxes of `{config.checkpoint}`",
                  location=config.out)  # fmt: skip
    return summary


STUDENT_FIELDS = {"threshold", "class_thresholds", "nms_iou", "student_epochs",
                  "finetune_epochs", "finetune_lr_factor"}  # fmt: skip


def _detector(config: DetectionStudyConfig, seed: int, **fields: Any) -> DetectTrainConfig:
    return DetectTrainConfig.model_validate({**config.detector, "seed": seed, **fields})


@flow(name="detection", flow_run_name=run_name("detection teacher-student -> {config.root}"))
def detection_flow(config: DetectionStudyConfig) -> dict[str, Any]:
    """The detection teacher-student loop per seed (see the module's docstring)."""
    log = get_run_logger()
    labeled = storage.expand_specs(config.labeled, ".tar")
    unlabeled = storage.expand_specs(config.unlabeled, ".tar")
    test = storage.expand_specs(config.test, ".tar")
    rows: list[dict[str, Any]] = []
    for seed in config.seeds:
        base = storage.join(config.root, f"seed-{seed}")
        teacher_cfg = _detector(config, seed, shards=labeled, out=storage.join(base, "teacher"),
                                init=config.backbone)  # fmt: skip
        teacher = train_run(teacher_cfg.job()).checkpoint
        t_eval = evaluate(teacher, test, storage.join(base, "teacher", "eval"), teacher_cfg)
        _publish_eval(t_eval, f"seed-{seed}-teacher", storage.join(base, "teacher", "eval"))

        # Folders named after the student's settings: another threshold, another student.
        tag = tables.config_hash(config.model_dump(include=STUDENT_FIELDS))[:8]
        pb = PseudoBoxConfig(checkpoint=teacher, shards=unlabeled,
                             out=storage.join(base, f"pseudo-{tag}"), threshold=config.threshold,
                             class_thresholds=config.class_thresholds, nms_iou=config.nms_iou,
                             device=teacher_cfg.device,
                             cpu_threads=teacher_cfg.cpu_threads)  # fmt: skip
        pb_stats = PseudoBoxStage(pb).summarize(run_units(PseudoBoxStage(pb), what="pseudo-boxes"))
        if pb_stats["boxes"] == 0:
            raise ValueError(
                f"seed {seed}: the teacher kept no box at threshold {config.threshold} "
                f"(test mAP@.5 {t_eval.map_50:.3f}): lower the threshold or train it longer"
            )
        mat = BoxMaterializeConfig(pseudo_boxes=pb.out, shards=unlabeled,
                                   out=storage.join(base, f"boxed-{tag}"))  # fmt: skip
        run_units(BoxMaterializeStage(mat), what="materialize boxes")
        boxed = [output_url(mat.out, shard) for shard in _shard_ids(unlabeled)]

        pre_cfg = _detector(config, seed, shards=boxed, out=storage.join(base, f"student-{tag}"),
                            init=config.backbone,
                            epochs=config.student_epochs or teacher_cfg.epochs)  # fmt: skip
        pretrained = train_run(pre_cfg.job()).checkpoint
        ft_cfg = _detector(config, seed, shards=labeled, out=storage.join(base, f"finetuned-{tag}"),
                           init=pretrained,
                           epochs=config.finetune_epochs or teacher_cfg.epochs,
                           lr=teacher_cfg.lr * config.finetune_lr_factor)  # fmt: skip
        finetuned = train_run(ft_cfg.job()).checkpoint
        common = {"seed": seed, "labeled": _count(labeled),
                  "pseudo_images": pb_stats["images_boxed"],
                  "pseudo_boxes": pb_stats["boxes"]}  # fmt: skip
        for method, ckpt, cfg in (("supervised", teacher, teacher_cfg),
                                  ("student_pretrained", pretrained, pre_cfg),
                                  ("student_finetuned", finetuned, ft_cfg)):  # fmt: skip
            res = t_eval if method == "supervised" else evaluate(
                ckpt, test, storage.join(cfg.out, "eval"), cfg)  # fmt: skip
            rows.append({**common, "method": method, "map": res.map, "map_50": res.map_50})
            log.info("seed %d %s: mAP %.4f mAP@.5 %.4f", seed, method, res.map, res.map_50)
    urls = write_study_report(rows, config.root, tables.lineage(config, stage="detection-study"))
    markdown = storage.read_bytes(urls["md"]).decode()
    publish_markdown(
        markdown, "detection-study", "Detection teacher-student study", location=config.root
    )
    return {"rows": rows, "markdown": markdown, **urls}


def _shard_ids(urls: list[str]) -> list[str]:
    from cvpipe.data.shards import shard_id

    return [shard_id(u) for u in urls]


def _count(urls: list[str]) -> int:
    """Samples of ingest shards, from their index tables' footers."""
    from cvpipe.data.shards import ingest_root, shard_id, unit_url

    total = 0
    for u in urls:
        root = ingest_root(u)
        index = unit_url(root, "index", shard_id(u)) if root else None
        total += tables.num_rows(index) if index and storage.is_committed(index) else 0
    return total


@flow(name="localize-train", flow_run_name=run_name("localize train {config.arch} -> {config.out}"))
def localize_train_flow(config: Any) -> dict[str, Any]:
    """Train a localizer (TrainStage with the localization task); score it on
    ``config.test`` when given."""
    result = train_run(config.job())
    last = {k: v for k, v in result.last.items() if k != "split"}
    summary: dict[str, Any] = {"checkpoint": result.checkpoint, **last}
    if config.test:
        summary.update(localize_eval_flow(
            result.checkpoint, storage.expand_specs(config.test, ".tar"),
            storage.join(config.out, "eval"), "test", config.device))  # fmt: skip
    return summary


@flow(name="localize-eval", flow_run_name=run_name("localize eval {checkpoint}"))
def localize_eval_flow(
    checkpoint: str, shards: list[str], out: str, split: str = "test", device: str = "auto"
) -> dict[str, Any]:
    row = _evaluate_localizer(checkpoint, shards, out, split, device)
    publish_table([row], "localize", f"Localization of `{checkpoint}`", location=out)
    return row


@task(name="evaluate-localizer", cache_policy=NONE, retries=1)
def _evaluate_localizer(
    checkpoint: str, shards: list[str], out: str, split: str, device: str
) -> dict[str, Any]:
    from cvpipe.learn.localize import evaluate_localizer

    return evaluate_localizer(checkpoint, shards, out, split=split, device=device)
