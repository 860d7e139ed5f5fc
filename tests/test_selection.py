"""Top-K selection against a brute-force reference, with ties and any merge order."""

from __future__ import annotations

import os
import random

import numpy as np
import pyarrow as pa
import pytest

from cvpipe.core import tables
from cvpipe.core.stage import run_stage
from cvpipe.label import selection, topk
from cvpipe.label.config import SelectConfig


def _write_predictions(url: str, keys, classes, scores, top_p: int, num_classes: int) -> None:
    table = pa.Table.from_arrays(
        [
            pa.array(keys, pa.string()),
            pa.array([f"part/{os.path.basename(url)[:-8]}"] * len(keys), pa.string()),
            pa.array(classes, pa.list_(pa.int32())),
            pa.array(scores, pa.list_(pa.float32())),
        ],
        schema=tables.PREDICTIONS,
    )
    lin = tables.lineage(None, top_p=top_p, num_classes=num_classes, model_id="m0")
    tables.write_parquet(table, url, lin)


def make_predictions(
    root, rng, files=5, rows=40, classes=10, num_classes=12, stored_p=4, levels=6
) -> list[str]:
    """Random predictions; scores come from few levels so ties are frequent; classes
    ``classes..num_classes-1`` are never predicted."""
    urls = []
    ids = rng.permutation(files * rows)  # key order unrelated to file/row order
    for f in range(files):
        url = str(root / "predictions" / "part" / f"p-{f:06d}.parquet")
        keys, cls, scs = [], [], []
        for r in range(rows):
            keys.append(f"k{ids[f * rows + r]:05d}")
            cls.append(rng.permutation(classes)[:stored_p].tolist())
            s = np.sort(rng.integers(1, levels + 1, stored_p) / levels)[::-1]
            scs.append(s.astype(np.float32).tolist())
        _write_predictions(url, keys, cls, scs, stored_p, num_classes)
        urls.append(url)
    return urls


def brute_force(urls, top_p, top_k):
    """The definition, literally: every (image, class) candidate, sorted per class."""
    per_class: dict[int, list[tuple[float, str, str]]] = {}
    for url in urls:
        t = tables.read_parquet(url).to_pylist()
        for r in t:
            for c, s in list(zip(r["classes"], r["scores"], strict=True))[:top_p]:
                per_class.setdefault(c, []).append((-s, r["key"], r["shard"]))
    rows = []
    for c, cands in per_class.items():
        for rank, (neg, key, shard) in enumerate(sorted(cands)[:top_k], start=1):
            rows.append((key, shard, c, np.float32(-neg), rank))
    return sorted(rows, key=lambda r: (r[2], r[4])), per_class


def read_selection(out) -> list[tuple]:
    t = tables.read_parquet(selection.selection_url(str(out))).to_pylist()
    rows = [(r["key"], r["shard"], r["label"], np.float32(r["score"]), r["rank"]) for r in t]
    return sorted(rows, key=lambda r: (r[2], r[4]))


@pytest.mark.parametrize(
    "top_p,top_k",
    [(1, 3), (3, 5), (4, 7), (2, 1000)],  # K=1000: more than any class has
)
def test_select_equals_brute_force(tmp_path, top_p, top_k):
    rng = np.random.default_rng(top_p * 100 + top_k)
    urls = make_predictions(tmp_path, rng)
    report = selection.select(urls, top_p, top_k, str(tmp_path / "sel"))
    expect, per_class = brute_force(urls, top_p, top_k)
    assert read_selection(tmp_path / "sel") == expect
    # the report: 12 classes, two of them without any candidate
    rep = tables.read_parquet(selection.report_url(str(tmp_path / "sel"))).to_pylist()
    assert [r["label"] for r in rep] == list(range(12))
    assert [r["candidates"] for r in rep] == [len(per_class.get(c, [])) for c in range(12)]
    assert [r["selected"] for r in rep] == [
        min(top_k, len(per_class.get(c, []))) for c in range(12)
    ]
    assert rep[10]["selected"] == 0 and rep[10]["min_score"] is None
    assert report["classes"] == 12 and report["selected"] == len(expect)
    assert report["images_per_class_min"] == 0
    assert report["classes_below_k"] >= 2
    md = (tmp_path / "sel" / "selection_report.md").read_text()
    assert f"P={top_p}, K={top_k}" in md
    lin = tables.read_lineage(selection.selection_url(str(tmp_path / "sel")))
    assert (lin["top_p"], lin["top_k"], lin["model_id"]) == (top_p, top_k, "m0")


def test_ties_at_the_boundary_are_broken_by_key(tmp_path):
    """Every score equal: the K smallest keys win. Classes get far more candidates than
    K + slack, so the streaming compaction cuts tie groups many times."""
    rng = np.random.default_rng(7)
    urls = make_predictions(tmp_path, rng, files=3, rows=300, classes=3, num_classes=3,
                            stored_p=2, levels=1)  # fmt: skip
    selection.select(urls, 2, 5, str(tmp_path / "sel"))
    expect, _ = brute_force(urls, 2, 5)
    got = read_selection(tmp_path / "sel")
    assert got == expect
    for c in range(3):
        keys = [r[0] for r in got if r[2] == c]
        assert keys == sorted(keys) and len(keys) == 5


def test_merge_is_associative_and_commutative(tmp_path):
    rng = np.random.default_rng(3)
    urls = make_predictions(tmp_path, rng, files=6, rows=60)
    parts = [topk.partial_topk(u, 3, 4) for u in urls]
    reference = topk.merge(parts)
    shuffler = random.Random(0)
    for _ in range(5):
        order = parts[:]
        shuffler.shuffle(order)
        cut = shuffler.randrange(1, len(order))
        tree = topk.merge([topk.merge(order[:cut]), topk.merge(order[cut:])])
        assert tree.same_as(reference)
    # Thresholds from another partial prune the map side without changing the result:
    # a hinted partial is exactly its plain partial less the entries below the class's
    # threshold (ties at the threshold stay), and here that drops entries.
    thr = reference.thresholds()
    hinted = [topk.partial_topk(u, 3, 4, thresholds=thr) for u in urls]
    dropped = 0
    for plain, hint in zip(parts, hinted, strict=True):
        keep = plain.score >= thr[plain.label]
        dropped += int((~keep).sum())
        rows = zip(plain.label, plain.score, plain.locations(), keep, strict=True)
        want = {(c, score, loc) for c, score, loc, k in rows if k}
        assert set(zip(hint.label, hint.score, hint.locations(), strict=True)) == want
        assert np.array_equal(hint.candidates, plain.candidates)  # every candidate counted
    assert dropped > 0
    assert topk.merge(hinted).same_as(reference)
    # merging the same file twice would double-count: refused
    with pytest.raises(ValueError, match="overlap"):
        topk.merge([parts[0], parts[0]])


@pytest.mark.parametrize(
    ("fan_in", "level_sizes"),
    [(2, [3, 2, 1]), (3, [2, 1]), (4, [2, 1]), (5, [1]), (16, [1])],
)
def test_stage_tree_has_the_fan_in_shape_and_the_same_selection(tmp_path, fan_in, level_sizes):
    """The map-reduce of the flow, unit by unit in this process: ``fan_in`` shapes the
    tree (units per level, partials per unit) and never the selection."""
    rng = np.random.default_rng(5)
    urls = make_predictions(tmp_path, rng, files=5)
    out = str(tmp_path / f"units-{fan_in}")
    config = SelectConfig(predictions=urls, out=out, top_p=2, top_k=6, fan_in=fan_in)
    maps = run_stage(selection.SelectPartialStage(config))
    assert [m.url for m in maps] == [selection.partial_url(out, u) for u in urls]
    assert selection.read_topk(maps[0].url).same_as(topk.partial_topk(urls[0], 2, 6))
    merges = selection.SelectMergeStage(config)
    levels = merges.levels()
    assert [len(level) for level in levels] == level_sizes
    assert all(len(u.inputs) <= fan_in for level in levels for u in level)
    assert [u.inputs for u in levels[0]] == [
        tuple(m.url for m in maps[i : i + fan_in]) for i in range(0, 5, fan_in)
    ]
    for level in levels:
        stats = run_stage(merges, level)
        assert all(os.path.exists(s.url) and s.entries > 0 for s in stats)
    assert merges.root() == merges.outputs(levels[-1][0])[0]
    [report] = run_stage(selection.SelectFinalizeStage(config))
    expect, _ = brute_force(urls, 2, 6)
    assert read_selection(out) == expect and report["selected"] == len(expect)
    # a rerun reads every unit back
    again = run_stage(selection.SelectPartialStage(config))
    assert all(a.skipped and a.entries == m.entries for a, m in zip(again, maps, strict=True))
    [report_again] = run_stage(selection.SelectFinalizeStage(config))
    assert report_again["skipped"] and report_again["selected"] == len(expect)


def test_select_has_no_fan_in_and_fan_in_is_not_identity():
    """In one process there is no tree, so ``select`` takes no ``fan_in`` (its one default
    is SelectConfig's, which the generated CLI falls back to); fan_in shapes the tree,
    never the selection, so it is not part of the stages' identity."""
    import inspect

    assert "fan_in" not in inspect.signature(selection.select).parameters
    base = {"predictions": "p", "out": "o"}
    stage = selection.SelectMergeStage
    assert (stage(SelectConfig(**base, fan_in=2)).identity_hash()
            == stage(SelectConfig(**base, fan_in=64)).identity_hash())  # fmt: skip
    assert (stage(SelectConfig(**base, top_k=5)).identity_hash()
            != stage(SelectConfig(**base)).identity_hash())  # fmt: skip


def test_rerun_writes_nothing_and_p_is_checked(tmp_path):
    rng = np.random.default_rng(9)
    urls = make_predictions(tmp_path, rng, files=2)
    out = tmp_path / "sel"
    first = selection.select(urls, 2, 3, str(out))
    mtimes = {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)}
    assert len(mtimes) == 3
    again = selection.select(urls, 2, 3, str(out))
    assert {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)} == mtimes
    assert again["skipped"] and again["selected"] == first["selected"]
    with pytest.raises(ValueError, match="top-4"):
        selection.select(urls, 5, 3, str(tmp_path / "other"))


@pytest.mark.parametrize("flush_rows", [7, 64])
def test_small_flushes_and_file_order(tmp_path, monkeypatch, flush_rows):
    """Tiny flushes: candidates are queued and grouped by class many times, merged
    partials are added in slices, and the writer groups the files in several slices.
    The selection file is in (file, row) order; an image selected for several classes
    has its rows in class order."""
    monkeypatch.setattr(topk, "FLUSH_ROWS", flush_rows)
    rng = np.random.default_rng(flush_rows)
    urls = make_predictions(tmp_path, rng, files=6, rows=50, stored_p=4, levels=4)
    empty = str(tmp_path / "predictions" / "part" / "p-000099.parquet")
    _write_predictions(empty, [], [], [], 4, 12)  # a file without rows changes nothing
    out = tmp_path / "sel"
    selection.select([*urls, empty], 3, 9, str(out))
    expect, _ = brute_force(urls, 3, 9)
    assert read_selection(out) == expect
    position = {}
    for f, url in enumerate(urls):
        for r, key in enumerate(tables.read_parquet(url).column("key").to_pylist()):
            position[key] = (f, r)
    got = tables.read_parquet(selection.selection_url(str(out))).to_pylist()
    physical = [(r["key"], r["label"]) for r in got]
    assert physical == sorted(physical, key=lambda kl: (position[kl[0]], kl[1]))
    # the same through persisted-free partials and merges, in slices
    parts = [topk.partial_topk(u, 3, 9) for u in urls]
    tree = topk.merge([topk.merge(parts[:4]), topk.merge(parts[4:])])
    assert tree.same_as(topk.merge(parts[::-1]))
    assert len(tree) == len(expect)
