"""Materialize a selection as WebDataset shards for student training.

One work unit = one input shard -> one output shard ``OUT/shards/<partition>/<stem>.tar``
holding that shard's selected images, each replicated once per class it was selected
for (key ``{key}_c{class}``), image bytes copied as they are. The sample json keeps the
source metadata and adds the pseudo-label class name in ``label`` (what
:class:`cvpipe.data.loader.ShardDataset` reads with ``classes=teacher classes``), the source
key, and a ``pseudo`` object: class index, score, rank, teacher (checkpoint hash),
top_p, top_k. A unit whose tar is committed is skipped; a shard with nothing selected
still gets an (empty) tar, so a rerun knows it is done.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.parquet as pq

from cvpipe.core import tables
from cvpipe.core.storage import is_committed, open_atomic, url_to_fs
from cvpipe.data.shards import Sample, ShardWriter, encode_meta, iter_shard, shard_id, unit_url
from cvpipe.models import load_info, model_id

STAGE = "materialize"


@dataclass
class MaterializeStats:
    shard: str
    selected: int = 0  # selection rows of this shard
    images: int = 0  # distinct source images written
    written: int = 0  # samples written (images x their selected classes)
    missing: int = 0  # selection rows whose key was not found in the shard
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Provenance:
    teacher: str | None  # the checkpoint's model id
    top_p: int
    top_k: int
    classes: tuple[str, ...]


def output_url(out: str, sid: str) -> str:
    return unit_url(out, "shards", sid, ".tar")


def provenance(selection_url: str, checkpoint: str | None = None) -> Provenance:
    """What each sample records, from the selection's lineage; class names come from
    ``checkpoint`` when given, else from the lineage (or the checkpoint it names)."""
    lin = tables.read_lineage(selection_url)
    teacher = lin.get("model_id")
    if checkpoint is not None:
        cid = model_id(checkpoint)
        if teacher and cid != teacher:
            raise ValueError(f"selection was made by teacher {teacher}, not {checkpoint} ({cid})")
        teacher, classes = cid, load_info(checkpoint).classes
    elif lin.get("classes"):
        classes = lin["classes"]
    elif lin.get("checkpoint"):
        classes = load_info(lin["checkpoint"]).classes
    else:
        raise ValueError("the selection names no class list: pass the teacher checkpoint")
    return Provenance(teacher, int(lin["top_p"]), int(lin["top_k"]), tuple(classes))


def selection_rows(selection_url: str, sid: str) -> dict[str, list[tuple[int, float, int]]]:
    """The selection rows of one shard, by key: [(class, score, rank)], class order.
    The selection is written in shard order, one row group per shard, so the filter
    reads only that shard's row groups."""
    fs, path = url_to_fs(selection_url)
    t = pq.read_table(
        path,
        filesystem=fs,
        columns=["key", "label", "score", "rank"],
        filters=[("shard", "==", sid)],
    )
    rows: dict[str, list[tuple[int, float, int]]] = defaultdict(list)
    for k, c, s, r in zip(
        t.column("key").to_pylist(),
        t.column("label").to_pylist(),
        t.column("score").to_pylist(),
        t.column("rank").to_pylist(),
        strict=True,
    ):
        rows[k].append((c, s, r))
    for v in rows.values():
        v.sort()
    return rows


def _meta(sample: Sample, cls: int, score: float, rank: int, prov: Provenance) -> dict[str, Any]:
    meta = dict(sample.meta)
    if "label" in meta:  # a label the source had is kept for measuring pseudo-label precision
        meta["source_label"] = meta.pop("label")
    meta["label"] = prov.classes[cls]
    meta["source_key"] = sample.key
    meta["source_shard"] = sample.shard
    meta["pseudo"] = {
        "class": cls,
        "score": score,
        "rank": rank,
        "teacher": prov.teacher,
        "top_p": prov.top_p,
        "top_k": prov.top_k,
    }
    return meta


def materialize_shard(
    selection_url: str, shard_url: str, out: str, checkpoint: str | None = None
) -> MaterializeStats:
    """One work unit: write the selected samples of one input shard."""
    sid = shard_id(shard_url)
    url = output_url(out, sid)
    if is_committed(url):
        return _committed_stats(url, sid)
    prov = provenance(selection_url, checkpoint)
    wanted = selection_rows(selection_url, sid)
    stats = MaterializeStats(sid, selected=sum(len(v) for v in wanted.values()))
    found: set[str] = set()
    with open_atomic(url) as f:
        writer = ShardWriter(f)
        if wanted:
            for item in iter_shard(shard_url, stage=STAGE, decode=False):
                if not isinstance(item, Sample) or item.key not in wanted:
                    continue
                found.add(item.key)
                stats.images += 1
                for cls, score, rank in wanted[item.key]:
                    if not 0 <= cls < len(prov.classes):
                        raise ValueError(f"class {cls} outside the teacher's {len(prov.classes)}")
                    meta = _meta(item, cls, score, rank, prov)
                    writer.add(
                        f"{item.key}_c{cls}", {item.ext: item.data, "json": encode_meta(meta)}
                    )
                    stats.written += 1
        writer.close()
    stats.missing = sum(len(v) for k, v in wanted.items() if k not in found)
    return stats


def _committed_stats(url: str, sid: str) -> MaterializeStats:
    keys = set()
    written = 0
    for item in iter_shard(url, stage=STAGE, decode=False):
        if isinstance(item, Sample):
            written += 1
            keys.add(item.meta.get("source_key", item.key))
    return MaterializeStats(sid, selected=written, images=len(keys), written=written, skipped=True)


def materialize(
    selection_url: str, shard_urls: Sequence[str], out: str, checkpoint: str | None = None
) -> list[MaterializeStats]:
    """Every shard in turn (a flow maps :func:`materialize_shard` instead)."""
    return [materialize_shard(selection_url, u, out, checkpoint) for u in shard_urls]


def pseudo_label_precision(
    urls: Sequence[str], truth: Mapping[str, str] | None = None
) -> tuple[float, int]:
    """Share of materialized samples whose pseudo-label is the true label, and how many
    samples could be checked. The truth is the source's own label (kept as
    ``source_label``) or, for sources ingested without labels, ``truth`` keyed by the
    basename of the sample's ``source`` path. NaN when nothing could be checked."""
    right = checked = 0
    for url in urls:
        for s in iter_shard(url, stage=STAGE, decode=False):
            if not isinstance(s, Sample):
                continue
            source = posixpath.basename(str(s.meta.get("source", "")))
            true = truth.get(source) if truth is not None else s.meta.get("source_label")
            if true is None:
                continue
            checked += 1
            right += str(true) == s.meta.get("label")
    return (right / checked if checked else float("nan")), checked


def relabel_shard(labels_url: str, shard_url: str, out: str) -> MaterializeStats:
    """One work unit: the samples of one shard that ``labels_url`` (a table with ``key``
    and ``label`` columns, e.g. anchor labels) labels, with that label in their json
    (the source's own label is kept as ``source_label``). Bytes are copied, not decoded;
    writes ``OUT/shards/<partition>/<stem>.tar``, skipped if committed."""
    sid = shard_id(shard_url)
    url = output_url(out, sid)
    if is_committed(url):
        return _committed_stats(url, sid)
    t = tables.read_parquet(labels_url, columns=["key", "label"])
    wanted = dict(zip(t.column("key").to_pylist(), t.column("label").to_pylist(), strict=True))
    stats = MaterializeStats(sid, selected=len(wanted))
    with open_atomic(url) as f:
        writer = ShardWriter(f)
        for item in iter_shard(shard_url, stage=STAGE, decode=False):
            if not isinstance(item, Sample) or item.key not in wanted:
                continue
            meta = dict(item.meta)
            if "label" in meta:
                meta["source_label"] = meta.pop("label")
            meta["label"] = wanted[item.key]
            writer.add(item.key, {item.ext: item.data, "json": encode_meta(meta)})
            stats.images += 1
            stats.written += 1
        writer.close()
    stats.missing = stats.selected - stats.written
    return stats
