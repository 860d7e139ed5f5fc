"""The transfer study's library half: training schedules per label count, seeds
averaged per method, the recommendation chosen on validation only, the report."""

from __future__ import annotations

import math

import pytest

from cvpipe.experiments import p2l_validation as pv
from cvpipe.experiments import transfer_study as ts
from cvpipe.experiments.config import TransferStudyConfig
from cvpipe.label import p2l


@pytest.mark.parametrize(
    "epochs,batch,images,min_steps,want",
    [
        (20, 32, 225, 100, (20, 32)),  # 8 steps an epoch: enough already
        (20, 32, 25, 100, (20, 5)),  # smaller batches: 5 steps an epoch
        (20, 32, 10, 100, (34, 4)),  # batch floor 4 (3 steps an epoch), then more epochs
        (20, 32, 100, 100, (20, 20)),
        (1, 64, 1, 10, (10, 4)),
    ],
)
def test_fit_schedule(epochs, batch, images, min_steps, want):
    e, b = ts.fit_schedule(epochs, batch, images, min_steps)
    assert (e, b) == want
    assert e * math.ceil(images / b) >= min_steps


def rows():
    """Two seeds of three methods on one target, at two label counts, and a curriculum
    (better on validation, but from another model) with its direct fine-tune."""
    out = []
    for m, src, v, t in (("curriculum:r>a", "r", 0.99, 0.95), ("direct:r", "r", 0.95, 0.93)):
        for seed in (0, 1):
            out.append(
                {
                    "target": "t",
                    "per_class": 5,
                    "source": src,
                    "method": m,
                    "freeze": 0,
                    "seed": seed,
                    "val_top1": v,
                    "test_top1": t + seed / 100,
                    "train_seconds": 9.0,
                }
            )
    spec = {  # method: (val, test, seconds) per seed
        "svm": [(0.80, 0.70, 0.1), (0.82, 0.72, 0.1)],
        "freeze-0": [(0.90, 0.60, 5.0), (0.90, 0.62, 5.0)],  # best on val, worse on test
        "freeze-2": [(0.90, 0.88, 3.0), (0.90, 0.90, 3.0)],  # ties freeze-0 on val, cheaper
    }
    for k in (5, None):
        for m, seeds in spec.items():
            for seed, (v, t, s) in enumerate(seeds):
                out.append(
                    {
                        "target": "t",
                        "per_class": k,
                        "source": "a",
                        "method": m,
                        "freeze": int(m[-1]) if m.startswith("freeze") else None,
                        "seed": seed,
                        "val_top1": v,
                        "test_top1": t,
                        "train_seconds": s,
                    }
                )
    return out


def test_method_summary_averages_seeds():
    s = {(r["per_class"], r["method"]): r for r in ts.method_summary(rows())}
    r = s[(5, "svm")]
    assert r["seeds"] == 2 and r["val"] == pytest.approx(0.81) and r["test"] == pytest.approx(0.71)
    assert r["test_std"] == pytest.approx(math.sqrt(2 * 0.01**2))
    assert r["by_seed"] == {0: 0.70, 1: 0.72}


def test_recommendation_uses_validation_and_breaks_ties_by_cost():
    summary = ts.method_summary(rows())
    ranking = [{"candidate": "a"}, {"candidate": "b"}]
    costs = [
        {"model": "fast", "latency_ms_b1": 0.1, "val": 0.80},
        {"model": "slow", "latency_ms_b1": 9.0, "val": 0.95},
    ]
    rec = ts.recommend("t", 5, summary, ranking, costs)
    assert rec["source"] == "a"
    assert rec["method"]["method"] == "freeze-2"  # equal val, 3 s < 5 s of training
    assert rec["freeze"]["freeze"] == 2
    assert rec["curriculum"]["method"] == "curriculum:r>a" and rec["direct"]["method"] == "direct:r"
    assert rec["arch"]["model"] == "slow"
    assert (
        ts.recommend("t", 5, summary, ranking, costs, latency_budget_ms=1.0)["arch"]["model"]
        == "fast"
    )
    with pytest.raises(ValueError, match="no method results"):
        ts.recommend("t", 20, summary, ranking, costs)


def test_report_names_the_choices(tmp_path):
    cfg = TransferStudyConfig(
        root=str(tmp_path),
        reference={},
        source={},
        finetune={},
        digits={
            "targets": {"t": "01", "u": "23"},
            "sources": {"a": {"classes": "01"}, "b": {"classes": "23"}, "c": {"classes": "4"}},
        },
        target="t",
        grid_per_class=5,
        seeds=[0, 1],
    )
    grid = [
        {
            "target": t,
            "source": s,
            "seed": seed,
            "size": n,
            "divergence": d,
            "val_top1": acc,
            "test_top1": acc,
        }
        for seed in (0, 1)
        for t, s, n, d, acc in [
            ("t", "a", 100, 0.1, 0.9),
            ("t", "b", 300, 0.5, 0.7),
            ("t", "c", 50, 0.3, 0.6),
            ("u", "a", 100, 0.6, 0.6),
            ("u", "b", 300, 0.1, 0.8),
            ("u", "c", 50, 0.2, 0.7),
        ]
    ]
    validation = pv.write_validation(grid, str(tmp_path / "p2l"), p2l.P2LWeights(), {})
    ranking = [
        {"candidate": "a", "rank": 1, "size": 100, "divergence": 0.1, "score": 1.0},
        {"candidate": "b", "rank": 2, "size": 300, "divergence": 0.5, "score": 0.5},
    ]
    costs = [
        {
            "name": "small_cnn@16",
            "scores": [{"val_top1": 0.9, "test_top1": 0.9}] * 2,
            "costs": {
                "model": "small_cnn@16",
                "arch": "small_cnn",
                "input_size": 16,
                "params": 19154,
                "checkpoint_bytes": 85000,
                "peak_memory_mb": 2.5,
                "memory_kind": "process_rss",
                "latency_ms_b1": 0.1,
                "batch": 64,
                "latency_ms_batched": 0.02,
                "device": "cpu",
                "threads": 1,
            },
        }
    ]
    out = ts.write_report(
        str(tmp_path),
        cfg,
        ranking=ranking,
        validation=validation,
        methods=rows(),
        costs=costs,
        lineage={},
    )
    md = (tmp_path / "transfer_report.md").read_text()
    assert out["recommendation"] == {
        "source": "a",
        "method": "freeze-2",
        "freeze": 2,
        "curriculum": "curriculum:r>a",
        "arch": "small_cnn@16",
    }
    assert "**Curriculum: `r>a` helps**" in md and "paired wins 2/2" in md
    assert "**Better start: `curriculum:r>a`**" in md
    assert "**Source: `a`**" in md and "**Method: `freeze-2`**" in md
    assert "**Freezing depth: 2**" in md and "p2l (paper)" in md and "19,154" in md
    assert (tmp_path / "transfer_report.png").read_bytes()[:4] == b"\x89PNG"
