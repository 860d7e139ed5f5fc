"""Ingest images into WebDataset shards: sources -> plan -> one shard per work unit.

1. A source is an image folder tree (class sub-folders give a known label) or a manifest
   file (Parquet, JSONL or CSV) with an ``image`` column (path relative to the manifest,
   absolute path or fsspec/http URL) and optional ``caption``, ``hashtags``, ``label``,
   ``boxes`` (:mod:`cvpipe.data.sources`).
2. :func:`prepare_plan` lists the source once, streamed, and publishes the plan, the
   frozen view of the partition (:mod:`cvpipe.data.plan`).
3. :func:`ingest_shard` is one work unit: it reads its row group, validates each image
   with the reader's own rules and caps (header and structure, no pixel decoding on the
   hot path; ``verify="decode"`` decodes too), and publishes the tar, the rejects table
   and, last, the shard index, which carries the tar's checksum and sample counts. The
   index is the commit: a unit whose index is committed is skipped, and an index is
   never visible before its tar.

Every plan row ends as exactly one sample in the tar or one reject row: for every shard
samples in = written + rejected. Reads are bounded (size cap, regular files only,
network reads with a timeout), so no row can hang or exhaust a worker.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from cvpipe.core import storage, tables
from cvpipe.core.stage import Resources, Stage, Unit, run_stage
from cvpipe.data import boxes as boxes_mod
from cvpipe.data import images
from cvpipe.data.config import DEFAULT_FETCH_TIMEOUT_S, IngestConfig
from cvpipe.data.plan import (  # noqa: F401  (the ingest API: plan helpers re-exported)
    PLAN,
    build_plan,
    make_key,
    plan_rows_count,
    plan_shard_count,
    plan_url,
    prepare_plan,
    read_plan_group,
    write_plan,
)
from cvpipe.data.shards import (
    DEFAULT_MAX_MEMBER_BYTES,
    NOT_SAMPLE_REASONS,
    ShardWriter,
    encode_meta,
    loads_json,
    shard_id,
    shard_url,
    unit_url,
)
from cvpipe.data.sources import MANIFEST_SUFFIXES, OPTIONAL_COLUMNS  # noqa: F401

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
    parsed = loads_json(value)
    if not isinstance(parsed, list):
        raise ValueError(f"{what} must be a JSON list")
    return parsed


def _check_hashtags(tags: list) -> list:
    bad = next((t for t in tags if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"hashtag {bad!r} is not a string")
    return tags


def _read_image(row: dict[str, Any], max_bytes: int, timeout: float) -> bytes:
    """The image's bytes, bounded, or a RejectedImage that says why not."""
    raw = row.get("image_raw")  # the real bytes of a local path that is not UTF-8
    path = row["image"] if raw is None else os.fsdecode(raw)
    try:
        return storage.read_bytes(path, max_bytes, timeout)
    except FileNotFoundError:
        raise images.RejectedImage("missing_file", f"{row['image']} does not exist") from None
    except storage.NotRegularFile as e:
        raise images.RejectedImage("not_a_regular_file", str(e)) from None
    except IsADirectoryError:
        raise images.RejectedImage("not_a_regular_file", f"{row['image']} is a folder") from None
    except storage.FileTooLarge as e:
        raise images.RejectedImage("file_too_large", str(e)) from None
    except storage.FetchTimeout as e:
        raise images.RejectedImage("fetch_timeout", str(e)) from None
    except storage.FetchFailed as e:
        raise images.RejectedImage("fetch_failed", str(e)) from None
    except (OSError, ValueError) as e:  # permissions, I/O errors, a bad URL
        raise images.RejectedImage("unreadable_file", f"{type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class Limits:
    """The bounds and checks of one ingest unit (from its config)."""

    max_pixels: int = images.DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # = the reader's member cap
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    verify: str = "header"  # "header" | "decode"

    @classmethod
    def of(cls, config: Any) -> Limits:
        if config is None:
            return cls()
        return cls(
            max_pixels=config.max_pixels,
            max_bytes=config.max_member_bytes,
            fetch_timeout_s=config.fetch_timeout_s,
            verify=config.verify,
        )


def _prepare(
    row: dict[str, Any], limits: Limits, box_labels: Sequence[str] | None = None
) -> tuple[str, bytes, dict[str, Any], list[boxes_mod.DroppedBox]]:
    """Validate one plan row; returns (extension, bytes, metadata, dropped boxes) or
    raises RejectedImage. A bad box is dropped (the image keeps its good boxes)."""
    if row.get("error_reason"):
        raise images.RejectedImage(row["error_reason"], row.get("error_detail") or "")
    if row["duplicate"]:
        raise images.RejectedImage("duplicate_key", f"{row['source']} is listed more than once")
    try:
        hashtags = _parse_list(row["hashtags"], "hashtags")
        if hashtags is not None:
            hashtags = _check_hashtags(hashtags)
        boxes = _parse_list(row["boxes"], "boxes")
    except (ValueError, TypeError, AttributeError) as e:
        raise images.RejectedImage("bad_metadata", str(e)) from None
    data = _read_image(row, limits.max_bytes, limits.fetch_timeout_s)
    header = images.inspect(data, limits.max_pixels)
    ext = images.SHARD_EXTENSION.get(header.format)
    notes: list[str] = []
    if ext is None:  # BMP, GIF, TIFF, AVIF...: shards carry only jpg/png/webp
        data, ext = images.reencode_png(data, limits.max_pixels, notes), "png"
        if len(data) > limits.max_bytes:
            raise images.RejectedImage(
                "file_too_large", f"as PNG {len(data)} bytes > cap {limits.max_bytes}"
            )
    elif limits.verify == "decode":
        images.decode(data, limits.max_pixels)
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
        "note": "; ".join(notes) or None,
        # The real bytes of a source path that is not UTF-8 (``source`` is escaped).
        "source_hex": row["source_raw"].hex() if row.get("source_raw") else None,
    }
    return ext, data, meta, dropped


class _Hashing:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._f.write(data)


def ingest_shard(
    root: str,
    partition: str,
    name: str,
    index: int,
    plan: str,
    config: Any = None,
    max_pixels: int | None = None,
) -> ShardStats:
    """Write shard ``index`` of a partition from its plan row group (the work of one
    :class:`IngestStage` unit; it overwrites, the stage skips committed shards)."""
    limits = Limits.of(config)
    if max_pixels is not None:
        limits = Limits(max_pixels, limits.max_bytes, limits.fetch_timeout_s, limits.verify)
    tar_url = shard_url(root, partition, name, index)
    sid = shard_id(tar_url)
    stats = ShardStats(sid)
    index_rows: list[dict[str, Any]] = []
    reject_rows: list[dict[str, Any]] = []

    def reject(key: str, reason: str, detail: str) -> None:
        stats.rejects[reason] += 1
        reject_rows.append(
            {"key": key, "shard": sid, "stage": "ingest", "reason": reason, "detail": detail}
        )

    def samples():
        for row in read_plan_group(plan, index).to_pylist():
            stats.samples += 1
            try:
                ext, data, meta, dropped = _prepare(
                    row, limits, getattr(config, "box_labels", None)
                )
                members = {ext: data, "json": encode_meta(meta)}
            except images.RejectedImage as e:
                reject(row["key"], e.reason, e.detail)
                continue
            except Exception as e:  # one bad row costs one reject row, never the unit
                reject(row["key"], "unexpected_error", f"{type(e).__name__}: {e}")
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
            yield row["key"], members

    # The tar is committed first, then the rejects, then the index (the unit's commit),
    # which records the tar's checksum: an index is never visible for a missing tar.
    with storage.open_atomic(tar_url) as f:
        out = _Hashing(f)
        writer = ShardWriter(out)  # type: ignore[arg-type]
        for key, members in samples():
            writer.add(key, members)
        writer.close()
    lineage = tables.lineage(config, stage="ingest", partition=partition)
    rejects_url = unit_url(root, "rejects/ingest", sid)
    tables.write_parquet(tables.from_rows(reject_rows, tables.REJECTS), rejects_url, lineage)
    shard_facts = {
        "tar_sha256": out.sha256.hexdigest(),
        "tar_bytes": out.size,
        "samples_in": stats.samples,
        "written": stats.written,
        "rejected": sum(stats.rejects.values()),
        "dropped_boxes": sum(stats.dropped_boxes.values()),
    }
    tables.write_parquet(
        tables.from_rows(index_rows, tables.SHARD_INDEX),
        unit_url(root, "index", sid),
        {**lineage, **shard_facts},
    )
    return stats


def committed_stats(root: str, sid: str) -> ShardStats:
    """Stats of a unit an earlier run committed, read back from its tables."""
    written = tables.num_rows(unit_url(root, "index", sid))
    rejects = tables.read_parquet(unit_url(root, "rejects/ingest", sid), columns=["reason"])
    reasons = Counter(rejects.column("reason").to_pylist())
    box_rows = Counter({r: n for r, n in reasons.items() if r in boxes_mod.REASONS})
    counts = reasons - box_rows
    return ShardStats(sid, samples=written + sum(counts.values()), written=written,
                      rejects=counts, skipped=True, dropped_boxes=box_rows)  # fmt: skip


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
    """Rejected samples of a stage, in total and by reason, from per-shard ``.rejects``
    counts; rows about members rather than samples (``ignored_member``: a pickle or an
    unknown member beside a good image) are counted apart, so samples in = written +
    rejected holds."""
    by_reason: Counter = Counter()
    for s in stats:
        by_reason.update(s.rejects)
    ignored = {r: n for r, n in by_reason.items() if r in NOT_SAMPLE_REASONS}
    samples = {r: n for r, n in by_reason.items() if r not in NOT_SAMPLE_REASONS}
    dropped: Counter = Counter()
    for s in stats:
        dropped.update(getattr(s, "dropped_boxes", None) or {})
    out = {
        "rejected": sum(samples.values()),
        "rejects_by_reason": dict(sorted(samples.items())),
        "ignored_members": sum(ignored.values()),
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
    # Every read of a unit is bounded (fetch timeout, size cap); this bounds the unit, so
    # a stuck one fails and is retried instead of holding a worker.
    timeout_s = 3600.0

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
            shard_url(c.root, c.partition, c.name, unit.index),
            unit_url(c.root, "rejects/ingest", sid),
            unit_url(c.root, "index", sid),  # the commit: published last
        ]

    def process(self, unit: Unit) -> ShardStats:
        c = self.config
        return ingest_shard(c.root, c.partition, c.name, unit.index, unit.inputs[0], c)

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
