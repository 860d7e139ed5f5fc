"""The anchor stages on the stage protocol: units, identity, reruns that skip committed
work (and redo work of another identity), the Uniform phases, bad configs, S3."""

from __future__ import annotations

import os

import numpy as np
import pytest
from anchor_helpers import NAMES, make_anchors, make_features_dir, read_labels, write_features

from cvpipe.core import storage, tables
from cvpipe.core.stage import PermanentError, run_stage, run_unit
from cvpipe.label import anchors as an
from cvpipe.label.anchor_stages import anchor_features_dir, rule_url
from cvpipe.label.config import AnchorsConfig, LabelConfig


def anchor_sources(tmp_path, checkpoint, kind="mean", files=2, rows=30, dim=8):
    """Features of three anchor datasets where the anchors flow's inference puts them."""
    cfg = AnchorsConfig(
        sources={n: f"shards/{n}" for n in ("animal", "plant", "tool")},
        checkpoint=checkpoint,
        out=str(tmp_path / "anchors.parquet"),
        kind=kind,
    )
    rng = np.random.default_rng(3)
    data = {}
    for name in cfg.sources:
        embs = []
        for i in range(files):
            e = np.maximum(rng.normal(loc=rng.normal(), size=(rows + i, dim)), 0)
            url = storage.join(
                anchor_features_dir(cfg, name), "features", name, f"s-{i:06d}.parquet"
            )
            write_features(url, [f"{name}-{i}-{j}" for j in range(len(e))], f"{name}/s-{i:06d}", e)
            embs.append(e.astype(np.float32))
        data[name] = np.concatenate(embs)
    return cfg, data


def mtimes(paths):
    return [os.stat(p).st_mtime_ns for p in paths]


def test_anchor_stages_build_the_anchors_of_one_pass_and_skip_on_rerun(tmp_path, random_checkpoint):
    cfg, data = anchor_sources(tmp_path, random_checkpoint)
    sums = an.AnchorSumsStage(cfg)
    units = sums.units()
    assert [u.name for u in units] == [
        f"{n}/{n}/s-{i:06d}" for n in ("animal", "plant", "tool") for i in range(2)
    ]
    stats = run_stage(sums)
    assert [s.images for s in stats] == [30, 31] * 3 and not any(s.skipped for s in stats)
    (merged,) = run_stage(an.AnchorMergeStage(cfg))
    assert merged.counts == {n: len(e) for n, e in data.items()}
    names, mat, _ = an.read_anchors(cfg.out)
    np.testing.assert_allclose(mat, np.stack([data[n].mean(0) for n in names]), rtol=1e-5)
    lin = tables.read_lineage(cfg.out)
    assert lin["model_id"] and lin["vector_kind"] == "mean" and lin["stage_identity"]

    partials = [sums.outputs(u)[0] for u in units]
    before = mtimes(partials + [cfg.out])
    assert all(s.skipped for s in run_stage(an.AnchorSumsStage(cfg)))
    assert run_stage(an.AnchorMergeStage(cfg))[0].skipped
    assert mtimes(partials + [cfg.out]) == before

    # Runtime fields change nothing; the vector kind changes every partial.
    fast = cfg.model_copy(update={"batch_size": 7, "device": "cpu", "num_workers": 0})
    assert an.AnchorSumsStage(fast).identity_hash() == sums.identity_hash()
    assert all(s.skipped for s in run_stage(an.AnchorSumsStage(fast)))
    norm = cfg.model_copy(update={"kind": "normalized"})
    assert not any(s.skipped for s in run_stage(an.AnchorSumsStage(norm)))
    (merged,) = run_stage(an.AnchorMergeStage(norm))
    assert not merged.skipped and tables.read_lineage(cfg.out)["vector_kind"] == "normalized"
    _, mat, _ = an.read_anchors(cfg.out)
    assert np.allclose(mat.sum(axis=1), 1.0, atol=1e-5)
    # Another source set is another anchors table, even into the same file.
    fewer = norm.model_copy(update={"sources": {"animal": "x", "tool": "y"}})
    assert [s.anchor for s in run_stage(an.AnchorSumsStage(fewer))] == ["animal"] * 2 + ["tool"] * 2
    (merged,) = run_stage(an.AnchorMergeStage(fewer))
    assert not merged.skipped and list(merged.counts) == ["animal", "tool"]


def label_config(tmp_path, method, **kw):
    make_features_dir(str(tmp_path), n_files=3, rows=120, dim=8)
    anchors_url = str(tmp_path / "anchors.parquet")
    if not os.path.exists(anchors_url):
        make_anchors(anchors_url, np.random.default_rng(5).normal(size=(5, 8)))
    return LabelConfig(
        features=str(tmp_path / "features"),
        anchors=anchors_url,
        out=str(tmp_path / "labels"),
        method=method,
        **kw,
    )


def test_uniform_phases_equal_the_library_and_rerun_skips(tmp_path):
    cfg = label_config(tmp_path, "uniform", n_labels=6, seed=2)
    counts = run_stage(an.UniformCountsStage(cfg))
    assert [c.images for c in counts] == [120] * 3
    (rule_stats,) = run_stage(an.UniformRuleStage(cfg))
    labels = run_stage(an.LabelStage(cfg))
    assert [s.rows for s in labels] == [120] * 3

    urls = sorted(storage.list_committed(str(tmp_path / "features"), ".parquet", recursive=True))
    expect_counts = an.merge_counts(an.count_sequences_file(u, cfg.anchors) for u in urls)
    rule = an.read_uniform_rule(rule_url(cfg))
    assert rule == an.uniform_rule(expect_counts, 6)
    assert rule_stats.labels == sum(rule.parts.values())
    for s, u in zip(labels, urls, strict=True):
        expect = an.label_file(u, cfg.anchors, str(tmp_path / "ref" / os.path.basename(u)),
                               "uniform", rule_url=rule_url(cfg), seed=2)  # fmt: skip
        assert read_labels(s.out) == read_labels(expect.out)
        assert s.counts == an.label_counts(s.out)
    summary = an.LabelStage(cfg).summarize(labels)
    assert summary["images"] == 360 and summary["files"] == 3
    assert summary["labels"] == len(an.merge_counts(s.counts for s in labels))

    outs = [s.out for s in labels] + [rule_url(cfg)] + [c.out for c in counts]
    before = mtimes(outs)
    again = [
        *run_stage(an.UniformCountsStage(cfg)),
        *run_stage(an.UniformRuleStage(cfg)),
        *run_stage(an.LabelStage(cfg)),
    ]
    assert all(s.skipped for s in again) and mtimes(outs) == before
    assert [s.counts for s in again[-3:]] == [s.counts for s in labels]
    # Another seed splits buckets differently: the counts are reused, the labels redone.
    seeded = cfg.model_copy(update={"seed": 3})
    assert all(c.skipped for c in run_stage(an.UniformCountsStage(seeded)))
    assert run_stage(an.UniformRuleStage(seeded))[0].skipped
    assert not any(s.skipped for s in run_stage(an.LabelStage(seeded)))


def test_a_rerun_with_another_method_into_the_same_folder_relabels(tmp_path):
    nearest = label_config(tmp_path, "nearest", n=2)
    first = run_stage(an.LabelStage(nearest))
    assert {r["method"] for r in read_labels(first[0].out)} == {"nearest-2"}
    cfa = nearest.model_copy(update={"method": "cfa", "n": 1})
    second = run_stage(an.LabelStage(cfa))
    assert [s.out for s in second] == [s.out for s in first] and not any(s.skipped for s in second)
    assert {r["method"] for r in read_labels(second[0].out)} == {"cfa"}
    assert all(s.skipped for s in run_stage(an.LabelStage(cfa)))


@pytest.mark.parametrize(
    "update,message",
    [
        ({"method": "nearest", "n": 6}, "Nearest-6 needs 1 <= N <= 5"),
        ({"method": "uniform"}, "no rule at"),
        ({"method": "vanilla"}, "needs --truth"),
        ({"method": "nearest", "metric": "kl"}, "distribution anchors"),
    ],
)
def test_a_bad_config_is_a_permanent_error_before_any_output(tmp_path, update, message):
    cfg = label_config(tmp_path, "nearest").model_copy(update=update)
    stage = an.LabelStage(cfg)
    with pytest.raises(PermanentError, match=message):
        run_unit(stage, stage.units()[0])
    assert not os.path.exists(cfg.out)


def test_vanilla_reads_each_shards_ingest_index(tmp_path):
    cfg = label_config(tmp_path, "vanilla", truth=str(tmp_path / "ingest"))
    truth = {}
    for i in range(3):
        keys = [f"day1/img-{i}-{j:04d}" for j in range(120)]
        rows = [{"key": k, "shard": f"day1/digits-{i:06d}", "label": NAMES[j % 5]}
                for j, k in enumerate(keys)]  # fmt: skip
        truth.update({r["key"]: r["label"] for r in rows})
        url = str(tmp_path / "ingest" / "index" / "day1" / f"digits-{i:06d}.parquet")
        tables.write_parquet(tables.from_rows(rows, tables.SHARD_INDEX), url, tables.lineage())
    stats = run_stage(an.LabelStage(cfg))
    rows = [r for s in stats for r in read_labels(s.out)]
    assert len(rows) == 360 and all(r["label"] == truth[r["key"]] for r in rows)


def test_stages_on_s3(s3_root, tmp_path):
    """Features, anchors and labels on S3: committed through markers, rerun skipped."""
    root = f"{s3_root}/run"
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(90, 8)).astype(np.float32)
    for i in range(2):
        url = f"{root}/features/day1/digits-{i:06d}.parquet"
        write_features(url, [f"k{i}-{j}" for j in range(45)], f"day1/digits-{i:06d}",
                       emb[i * 45 : (i + 1) * 45])  # fmt: skip
    anchors_url = make_anchors(f"{root}/anchors.parquet", rng.normal(size=(5, 8)))
    cfg = LabelConfig(features=f"{root}/features", anchors=anchors_url, out=f"{root}/labels",
                      method="nearest", n=2)  # fmt: skip
    stats = run_stage(an.LabelStage(cfg))
    assert [s.out for s in stats] == [f"{root}/labels/day1/digits-{i:06d}.parquet" for i in (0, 1)]
    assert storage.list_committed(f"{root}/labels", ".parquet", recursive=True) == [
        s.out for s in stats
    ]
    got = [r["label"] for s in stats for r in read_labels(s.out)]
    names, mat, _ = an.read_anchors(anchors_url)
    assert got == an.nearest_labels(an.anchor_distances(emb, mat), names, 2).labels
    assert all(s.skipped for s in run_stage(an.LabelStage(cfg)))
