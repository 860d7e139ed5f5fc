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

Steps 2, 3 and the writing of D^ as shards use cvpipe.inference / cvpipe.selection /
cvpipe.materialize when they exist, else the small stand-ins below (same contracts:
top-P per image; top-K per class over the images that have the class in their top-P;
D^ written as shards whose json ``label`` is the pseudo-label's class name).
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

from cvpipe import ingest, models, shards, storage, tables, training  # noqa: E402
from cvpipe.config import DigitsSplit, IngestConfig, SemiSupervisedConfig, TrainConfig  # noqa: E402
from cvpipe.datasets import export_digits  # noqa: E402
from cvpipe.loader import ShardDataset, make_loader  # noqa: E402

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


# --------------------------------------------------------------------------- stand-ins


@torch.no_grad()
def predict_top_p(checkpoint: str, urls: list[str], top_p: int, batch_size: int) -> list[dict]:
    """Stand-in for cvpipe.inference: per image its top-P classes and softmax scores."""
    model, info = models.load_checkpoint(checkpoint)
    model.eval()
    ds = ShardDataset(urls, models.preprocess(info), stage="infer")
    rows = []
    for batch in make_loader(ds, batch_size):
        if len(batch) == 0:
            continue
        probs = model(batch.images).softmax(1)
        scores, classes = probs.topk(min(top_p, probs.shape[1]), dim=1)
        for key, shard, c, s in zip(
            batch.keys, batch.shards, classes.tolist(), scores.tolist(), strict=True
        ):
            rows.append({"key": key, "shard": shard, "classes": c, "scores": s})
    return rows


def select_top_k(predictions: list[dict], top_k: int) -> list[dict]:
    """Stand-in for cvpipe.selection: for each class, the K images that class scores
    highest among those holding it in their top-P (an image may serve several classes)."""
    by_class: dict[int, list[tuple[float, str, str]]] = defaultdict(list)
    for r in predictions:
        for c, s in zip(r["classes"], r["scores"], strict=True):
            by_class[c].append((s, r["key"], r["shard"]))
    out = []
    for c, items in sorted(by_class.items()):
        items.sort(key=lambda t: (-t[0], t[1]))
        for rank, (s, key, shard) in enumerate(items[:top_k], start=1):
            out.append({"key": key, "shard": shard, "label": c, "score": s, "rank": rank})
    return out


def materialize(
    selection: list[dict], urls: list[str], classes: list[str], out: str, truth: dict
) -> tuple[list[str], float]:
    """Stand-in for cvpipe.materialize: D^ as one shard, json label = class name.
    Returns the shard URLs and the pseudo-label precision against U's hidden truth."""
    url = storage.join(out, "pseudo-000000.tar")
    wanted: dict[str, list[int]] = defaultdict(list)
    for r in selection:
        wanted[r["key"]].append(r["label"])
    right = total = 0
    samples = []
    for u in urls:  # U's own order: the shard is not grouped by class
        for s in shards.iter_shard(u, decode=False):
            if isinstance(s, shards.Reject) or s.key not in wanted:
                continue
            for c in wanted[s.key]:
                meta = {**s.meta, "label": classes[c], "pseudo_label": True}
                samples.append((f"{s.key}-c{c}", {s.ext: s.data, "json": shards.encode_meta(meta)}))
                total += 1
                right += truth.get(os.path.basename(s.meta.get("source", ""))) == classes[c]
    if not storage.is_committed(url):
        shards.write_shard(url, samples)
    return [url], right / max(total, 1)


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
    teacher = stage(
        "teacher",
        training.train,
        with_seed(cfg.teacher, seed),
        lab,
        storage.join(base, "teacher"),
    )
    info = models.load_info(teacher)
    preds = stage("infer", predict_top_p, teacher, unl, cfg.top_p, cfg.inference_batch_size)
    if u_fraction < 1.0:
        # A seeded subset of U: how the gain grows with |U|.
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(preds), generator=g)[: round(u_fraction * len(preds))]
        preds = [preds[i] for i in sorted(keep.tolist())]
    variant = f"k{top_k}-u{u_fraction:g}"
    sel = stage("select", select_top_k, preds, top_k)
    pseudo, precision = stage(
        "materialize", materialize, sel, unl, info.classes, storage.join(base, variant), truth
    )
    student = stage(
        "student_pretrain",
        training.train,
        with_seed(cfg.student, seed),
        pseudo,
        storage.join(base, variant, "student"),
    )
    finetuned = stage(
        "student_finetune",
        training.train,
        with_seed(cfg.finetune, seed),
        lab,
        storage.join(base, variant, "finetuned"),
        init_checkpoint=student,
    )
    baseline = stage(
        "baseline",
        training.train,
        with_seed(cfg.baseline, seed),
        lab,
        storage.join(base, "baseline"),
    )
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
        "pseudo": len(sel),
        "precision": precision,
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
    ap.add_argument("--threads", type=int, default=2)
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
