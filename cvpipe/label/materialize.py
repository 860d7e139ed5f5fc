"""Materialize a selection as WebDataset shards for student training.

One work unit = one input shard -> one output shard ``OUT/shards/<partition>/<stem>.tar``
holding that shard's selected images, each replicated once per class it was selected
for (key ``{key}_c{class}``), image bytes copied as they are. The sample json keeps the
source metadata and adds the pseudo-label class name in ``label`` (what
:class:`cvpipe.data.loader.ShardDataset` reads with ``classes=teacher classes``), the source
key, and a ``pseudo`` object: class index, score, rank, teacher (checkpoint hash),
top_p, top_k. A unit whose tar is committed is skipped; a shard with nothing selected
still gets an (empty) tar, so a rerun knows it is done.

Stages (one unit = one input shard): :class:`MaterializeStage` (a top-K selection),
:class:`RelabelStage` (a labels table per shard, e.g. anchor labels) and
:class:`LabelCheckStage` (samples per shard, and how many carry their true label: the
pseudo-label precision of an experiment, a map-side partial the flow sums).
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import pyarrow.parquet as pq

from cvpipe.core import tables
from cvpipe.core.stage import PermanentError, Resources, Stage, Unit, run_stage
from cvpipe.core.storage import expand_specs, is_committed, open_atomic, read_bytes, url_to_fs
from cvpipe.data.shards import (
    Sample,
    ShardWriter,
    encode_meta,
    ingest_root,
    iter_shard,
    shard_id,
    unit_url,
)
from cvpipe.label.config import LabelCheckConfig, MaterializeConfig, RelabelConfig
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
    labels: dict[str, int] = field(default_factory=dict)  # samples written per label

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


class ProvenanceError(PermanentError, ValueError):
    """The selection and the teacher named do not belong together (or no class list is
    known): every unit would fail the same way, so no unit is retried."""


def provenance(selection_url: str, checkpoint: str | None = None) -> Provenance:
    """What each sample records, from the selection's lineage; class names come from
    ``checkpoint`` when given, else from the lineage (or the checkpoint it names)."""
    lin = tables.read_lineage(selection_url)
    teacher = lin.get("model_id")
    if checkpoint is not None:
        cid = model_id(checkpoint)
        if teacher and cid != teacher:
            raise ProvenanceError(
                f"selection was made by teacher {teacher}, not {checkpoint} ({cid})"
            )
        teacher, classes = cid, load_info(checkpoint).classes
    elif lin.get("classes"):
        classes = lin["classes"]
    elif lin.get("checkpoint"):
        classes = load_info(lin["checkpoint"]).classes
    else:
        raise ProvenanceError("the selection names no class list: pass the teacher checkpoint")
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
    selection_url: str, shard_url: str, out: str, prov: Provenance
) -> MaterializeStats:
    """The work of one :class:`MaterializeStage` unit: write the selected samples of one
    input shard (it overwrites; the stage skips committed shards)."""
    sid = shard_id(shard_url)
    url = output_url(out, sid)
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
                    stats.labels[meta["label"]] = stats.labels.get(meta["label"], 0) + 1
        writer.close()
    stats.missing = sum(len(v) for k, v in wanted.items() if k not in found)
    return stats


def committed_stats(url: str, sid: str) -> MaterializeStats:
    """Stats of a shard an earlier run committed, read back from its tar (no images are
    decoded; ``selected`` is what was written, ``missing`` is not known any more)."""
    keys = set()
    labels: Counter[str] = Counter()
    for item in iter_shard(url, stage=STAGE, decode=False):
        if isinstance(item, Sample):
            keys.add(item.meta.get("source_key", item.key))
            labels[str(item.meta.get("label"))] += 1
    written = sum(labels.values())
    return MaterializeStats(sid, selected=written, images=len(keys), written=written,
                            skipped=True, labels=dict(labels))  # fmt: skip


def materialize(config: MaterializeConfig) -> list[MaterializeStats]:
    """Every shard of ``config`` in this process (a flow runs the units as tasks)."""
    return run_stage(MaterializeStage(config))


def summarize(stats: Sequence[MaterializeStats]) -> dict[str, Any]:
    return {
        "shards": len(stats),
        "shards_skipped": sum(s.skipped for s in stats),
        **{k: sum(getattr(s, k) for s in stats) for k in ("selected", "images", "written")},
        "missing": sum(s.missing for s in stats),
    }


@dataclass
class CheckStats:
    """Samples of one shard, and how many could be checked against a true label and
    carry it (their pseudo-label is right)."""

    shard: str
    samples: int = 0
    checked: int = 0
    right: int = 0
    skipped: bool = False


def check_shard(url: str, truth: Mapping[str, str] | None = None) -> CheckStats:
    """Count the samples of one shard and check their labels. The truth is the source's
    own label (kept as ``source_label`` by materialize and relabel) or, for sources
    ingested without labels, ``truth`` keyed by the basename of the sample's ``source``
    path. A shard of an ingest root with no truth to check is counted from its index
    table's footer; any other is streamed once, images not decoded."""
    sid = shard_id(url)
    root = ingest_root(url)
    index = unit_url(root, "index", sid) if root else None
    if truth is None and index and is_committed(index):  # ingest shards have no source_label
        return CheckStats(sid, samples=tables.num_rows(index))
    stats = CheckStats(sid)
    for s in iter_shard(url, stage=STAGE, decode=False):
        if not isinstance(s, Sample):
            continue
        stats.samples += 1
        source = posixpath.basename(str(s.meta.get("source", "")))
        true = truth.get(source) if truth is not None else s.meta.get("source_label")
        if true is None:
            continue
        stats.checked += 1
        stats.right += str(true) == s.meta.get("label")
    return stats


def read_truth(url: str) -> dict[str, str]:
    """Hidden labels from a CSV with ``image`` (a file name) and ``label`` columns."""
    rows = csv.DictReader(io.StringIO(read_bytes(url).decode()))
    return {r["image"]: r["label"] for r in rows}


def relabel_shard(labels_url: str, shard_url: str, out: str) -> MaterializeStats:
    """One work unit: the samples of one shard that ``labels_url`` (a table with ``key``
    and ``label`` columns, e.g. anchor labels) labels, with that label in their json
    (the source's own label is kept as ``source_label``). Bytes are copied, not decoded;
    writes ``OUT/shards/<partition>/<stem>.tar``, skipped if committed."""
    sid = shard_id(shard_url)
    url = output_url(out, sid)
    if is_committed(url):
        return committed_stats(url, sid)
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
            stats.labels[meta["label"]] = stats.labels.get(meta["label"], 0) + 1
        writer.close()
    stats.missing = stats.selected - stats.written
    return stats


# ------------------------------------------------------------------------- the stages


def _shard_units(spec: str | list[str]) -> list[Unit]:
    return [Unit(shard_id(u), (u,)) for u in expand_specs(spec, ".tar")]


_C = TypeVar("_C", MaterializeConfig, RelabelConfig)


class _ShardsOut(Stage[_C, MaterializeStats]):
    """A stage that writes one output shard per input shard (``OUT/shards/<partition>/
    <stem>.tar``): its units, outputs, read-back and summary."""

    def units(self) -> list[Unit]:
        return _shard_units(self.config.shards)

    def outputs(self, unit: Unit) -> list[str]:
        return [output_url(self.config.out, unit.name)]

    def read_back(self, unit: Unit) -> MaterializeStats:
        return committed_stats(self.outputs(unit)[0], unit.name)

    def describe(self, stats: MaterializeStats) -> str:
        return f"{stats.shard}: {stats.written} written"

    def summarize(self, stats: Sequence[MaterializeStats]) -> dict[str, Any]:
        return summarize(stats)


class MaterializeStage(_ShardsOut[MaterializeConfig]):
    """One unit per input shard: its selected samples as ``OUT/shards/<partition>/
    <stem>.tar``. :meth:`setup` reads the provenance once per process; a selection
    that does not belong to the teacher named fails every unit at once, unretried."""

    name = "materialize"
    resources = Resources(cpus=1)

    def __init__(self, config: MaterializeConfig) -> None:
        super().__init__(config)
        self.prov: Provenance | None = None

    def setup(self) -> None:
        self.prov = provenance(self.config.selection, self.config.checkpoint)

    def process(self, unit: Unit) -> MaterializeStats:
        assert self.prov is not None, "setup() first"
        c = self.config
        return materialize_shard(c.selection, unit.inputs[0], c.out, self.prov)


class RelabelStage(_ShardsOut[RelabelConfig]):
    """One unit per input shard: the samples its labels table (``LABELS/<partition>/
    <stem>.parquet``, e.g. anchor labels) labels, as ``OUT/shards/<partition>/
    <stem>.tar`` with that label. ``labels`` of the stats: samples per label."""

    name = "relabel"
    resources = Resources(cpus=1)

    def labels_url(self, unit: Unit) -> str:
        return unit_url(self.config.labels, "", unit.name)

    def process(self, unit: Unit) -> MaterializeStats:
        return relabel_shard(self.labels_url(unit), unit.inputs[0], self.config.out)


class LabelCheckStage(Stage[LabelCheckConfig, CheckStats]):
    """One unit per shard: its samples, and how many carry their true label
    (:func:`check_shard`), as one row of ``OUT/<partition>/<stem>.parquet``
    (:data:`tables.LABEL_CHECK`). A flow sums the rows: counts and precision of a
    whole set without reading it in the flow."""

    name = "label-check"
    resources = Resources(cpus=1)

    def __init__(self, config: LabelCheckConfig) -> None:
        super().__init__(config)
        self.truth: dict[str, str] | None = None

    def units(self) -> list[Unit]:
        return _shard_units(self.config.shards)

    def outputs(self, unit: Unit) -> list[str]:
        return [unit_url(self.config.out, "", unit.name)]

    def setup(self) -> None:
        self.truth = read_truth(self.config.truth) if self.config.truth else None

    def process(self, unit: Unit) -> CheckStats:
        stats = check_shard(unit.inputs[0], self.truth)
        row = {k: v for k, v in asdict(stats).items() if k != "skipped"}
        lineage = tables.lineage(self.config, stage=self.name, shard=stats.shard)
        tables.write_parquet(tables.from_rows([row], tables.LABEL_CHECK),
                             self.outputs(unit)[0], lineage)  # fmt: skip
        return stats

    def read_back(self, unit: Unit) -> CheckStats:
        [row] = tables.read_parquet(self.outputs(unit)[0]).to_pylist()
        return CheckStats(**row, skipped=True)

    def summarize(self, stats: Sequence[CheckStats]) -> dict[str, Any]:
        checked = sum(s.checked for s in stats)
        right = sum(s.right for s in stats)
        return {
            "shards": len(stats),
            "samples": sum(s.samples for s in stats),
            "checked": checked,
            "precision": right / checked if checked else float("nan"),
        }
