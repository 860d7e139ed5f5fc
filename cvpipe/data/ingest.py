"""Ingest images into WebDataset shards: sources -> plan -> one shard per work unit.

1. A source is an image folder tree (class sub-folders give a known label) or a manifest
   file (Parquet, JSONL or CSV) with an ``image`` column (path relative to the manifest,
   absolute path or fsspec URL) and optional ``caption``, ``hashtags``, ``label``,
   ``boxes``.
2. :func:`build_plan` lists the source once, in a deterministic order, gives every item
   a stable key, and writes the plan as Parquet with one row group per shard. The plan
   is the frozen view of the partition: a rerun reuses it, so it makes the same shards.
3. :func:`ingest_shard` is one work unit: it reads its row group, validates each image
   from its header and trailer (no pixel decoding on the hot path), and publishes the
   rejects table, the shard index table and, last, the tar. The tar is the commit: a
   unit whose tar is committed is skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cvpipe.core import tables
from cvpipe.core.stage import Resources, Stage, Unit, run_stage
from cvpipe.core.storage import is_committed, is_local, join, open_atomic, read_bytes, url_to_fs
from cvpipe.data import boxes as boxes_mod
from cvpipe.data import coco as coco_mod
from cvpipe.data import images
from cvpipe.data.config import IngestConfig
from cvpipe.data.shards import ShardWriter, encode_meta, shard_id, shard_url, unit_url

PLAN = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.string()),  # URL or path of the source image
        ("source", pa.string()),  # what a person recognizes: the relative path or the URL
        ("label", pa.string()),
        ("caption", pa.string()),
        ("hashtags", pa.string()),  # JSON list of strings
        ("boxes", pa.string()),  # JSON list of boxes
        ("duplicate", pa.bool_()),  # a later row with a key seen before
    ]
)
OPTIONAL_COLUMNS = ("label", "caption", "hashtags", "boxes")
MANIFEST_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")
SOURCE_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def make_key(partition: str, source: str) -> str:
    """A stable key, unique across the corpus: a readable slug of the source path plus a
    hash of (partition, source). Only ``[A-Za-z0-9_-]``, so WebDataset's rule that the
    key ends at the first dot of the member name cannot split it."""
    stem = source.rsplit(".", 1)[0] if "." in source.rsplit("/", 1)[-1] else source
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[-48:] or "img"
    digest = hashlib.sha1(f"{partition}\0{source}".encode()).hexdigest()[:12]
    return f"{slug}-{digest}"


def plan_url(root: str, partition: str, name: str) -> str:
    return join(root, "plans", partition, f"{name}.parquet")


def _scan_folder(src: str) -> list[dict[str, Any]]:
    fs, root = url_to_fs(src)
    rows = []
    for path in sorted(fs.find(root)):
        rel = os.path.relpath(path, root) if is_local(fs) else path[len(root.rstrip("/")) + 1 :]
        rel = rel.replace(os.sep, "/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if not rel.lower().endswith(SOURCE_IMAGE_SUFFIXES):
            continue
        parts = rel.split("/")
        label = parts[-2] if len(parts) >= 2 else None
        url = path if is_local(fs) else fs.unstrip_protocol(path)
        rows.append({"image": url, "source": rel, "label": label})
    return rows


def _read_manifest(src: str) -> list[dict[str, Any]]:
    fs, path = url_to_fs(src)
    lower = path.lower()
    if lower.endswith(".parquet"):
        table = pq.read_table(path, filesystem=fs)
    elif lower.endswith((".jsonl", ".json")):
        import pyarrow.json as pj

        with fs.open(path, "rb") as f:
            table = pj.read_json(f)
    else:
        import pyarrow.csv as pcsv

        with fs.open(path, "rb") as f:
            table = pcsv.read_csv(f)
    if "image" not in table.column_names:
        raise ValueError(f"manifest {src} has no 'image' column (columns: {table.column_names})")
    base = src.rsplit("/", 1)[0] if "/" in src else "."
    rows = []
    for row in table.to_pylist():
        image = row.get("image")
        image = "" if image is None else str(image)
        url = image if ("://" in image or os.path.isabs(image)) else join(base, image)
        # CSV has no null: an empty cell means "not given".
        fields = {k: (None if row.get(k) == "" else row.get(k)) for k in OPTIONAL_COLUMNS}
        rows.append({"image": url, "source": image, **fields})
    return rows


def _json_or_none(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value  # validated per row in the unit, where it can become a reject row
    return json.dumps(value)


def list_source(src: str) -> list[dict[str, Any]]:
    """The items of a source, in a deterministic order."""
    fs, path = url_to_fs(src)
    if fs.isdir(path):
        return _scan_folder(src)
    if path.lower().endswith(MANIFEST_SUFFIXES):
        return _read_manifest(src)
    raise ValueError(
        f"source {src} is neither a folder of images nor a manifest "
        f"({', '.join(MANIFEST_SUFFIXES)})"
    )


def build_plan(src: str, partition: str, shard_size: int, coco: str | None = None) -> pa.Table:
    """The plan table for a source: one row per item, keys assigned, duplicates marked.
    With ``coco`` (a COCO annotation file), ``src`` is its images folder."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    rows = coco_mod.manifest_rows(coco, src)[0] if coco else list_source(src)
    seen: set[str] = set()
    for row in rows:
        row["key"] = make_key(partition, row["source"])
        row["duplicate"] = row["key"] in seen
        seen.add(row["key"])
        row["label"] = None if row.get("label") is None else str(row["label"])
        row["caption"] = None if row.get("caption") is None else str(row["caption"])
        row["hashtags"] = _json_or_none(row.get("hashtags"))
        row["boxes"] = _json_or_none(row.get("boxes"))
    return pa.Table.from_pylist(rows, schema=PLAN)


def write_plan(plan: pa.Table, url: str, shard_size: int, config: Any) -> None:
    buf = io.BytesIO()
    meta = {tables.LINEAGE_KEY: json.dumps(tables.lineage(config, shard_size=shard_size)).encode()}
    pq.write_table(plan.replace_schema_metadata(meta), buf, row_group_size=shard_size)
    with open_atomic(url) as f:
        f.write(buf.getbuffer())


def prepare_plan(
    src: str, root: str, partition: str, name: str, shard_size: int, config: Any
) -> tuple[str, int]:
    """Build and publish the partition's plan, or reuse the one an earlier run of the
    same config published. Returns (plan URL, number of shards).

    A partition's plan is frozen: ingesting it again with another source, name or shard
    size would make different shards under the same names, so that is an error.
    """
    url = plan_url(root, partition, name)
    want = tables.config_hash(config)
    if is_committed(url):
        have = tables.read_lineage(url).get("config_hash")
        if have != want:
            raise ValueError(
                f"partition {partition!r} of {root} was ingested as {name!r} with another "
                f"config (hash {have}, now {want}): ingest into a new partition or root"
            )
        return url, plan_shard_count(url)
    plan = build_plan(src, partition, shard_size, getattr(config, "coco", None))
    if plan.num_rows == 0:
        raise ValueError(f"source {src} holds no images")
    write_plan(plan, url, shard_size, config)
    return url, plan_shard_count(url)


def plan_shard_count(url: str) -> int:
    fs, path = url_to_fs(url)
    return pq.ParquetFile(path, filesystem=fs).num_row_groups


def read_plan_group(url: str, index: int) -> pa.Table:
    fs, path = url_to_fs(url)
    return pq.ParquetFile(path, filesystem=fs).read_row_group(index)


# ------------------------------------------------------------------------- one unit


@dataclass
class ShardStats:
    shard: str
    samples: int = 0
    written: int = 0
    rejects: Counter = field(default_factory=Counter)
    skipped: bool = False  # committed by an earlier run
    dropped_boxes: Counter = field(default_factory=Counter)  # bad boxes of written images

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "samples": self.samples,
            "written": self.written,
            "rejected": sum(self.rejects.values()),
            "rejects": dict(self.rejects),
            "skipped": self.skipped,
            "dropped_boxes": dict(self.dropped_boxes),
        }


def _parse_list(value: str | None, what: str) -> list | None:
    if value is None:
        return None
    parsed = json.loads(value)
    if not isinstance(parsed, list):
        raise ValueError(f"{what} must be a JSON list")
    return parsed


def _prepare(
    row: dict[str, Any], max_pixels: int, box_labels: Sequence[str] | None = None
) -> tuple[str, bytes, dict[str, Any], list[boxes_mod.DroppedBox]]:
    """Validate one plan row; returns (extension, bytes, metadata, dropped boxes) or
    raises RejectedImage. A bad box is dropped (the image keeps its good boxes)."""
    if row["duplicate"]:
        raise images.RejectedImage("duplicate_key", f"{row['source']} is listed more than once")
    try:
        hashtags = _parse_list(row["hashtags"], "hashtags")
        boxes = _parse_list(row["boxes"], "boxes")
    except (ValueError, TypeError, AttributeError) as e:
        raise images.RejectedImage("bad_metadata", str(e)) from None
    try:
        data = read_bytes(row["image"])
    except FileNotFoundError:
        raise images.RejectedImage("missing_file", f"{row['image']} does not exist") from None
    except (OSError, ValueError) as e:
        raise images.RejectedImage("unreadable_file", f"{type(e).__name__}: {e}") from None
    header = images.inspect(data, max_pixels)
    ext = images.SHARD_EXTENSION.get(header.format)
    if ext is None:  # BMP, GIF, TIFF...: shards carry only jpg/png/webp
        data, ext = images.reencode_png(data, max_pixels), "png"
    dropped: list[boxes_mod.DroppedBox] = []
    if boxes is not None:
        checked = boxes_mod.validate_boxes(boxes, header.width, header.height, box_labels)
        boxes, dropped = checked.boxes, checked.dropped
    meta = {
        "source": row["source"],
        "width": header.width,
        "height": header.height,
        "label": row["label"],
        "caption": row["caption"],
        "hashtags": hashtags,
        "boxes": boxes,
    }
    return ext, data, meta, dropped


def ingest_shard(
    root: str,
    partition: str,
    name: str,
    index: int,
    plan: str,
    config: Any = None,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    box_labels: Sequence[str] | None = None,
) -> ShardStats:
    """Write shard ``index`` of a partition from its plan row group (the work of one
    :class:`IngestStage` unit; it overwrites, the stage skips committed shards)."""
    tar_url = shard_url(root, partition, name, index)
    sid = shard_id(tar_url)
    index_url = unit_url(root, "index", sid)
    rejects_url = unit_url(root, "rejects/ingest", sid)
    stats = ShardStats(sid)
    index_rows: list[dict[str, Any]] = []
    reject_rows: list[dict[str, Any]] = []

    def samples():
        for row in read_plan_group(plan, index).to_pylist():
            stats.samples += 1
            try:
                ext, data, meta, dropped = _prepare(row, max_pixels, box_labels)
            except images.RejectedImage as e:
                stats.rejects[e.reason] += 1
                reject_rows.append(
                    {
                        "key": row["key"],
                        "shard": sid,
                        "stage": "ingest",
                        "reason": e.reason,
                        "detail": e.detail,
                    }
                )
                continue
            stats.written += 1
            for d in dropped:  # rows about boxes, counted apart from rejected samples
                stats.dropped_boxes[d.reason] += 1
                detail = f"box {d.index}: {d.detail}"
                reject_rows.append({"key": row["key"], "shard": sid, "stage": "ingest",
                                    "reason": d.reason, "detail": detail})  # fmt: skip
            index_rows.append(
                {
                    "key": row["key"],
                    "shard": sid,
                    "width": meta["width"],
                    "height": meta["height"],
                    "label": meta["label"],
                    "caption": meta["caption"],
                }
            )
            yield row["key"], {ext: data, "json": encode_meta(meta)}

    # The tar streams to a hidden temp name (or an unfinished upload) while it fills;
    # the tables need the whole shard, so they are published after it is closed but
    # before the commit (the rename, or the marker).
    lineage = tables.lineage(config, stage="ingest", partition=partition)
    with open_atomic(tar_url) as f:
        writer = ShardWriter(f)
        for key, members in samples():
            writer.add(key, members)
        writer.close()
        tables.write_parquet(tables.from_rows(reject_rows, tables.REJECTS), rejects_url, lineage)
        tables.write_parquet(tables.from_rows(index_rows, tables.SHARD_INDEX), index_url, lineage)
    return stats


def committed_stats(root: str, sid: str) -> ShardStats:
    """Stats of a unit an earlier run committed, read back from its tables."""
    index = tables.read_parquet(unit_url(root, "index", sid), columns=["key"])
    rejects = tables.read_parquet(unit_url(root, "rejects/ingest", sid), columns=["reason"])
    reasons = Counter(rejects.column("reason").to_pylist())
    box_rows = Counter({r: n for r, n in reasons.items() if r in boxes_mod.REASONS})
    counts = reasons - box_rows
    return ShardStats(
        sid,
        samples=index.num_rows + sum(counts.values()),
        written=index.num_rows,
        rejects=counts,
        skipped=True,
        dropped_boxes=box_rows,
    )


def summarize(stats: list[ShardStats]) -> dict[str, Any]:
    """The ingest summary: shards, samples, rejects by reason, how many were skipped."""
    return {
        **shard_summary(stats),
        "samples": sum(s.samples for s in stats),
        "written": sum(s.written for s in stats),
        **reject_summary(stats),
    }


def shard_summary(stats: Sequence[Any]) -> dict[str, int]:
    """Shards of a stage and how many an earlier run had committed (``.skipped``)."""
    return {"shards": len(stats), "shards_skipped": sum(s.skipped for s in stats)}


def reject_summary(stats: Sequence[Any]) -> dict[str, Any]:
    """Rejects of a stage, in total and by reason, from per-shard ``.rejects`` counts."""
    by_reason: Counter = Counter()
    for s in stats:
        by_reason.update(s.rejects)
    dropped: Counter = Counter()
    for s in stats:
        dropped.update(getattr(s, "dropped_boxes", None) or {})
    out = {
        "rejected": sum(by_reason.values()),
        "rejects_by_reason": dict(sorted(by_reason.items())),
    }
    if dropped:  # boxes dropped from images that were written with their good boxes
        out["dropped_boxes"] = sum(dropped.values())
        out["dropped_boxes_by_reason"] = dict(sorted(dropped.items()))
    return out


# ------------------------------------------------------------------------- the stage


class IngestStage(Stage[IngestConfig, ShardStats]):
    """Ingest as a stage: unit ``i`` turns plan row group ``i`` into shard ``i`` of the
    partition. The plan is published first (:func:`prepare_plan`, phase one of the
    flow); the units are read from it."""

    name = "ingest"
    resources = Resources(cpus=1)

    def plan(self) -> str:
        c = self.config
        return plan_url(c.root, c.partition, c.name)

    def units(self) -> list[Unit]:
        c, plan = self.config, self.plan()
        return [
            Unit(f"{c.partition}/{c.name}-{i:06d}", (plan,), index=i)
            for i in range(plan_shard_count(plan))
        ]

    def _sid(self, unit: Unit) -> str:
        c = self.config
        return shard_id(shard_url(c.root, c.partition, c.name, unit.index))

    def outputs(self, unit: Unit) -> list[str]:
        c, sid = self.config, self._sid(unit)
        return [
            unit_url(c.root, "rejects/ingest", sid),
            unit_url(c.root, "index", sid),
            shard_url(c.root, c.partition, c.name, unit.index),
        ]

    def process(self, unit: Unit) -> ShardStats:
        c = self.config
        return ingest_shard(c.root, c.partition, c.name, unit.index, unit.inputs[0], c,
                            c.max_pixels, c.box_labels)  # fmt: skip

    def read_back(self, unit: Unit) -> ShardStats:
        return committed_stats(self.config.root, self._sid(unit))

    def describe(self, stats: ShardStats) -> str:
        state = "already committed" if stats.skipped else "committed"
        rejected = sum(stats.rejects.values())
        return f"{stats.shard} {state}: {stats.written} written, {rejected} rejected"

    def summarize(self, stats: Sequence[ShardStats]) -> dict[str, Any]:
        return summarize(list(stats))


def ingest_partition(config: IngestConfig) -> list[ShardStats]:
    """Ingest a whole partition in this process (no orchestrator): publish or reuse the
    plan, then run every unit; committed shards are skipped."""
    prepare_plan(config.source, config.root, config.partition, config.name,
                 config.shard_size, config)  # fmt: skip
    return run_stage(IngestStage(config))
