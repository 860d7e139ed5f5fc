"""Pseudo-boxes: a detector (the teacher) run over unlabeled shards, and the boxed
images materialized as shards for a student detector.

:class:`PseudoBoxStage` (one unit per input shard) writes
``OUT/pseudo_boxes/<partition>/<stem>.parquet`` (tables.PSEUDO_BOXES: key, shard, boxes
``[[x1, y1, x2, y2], ...]`` in the image's pixels, labels, scores) for every readable
image of the shard, with the boxes that pass :func:`filter_detections`: a score at
least the threshold (per class when given; the semi-supervised detection literature
keeps 0.7-0.9: Unbiased Teacher 0.7, STAC 0.9), then NMS. ``labels`` index the
teacher's classes (0-based); the lineage names them, with the teacher's model id and
the thresholds. Unreadable images go to ``OUT/rejects/pseudo_boxes/``.

:class:`BoxMaterializeStage` (one unit per input shard) copies the images with at
least ``min_boxes`` pseudo-boxes into ``OUT/shards/<partition>/<stem>.tar`` (the
classification materialize stage's layout and writer): the json's ``boxes`` become the
pseudo-boxes (``{"bbox", "label", "score"}``; boxes the source had are kept as
``source_boxes``), with a ``pseudo`` object of provenance (teacher, thresholds).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cvpipe import models
from cvpipe.core import tables
from cvpipe.core.stage import PermanentError, Resources, Stage, Unit
from cvpipe.core.storage import expand_specs, open_atomic
from cvpipe.data.loader import ShardDataset, make_loader
from cvpipe.data.shards import Sample, ShardWriter, encode_meta, iter_shard, shard_id, unit_url
from cvpipe.label.config import BoxMaterializeConfig, PseudoBoxConfig
from cvpipe.label.materialize import output_url

STAGE = "pseudo_boxes"


def filter_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    threshold: float | torch.Tensor,
    nms_iou: float = 0.5,
    class_agnostic: bool = False,
) -> torch.Tensor:
    """Indices of the detections to keep, best score first: those scoring at least
    their threshold (a number, or a tensor indexed by label), then NMS at ``nms_iou``
    within each class (or across classes)."""
    from torchvision.ops import batched_nms, nms

    if isinstance(threshold, torch.Tensor):
        floor = threshold.to(scores.device)[labels]
    else:
        floor = torch.full_like(scores, float(threshold))
    idx = torch.nonzero(scores >= floor).flatten()
    if len(idx) == 0:
        return idx
    b, s, c = boxes[idx].float(), scores[idx].float(), labels[idx]
    keep = nms(b, s, nms_iou) if class_agnostic else batched_nms(b, s, c, nms_iou)
    return idx[keep]


def thresholds_by_label(
    classes: Sequence[str], default: float, per_class: dict[str, float]
) -> torch.Tensor:
    """The threshold of each detector label (0 = background, i + 1 = classes[i])."""
    unknown = sorted(set(per_class) - set(classes))
    if unknown:
        raise PermanentError(f"class_thresholds names unknown classes {unknown}")
    return torch.tensor(
        [default] + [per_class.get(c, default) for c in classes], dtype=torch.float64
    )


@dataclass
class PseudoBoxStats:
    shard: str
    images: int = 0
    boxed: int = 0  # images with at least one box kept
    boxes: int = 0
    rejects: Counter = field(default_factory=Counter)
    skipped: bool = False


def pseudo_boxes_url(out: str, sid: str) -> str:
    return unit_url(out, STAGE, sid)


def rejects_url(out: str, sid: str) -> str:
    return unit_url(out, f"rejects/{STAGE}", sid)


def _tensor_item(s: Sample) -> dict[str, Any]:
    from torchvision.transforms.v2 import functional as TF

    return {"image": TF.to_dtype(TF.pil_to_tensor(s.image), torch.float32, scale=True)}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    samples = [it for it in items if "reject" not in it]
    return {
        "images": [it["image"] for it in samples],
        "keys": [it["key"] for it in samples],
        "rejects": [it["reject"] for it in items if "reject" in it],
    }


class PseudoBoxStage(Stage[PseudoBoxConfig, PseudoBoxStats]):
    """The teacher over one shard per unit (see the module's docstring); the model is
    loaded once per worker process in :meth:`setup`."""

    name = "pseudo-boxes"
    resources = Resources(cpus=1, gpus=1)

    def __init__(self, config: PseudoBoxConfig) -> None:
        super().__init__(config)
        self.model: torch.nn.Module | None = None
        self.info: models.ModelInfo | None = None
        self.thresholds: torch.Tensor | None = None
        self.model_id = ""

    def units(self) -> list[Unit]:
        return [Unit(shard_id(u), (u,)) for u in expand_specs(self.config.shards, ".tar")]

    def outputs(self, unit: Unit) -> list[str]:
        out = self.config.out
        return [rejects_url(out, unit.name), pseudo_boxes_url(out, unit.name)]

    def committed(self, unit: Unit) -> bool:
        """Committed by this config; a unit another config committed under the same OUT
        is an error (its boxes would silently stand for this config's)."""
        if not super().committed(unit):
            return False
        have = tables.read_lineage(pseudo_boxes_url(self.config.out, unit.name)).get("config_hash")
        if have != tables.config_hash(self.config):
            raise PermanentError(
                f"{pseudo_boxes_url(self.config.out, unit.name)} was written by another "
                f"config (hash {have}, now {tables.config_hash(self.config)}): use a new OUT"
            )
        return True

    def setup(self) -> None:
        c = self.config
        self.device = models.resolve_device(c.device)
        self.model, self.info = models.load_detector(c.checkpoint, self.device)
        self.model_id = models.model_id(c.checkpoint)
        self.thresholds = thresholds_by_label(self.info.classes, c.threshold, c.class_thresholds)

    def teardown(self) -> None:
        self.model = None

    def lineage(self, sid: str) -> dict[str, Any]:
        assert self.info is not None
        return tables.lineage(
            self.config,
            stage=STAGE,
            shard=sid,
            checkpoint=self.config.checkpoint,
            model_id=self.model_id,
            teacher_run=self.info.lineage.get("run_hash"),
            classes=self.info.classes,
            threshold=self.config.threshold,
            class_thresholds=self.config.class_thresholds,
            nms_iou=self.config.nms_iou,
        )

    @torch.no_grad()
    def process(self, unit: Unit) -> PseudoBoxStats:
        assert self.model is not None and self.thresholds is not None, "setup() first"
        c, sid = self.config, unit.name
        ds = ShardDataset([unit.inputs[0]], None, stage=STAGE, sample_fn=_tensor_item)
        stats = PseudoBoxStats(sid)
        rows, reject_rows = [], []
        cuda = self.device.type == "cuda"
        with models.cpu_threads(c.cpu_threads):
            for batch in make_loader(ds, c.batch_size, c.num_workers, collate_fn=_collate):
                reject_rows += batch["rejects"]
                stats.rejects.update(r["reason"] for r in batch["rejects"])
                if not batch["images"]:
                    continue
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    dets = self.model([x.to(self.device) for x in batch["images"]])
                for key, d in zip(batch["keys"], dets, strict=True):
                    b, s, lab = d["boxes"].float().cpu(), d["scores"].float().cpu(), d["labels"]
                    lab = lab.cpu()
                    keep = filter_detections(b, s, lab, self.thresholds, c.nms_iou,
                                             c.class_agnostic_nms)  # fmt: skip
                    rows.append({
                        "key": key, "shard": sid,
                        "boxes": b[keep].tolist(),
                        "labels": (lab[keep] - 1).tolist(),  # detector label i + 1 = class i
                        "scores": s[keep].tolist(),
                    })  # fmt: skip
                    stats.images += 1
                    stats.boxes += len(keep)
                    stats.boxed += len(keep) > 0
        lin = self.lineage(sid)
        # Rejects first, the boxes last: the boxes table is the unit's commit.
        tables.write_parquet(tables.from_rows(reject_rows, tables.REJECTS),
                             rejects_url(c.out, sid), lin)  # fmt: skip
        tables.write_parquet(tables.from_rows(rows, tables.PSEUDO_BOXES),
                             pseudo_boxes_url(c.out, sid), lin)  # fmt: skip
        return stats

    def read_back(self, unit: Unit) -> PseudoBoxStats:
        t = tables.read_parquet(pseudo_boxes_url(self.config.out, unit.name), columns=["labels"])
        counts = [len(v) for v in t.column("labels").to_pylist()]
        rejects = tables.read_parquet(rejects_url(self.config.out, unit.name), columns=["reason"])
        reasons = Counter(rejects.column("reason").to_pylist())
        return PseudoBoxStats(unit.name, images=len(counts), boxed=sum(n > 0 for n in counts),
                              boxes=sum(counts), rejects=reasons, skipped=True)  # fmt: skip

    def describe(self, stats: PseudoBoxStats) -> str:
        return f"{stats.shard}: {stats.boxes} boxes on {stats.boxed}/{stats.images} images"

    def summarize(self, stats: Sequence[PseudoBoxStats]) -> dict[str, Any]:
        images = sum(s.images for s in stats)
        rejects: Counter = Counter()
        for s in stats:
            rejects.update(s.rejects)
        return {
            "shards": len(stats),
            "shards_skipped": sum(s.skipped for s in stats),
            "images": images,
            "images_boxed": sum(s.boxed for s in stats),
            "boxes": sum(s.boxes for s in stats),
            "boxes_per_image": sum(s.boxes for s in stats) / images if images else math.nan,
            "rejected": sum(rejects.values()),
            "rejects_by_reason": dict(sorted(rejects.items())),
        }


# --------------------------------------------------------------------------- materialize


@dataclass
class BoxMaterializeStats:
    shard: str
    images: int = 0  # images with pseudo-boxes rows
    written: int = 0  # images written (at least min_boxes boxes)
    boxes: int = 0  # boxes written
    missing: int = 0  # pseudo-box rows whose key is not in the shard
    skipped: bool = False


def _pseudo_meta(sample: Sample, row: dict[str, Any], prov: dict[str, Any]) -> dict[str, Any]:
    classes = prov["classes"]
    meta = dict(sample.meta)
    if meta.get("boxes") is not None:  # kept for measuring pseudo-box quality
        meta["source_boxes"] = meta.pop("boxes")
    meta["boxes"] = [
        {"bbox": [float(v) for v in b], "label": classes[c], "score": float(s)}
        for b, c, s in zip(row["boxes"], row["labels"], row["scores"], strict=True)
    ]
    meta["source_key"], meta["source_shard"] = sample.key, sample.shard
    meta["pseudo"] = {
        "teacher": prov.get("model_id"),
        "threshold": prov.get("threshold"),
        "class_thresholds": prov.get("class_thresholds") or None,
        "nms_iou": prov.get("nms_iou"),
    }
    return meta


class BoxMaterializeStage(Stage[BoxMaterializeConfig, BoxMaterializeStats]):
    """One unit per input shard: its pseudo-boxed images as a new shard (see the
    module's docstring). Bytes are copied, not decoded."""

    name = "materialize-boxes"
    resources = Resources(cpus=1)

    def units(self) -> list[Unit]:
        return [Unit(shard_id(u), (u,)) for u in expand_specs(self.config.shards, ".tar")]

    def outputs(self, unit: Unit) -> list[str]:
        return [output_url(self.config.out, unit.name)]

    def process(self, unit: Unit) -> BoxMaterializeStats:
        c, sid = self.config, unit.name
        src = pseudo_boxes_url(c.pseudo_boxes, sid)
        prov = tables.read_lineage(src)
        if not prov.get("classes"):
            raise PermanentError(f"{src} names no classes in its lineage")
        wanted = {r["key"]: r for r in tables.read_parquet(src).to_pylist()}
        stats = BoxMaterializeStats(sid, images=len(wanted))
        found: set[str] = set()
        with open_atomic(output_url(c.out, sid)) as f:
            writer = ShardWriter(f)
            for item in iter_shard(unit.inputs[0], stage="materialize", decode=False):
                if not isinstance(item, Sample) or item.key not in wanted:
                    continue
                found.add(item.key)
                row = wanted[item.key]
                if len(row["labels"]) < c.min_boxes:  # too few boxes kept: left out
                    continue
                meta = _pseudo_meta(item, row, prov)
                writer.add(item.key, {item.ext: item.data, "json": encode_meta(meta)})
                stats.written += 1
                stats.boxes += len(row["labels"])
            writer.close()
        stats.missing = len(set(wanted) - found)
        return stats

    def read_back(self, unit: Unit) -> BoxMaterializeStats:
        stats = BoxMaterializeStats(unit.name, skipped=True)
        for item in iter_shard(self.outputs(unit)[0], stage="materialize", decode=False):
            if isinstance(item, Sample):
                stats.written += 1
                stats.boxes += len(item.meta.get("boxes") or [])
        stats.images = stats.written
        return stats

    def summarize(self, stats: Sequence[BoxMaterializeStats]) -> dict[str, Any]:
        return {
            "shards": len(stats),
            "shards_skipped": sum(s.skipped for s in stats),
            **{k: sum(getattr(s, k) for s in stats) for k in ("images", "written", "boxes")},
            "missing": sum(s.missing for s in stats),
        }
