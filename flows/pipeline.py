"""The mission as one DAG of dependent subflows, run per partition.

    data -> ingest (D, test, the partition) -> teacher (trained on D) -> shard checks and
    inference on the partition -> top-K selection over every partition so far -> materialize D^ ->
    student pretrained on D^ -> fine-tuned on D -> evaluated on test

Each stage is a subflow that reads the previous stages' committed outputs by URL and
skips its own committed work, so a rerun after any failure continues where it stopped,
and a rerun of a finished pipeline writes nothing. A stage switched off (or left out
of ``stages``) runs nothing; later stages use what earlier runs committed.

Layout under ``root`` (``T``, ``S`` and ``P`` are short hashes of the identity of the
teacher, selection and student settings, so changed settings never reuse stale work):

    png/                          the bundled digits, exported once (digits data only)
    shards/{labeled,test,<partition>}/   ingested WebDataset shards + index/ + rejects/
    models/teacher-T/             the teacher's checkpoints, metrics and eval/
    infer/teacher-T/              predictions/, rejects/ of every partition
    select/teacher-T-S/           selection.parquet, selection_report.{parquet,md}
    pseudo/teacher-T-S/shards/    D^: the selected images with their pseudo-labels
    models/student-P/, models/finetuned-P/     the student before and after fine-tuning
    reports/<partition>.md        what this run produced, with every path
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from cvpipe.core import storage, tables
from cvpipe.data.config import IngestConfig
from cvpipe.data.integrity import VerifyConfig
from cvpipe.infer.config import InferConfig
from cvpipe.label import selection
from cvpipe.label.config import MaterializeConfig, SelectConfig
from cvpipe.learn.config import TrainConfig
from flows.datasets import export_digits_flow
from flows.ingest import ingest_flow, verify_flow
from flows.pipeline_config import STAGES, PipelineConfig
from flows.teacher import infer_flow, materialize_flow, select_flow
from tasks.artifacts import publish_markdown
from tasks.training import evaluate, train


class Layout:
    """Every URL of a pipeline run, derived from its config alone."""

    def __init__(self, config: PipelineConfig) -> None:
        c = self.config = config
        self.root = c.root
        self.teacher_id = tables.config_hash([c.teacher.train, c.teacher.init])[:8]
        self.select_id = tables.config_hash([c.infer.top_p, c.select.top_k])[:8]
        self.student_id = tables.config_hash([c.student.train, c.finetune.train])[:8]

    def join(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def shards(self, partition: str) -> str:
        return self.join("shards", partition)

    @property
    def teacher_dir(self) -> str:
        return self.join("models", f"teacher-{self.teacher_id}")

    @property
    def infer_dir(self) -> str:
        return self.join("infer", f"teacher-{self.teacher_id}")

    @property
    def select_dir(self) -> str:
        return self.join("select", f"teacher-{self.teacher_id}-{self.select_id}")

    @property
    def pseudo_dir(self) -> str:
        return self.join("pseudo", f"teacher-{self.teacher_id}-{self.select_id}")

    @property
    def student_dir(self) -> str:
        return self.join("models", f"student-{self.teacher_id}-{self.select_id}-{self.student_id}")

    @property
    def finetuned_dir(self) -> str:
        return self.join(
            "models", f"finetuned-{self.teacher_id}-{self.select_id}-{self.student_id}"
        )

    def report(self, partition: str) -> str:
        return self.join("reports", f"{partition}.md")


def _committed_checkpoint(out: str, stage: str) -> str:
    url = storage.join(out, "final.pt")
    if not storage.is_committed(url):
        raise ValueError(
            f"stage {stage!r} is off, and no earlier run committed {url}: enable it once"
        )
    return url


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
        sources = {
            "labeled": storage.join(png, "labeled"),
            "test": storage.join(png, "test"),
            partition: storage.join(png, "unlabeled"),
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
    to run; the DAG stops after the last of them, and a stage before it that is not
    named (or is switched off) contributes what an earlier run committed."""
    unknown = sorted(set(stages or ()) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {list(STAGES)}")
    logger = get_run_logger()
    layout = Layout(config)
    p = config.partition
    reach = max(STAGES.index(s) for s in stages) if stages else len(STAGES) - 1

    def on(stage: str) -> bool:
        return getattr(config, stage).enabled and (stages is None or stage in stages)

    def needed(stage: str) -> bool:
        return STAGES.index(stage) <= reach

    if not on("ingest"):
        config = config.model_copy(update={"ingest": config.ingest.model_copy(
            update={"enabled": False})})  # fmt: skip
    folders = data_flow(config, config.root, p)
    summary: dict[str, Any] = {"partition": p, "root": config.root}
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
        i = config.infer
        infer_flow(InferConfig(shards=folders[p], checkpoint=teacher, out=layout.infer_dir,
                               top_p=i.top_p, batch_size=i.batch_size, device=i.device,
                               num_workers=i.num_workers, shards_per_unit=i.shards_per_unit,
                               cpu_threads=i.cpu_threads))  # fmt: skip

    # Selection over the predictions of every partition inferred so far.
    predictions = storage.join(layout.infer_dir, "predictions")
    if on("select"):
        select_flow(SelectConfig(predictions=predictions, out=layout.select_dir,
                                 top_p=config.infer.top_p, top_k=config.select.top_k))  # fmt: skip
    if needed("select"):
        summary["selection"] = selection.selection_url(layout.select_dir)

    # D^ as shards: every partition with predictions.
    if on("materialize"):
        parts = sorted({u[len(predictions):].strip("/").split("/")[0]
                        for u in storage.expand_urls(predictions, ".parquet")})  # fmt: skip
        unlabeled = [u for part in parts for u in _tars(layout.shards(part))]
        materialize_flow(MaterializeConfig(selection=summary["selection"], shards=unlabeled,
                                           out=layout.pseudo_dir, checkpoint=teacher))  # fmt: skip
    pseudo = storage.join(layout.pseudo_dir, "shards")

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
    """What a run produced: the models it has (with test accuracy) and where they are."""
    lines = [f"# Pipeline: partition {summary['partition']}", "", f"Root: `{summary['root']}`"]
    if "selection" in summary:
        lines.append(f"Selection: `{summary['selection']}`")
    if summary.get("quarantined"):
        lines.append(f"Quarantined shards: {summary['quarantined']}")
    models = [(name, summary[key]) for name, key in (
        ("teacher (D only)", "teacher"), ("student (D^ only)", "student"),
        ("student fine-tuned on D", "finetuned")) if key in summary]  # fmt: skip
    if models:
        lines += ["", "| model | top-1 (%) | top-5 (%) | checkpoint |", "|---|---|---|---|"]
        lines += [f"| {name} | {100 * s['top1']:.2f} | {100 * s['top5']:.2f} | "
                  f"`{s['checkpoint']}` |" for name, s in models]  # fmt: skip
    return "\n".join([*lines, ""])
