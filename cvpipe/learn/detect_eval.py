"""Detection evaluation: COCO mAP by torchmetrics' MeanAveragePrecision, per-class AP,
and a picture of detections.

:func:`evaluate_detector` scores a detection checkpoint on labeled shards. Images go to
the model at their own size (the detector resizes inside and maps its boxes back), so
predictions and ground truth are both in the image's pixels. It publishes, under
``out``::

    {split}_map.parquet        tables.DETECT_METRICS: mAP@[.5:.95], mAP@.5, mAP@.75, mAR@100
    {split}_per_class.parquet  tables.DETECT_PER_CLASS: AP and AP@.5 of every class
    {split}_boxes.png          the first test images, ground truth (green) and detections

A rerun with the same weights on the same shards reads the tables back. The metric
keeps the split's predictions in memory (it ranks them globally, as COCO evaluation
does): evaluation splits are held-out sets of thousands of images, not the corpus.
"""

from __future__ import annotations

import io
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field

from cvpipe import models
from cvpipe.core import tables
from cvpipe.core.config import runtime
from cvpipe.core.stage import Resources, Stage, Unit
from cvpipe.core.storage import is_committed, join, write_bytes_atomic
from cvpipe.data.boxes import to_arrays
from cvpipe.data.loader import ShardDataset, make_loader
from cvpipe.data.shards import Sample
from cvpipe.learn.stages import EvalJob
from cvpipe.learn.tasks.base import TaskBatch

DRAW_IMAGES = 8


def map_metric() -> Any:
    """COCO box mAP with per-class results (torchmetrics, faster-coco-eval backend)."""
    from torchmetrics.detection import MeanAveragePrecision

    return MeanAveragePrecision(
        iou_type="bbox", class_metrics=True, extended_summary=True, backend="faster_coco_eval"
    )


def _num(v: Any) -> float:
    """torchmetrics marks 'no data' as -1: NaN here, so means skip it."""
    x = float(v)
    return math.nan if x < 0 else x


def ap50_per_class(result: dict[str, Any]) -> dict[int, float]:
    """AP at IoU 0.5 of each class label, from the extended summary's precision array
    (IoU threshold x recall x class x area x max detections; -1 where undefined)."""
    precision = result["precision"]
    out = {}
    for k, label in enumerate(result["classes"].reshape(-1).tolist()):
        p = precision[0, :, k, 0, -1]
        p = p[p > -1]
        out[int(label)] = float(p.mean()) if len(p) else math.nan
    return out


class MAPMeter:
    """Validation mAP for the training loop: detections of each batch against its
    targets, computed once per epoch (the loss parts are not defined in eval mode)."""

    def __init__(self) -> None:
        self.metric = map_metric()
        self.n = 0

    def update(self, outputs: Any, batch: TaskBatch) -> None:
        if isinstance(outputs, list):  # detections (eval mode), not a loss dict
            cpu = [{k: v.detach().float().cpu() for k, v in o.items()} for o in outputs]
            for o in cpu:
                o["labels"] = o["labels"].long()
            targets = [{k: v.cpu() for k, v in t.items()} for t in batch.targets]
            self.metric.update(cpu, targets)
            self.n += len(outputs)

    def compute(self) -> dict[str, float]:
        if not self.n:
            return {}
        r = self.metric.compute()
        return {"map": _num(r["map"]), "map_50": _num(r["map_50"])}


# --------------------------------------------------------------------------- evaluation


def _plain_item(field_name: str, index: dict[str, int], s: Sample) -> dict[str, Any]:
    from torchvision.transforms.v2 import functional as TF

    coords, labels = to_arrays(s.meta.get(field_name) or [], index)
    image = TF.to_dtype(TF.pil_to_tensor(s.image), torch.float32, scale=True)
    return {
        "image": image,
        "target": {
            "boxes": torch.tensor(coords, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
        },
    }


def detection_dataset(
    urls: Sequence[str], classes: Sequence[str], stage: str, boxes_field: str = "boxes"
) -> ShardDataset:
    """Samples as float images in [0, 1] at their own size, with their boxes (labels
    1..K for ``classes``; boxes of other labels left out): for evaluation and drawing."""
    import functools

    index = {c: i + 1 for i, c in enumerate(classes)}
    return ShardDataset(
        list(urls), None, stage=stage,
        sample_fn=functools.partial(_plain_item, boxes_field, index),
    )  # fmt: skip


def collate_detection(items: list[dict[str, Any]]) -> TaskBatch:
    rejects = [it["reject"] for it in items if "reject" in it]
    samples = [it for it in items if "reject" not in it]
    return TaskBatch(
        [it["image"] for it in samples], [it["target"] for it in samples], len(samples), 0, rejects
    )


@dataclass(frozen=True)
class DetectEvalResult:
    checkpoint: str
    images: int
    boxes: int
    map: float
    map_50: float
    map_75: float
    mar_100: float
    images_per_s: float
    per_class: list[dict[str, Any]] = field(default_factory=list)  # tables.DETECT_PER_CLASS
    rejects: int = 0
    urls: dict[str, str] = field(default_factory=dict)

    def row(self, split: str) -> dict[str, Any]:
        return {
            "split": split,
            "images": self.images,
            "boxes": self.boxes,
            "map": self.map,
            "map_50": self.map_50,
            "map_75": self.map_75,
            "mar_100": self.mar_100,
            "images_per_s": self.images_per_s,
        }


def eval_urls(out: str, split: str) -> dict[str, str]:
    return {
        "metrics": join(out, f"{split}_map.parquet"),
        "per_class": join(out, f"{split}_per_class.parquet"),
        "png": join(out, f"{split}_boxes.png"),
    }


def evaluated(checkpoint: str, urls: Sequence[str], out: str, split: str = "test") -> bool:
    """True when ``out`` holds this split's scores of these weights on these shards."""
    u = eval_urls(out, split)
    if not (is_committed(u["per_class"]) and is_committed(u["metrics"])):
        return False
    lin = tables.read_lineage(u["metrics"])
    return lin.get("model_id") == models.model_id(checkpoint) and lin.get("shard_urls") == list(
        urls
    )


def read_eval(checkpoint: str, out: str, split: str = "test") -> DetectEvalResult:
    u = eval_urls(out, split)
    m = tables.read_parquet(u["metrics"]).to_pylist()[0]
    lin = tables.read_lineage(u["metrics"])
    return DetectEvalResult(
        checkpoint=checkpoint,
        images=m["images"],
        boxes=m["boxes"],
        map=m["map"],
        map_50=m["map_50"],
        map_75=m["map_75"],
        mar_100=m["mar_100"],
        images_per_s=m["images_per_s"],
        per_class=tables.read_parquet(u["per_class"]).to_pylist(),
        rejects=int(lin.get("rejects", 0)),
        urls=u,
    )


@torch.no_grad()
def evaluate_detector(
    checkpoint: str,
    urls: Sequence[str],
    out: str | None = None,
    *,
    split: str = "test",
    batch_size: int = 8,
    device: str = "auto",
    num_workers: int = 0,
    draw: int = DRAW_IMAGES,
) -> DetectEvalResult:
    """Score a detection checkpoint on labeled shards (see the module's docstring)."""
    urls = list(urls)
    if out is not None and evaluated(checkpoint, urls, out, split):
        return read_eval(checkpoint, out, split)
    dev = models.resolve_device(device)
    model, info = models.load_detector(checkpoint, dev)
    loader = make_loader(
        detection_dataset(urls, info.classes, stage="evaluate"), batch_size, num_workers,
        collate_fn=collate_detection,
    )  # fmt: skip
    metric = map_metric()
    gt: Counter = Counter()
    images = rejects = 0
    shown: list[tuple[torch.Tensor, dict[str, Any], dict[str, Any]]] = []
    start = time.perf_counter()
    for batch in loader:
        rejects += len(batch.rejects)
        if batch.size == 0:
            continue
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            preds = model([x.to(dev) for x in batch.inputs])
        preds = [{k: v.float().cpu() for k, v in p.items()} for p in preds]
        for p in preds:
            p["labels"] = p["labels"].long()
        metric.update(preds, batch.targets)
        for t in batch.targets:
            gt.update(t["labels"].tolist())
        for x, p, t in zip(batch.inputs, preds, batch.targets, strict=True):
            if len(shown) < draw:
                shown.append((x, p, t))
        images += batch.size
    seconds = time.perf_counter() - start
    if images == 0:
        raise ValueError(f"no readable image in {len(urls)} shard(s) to evaluate on")
    r = metric.compute()
    ap = dict(zip(r["classes"].reshape(-1).tolist(), r["map_per_class"].reshape(-1).tolist(),
                  strict=True))  # fmt: skip
    ap50 = ap50_per_class(r)
    per_class = [
        {
            "class_index": i,
            "class_name": name,
            "boxes": gt.get(i + 1, 0),
            "ap": _num(ap[i + 1]) if gt.get(i + 1) and i + 1 in ap else math.nan,
            "ap_50": ap50.get(i + 1, math.nan) if gt.get(i + 1) else math.nan,
        }
        for i, name in enumerate(info.classes)
    ]
    result = DetectEvalResult(
        checkpoint=checkpoint,
        images=images,
        boxes=sum(gt.values()),
        map=_num(r["map"]),
        map_50=_num(r["map_50"]),
        map_75=_num(r["map_75"]),
        mar_100=_num(r["mar_100"]),
        images_per_s=images / seconds if seconds > 0 else 0.0,
        per_class=per_class,
        rejects=rejects,
    )
    if out is None:
        return result
    u = eval_urls(out, split)
    lin = tables.lineage(None, stage="evaluate_detector", split=split, checkpoint=checkpoint,
                         model_id=models.model_id(checkpoint), shard_urls=urls,
                         classes=info.classes, rejects=rejects)  # fmt: skip
    if shown:
        write_bytes_atomic(u["png"], draw_detections(shown, info.classes))
    tables.write_parquet(tables.from_rows(per_class, tables.DETECT_PER_CLASS), u["per_class"], lin)
    tables.write_parquet(tables.from_rows([result.row(split)], tables.DETECT_METRICS),
                         u["metrics"], lin)  # fmt: skip
    return DetectEvalResult(**{**result.__dict__, "urls": u})


def draw_detections(
    shown: Sequence[tuple[torch.Tensor, dict[str, Any], dict[str, Any]]],
    classes: Sequence[str],
    min_score: float = 0.5,
    columns: int = 4,
    scale: int = 2,
) -> bytes:
    """A PNG grid of images with ground-truth boxes (green) and detections scoring at
    least ``min_score`` (red, labeled ``class score``)."""
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes

    def name(label: int) -> str:
        return classes[label - 1] if 1 <= label <= len(classes) else str(label)

    tiles = []
    for image, pred, target in shown:
        img = (image.clamp(0, 1) * 255).to(torch.uint8)
        img = torch.nn.functional.interpolate(img[None].float(), scale_factor=scale)[0]
        img = img.to(torch.uint8)
        if len(target["boxes"]):
            img = draw_bounding_boxes(img, target["boxes"] * scale, colors="lime", width=1)
        keep = pred["scores"] >= min_score
        if keep.any():
            labels = [f"{name(int(c))} {float(s):.2f}" for c, s in
                      zip(pred["labels"][keep], pred["scores"][keep], strict=True)]  # fmt: skip
            img = draw_bounding_boxes(img, pred["boxes"][keep] * scale, labels=labels,
                                      colors="red", width=2)  # fmt: skip
        tiles.append(img)
    h = max(t.shape[1] for t in tiles)
    w = max(t.shape[2] for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    grid = torch.zeros(3, rows * h, min(columns, len(tiles)) * w, dtype=torch.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[:, r * h : r * h + t.shape[1], c * w : c * w + t.shape[2]] = t
    buf = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- the stage


class DetectEvalJob(EvalJob):
    """A detection checkpoint to score on labeled shards: the unit of a
    :class:`DetectEvalStage`."""

    out: str = Field(description="writes {out}/{split}_map.parquet, _per_class.parquet, _boxes.png")
    batch_size: int = runtime(8, ge=1)


class DetectEvalStage(Stage[DetectEvalJob, DetectEvalResult]):
    name = "evaluate-detector"
    resources = Resources(cpus=1, gpus=1)
    retries = 1

    def units(self) -> list[Unit]:
        j = self.config
        return [Unit(f"{j.split} {j.checkpoint}", (j.checkpoint, *j.shards))]

    def outputs(self, unit: Unit) -> list[str]:
        u = eval_urls(self.config.out, self.config.split)
        return [u["per_class"], u["metrics"]]

    def committed(self, unit: Unit) -> bool:
        j = self.config
        return evaluated(j.checkpoint, j.shards, j.out, j.split)

    def process(self, unit: Unit) -> DetectEvalResult:
        j = self.config
        with models.cpu_threads(j.cpu_threads):
            return evaluate_detector(j.checkpoint, j.shards, j.out, split=j.split,
                                     batch_size=j.batch_size, device=j.device,
                                     num_workers=j.num_workers)  # fmt: skip

    def read_back(self, unit: Unit) -> DetectEvalResult:
        return read_eval(self.config.checkpoint, self.config.out, self.config.split)

    def describe(self, stats: DetectEvalResult) -> str:
        return f"{stats.checkpoint}: mAP {stats.map:.4f}, mAP@.5 {stats.map_50:.4f}"
