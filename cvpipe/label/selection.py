"""Top-K selection (Yalniz et al. 2019): predictions files in, the selection table and
its per-class report out, as work units of bounded memory.

The streaming state is :mod:`cvpipe.label.topk`. Here:

- :func:`select` does it all in one process (every file streamed into one accumulator)
  and writes ``OUT/selection.parquet``, ``OUT/selection_report.parquet`` and
  ``OUT/selection_report.md``;
- the stages a flow composes into a map-reduce tree (flows/teacher.py ``select_flow``):
  :class:`SelectPartialStage` (map: one predictions file -> one persisted partial),
  :class:`SelectMergeStage` (reduce: a unit merges ``fan_in`` partials of one tree
  level) and :class:`SelectFinalizeStage` (the root partial -> the table and report).
  Every partial's URL follows from the config, so the whole tree is known before any
  unit runs and a rerun skips committed units.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cvpipe.core import tables
from cvpipe.core.stage import Stage, Unit
from cvpipe.core.storage import (
    expand_specs,
    expand_urls,
    is_committed,
    join,
    open_atomic,
    url_to_fs,
)
from cvpipe.data.shards import shard_id, unit_url
from cvpipe.label import topk
from cvpipe.label.config import SelectConfig
from cvpipe.label.topk import TopK, bincount

STAGE = "select"


def select(
    prediction_urls: Sequence[str],
    top_p: int,
    top_k: int,
    out: str,
    classes: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Select the top-K images per class from predictions files and write
    ``OUT/selection.parquet`` (:data:`tables.SELECTION`, ordered by shard then row),
    ``OUT/selection_report.parquet`` and ``OUT/selection_report.md``. Returns the report.
    Skipped (report read back) when the selection is committed.

    There is no merge tree here (and so no ``fan_in``): the tree is the shape of work
    units over many processes, the stages below composed by a flow."""
    urls = sorted(dict.fromkeys(prediction_urls))
    if not urls:
        raise ValueError("no predictions files to select from")
    if is_committed(selection_url(out)) and is_committed(report_url(out)):
        return read_report(out)
    # In one process every node of a reduce tree would run in turn, so the tree collapses
    # into one accumulator: its thresholds rise from the first files on and no partial is
    # ever sorted. (With K=16,000 and 64-file nodes, no node ever reached K per class, so
    # the tree shared no thresholds and sorted every candidate twice.)
    acc = topk.Accumulator(top_p, top_k)
    for url in urls:
        acc.add_file(url, top_p)
    result = acc.result()
    del acc
    return finalize(result, out, classes=classes, num_classes=num_classes)


def selection_url(out: str) -> str:
    return join(out, "selection.parquet")


def report_url(out: str) -> str:
    return join(out, "selection_report.parquet")


def report_md_url(out: str) -> str:
    return join(out, "selection_report.md")


def _first_lineage(urls: Sequence[str]) -> dict[str, Any]:
    for u in urls[:1]:
        return tables.read_lineage(u)
    return {}


def finalize(
    result: TopK,
    out: str,
    classes: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Resolve the survivors' keys and shards (one predictions file at a time), write
    the selection, the per-class report (Parquet and markdown), and return the report."""
    if len(result.model_ids) > 1:
        raise ValueError(f"predictions from several teachers: {result.model_ids}")
    pred_lineage = _first_lineage(result.sources)
    n_classes = max(result.num_classes, num_classes or 0, int(pred_lineage.get("num_classes", 0)))
    if classes is None:
        classes = _teacher_classes(pred_lineage.get("checkpoint"))
    if classes is not None:
        n_classes = max(n_classes, len(classes))
    lineage = tables.lineage(
        {
            "stage": STAGE,
            "top_p": result.top_p,
            "top_k": result.top_k,
            "model_id": pred_lineage.get("model_id"),
            "sources": result.sources,
        },
        stage=STAGE,
        top_p=result.top_p,
        top_k=result.top_k,
        model_id=result.model_ids[0] if result.model_ids else pred_lineage.get("model_id"),
        checkpoint=pred_lineage.get("checkpoint"),
        num_classes=n_classes,
        classes=list(classes) if classes is not None else None,
        predictions=len(result.sources),
    )
    _write_selection(result, selection_url(out), lineage)
    report = _report(result, n_classes, classes)
    tables.write_parquet(report, report_url(out), lineage)
    summary = _summary(report, result.top_p, result.top_k, len(result.sources))
    with open_atomic(report_md_url(out)) as f:
        f.write(_markdown(summary, report).encode())
    return summary


def _teacher_classes(checkpoint: str | None) -> list[str] | None:
    if not checkpoint:
        return None
    from cvpipe.models import CheckpointError, load_info

    try:
        return list(load_info(checkpoint).classes)
    except (CheckpointError, OSError):
        return None  # the report falls back to class indices


def _by_file(result: TopK) -> Iterator[tuple[int, np.ndarray]]:
    """(file id, entry indices in row order) for every file of ``result``.

    Files are taken in groups of about ``topk.FLUSH_ROWS`` entries: one compare pass per group
    finds its entries, a stable radix sort of their (uint16) file offsets groups them,
    so the index arrays are a few MB instead of a full argsort of every entry."""
    counts = bincount(result.file, len(result.files))
    f0 = 0
    while f0 < len(counts):
        total = np.cumsum(counts[f0:])
        f1 = f0 + max(1, int(np.searchsorted(total, topk.FLUSH_ROWS, side="right")))
        f1 = min(f1, f0 + 65_536, len(counts))
        mask = result.file >= f0
        mask &= result.file < f1
        idx = np.flatnonzero(mask)
        del mask
        sub = (result.file[idx] - f0).astype(np.uint16)
        idx = idx[np.argsort(sub, kind="stable")]
        bounds = np.r_[0, np.cumsum(counts[f0:f1])]
        for i in range(f1 - f0):
            part = idx[bounds[i] : bounds[i + 1]]
            # Stable: an image selected for several classes keeps its rows in class order.
            yield f0 + i, part[np.argsort(result.row[part], kind="stable")]
        f0 = f1


def _write_selection(result: TopK, url: str, lineage: dict[str, Any]) -> None:
    """Stream the selection file by file, so keys are never all in memory at once."""
    # Rank = position in the class's sorted run (label is sorted), computed per file.
    # Needles of the label dtype: mixed dtypes make searchsorted copy the whole haystack.
    labels = np.arange(result.num_classes + 1, dtype=result.label.dtype)
    class_start = np.searchsorted(result.label, labels)
    schema = tables.SELECTION.with_metadata(
        {tables.LINEAGE_KEY: json.dumps(lineage, sort_keys=True, default=str).encode()}
    )
    # Straight into the atomic file: the selection can be larger than memory allows.
    # Dictionaries only where values repeat: on unique keys and raw scores they cost half
    # the write time and make the file larger.
    dictionary = ["shard", "label"]
    with (
        open_atomic(url) as f,
        pq.ParquetWriter(f, schema, compression="zstd", use_dictionary=dictionary) as writer,
    ):
        for fid, idx in _by_file(result):
            rows = result.row[idx]
            label = result.label[idx]
            ranks = (idx - class_start[label] + 1).astype(np.int32)
            fs, path = url_to_fs(result.files[fid])
            cols = pq.ParquetFile(path, filesystem=fs).read(columns=["key", "shard"])
            take = pa.array(rows.astype(np.int64))
            writer.write_batch(  # one row group per predictions file, i.e. per shard
                pa.record_batch(
                    [
                        cols.column("key").take(take).combine_chunks(),
                        cols.column("shard").take(take).combine_chunks(),
                        pa.array(label, pa.int32()),
                        pa.array(result.score[idx], pa.float32()),
                        pa.array(ranks, pa.int32()),
                    ],
                    schema=schema,
                )
            )


def _report(result: TopK, n_classes: int, classes: Sequence[str] | None) -> pa.Table:
    counts = bincount(result.label, n_classes)[:n_classes]
    cands = np.zeros(n_classes, np.int64)
    cands[: result.num_classes] = result.candidates
    min_s = np.full(n_classes, np.nan, np.float32)
    max_s = np.full(n_classes, np.nan, np.float32)
    if len(result):
        labels = np.arange(n_classes, dtype=result.label.dtype)  # no haystack copy
        first = np.searchsorted(result.label, labels, side="left")
        last = np.searchsorted(result.label, labels, side="right") - 1
        has = counts > 0
        max_s[has] = result.score[first[has]]
        min_s[has] = result.score[last[has]]
    names = [classes[i] if classes is not None else str(i) for i in range(n_classes)]
    return pa.Table.from_arrays(
        [
            pa.array(np.arange(n_classes, dtype=np.int32)),
            pa.array(names, pa.string()),
            pa.array(cands),
            pa.array(counts.astype(np.int64)),
            pa.array(min_s, pa.float32(), mask=np.isnan(min_s)),
            pa.array(max_s, pa.float32(), mask=np.isnan(max_s)),
        ],
        schema=tables.SELECTION_REPORT,
    )


def _summary(report: pa.Table, top_p: int, top_k: int, files: int) -> dict[str, Any]:
    sel = report.column("selected").to_numpy()
    names = report.column("class_name").to_pylist()
    short = [names[i] for i in np.flatnonzero(sel < top_k)]
    return {
        "top_p": top_p,
        "top_k": top_k,
        "predictions_files": files,
        "classes": len(sel),
        "selected": int(sel.sum()),
        "candidates": int(report.column("candidates").to_numpy().sum()),
        "images_per_class_mean": float(sel.mean()) if len(sel) else 0.0,
        "images_per_class_std": float(sel.std()) if len(sel) else 0.0,
        "images_per_class_min": int(sel.min()) if len(sel) else 0,
        "images_per_class_max": int(sel.max()) if len(sel) else 0,
        "classes_below_k": len(short),
        "classes_below_k_names": short[:100],
    }


def _markdown(summary: dict[str, Any], report: pa.Table) -> str:
    s = summary
    lines = [
        f"# Top-K selection (P={s['top_p']}, K={s['top_k']})",
        "",
        f"- predictions files: {s['predictions_files']}",
        f"- candidates (image, class) pairs: {s['candidates']}",
        f"- selected: {s['selected']} over {s['classes']} classes",
        f"- images per class: mean {s['images_per_class_mean']:.1f}, "
        f"std {s['images_per_class_std']:.1f}, min {s['images_per_class_min']}, "
        f"max {s['images_per_class_max']}",
        f"- classes with fewer than K: {s['classes_below_k']}",
        "",
    ]
    if s["classes_below_k"]:
        lines += ["| class | candidates | selected |", "|---|---:|---:|"]
        below = report.filter(pc.less(report.column("selected"), s["top_k"]))
        for r in below.slice(0, 50).to_pylist():
            lines.append(f"| {r['class_name']} | {r['candidates']} | {r['selected']} |")
        if below.num_rows > 50:
            lines.append(f"| ... {below.num_rows - 50} more | | |")
    return "\n".join(lines) + "\n"


def read_report(out: str) -> dict[str, Any]:
    """The summary of a committed selection, read back from its report table."""
    lin = tables.read_lineage(report_url(out))
    report = tables.read_parquet(report_url(out))
    files = int(lin.get("predictions", 0))
    return {**_summary(report, int(lin["top_p"]), int(lin["top_k"]), files), "skipped": True}


# ------------------------------------------------- persisted partials (work units)


def write_topk(t: TopK, url: str) -> None:
    files = pa.array(t.files, pa.string())
    table = pa.Table.from_arrays(
        [
            pa.array(t.label, pa.int32()),
            pa.array(t.score, pa.float32()),
            pa.DictionaryArray.from_arrays(pa.array(t.file, pa.int32()), files).cast(pa.string()),
            pa.array(t.row, pa.int32()),
        ],
        schema=tables.TOPK_STATE,
    )
    lineage = tables.lineage(
        None,
        stage=STAGE + "/partial",
        top_p=t.top_p,
        top_k=t.top_k,
        candidates=t.candidates.tolist(),
        sources=t.sources,
        model_ids=t.model_ids,
    )
    tables.write_parquet(table, url, lineage)


def read_topk(url: str) -> TopK:
    lin = tables.read_lineage(url)
    table = tables.read_parquet(url)
    files = pc.unique(table.column("file")).to_pylist()
    files = sorted(files)
    ids = pc.index_in(table.column("file"), value_set=pa.array(files, pa.string()))
    return TopK(
        top_p=int(lin["top_p"]),
        top_k=int(lin["top_k"]),
        files=files,
        label=table.column("label").to_numpy().astype(np.int32),
        score=table.column("score").to_numpy().astype(np.float32),
        file=ids.to_numpy().astype(np.int32),
        row=table.column("row").to_numpy().astype(np.int32),
        candidates=np.asarray(lin["candidates"], np.int64),
        sources=list(lin["sources"]),
        model_ids=list(lin["model_ids"]),
    )


def predictions_files(spec: str | Sequence[str]) -> list[str]:
    """Predictions files of a spec; an inference OUT folder means its predictions/ part
    (not its features/ or rejects/)."""
    if not isinstance(spec, str):
        return expand_specs(spec, ".parquet")
    inner = join(spec, "predictions")
    fs, path = url_to_fs(inner)
    return expand_urls(inner if fs.isdir(path) else spec, ".parquet")


def partial_url(out: str, predictions_url: str) -> str:
    return unit_url(out, "selection_parts/map", shard_id(predictions_url))


def merge_url(out: str, level: int, inputs: Sequence[str]) -> str:
    """Named by its inputs: a rerun over the same predictions reuses committed merges,
    and a run over other predictions can never pick up a stale one."""
    digest = hashlib.sha1("\n".join(inputs).encode()).hexdigest()[:16]
    return join(out, "selection_parts", f"merge-{level}", f"{digest}.parquet")


# ------------------------------------------------------------------------- the stages


@dataclass
class PartialStats:
    """A persisted partial: where it is and how many (image, class) entries it keeps."""

    url: str
    entries: int
    skipped: bool = False


class SelectPartialStage(Stage[SelectConfig, PartialStats]):
    """Map: one unit per predictions file, its top-K per class persisted as
    ``OUT/selection_parts/map/<partition>/<stem>.parquet``."""

    name = "select-partial"

    def units(self) -> list[Unit]:
        return [Unit(shard_id(u), (u,)) for u in predictions_files(self.config.predictions)]

    def outputs(self, unit: Unit) -> list[str]:
        return [partial_url(self.config.out, unit.inputs[0])]

    def process(self, unit: Unit) -> PartialStats:
        c, [url] = self.config, self.outputs(unit)
        part = topk.partial_topk(unit.inputs[0], c.top_p, c.top_k)
        write_topk(part, url)
        return PartialStats(url, len(part))

    def read_back(self, unit: Unit) -> PartialStats:
        [url] = self.outputs(unit)
        return PartialStats(url, tables.num_rows(url), skipped=True)

    def describe(self, stats: PartialStats) -> str:
        return f"{stats.url}: {stats.entries} entries"


class SelectMergeStage(Stage[SelectConfig, PartialStats]):
    """Reduce: a unit merges up to ``fan_in`` partials of one tree level (read one at a
    time) into one partial of the next. :meth:`levels` lists the units level by level:
    a flow runs a level once the one before is committed."""

    name = "select-merge"

    def levels(self) -> list[list[Unit]]:
        c = self.config
        parts = [partial_url(c.out, u.inputs[0]) for u in SelectPartialStage(c).units()]
        levels: list[list[Unit]] = []
        while len(parts) > 1:
            level = len(levels)
            groups = [parts[i : i + c.fan_in] for i in range(0, len(parts), c.fan_in)]
            levels.append([Unit(f"merge-{level}/{i}", tuple(g), index=level)
                           for i, g in enumerate(groups)])  # fmt: skip
            parts = [self.outputs(u)[0] for u in levels[-1]]
        return levels

    def root(self) -> str:
        """The URL of the tree's root partial (the only partial of a single file)."""
        c = self.config
        levels = self.levels()
        if levels:
            return self.outputs(levels[-1][0])[0]
        units = SelectPartialStage(c).units()
        if not units:
            raise ValueError(f"no predictions files to select from in {c.predictions}")
        return partial_url(c.out, units[0].inputs[0])

    def units(self) -> list[Unit]:
        return [u for level in self.levels() for u in level]

    def outputs(self, unit: Unit) -> list[str]:
        assert unit.index is not None, "a merge unit knows its level"
        return [merge_url(self.config.out, unit.index, unit.inputs)]

    def process(self, unit: Unit) -> PartialStats:
        [url] = self.outputs(unit)
        merged = topk.merge(read_topk(u) for u in unit.inputs)
        write_topk(merged, url)
        return PartialStats(url, len(merged))

    def read_back(self, unit: Unit) -> PartialStats:
        [url] = self.outputs(unit)
        return PartialStats(url, tables.num_rows(url), skipped=True)

    def describe(self, stats: PartialStats) -> str:
        return f"{stats.url}: {stats.entries} entries"


class SelectFinalizeStage(Stage[SelectConfig, dict[str, Any]]):
    """The last unit: the root partial -> ``OUT/selection.parquet`` and the report
    (Parquet, then markdown: the commit). Returns the report's summary."""

    name = "select-finalize"

    def units(self) -> list[Unit]:
        return [Unit("finalize", (SelectMergeStage(self.config).root(),))]

    def outputs(self, unit: Unit | None = None) -> list[str]:
        out = self.config.out
        return [selection_url(out), report_url(out), report_md_url(out)]

    def done(self) -> bool:
        """The selection is committed (known without listing the predictions)."""
        return all(is_committed(u) for u in self.outputs())

    def process(self, unit: Unit) -> dict[str, Any]:
        return finalize(read_topk(unit.inputs[0]), self.config.out)

    def read_back(self, unit: Unit) -> dict[str, Any]:
        return read_report(self.config.out)
