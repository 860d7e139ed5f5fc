"""Divergence-based pseudo-labeling with named anchors (Dube et al. 2019), end to end:

reference model on the anchor datasets -> anchors -> features of U -> pseudo-labels of U
per method -> one source model pretrained per method -> each fine-tuned on each target
-> the transfer table (targets x methods, best per row marked), and the pseudo-label
dataset table (labels, images per label, accuracy of the source on held-out images).

Outputs under ``config.root``: ``pseudo_labels.{parquet,md}`` and
``pseudo_labels_sizes.png``; ``transfer.{parquet,md}``. Committed work is skipped.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from prefect import flow, get_run_logger

from cvpipe import models
from cvpipe.core import storage, tables
from cvpipe.data import datasets, shards
from cvpipe.data.config import IngestConfig
from cvpipe.experiments import reports
from cvpipe.experiments.config import AnchorTransferConfig, DigitsAnchors, LabelMethod
from cvpipe.infer.config import InferConfig
from cvpipe.label.config import AnchorsConfig, LabelConfig, RelabelConfig
from cvpipe.label.materialize import RelabelStage
from cvpipe.learn.config import TrainConfig
from flows.anchors import anchors_build_flow, label_flow
from flows.datasets import export_digits_flow
from flows.ingest import ingest_flow
from flows.teacher import infer_flow
from tasks.artifacts import publish_markdown, publish_table, run_name
from tasks.progress import header
from tasks.stage import run_units
from tasks.training import evaluate, train


def _ingest_manifest(manifest: str, root: str, partition: str, shard_size: int) -> list[str]:
    ingest_flow(
        IngestConfig(
            source=manifest, root=root, partition=partition, name="digits", shard_size=shard_size
        )
    )
    return storage.list_committed(storage.join(root, "shards", partition), ".tar")


@flow(name="prepare-digit-anchors", flow_run_name=run_name("digit anchors -> {root}"))
def digit_anchors_data_flow(root: str, spec: DigitsAnchors, seed: int) -> dict[str, Any]:
    """Anchor datasets (labeled digit groups), U (the unlabeled split) and targets (other
    groups: labeled images to train on, test images to score) as shards."""
    images = storage.join(root, "png")
    if not storage.is_committed(storage.join(images, "unlabeled_truth.csv")):
        export_digits_flow(images, size=spec.size, split=spec.split, seed=seed)
    manifests = storage.join(root, "manifests")
    out: dict[str, Any] = {"anchors": {}, "targets": {}}
    for name, classes in spec.anchor_groups.items():
        m = storage.join(manifests, f"anchor-{name}.csv")
        datasets.class_manifest(storage.join(images, "labeled"), classes, m)
        out["anchors"][name] = _ingest_manifest(m, root, f"anchor-{name}", spec.shard_size)
    # U keeps its true labels in its json, for the Vanilla baseline and for measuring
    # precision; the anchor labelers never read them.
    m = storage.join(manifests, "unlabeled.csv")
    datasets.unlabeled_manifest(images, m)
    out["unlabeled"] = _ingest_manifest(m, root, "unlabeled", spec.shard_size)
    for name, classes in spec.target_groups.items():
        parts = {}
        for part, folder in (("train", "labeled"), ("test", "test")):
            m = storage.join(manifests, f"target-{name}-{part}.csv")
            per_class = spec.target_per_class if part == "train" else None
            datasets.class_manifest(storage.join(images, folder), classes, m, per_class)
            parts[part] = _ingest_manifest(m, root, f"target-{name}-{part}", spec.shard_size)
        out["targets"][name] = parts
    return out


def _seeded(cfg: TrainConfig, seed: int) -> TrainConfig:
    return TrainConfig.model_validate({**cfg.model_dump(), "seed": seed})


@flow(name="anchor-source", flow_run_name="source model {method.tag}")
def source_flow(
    config: AnchorTransferConfig,
    method: LabelMethod,
    features: str,
    anchors_url: str,
    unlabeled: list[str],
    reference: str,
) -> dict[str, Any]:
    """Label U with one method, relabel its shards, pretrain a source model on all but
    the first shard and score it on that held-out shard. Returns counts and the source."""
    out = storage.join(config.root, "methods", method.tag)
    stats = label_flow(
        LabelConfig(
            features=features,
            anchors=anchors_url,
            out=storage.join(out, "labels"),
            method=method.method,
            n=method.n,
            metric=method.metric,
            ordered=method.ordered,
            n_labels=method.n_labels,
            seed=config.seed,
            truth=_truth_root(unlabeled) if method.method == "vanilla" else None,
            checkpoint=reference if config.anchor_kind == "softmax" else None,
        )
    )
    relabel = RelabelStage(
        RelabelConfig(
            labels=storage.join(out, "labels"), shards=unlabeled, out=storage.join(out, "pseudo")
        )
    )
    relabeled = run_units(relabel, what=f"relabel ({method.tag})")
    pseudo = storage.expand_urls(storage.join(out, "pseudo", "shards"), ".tar")
    # Hold out a whole shard (the first: the last one is the partial one) for scoring.
    held_out, train_part = (pseudo[:1], pseudo[1:]) if len(pseudo) > 1 else (pseudo, pseudo)
    source = train(_seeded(config.source, config.seed), train_part, storage.join(out, "source"))
    scored = evaluate(
        source,
        held_out,
        storage.join(out, "source", "eval"),
        device=config.source.device,
        threads=config.source.cpu_threads,
    )
    # Images per label of the pseudo-labeled set, counted by the relabel units.
    counts = dict(sorted(sum((Counter(s.labels) for s in relabeled), Counter()).items()))
    get_run_logger().info("%s: %s, source top-1 on held-out U %.3f", method.tag, stats, scored.top1)
    return {"tag": method.tag, "source": source, "counts": counts, "top1": scored.top1}


@flow(name="anchor-transfer", flow_run_name=run_name("anchor transfer -> {config.root}"))
def anchor_transfer_flow(config: AnchorTransferConfig) -> dict[str, Any]:
    """The whole experiment; returns the two tables as markdown."""
    root = config.root
    header("anchor transfer: data")
    if config.digits is not None:
        data_root = storage.join(root, "data")
        data = digit_anchors_data_flow(data_root, config.digits, config.seed)
    else:
        data = {
            "anchors": {n: storage.expand_specs(s, ".tar") for n, s in config.anchors.items()},
            "unlabeled": storage.expand_specs(config.unlabeled, ".tar"),
            "targets": {
                n: {
                    "train": storage.expand_specs(t.train, ".tar"),
                    "test": storage.expand_specs(t.test, ".tar"),
                }
                for n, t in config.targets.items()
            },
        }
    header("anchor transfer: reference model")
    reference = train(
        _seeded(config.reference, config.seed),
        [u for urls in data["anchors"].values() for u in urls],
        storage.join(root, "reference"),
    )
    anchors_url = storage.join(root, "anchors.parquet")
    header("anchor transfer: anchors")
    anchors_build_flow(
        AnchorsConfig(
            sources={n: urls for n, urls in data["anchors"].items()},
            checkpoint=reference,
            out=anchors_url,
            kind=config.anchor_kind,
            device=config.reference.device,
            num_workers=0,
            cpu_threads=config.reference.cpu_threads,
        )
    )
    u_infer = storage.join(root, "unlabeled_features")
    header("anchor transfer: features of U")
    infer_flow(
        InferConfig(
            shards=data["unlabeled"],
            checkpoint=reference,
            out=u_infer,
            top_p=1,
            features=True,
            device=config.reference.device,
            num_workers=0,
            cpu_threads=config.reference.cpu_threads,
        )
    )
    features = storage.join(u_infer, "features")
    sources = []
    for i, m in enumerate(config.methods, 1):
        header(f"anchor transfer: source {i}/{len(config.methods)}: {m.tag}")
        sources.append(source_flow(config, m, features, anchors_url, data["unlabeled"], reference))
    rows = []
    for name, target in data["targets"].items():
        header(f"anchor transfer: target {name}")
        starts = [(s["tag"], s["source"]) for s in sources]
        if config.scratch:
            starts.append(("scratch", None))
        for tag, init in starts:
            cfg = _seeded(config.finetune, config.seed)
            if init is None:
                cfg = TrainConfig.model_validate(
                    {**cfg.model_dump(), "copy_stages": None, "freeze_stages": 0}
                )
            out = storage.join(root, "targets", name, tag)
            ckpt = train(cfg, target["train"], out, init_checkpoint=init)
            top1 = evaluate(
                ckpt,
                target["test"],
                storage.join(out, "eval"),
                device=cfg.device,
                threads=cfg.cpu_threads,
            ).top1
            rows.append({"target": name, "method": tag, "top1": top1})
    return _report(config, sources, rows, reference)


def _truth_root(unlabeled: list[str]) -> str:
    """Vanilla labels are U's own: the ingest root whose index/ holds them."""
    root = shards.ingest_root(unlabeled[0])
    if root is None:
        raise ValueError(
            f"vanilla labels need U ingested by cvpipe (an index/), not {unlabeled[0]}"
        )
    return root


def _report(
    config: AnchorTransferConfig,
    sources: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    reference: str,
) -> dict[str, Any]:
    lineage = {
        **tables.lineage(config, stage="anchor_transfer"),
        "reference_model": models.model_id(reference),
    }
    counts = {s["tag"]: s["counts"] for s in sources}
    top1 = {s["tag"]: s["top1"] for s in sources}
    pl = reports.write_pseudo_label_report(
        counts, storage.join(config.root, "pseudo_labels"), top1=top1, lineage=lineage
    )
    tr = reports.write_transfer_report(rows, storage.join(config.root, "transfer"), lineage)
    pl_md = storage.read_bytes(pl["markdown"]).decode()
    tr_md = storage.read_bytes(tr["markdown"]).decode()
    publish_table(
        tables.read_parquet(pl["parquet"]).to_pylist(),
        "pseudo-label-datasets",
        "Pseudo-label datasets per method: labels, images per label, source top-1",
        location=config.root,
    )
    publish_markdown(
        tr_md,
        "transfer-table",
        "Top-1 of each source fine-tuned on each target",
        location=config.root,
    )
    publish_table(
        rows,
        "transfer-rows",
        "Transfer results, one row per (target, method)",
        location=config.root,
    )
    return {"pseudo_labels": pl_md, "transfer": tr_md}
