"""The "learn to transfer" study on the bundled digits, end to end (``cvpipe transfer``).

1. Data: each digit class split into a source pool and a target pool; source datasets
   (groups of classes, different sizes) and targets (groups of classes with test,
   validation and training slices, the training slice at several label counts).
2. The reference model (trained on the union of the sources) and the summaries of every
   source and target in its feature space (the anchors stage); ``D(target, source)``.
3. Per seed: a source model per source; the exhaustive grid (every source fine-tuned on
   every target): the ground truth of the P2L validation (LOTO weights, picks, table,
   PNG; the weights fitted on all targets are stored with their lineage).
4. Per seed, for the study's targets, from the source P2L picks: shallow learners (SVM,
   logistic) on the source's penultimate features, fine-tuning at each freezing depth,
   with per-stage LR multipliers, from scratch; at each label count.
5. Curricula (chains of fine-tunings) against the direct fine-tune from their first model.
6. Costs of each architecture (trained on the picked source, fine-tuned on the target).
7. The report: ``transfer_report.md`` + ``.png`` with the recommendation and evidence.

Runs are named by what they are (target, label count, source, config hash), so a run
the grid and the methods table share is trained once; committed work is skipped.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from cvpipe import models
from cvpipe.core import storage, tables
from cvpipe.data import datasets, shards
from cvpipe.data.config import IngestConfig
from cvpipe.experiments import p2l_validation as pv
from cvpipe.experiments import transfer_study as study
from cvpipe.experiments.config import TransferDigits, TransferStudyConfig
from cvpipe.infer.config import InferConfig
from cvpipe.label import p2l
from cvpipe.learn.config import ShallowConfig, TrainConfig
from flows.datasets import export_digits_flow
from flows.ingest import ingest_flow
from flows.teacher import infer_flow
from flows.transfer import shallow_flow, summarize
from tasks.artifacts import publish_markdown, publish_table, run_name
from tasks.training import evaluate, train
from tasks.transfer import measure_costs

count_key = study.count_key


def _ingest(manifest: str, root: str, partition: str, shard_size: int) -> list[str]:
    ingest_flow(
        IngestConfig(
            source=manifest, root=root, partition=partition, name="digits", shard_size=shard_size
        )
    )
    return storage.list_committed(storage.join(root, "shards", partition), ".tar")


@flow(name="prepare-transfer-digits", flow_run_name=run_name("transfer digits -> {root}"))
def transfer_digits_flow(
    root: str, spec: TransferDigits, counts: list[int | None]
) -> dict[str, Any]:
    """Sources and targets as partitions of one ingest root (labels in its index/)."""
    images = storage.join(root, "png")
    marker = storage.join(images, "_exported.json")
    if not storage.is_committed(marker):
        f = spec.source_fraction
        split = f"labeled={f!r},unlabeled=0.0,test={1 - f!r}"
        counts_out = export_digits_flow(images, size=spec.size, split=split, seed=spec.seed)
        storage.write_bytes_atomic(marker, str(counts_out).encode())
    manifests = storage.join(root, "manifests")
    out: dict[str, Any] = {"sources": {}, "targets": {}}
    for name, group in spec.sources.items():
        m = storage.join(manifests, f"source-{name}.csv")
        datasets.class_manifest(storage.join(images, "labeled"), group.classes, m, group.per_class)
        out["sources"][name] = _ingest(m, root, f"source-{name}", spec.shard_size)
    for name, classes in spec.targets.items():
        slices = [
            ("test", spec.test_per_class, 0),
            ("val", spec.val_per_class, spec.test_per_class),
        ]
        slices += [
            (f"train-{count_key(k)}", k, spec.test_per_class + spec.val_per_class) for k in counts
        ]
        parts = {}
        for part, per_class, offset in slices:
            m = storage.join(manifests, f"target-{name}-{part}.csv")
            datasets.class_manifest(storage.join(images, "test"), classes, m, per_class, offset)
            parts[part] = _ingest(m, root, f"target-{name}-{part}", spec.shard_size)
        out["targets"][name] = parts
    return out


def _cfg(cfg: TrainConfig, seed: int, **updates: Any) -> TrainConfig:
    return TrainConfig.model_validate({**cfg.model_dump(), "seed": seed, **updates})


class Runner:
    """Trains and scores runs of one study; a run's folder is named by its content."""

    def __init__(self, config: TransferStudyConfig, data: dict[str, Any], data_root: str):
        self.config, self.data, self.data_root = config, data, data_root
        self.root = config.root
        self._sizes: dict[str, int] = {}

    def images(self, urls: list[str]) -> int:
        key = "|".join(urls)
        if key not in self._sizes:
            self._sizes[key] = sum(
                tables.num_rows(shards.unit_url(self.data_root, "index", shards.shard_id(u)))
                for u in urls
            )
        return self._sizes[key]

    def fit(self, cfg: TrainConfig, urls: list[str], where: str, init: str | None) -> str:
        run = tables.config_hash({"cfg": cfg, "init": init, "train": urls})[:10]
        return train(cfg, urls, storage.join(self.root, "runs", where, run), init)

    def fit_target(self, cfg: TrainConfig, urls: list[str], where: str, init: str | None) -> str:
        """A run on a target's training slice, with at least ``finetune_min_steps``
        optimizer steps whatever the label count (:func:`study.fit_schedule`)."""
        epochs, batch = study.fit_schedule(
            cfg.epochs, cfg.batch_size, self.images(urls), self.config.finetune_min_steps
        )
        cfg = cfg.model_copy(update={"epochs": epochs, "batch_size": batch})
        return self.fit(cfg, urls, where, init)

    def score(self, ckpt: str, target: str, cfg: TrainConfig) -> dict[str, float]:
        out = ckpt.rsplit("/", 1)[0]
        parts = self.data["targets"][target]
        return {
            f"{split}_top1": evaluate(
                ckpt,
                parts[split],
                storage.join(out, f"eval-{split}"),
                device=cfg.device,
                threads=cfg.cpu_threads,
            ).top1
            for split in ("val", "test")
        }

    def train_seconds(self, ckpt: str, urls: list[str]) -> float:
        """Seconds of training: images per epoch over images/s, summed over epochs."""
        metrics = tables.read_parquet(storage.join(ckpt.rsplit("/", 1)[0], "metrics.parquet"))
        n = self.images(urls)
        return float(
            sum(
                n / r["images_per_s"]
                for r in metrics.to_pylist()
                if r["split"] == "train" and r["images_per_s"] > 0
            )
        )


@flow(name="transfer-study", flow_run_name=run_name("transfer study -> {config.root}"))
def transfer_flow(config: TransferStudyConfig) -> dict[str, Any]:
    """The whole study; returns the report's URLs and the recommendation."""
    log = get_run_logger()
    c, root = config, config.root
    counts = list(dict.fromkeys([*c.label_counts, c.grid_per_class]))
    data_root = storage.join(root, "data")
    data = transfer_digits_flow(data_root, c.digits, counts)
    run = Runner(c, data, data_root)
    grid_part = f"train-{count_key(c.grid_per_class)}"

    # Reference model, summaries and divergences (one forward pass per dataset).
    union = [u for urls in data["sources"].values() for u in urls]
    reference = train(_cfg(c.reference, c.seeds[0]), union, storage.join(root, "reference"))
    runtime = {"device": c.reference.device, "cpu_threads": c.reference.cpu_threads}
    src_sum = summarize(
        data["sources"],
        reference,
        storage.join(root, "p2l", f"sources-{c.p2l.kind}.parquet"),
        c.p2l.kind,
        **runtime,
    )
    tgt_sum = summarize(
        {t: p[grid_part] for t, p in data["targets"].items()},
        reference,
        storage.join(root, "p2l", f"targets-{c.p2l.kind}.parquet"),
        c.p2l.kind,
        **runtime,
    )
    template = p2l.P2LWeights(
        metric=c.p2l.metric, kind=c.p2l.kind, kl_direction=c.p2l.kl_direction, eps=c.p2l.eps
    )
    size, div = p2l.divergence_table(tgt_sum, src_sum, template)
    s_names = sorted(size)

    # Source models and the exhaustive grid.
    sources: dict[int, dict[str, str]] = {}
    grid = []
    for seed in c.seeds:
        sources[seed] = {
            n: run.fit(_cfg(c.source, seed), urls, f"sources/{n}", None)
            for n, urls in data["sources"].items()
        }
        for t, parts in data["targets"].items():
            for s in s_names:
                cfg = _cfg(c.finetune, seed)
                ckpt = run.fit_target(cfg, parts[grid_part], f"{t}/{grid_part}", sources[seed][s])
                grid.append(
                    {
                        "target": t,
                        "source": s,
                        "seed": seed,
                        "size": size[s],
                        "divergence": div[t][s],
                        **run.score(ckpt, t, cfg),
                    }
                )
    lineage = {
        **tables.lineage(c, stage="transfer_study"),
        "reference_model": models.model_id(reference),
    }
    tables.write_parquet(
        tables.from_rows(grid, tables.TRANSFER_GRID), storage.join(root, "grid.parquet"), lineage
    )
    validation = pv.write_validation(
        grid, storage.join(root, "p2l"), template, lineage, c.p2l.fit_on
    )
    pick = {r["target"]: r["pick"] for r in validation["picks"] if r["selector"] == "p2l"}
    log.info("P2L picks (leave-one-target-out): %s", pick)

    methods = []
    for t in dict.fromkeys([c.target, *c.method_targets]):
        for seed in c.seeds:
            methods += _methods(run, t, pick[t], sources[seed][pick[t]], seed, counts)
    for name, chain in c.curricula.items():
        for seed in c.seeds:
            methods += _curriculum(run, name, chain, reference, sources[seed], seed, grid_part)
    tables.write_parquet(
        tables.from_rows(methods, tables.TRANSFER_METHODS),
        storage.join(root, "methods.parquet"),
        lineage,
    )

    cost_rows = _costs(run, pick[c.target], grid_part, sources)
    tables.write_parquet(
        tables.from_rows([r["costs"] for r in cost_rows], tables.MODEL_COSTS),
        storage.join(root, "costs.parquet"),
        lineage,
    )

    ranking = p2l.rank_summaries(tgt_sum, src_sum, validation["loto"][c.target], target=c.target)
    report = study.write_report(
        root,
        c,
        ranking=ranking,
        validation=validation,
        methods=methods,
        costs=cost_rows,
        lineage=lineage,
    )
    publish_markdown(
        storage.read_bytes(report["markdown"]).decode(),
        "transfer-report",
        f"Transfer study: recommendation for `{c.target}`",
        location=root,
    )
    publish_table(
        validation["summary"], "p2l-validation", "P2L vs largest vs closest", location=root
    )
    return report


def _methods(
    run: Runner, t: str, source: str, src_ckpt: str, seed: int, counts: list[int | None]
) -> list[dict[str, Any]]:
    """Shallow learners and fine-tunes of one (target, seed) at every label count."""
    c = run.config
    parts = run.data["targets"][t]
    stages = len(models.ARCHITECTURES[c.finetune.arch].stages)
    rows = []
    feats = {}
    for part in ["val", "test", *[f"train-{count_key(k)}" for k in counts]]:
        out = storage.join(c.root, "features", models.model_id(src_ckpt), t, part)
        infer_flow(
            InferConfig(
                shards=parts[part],
                checkpoint=src_ckpt,
                out=out,
                top_p=1,
                features=True,
                device=c.finetune.device,
                num_workers=0,
                cpu_threads=c.finetune.cpu_threads,
            )
        )
        feats[part] = storage.join(out, "features")
    for k in counts:
        part = f"train-{count_key(k)}"
        base = {"target": t, "per_class": k, "source": source, "seed": seed}
        for model in c.shallow:
            out = storage.join(c.root, "shallow", t, count_key(k), f"{source}-s{seed}-{model}")
            r = shallow_flow(
                ShallowConfig(
                    features=feats[part],
                    truth=run.data_root,
                    test=feats["test"],
                    val=feats["val"],
                    model=model,
                    out=out,
                    c_grid=c.c_grid,
                    seed=seed,
                )
            )
            val = tables.read_lineage(storage.join(out, "shallow.parquet"))["val_scores"]
            rows.append(
                {
                    **base,
                    "method": model,
                    "freeze": None,
                    "val_top1": max(val.values()),
                    "test_top1": r["top1"],
                    "train_seconds": r["fit_seconds"],
                }
            )
        variants = [
            (f"freeze-{n}", n, _cfg(c.finetune, seed, freeze_stages=n))
            for n in c.freeze_depths
            if n <= stages
        ]
        variants.append(
            ("lr-mult", 0, _cfg(c.finetune, seed, freeze_stages=0, lr_multipliers=c.lr_multipliers))
        )
        variants.append(("scratch", 0, _cfg(c.finetune, seed, freeze_stages=0, new_head=False)))
        for method, n, cfg in variants:
            init = None if method == "scratch" else src_ckpt
            ckpt = run.fit_target(cfg, parts[part], f"{t}/{part}", init)
            rows.append(
                {
                    **base,
                    "source": None if init is None else source,
                    "method": method,
                    "freeze": n,
                    **run.score(ckpt, t, cfg),
                    "train_seconds": run.train_seconds(ckpt, parts[part]),
                }
            )
    return rows


def _curriculum(
    run: Runner,
    name: str,
    chain: list[str],
    reference: str,
    sources: dict[str, str],
    seed: int,
    part: str,
) -> list[dict[str, Any]]:
    """One chain (each step a training stage from the last) and the direct fine-tune
    from its first model, both finished on the study target."""
    c = run.config
    first = reference if chain[0] == "reference" else sources[chain[0]]
    ckpt, seconds = first, 0.0
    for i, step in enumerate(chain[1:], 1):
        cfg = _cfg(c.finetune, seed, freeze_stages=0, lr_multipliers={}, classes=None)
        urls = run.data["sources"][step]
        ckpt = run.fit(cfg, urls, f"curricula/{name}/{i:02d}-{step}", ckpt)
        seconds += run.train_seconds(ckpt, urls)
    urls = run.data["targets"][c.target][part]
    cfg = _cfg(c.finetune, seed)
    rows = []
    for method, init, extra in (
        (f"curriculum:{name}", ckpt, seconds),
        (f"direct:{chain[0]}", first, 0.0),
    ):
        final = run.fit_target(cfg, urls, f"{c.target}/{part}", init)
        rows.append(
            {
                "target": c.target,
                "per_class": c.grid_per_class,
                "source": chain[0],
                "method": method,
                "freeze": c.finetune.freeze_stages,
                "seed": seed,
                **run.score(final, c.target, cfg),
                "train_seconds": extra + run.train_seconds(final, urls),
            }
        )
    return rows


def _costs(
    run: Runner, source: str, part: str, sources: dict[int, dict[str, str]]
) -> list[dict[str, Any]]:
    """Per architecture: source model + fine-tune on the target per seed (the study's
    own architecture reuses its runs), accuracy over seeds, costs of the first seed's."""
    c = run.config
    urls = run.data["targets"][c.target][part]
    base_size = c.finetune.input_size or models.ARCHITECTURES[c.finetune.arch].input_size
    out = []
    for cand in c.archs:
        scores, ckpts = [], []
        own = cand.arch == c.finetune.arch and cand.input_size == base_size and cand.lr is None
        for seed in c.seeds:
            if own:
                src, cfg = sources[seed][source], _cfg(c.finetune, seed)
            else:
                arch = {
                    "arch": cand.arch,
                    "input_size": cand.input_size,
                    "freeze_stages": 0,
                    "lr_multipliers": {},
                    **({"lr": cand.lr} if cand.lr else {}),
                }
                src = run.fit(
                    _cfg(c.source, seed, **arch),
                    run.data["sources"][source],
                    f"sources/{source}",
                    None,
                )
                cfg = _cfg(c.finetune, seed, **arch)
            ckpts.append(run.fit_target(cfg, urls, f"{c.target}/{part}", src))
            scores.append(run.score(ckpts[-1], c.target, cfg))
        name = f"{cand.arch}@{cand.input_size}"
        row = measure_costs(ckpts[0], name, c.cost_batch, "cpu", c.cost_threads)
        out.append({"name": name, "costs": row, "scores": scores})
    return out
