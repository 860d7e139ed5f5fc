"""The teacher-student loop of Yalniz et al. 2019 as dependent Prefect stages.

For every seed: train the teacher on labeled D -> infer on unlabeled U -> select top-K
per class (P) -> materialize the pseudo-labeled set D^ -> pretrain the student on D^ ->
fine-tune it on D -> evaluate on the test split; and the supervised baseline (the
student's architecture trained on D only, same budget). Optional sweeps over K
(Fig. 5) and over the size of U (Fig. 3) reuse the teacher and its predictions.

Outputs under ``config.root``:
- ``results.parquet`` (seed, method, top1, top5) and ``results.md``, the table to read;
- ``runs.parquet`` (tables.SSL_RUNS): every (seed, K, |U|, method), sweeps included;
- ``sweep_top_k.md/.png`` and ``sweep_unlabeled.md/.png`` when sweeps are configured.
Every stage skips committed work, so a rerun only reads back and reports.
"""

from __future__ import annotations

import math
from typing import Any

from prefect import flow, get_run_logger

from cvpipe import models
from cvpipe.core import storage, tables
from cvpipe.data import shards
from cvpipe.data.config import IngestConfig
from cvpipe.experiments import reports
from cvpipe.experiments.config import DigitsSplit, SemiSupervisedConfig
from cvpipe.infer import teacher as inference
from cvpipe.infer.config import InferConfig
from cvpipe.label.config import LabelCheckConfig, MaterializeConfig, SelectConfig
from cvpipe.label.materialize import LabelCheckStage
from cvpipe.learn.config import TrainConfig
from flows.datasets import export_digits_flow
from flows.ingest import ingest_flow
from flows.teacher import infer_flow, materialize_flow, select_flow
from tasks.artifacts import publish_markdown, publish_table, run_name
from tasks.progress import header
from tasks.stage import run_units
from tasks.training import evaluate, train

PARTS = ("labeled", "unlabeled", "test")


def _seeded(cfg: TrainConfig, seed: int, **updates: Any) -> TrainConfig:
    return TrainConfig.model_validate({**cfg.model_dump(), "seed": seed, **updates})


@flow(name="prepare-digits", flow_run_name=run_name("digits seed {seed} -> {root}"))
def digits_data_flow(root: str, split: DigitsSplit, seed: int) -> dict[str, list[str]]:
    """The digits split of ``seed`` (stratified), each part ingested as a partition."""
    pool = 1.0 - split.test_fraction
    fractions = {
        "labeled": split.labeled_fraction * pool,
        "unlabeled": (1.0 - split.labeled_fraction) * pool,
        "test": split.test_fraction,
    }
    images = storage.join(root, "png")
    spec = ",".join(f"{k}={v!r}" for k, v in fractions.items())
    if not storage.is_committed(storage.join(images, "unlabeled_truth.csv")):
        export_digits_flow(images, size=split.size, split=spec, seed=seed)
    urls = {}
    for part in PARTS:
        ingest_flow(
            IngestConfig(
                source=storage.join(images, part),
                root=root,
                partition=part,
                name="digits",
                shard_size=split.shard_size,
            )
        )
        urls[part] = storage.list_committed(storage.join(root, "shards", part), ".tar")
    return urls


def _hidden_truth(root: str) -> str | None:
    """The CSV of U's hidden labels (by file name), when the data is the exported digits."""
    url = storage.join(root, "png", "unlabeled_truth.csv")
    return url if storage.is_committed(url) else None


def _check(shards: list[str], out: str, truth: str | None = None) -> dict[str, Any]:
    """Samples of ``shards`` and the share carrying their true label, counted by one
    stage unit per shard (nothing is read in the flow itself)."""
    stage = LabelCheckStage(LabelCheckConfig(shards=shards, out=out, truth=truth))
    return stage.summarize(run_units(stage, what=f"count and check {out}"))


def _score(checkpoint: str, test: list[str], cfg: TrainConfig) -> tuple[float, float]:
    out = storage.join(checkpoint.rsplit("/", 1)[0], "eval")
    result = evaluate(checkpoint, test, out, device=cfg.device, threads=cfg.cpu_threads)
    return result.top1, result.top5


@flow(name="student", flow_run_name="student seed {seed} K={top_k} U={u_fraction}")
def student_flow(
    config: SemiSupervisedConfig,
    seed: int,
    data: dict[str, list[str]],
    teacher: str,
    predictions: list[str],
    top_k: int,
    u_fraction: float,
    truth: str | None,
) -> list[dict[str, Any]]:
    """Select -> materialize -> pretrain -> fine-tune -> evaluate, for one (K, |U|).
    Returns SSL_RUNS rows of the two student methods."""
    base = storage.join(teacher.rsplit("/", 1)[0], f"p{config.top_p}-k{top_k}-u{u_fraction:g}")
    # |U| grows by whole shards, as it would by partitions in the pipeline.
    n = max(1, math.ceil(u_fraction * len(data["unlabeled"])))
    unlabeled, preds = data["unlabeled"][:n], predictions[:n]
    sel_out = storage.join(base, "select")
    select_flow(SelectConfig(predictions=preds, out=sel_out, top_p=config.top_p, top_k=top_k))
    pseudo_root = storage.join(base, "pseudo")
    materialize_flow(
        MaterializeConfig(
            selection=storage.join(sel_out, "selection.parquet"),
            shards=unlabeled,
            out=pseudo_root,
            checkpoint=teacher,
        )
    )
    pseudo = storage.expand_urls(storage.join(pseudo_root, "shards"), ".tar")
    check = _check(pseudo, storage.join(base, "pseudo_check"), truth)
    # |D| does not depend on the teacher; its counts sit beside the teacher's other outputs.
    labeled = _check(data["labeled"], storage.join(teacher.rsplit("/", 1)[0], "labeled_check"))
    # The student's head is the teacher's class list, even for a class D^ missed.
    classes = config.student.classes or models.load_info(teacher).classes
    variant = tables.config_hash([config.student, config.finetune])[:8]
    student = train(
        _seeded(config.student, seed, classes=classes),
        pseudo,
        storage.join(base, f"student-{variant}"),
    )
    finetuned = train(
        _seeded(config.finetune, seed),
        data["labeled"],
        storage.join(base, f"finetuned-{variant}"),
        init_checkpoint=student,
    )
    common = {
        "seed": seed,
        "top_k": top_k,
        "unlabeled_fraction": u_fraction,
        "labeled": labeled["samples"],
        "pseudo": check["checked"] or check["samples"],
        "precision": check["precision"],
    }
    rows = []
    for method, ckpt in (("student_pretrained", student), ("student_finetuned", finetuned)):
        top1, top5 = _score(ckpt, data["test"], config.finetune)
        rows.append({**common, "method": method, "top1": top1, "top5": top5})
    return rows


@flow(name="semi-supervised", flow_run_name=run_name("semi-supervised -> {config.root}"))
def semi_supervised_flow(config: SemiSupervisedConfig) -> dict[str, Any]:
    """The whole experiment for every seed; returns the mean top-1 per method and the
    per-seed gains of the fine-tuned student over the supervised baseline."""
    logger = get_run_logger()
    runs: list[dict[str, Any]] = []
    for i, seed in enumerate(config.seeds, 1):
        step = f"seed {i}/{len(config.seeds)}"  # "seed 2/3: teacher" in the terminal
        seed_root = storage.join(config.root, f"seed-{seed}")
        header(f"{step}: data (seed {seed})")
        if config.digits is not None:
            data_root = storage.join(seed_root, "data")
            data = digits_data_flow(data_root, config.digits, seed)
            truth = _hidden_truth(data_root)
        else:
            data = {p: storage.expand_urls(getattr(config, p), ".tar") for p in PARTS}
            truth = None
        init = config.teacher_init.replace("{seed}", str(seed)) if config.teacher_init else None
        teacher_id = tables.config_hash([config.teacher, init] if init else config.teacher)
        teacher_dir = storage.join(seed_root, f"teacher-{teacher_id[:8]}")
        header(f"{step}: teacher")
        # From another model (its classes are words, not digits): a fresh head on D's labels.
        teacher_cfg = _seeded(config.teacher, seed, **({"new_head": True} if init else {}))
        teacher = train(teacher_cfg, data["labeled"], teacher_dir, init_checkpoint=init)
        # A baseline configured like the teacher *is* the teacher's run: train it once
        # (unless the teacher starts from another model: the baseline starts from scratch).
        if not (config.baseline == config.teacher and init is None):
            header(f"{step}: supervised baseline")
        baseline = (
            teacher
            if config.baseline == config.teacher and init is None
            else train(
                _seeded(config.baseline, seed),
                data["labeled"],
                storage.join(seed_root, f"baseline-{tables.config_hash(config.baseline)[:8]}"),
            )
        )
        infer_out = storage.join(teacher_dir, "infer")
        header(f"{step}: teacher inference on U")
        infer_flow(
            InferConfig(
                shards=data["unlabeled"],
                checkpoint=teacher,
                out=infer_out,
                top_p=config.top_p,
                batch_size=config.inference_batch_size,
                device=config.teacher.device,
                num_workers=0,
                cpu_threads=config.teacher.cpu_threads,
            )
        )
        predictions = [
            inference.predictions_url(infer_out, shards.shard_id(u)) for u in data["unlabeled"]
        ]
        # The teacher and baseline do not depend on K or |U|: score them once per seed
        # (once in all when the baseline is the teacher's run).
        scores = {ckpt: _score(ckpt, data["test"], config.teacher) for ckpt in {teacher, baseline}}
        variants = [(config.top_k, 1.0)]
        variants += [(k, 1.0) for k in config.sweep_top_k if k != config.top_k]
        variants += [(config.top_k, f) for f in config.sweep_unlabeled_fraction if f != 1.0]
        for top_k, fraction in variants:
            header(f"{step}: student (K={top_k}, {fraction:.0%} of U)")
            student_rows = student_flow(
                config, seed, data, teacher, predictions, top_k, fraction, truth
            )
            common = {
                k: v for k, v in student_rows[0].items() if k not in ("method", "top1", "top5")
            }
            for method, ckpt in (("teacher", teacher), ("supervised", baseline)):
                top1, top5 = scores[ckpt]
                runs.append({**common, "method": method, "top1": top1, "top5": top5})
            runs.extend(student_rows)
        main = [
            r
            for r in runs
            if r["seed"] == seed and r["top_k"] == config.top_k and r["unlabeled_fraction"] == 1.0
        ]
        acc = {r["method"]: r["top1"] for r in main}
        logger.info(
            "seed %d: supervised %.2f, student fine-tuned %.2f (gain %+.2f), precision %.3f",
            seed,
            100 * acc["supervised"],
            100 * acc["student_finetuned"],
            100 * (acc["student_finetuned"] - acc["supervised"]),
            main[0]["precision"],
        )
    return _report(config, runs)


def _report(config: SemiSupervisedConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    lineage = tables.lineage(config, stage="semi_supervised")
    tables.write_parquet(
        tables.from_rows(runs, tables.SSL_RUNS),
        storage.join(config.root, "runs.parquet"),
        lineage,
    )
    main = [r for r in runs if r["top_k"] == config.top_k and r["unlabeled_fraction"] == 1.0]
    tables.write_parquet(
        tables.from_rows(main, tables.RESULTS),
        storage.join(config.root, "results.parquet"),
        lineage,
    )
    markdown = reports.ssl_results_markdown(main)
    title = (
        f"Semi-supervised: P={config.top_p}, K={config.top_k}, "
        f"{len(config.seeds)} seed(s); top-1 (%) on the test split"
    )
    storage.write_bytes_atomic(
        storage.join(config.root, "results.md"), f"# {title}\n\n{markdown}".encode()
    )
    storage.write_bytes_atomic(
        storage.join(config.root, "results_per_seed.png"), reports.ssl_seed_bars(main)
    )
    publish_markdown(markdown, "semi-supervised-results", title, location=config.root)
    publish_table(
        [
            {k: r[k] for k in ("seed", "method", "top1", "top5", "pseudo", "precision")}
            for r in main
        ],
        "semi-supervised-runs",
        f"Every (seed, method) of the main setting (per-seed chart: "
        f"`{storage.join(config.root, 'results_per_seed.png')}`)",
        location=config.root,
    )
    for x, name, rows in (
        ("top_k", "sweep_top_k", [r for r in runs if r["unlabeled_fraction"] == 1.0]),
        ("unlabeled_fraction", "sweep_unlabeled", [r for r in runs if r["top_k"] == config.top_k]),
    ):
        if len({r[x] for r in rows}) < 2:
            continue
        md, png = reports.ssl_sweep(rows, x)
        storage.write_bytes_atomic(storage.join(config.root, f"{name}.md"), md.encode())
        storage.write_bytes_atomic(storage.join(config.root, f"{name}.png"), png)
        publish_markdown(md, f"semi-supervised-{name}", f"Sweep over {x}", location=config.root)
    by_method = {
        m: sum(r["top1"] for r in main if r["method"] == m) / len(config.seeds)
        for m in reports.SSL_METHODS
    }
    gains = {
        s: next(r["top1"] for r in main if r["seed"] == s and r["method"] == "student_finetuned")
        - next(r["top1"] for r in main if r["seed"] == s and r["method"] == "supervised")
        for s in config.seeds
    }
    return {"mean_top1": by_method, "gains": gains, "markdown": markdown}
