"""The P2L validation against a synthetic exhaustive grid: LOTO weights never see the
held-out target, picks and losses by hand, the report files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cvpipe.core import tables
from cvpipe.experiments import p2l_validation as pv
from cvpipe.label import p2l


def grid(w_size=0.03, w_div=0.2, targets=6, sources=6, seeds=3, noise=0.0, seed=0):
    """Results drawn from the model P2L assumes (offset per target + weighted terms)."""
    rng = np.random.default_rng(seed)
    sizes = {f"s{j}": int(s) for j, s in enumerate(rng.integers(50, 3000, sources))}
    rows = []
    for t in range(targets):
        offset = rng.uniform(0.4, 0.6)
        for name, size in sizes.items():
            d = float(rng.uniform(0, 1.5))
            acc = offset + w_size * math.log(size) - w_div * d
            for s in range(seeds):
                e = rng.normal(0, noise) if noise else 0.0
                rows.append(
                    {
                        "target": f"t{t}",
                        "source": name,
                        "seed": s,
                        "size": size,
                        "divergence": d,
                        "val_top1": acc + e,
                        "test_top1": acc - e,
                    }
                )
    return rows


def test_noise_free_grid_p2l_always_picks_the_best():
    cells = pv.aggregate(grid())
    assert len(cells) == 36 and all(c.seeds == 3 for c in cells)
    loto = pv.loto_weights(cells)
    for w in loto.values():
        assert w.w_size == pytest.approx(0.03) and w.w_div == pytest.approx(0.2)
        assert w.targets == 5  # the held-out target is not in its own fit
    rows = pv.picks(cells, loto)
    p = [r for r in rows if r["selector"] == "p2l"]
    assert all(r["is_best"] and r["loss"] == 0 for r in p)
    assert all(r["spearman"] == pytest.approx(1.0) for r in p)
    summary = {r["selector"]: r for r in pv.summary(rows)}
    assert summary["p2l"]["best_rate"] == 1.0 and summary["p2l"]["mean_loss"] == 0
    assert summary["largest"]["best_rate"] < 1.0 or summary["closest"]["best_rate"] < 1.0
    assert summary["p2l (paper)"]["best_rate"] == 0.62 and summary["p2l (paper)"]["targets"] == 21


@pytest.mark.parametrize("fit_on", ["test", "val"])
def test_loto_fit_never_sees_the_held_out_target(fit_on):
    rows = grid(noise=0.01)
    # Poison one target's results: the weights used to rank it do not change.
    bump = {"val_top1": 5.0, "test_top1": 5.0}
    poisoned = [
        {k: v + bump[k] if k in bump else v for k, v in r.items()}
        if r["target"] == "t2" and r["source"] == "s0"
        else r
        for r in rows
    ]
    clean, dirty = pv.aggregate(rows), pv.aggregate(poisoned)
    assert (
        pv.loto_weights(clean, fit_on=fit_on)["t2"] == pv.loto_weights(dirty, fit_on=fit_on)["t2"]
    )
    # Every other target's weights do see t2.
    assert (
        pv.loto_weights(clean, fit_on=fit_on)["t3"] != pv.loto_weights(dirty, fit_on=fit_on)["t3"]
    )
    # Fitting on validation or on test top-1 are different fits of the same model.
    assert pv.fit_all(clean, fit_on="val") != pv.fit_all(clean, fit_on="test")
    with pytest.raises(ValueError, match="fit_on"):
        pv.fit_all(clean, fit_on="train")


def test_picks_by_hand():
    rows = []
    for src, size, d, acc in [("a", 100, 0.1, 0.80), ("b", 1000, 0.9, 0.70), ("c", 300, 0.5, 0.75)]:
        rows.append(
            {
                "target": "t",
                "source": src,
                "seed": 0,
                "size": size,
                "divergence": d,
                "val_top1": acc,
                "test_top1": acc,
            }
        )
    cells = pv.aggregate(rows)
    w = {"t": p2l.P2LWeights(w_size=1.0, w_div=0.0)}  # P2L = largest here
    by = {r["selector"]: r for r in pv.picks(cells, w)}
    assert by["largest"]["pick"] == "b" and by["largest"]["loss"] == pytest.approx(0.10)
    assert by["closest"]["pick"] == "a" and by["closest"]["is_best"]
    assert by["p2l"]["pick"] == "b"
    assert by["closest"]["spearman"] == pytest.approx(1.0)
    assert by["largest"]["spearman"] == pytest.approx(-1.0)


def test_seeds_must_agree_on_size_and_divergence():
    rows = grid(seeds=2)
    rows[1] = dict(rows[1], size=rows[1]["size"] + 1)
    with pytest.raises(ValueError, match="differs between seeds"):
        pv.aggregate(rows)


def test_write_validation(tmp_path):
    res = pv.write_validation(grid(noise=0.01), str(tmp_path), p2l.P2LWeights(), {"study": "x"})
    t = tables.read_parquet(res["urls"]["parquet"])
    assert t.schema.equals(tables.P2L_VALIDATION, check_metadata=False)
    assert t.column("selector").to_pylist()[:3] == ["p2l", "largest", "closest"]
    md = (tmp_path / "p2l_validation.md").read_text()
    assert "p2l (paper)" in md and "| t5 |" in md
    assert (tmp_path / "p2l_validation.png").read_bytes()[:4] == b"\x89PNG"
    w = p2l.read_weights(res["urls"]["weights"])
    assert w.targets == 6 and w.w_size == pytest.approx(0.03, abs=0.01)
    assert tables.read_lineage(res["urls"]["weights"])["study"] == "x"
