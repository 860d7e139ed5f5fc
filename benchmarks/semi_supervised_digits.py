"""Billion-scale semi-supervised learning (Yalniz et al. 2019) in miniature, on the
bundled scikit-learn digits.

For every seed: split the digits (labeled D / unlabeled U / test), then

1. teacher: train on D;
2. infer on U, keep each image's top-P classes;
3. select, per class, the K images that class scores highest (D^);
4. student: pretrain on D^ (pseudo-labels); 5. fine-tune the student on D;
6. baseline: the student's architecture trained on D only.

Prints a results table (mean, std, per-seed, paired wins of the fine-tuned student over
the baseline) and publishes ``ROOT/results.parquet`` (tables.RESULTS). Every stage is
skipped when its output is committed, so a rerun only prints.

    python benchmarks/semi_supervised_digits.py                      # flows/examples/demo.yaml
    python benchmarks/semi_supervised_digits.py --root /tmp/ssl --seeds 0 1 2 3 4
    python benchmarks/semi_supervised_digits.py --sweep              # K and |U| sweeps too

Steps 2, 3 and the writing of D^ as shards are the pipeline's own stages
(cvpipe.inference, cvpipe.selection, cvpipe.materialize); training and evaluation are
cvpipe.training. Pseudo-label precision is measured against U's hidden labels.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml

ROOT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT_DIR))

from cvpipe import (  # noqa: E402
    inference,
    ingest,
    materialize,
    models,
    selection,
    shards,
    storage,
    tables,
    training,
)
from cvpipe.config import DigitsSplit, IngestConfig, SemiSupervisedConfig, TrainConfig  # noqa: E402
from cvpipe.datasets import export_digits  # noqa: E402

DEFAULT_CONFIG = ROOT_DIR / "flows" / "examples" / "demo.yaml"


# --------------------------------------------------------------------------- data


def prepare_digits(root: str, split: DigitsSplit, seed: int) -> tuple[dict[str, list[str]], dict]:
    """Export the digits split of ``seed`` and ingest each part as shards. Returns the
    shard URLs per part and the hidden truth of U (source file name -> label)."""
    pool = 1.0 - split.test_fraction
    fractions = {
        "labeled": split.labeled_fraction * pool,
        "unlabeled": (1.0 - split.labeled_fraction) * pool,
        "test": split.test_fraction,
    }
    png = os.path.join(root, "png")
    truth_csv = os.path.join(png, "unlabeled_truth.csv")
    if not os.path.exists(truth_csv):
        export_digits(png, size=split.size, split=fractions, seed=seed)
    urls = {}
    for part in ("labeled", "unlabeled", "test"):
        cfg = IngestConfig(
            source=os.path.join(png, part),
            root=root,
            partition=part,
            name="digits",
            shard_size=split.shard_size,
        )
        plan, n = ingest.prepare_plan(cfg.source, root, part, "digits", cfg.shard_size, cfg)
        for i in range(n):
            ingest.ingest_shard(root, part, "digits", i, plan, cfg)
        urls[part] = storage.list_committed(storage.join(root, "shards", part), ".tar")
    with open(truth_csv) as f:
        truth = {row["image"]: row["label"] for row in csv.DictReader(f)}
    return urls, truth


# --------------------------------------------------------------------------- pseudo-labels


def pseudo_label(
    teacher: str, unlabeled: list[str], out: str, top_p: int, top_k: int, batch_size: int
) -> tuple[list[str], int]:
    """Steps 2-3 and D^ as shards, with the pipeline's own stages: teacher inference
    (cvpipe.inference), top-K per class (cvpipe.selection), materialization
    (cvpipe.materialize). Returns D^'s shard URLs and its sample count."""
    infer_out = storage.join(out, "infer")
    inference.infer_shards(
        unlabeled,
        teacher,
        infer_out,
        top_p=top_p,
        batch_size=batch_size,
        device="cpu",
        num_workers=0,
    )
    preds = [inference.predictions_url(infer_out, shards.shard_id(u)) for u in unlabeled]
    sel_out = storage.join(out, "select")
    report = selection.select(preds, top_p, top_k, sel_out)
    stats = materialize.materialize(
        selection.selection_url(sel_out), unlabeled, storage.join(out, "pseudo"), teacher
    )
    urls = [materialize.output_url(storage.join(out, "pseudo"), s.shard) for s in stats]
    n = sum(s.written for s in stats)
    if report and n == 0:
        raise RuntimeError("the selection kept nothing")
    return urls, n


def precision(pseudo_urls: list[str], truth: dict[str, str]) -> float:
    """Share of D^ samples whose pseudo-label is the hidden true label."""
    right = total = 0
    for u in pseudo_urls:
        for s in shards.iter_shard(u, decode=False):
            if isinstance(s, shards.Sample):
                total += 1
                right += truth.get(os.path.basename(s.meta.get("source", ""))) == s.meta["label"]
    return right / max(total, 1)


# --------------------------------------------------------------------------- one loop


def with_seed(cfg: TrainConfig, seed: int) -> TrainConfig:
    return TrainConfig.model_validate({**cfg.model_dump(), "seed": seed})


def run_seed(
    cfg: SemiSupervisedConfig,
    seed: int,
    top_k: int,
    u_fraction: float = 1.0,
    data_root: str | None = None,
) -> dict:
    base = storage.join(cfg.root, f"seed-{seed}")
    t0 = time.perf_counter()
    data_dir = storage.join(data_root or cfg.root, f"seed-{seed}", "data")
    data, truth = prepare_digits(data_dir, cfg.digits, seed)
    t_data = time.perf_counter() - t0
    timings: dict[str, float] = {}

    def stage(name, fn, *a, **kw):
        t = time.perf_counter()
        r = fn(*a, **kw)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        return r

    lab, unl, test = data["labeled"], data["unlabeled"], data["test"]
    # Folders named after their config, so sweeps share the teacher and the baseline;
    # a baseline configured like the teacher *is* the teacher's run (same hash: skipped).
    teacher_dir = storage.join(base, f"teacher-{tables.config_hash(cfg.teacher)[:8]}")
    baseline_dir = (
        teacher_dir
        if cfg.baseline == cfg.teacher
        else storage.join(base, f"baseline-{tables.config_hash(cfg.baseline)[:8]}")
    )
    teacher = stage("teacher", training.train, with_seed(cfg.teacher, seed), lab, teacher_dir)
    if u_fraction < 1.0:
        # |U| grows by whole shards, as it would by partitions in the pipeline.
        unl = unl[: max(1, round(u_fraction * len(unl)))]
    selection_dir = storage.join(teacher_dir, f"p{cfg.top_p}-k{top_k}-u{u_fraction:g}")
    student_dir = storage.join(selection_dir, f"student-{tables.config_hash(cfg.student)[:8]}")
    finetune_dir = storage.join(student_dir, f"finetune-{tables.config_hash(cfg.finetune)[:8]}")
    pseudo, n_pseudo = stage(
        "pseudo_label",
        pseudo_label,
        teacher,
        unl,
        selection_dir,
        cfg.top_p,
        top_k,
        cfg.inference_batch_size,
    )
    prec = precision(pseudo, truth)
    # The student's head is the teacher's class list, even for a class D^ missed.
    student_cfg = with_seed(cfg.student, seed)
    if student_cfg.classes is None:
        classes = models.load_info(teacher).classes
        student_cfg = TrainConfig.model_validate({**student_cfg.model_dump(), "classes": classes})
    student = stage(
        "student_pretrain",
        training.train,
        student_cfg,
        pseudo,
        student_dir,
    )
    finetuned = stage(
        "student_finetune",
        training.train,
        with_seed(cfg.finetune, seed),
        lab,
        finetune_dir,
        init_checkpoint=student,
    )
    baseline = stage("baseline", training.train, with_seed(cfg.baseline, seed), lab, baseline_dir)
    results = {}
    for method, ck in (
        ("teacher", teacher),
        ("supervised", baseline),
        ("student_pretrained", student),
        ("student_finetuned", finetuned),
    ):
        r = stage("evaluate", training.evaluate, ck, test, os.path.dirname(ck), device="cpu")
        results[method] = r
    return {
        "seed": seed,
        "top_k": top_k,
        "u_fraction": u_fraction,
        "labeled": sum(1 for u in lab for _ in shards.iter_shard(u, decode=False)),
        "pseudo": n_pseudo,
        "precision": prec,
        "results": results,
        "timings": timings,
        "data_s": t_data,
    }


# --------------------------------------------------------------------------- report


def summarize(runs: list[dict]) -> str:
    methods = ["teacher", "supervised", "student_pretrained", "student_finetuned"]
    lines = [
        "| seed | |D| | |D^| | precision | " + " | ".join(methods) + " | gain |",
        "|---|---|---|---|" + "---|" * len(methods) + "---|",
    ]
    gains = []
    for r in runs:
        acc = {m: r["results"][m].top1 for m in methods}
        gain = acc["student_finetuned"] - acc["supervised"]
        gains.append(gain)
        lines.append(
            f"| {r['seed']} | {r['labeled']} | {r['pseudo']} | {r['precision']:.3f} | "
            + " | ".join(f"{100 * acc[m]:.2f}" for m in methods)
            + f" | {100 * gain:+.2f} |"
        )

    def ms(xs):
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{100 * statistics.mean(xs):.2f} ± {100 * sd:.2f}"

    lines.append(
        "| mean ± std | | | | "
        + " | ".join(ms([r["results"][m].top1 for r in runs]) for m in methods)
        + f" | {ms(gains)} |"
    )
    wins = sum(g > 0 for g in gains)
    ties = sum(g == 0 for g in gains)
    lines.append("")
    lines.append(
        f"fine-tuned student beats the supervised baseline on {wins}/{len(gains)} seeds"
        + (f" ({ties} tie)" if ties else "")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--root", help="output root (default: a temporary folder)")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--labeled-fraction", type=float)
    ap.add_argument("--sweep", action="store_true", help="also run the K and |U| sweeps")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads: 1 is fastest for these tiny models"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    raw = yaml.safe_load(Path(args.config).read_text())
    root = args.root or tempfile.mkdtemp(prefix="ssl-digits-")
    raw["root"] = root
    if args.seeds:
        raw["seeds"] = args.seeds
    if args.top_k:
        raw["top_k"] = args.top_k
    if args.labeled_fraction:
        raw.setdefault("digits", {})["labeled_fraction"] = args.labeled_fraction
    cfg = SemiSupervisedConfig.model_validate(raw)
    if cfg.digits is None:
        raise SystemExit("this benchmark runs on the bundled digits: give `digits:` in the config")

    t0 = time.perf_counter()
    runs = [run_seed(cfg, s, cfg.top_k) for s in cfg.seeds]
    wall = time.perf_counter() - t0
    print(
        f"\nSemi-supervised digits: labeled {cfg.digits.labeled_fraction:.0%} of the pool, "
        f"test {cfg.digits.test_fraction:.0%}, P={cfg.top_p}, K={cfg.top_k}, "
        f"{len(cfg.seeds)} seeds, root {root}\n"
    )
    print(summarize(runs))
    stage_s: dict[str, float] = defaultdict(float)
    for r in runs:
        for k, v in r["timings"].items():
            stage_s[k] += v
    train_s = sum(
        v
        for k, v in stage_s.items()
        if k in ("teacher", "student_pretrain", "student_finetune", "baseline")
    )
    print(
        f"\nwall {wall:.1f} s; training compute {train_s:.1f} s; per stage (all seeds): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in stage_s.items())
    )
    rows = [
        {"seed": r["seed"], "method": m, "top1": res.top1, "top5": res.top5}
        for r in runs
        for m, res in r["results"].items()
    ]
    tables.write_parquet(
        tables.from_rows(rows, tables.RESULTS),
        storage.join(root, "results.parquet"),
        tables.lineage(cfg, stage="semi_supervised_digits", wall_s=round(wall, 1)),
    )

    if args.sweep:
        for k in cfg.sweep_top_k:
            sweep = [run_seed(cfg, s, k) for s in cfg.seeds]
            print(f"\nK = {k}\n" + summarize(sweep))
        for f in cfg.sweep_unlabeled_fraction:
            sweep = [run_seed(cfg, s, cfg.top_k, f) for s in cfg.seeds]
            print(f"\n|U| fraction = {f:g}\n" + summarize(sweep))
    summary = {
        "wall_s": wall,
        "train_s": train_s,
        "gains": [
            r["results"]["student_finetuned"].top1 - r["results"]["supervised"].top1 for r in runs
        ],
    }
    print("\n" + json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
