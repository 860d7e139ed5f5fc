"""P2L-style source selection: rankings on constructed summaries whose right answer is
known, the score against a hand computation, the weight fit on synthetic transfer
results, and rankings read from anchors tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cvpipe.core import tables
from cvpipe.label import anchors, p2l


def dist(*weights: float) -> np.ndarray:
    v = np.asarray(weights, np.float64)
    return v / v.sum()


TARGET = dist(8, 1, 1, 0)
# Candidates at increasing KL(target || source): the same mass order, flatter each time.
SOURCES = np.stack([dist(7, 1, 1, 1), dist(4, 2, 2, 2), dist(1, 3, 3, 3), dist(0.1, 1, 4, 5)])
NAMES = ["near", "mid", "far", "farthest"]


def kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-8) -> float:
    p, q = (p + eps) / (p + eps).sum(), (q + eps) / (q + eps).sum()
    return float((p * np.log(p / q)).sum())


def test_divergence_is_kl_of_target_to_source_with_smoothing():
    d = p2l.divergences(TARGET, SOURCES, "kl")
    want = [kl(TARGET, s) for s in SOURCES]
    np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-6)
    assert list(np.argsort(d)) == [0, 1, 2, 3]
    # The other direction is another number (KL is not symmetric).
    rev = p2l.divergences(TARGET, SOURCES, "kl", kl_direction="anchor_image")
    np.testing.assert_allclose(rev, [kl(s, TARGET) for s in SOURCES], rtol=1e-5, atol=1e-6)
    assert not np.allclose(rev, d)


def test_kl_refuses_vectors_that_are_not_distributions():
    with pytest.raises(ValueError, match="distributions"):
        p2l.divergences(np.array([1.0, -1.0]), np.array([[0.5, 0.5]]), "kl")


@pytest.mark.parametrize("metric", ["kl", "cosine", "l2"])
def test_equal_sizes_the_closest_source_wins(metric):
    div = p2l.divergences(TARGET, SOURCES, metric)
    rows = p2l.rank(NAMES, [500] * 4, div, p2l.P2LWeights(w_size=1.0, w_div=1.0, metric=metric))
    assert [r["candidate"] for r in rows] == ["near", "mid", "far", "farthest"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]


def test_equal_divergence_the_largest_source_wins():
    sources = np.stack([TARGET * 0.5 + dist(1, 1, 1, 1) * 0.5] * 4)
    div = p2l.divergences(TARGET, sources, "kl")
    assert np.ptp(div) == 0
    sizes = [100, 5000, 20, 800]
    rows = p2l.rank(NAMES, sizes, div, p2l.P2LWeights())
    assert [r["size"] for r in rows] == [5000, 800, 100, 20]
    assert rows[0]["candidate"] == "mid"


def test_score_is_weighted_log_size_minus_divergence_and_ties_go_by_name():
    w = p2l.P2LWeights(w_size=0.5, w_div=2.0)
    rows = p2l.rank(["b", "a", "c"], [100, 100, 10], [0.1, 0.1, 0.0], w)
    by = {r["candidate"]: r for r in rows}
    assert by["a"]["score"] == pytest.approx(0.5 * math.log(100) - 2.0 * 0.1)
    assert by["c"]["score"] == pytest.approx(0.5 * math.log(10))
    # a and b tie exactly: the name decides, so the ranking is deterministic.
    assert [r["candidate"] for r in rows] == ["a", "b", "c"]
    # A strong size weight flips the order of c and the large sources.
    rows = p2l.rank(["b", "a", "c"], [100, 100, 10], [0.1, 0.1, 0.0], p2l.P2LWeights(1, 0))
    assert rows[-1]["candidate"] == "c"


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="sizes"):
        p2l.rank(["a"], [0], [0.1], p2l.P2LWeights())
    with pytest.raises(ValueError, match="duplicate"):
        p2l.rank(["a", "a"], [1, 2], [0.1, 0.2], p2l.P2LWeights())
    with pytest.raises(ValueError, match="unknown divergence"):
        p2l.divergences(TARGET, SOURCES, "js")


def synthetic_results(w_size: float, w_div: float, noise: float, seed: int = 0):
    """Transfer results drawn from the model the fit assumes: a per-target offset plus
    the weighted terms plus noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(8):
        offset = rng.uniform(0.3, 0.9)
        for _ in range(6):
            size = int(rng.integers(50, 5000))
            d = float(rng.uniform(0.0, 2.0))
            acc = offset + w_size * math.log(size) - w_div * d + rng.normal(0, noise)
            rows.append((f"t{t}", size, d, acc))
    return [list(c) for c in zip(*rows, strict=True)]


@pytest.mark.parametrize("w_size,w_div", [(0.02, 0.15), (0.0, 0.3), (0.05, 0.0)])
def test_weight_fit_recovers_known_weights(w_size, w_div):
    targets, sizes, div, acc = synthetic_results(w_size, w_div, noise=0.0)
    w = p2l.fit_weights(targets, sizes, div, acc)
    assert w.w_size == pytest.approx(w_size, abs=1e-9)
    assert w.w_div == pytest.approx(w_div, abs=1e-9)
    assert w.targets == 8 and w.points == 48
    # With noise, close (and the explained share drops below 1).
    targets, sizes, div, acc = synthetic_results(w_size, w_div, noise=0.005, seed=1)
    w = p2l.fit_weights(targets, sizes, div, acc)
    assert w.w_size == pytest.approx(w_size, abs=0.004)
    assert w.w_div == pytest.approx(w_div, abs=0.01)
    assert w.r2 < 1.0


def test_weight_fit_ignores_target_offsets():
    """Adding any constant to one target's accuracies leaves the weights unchanged."""
    targets, sizes, div, acc = synthetic_results(0.02, 0.15, noise=0.01)
    shifted = [a + (0.4 if t == "t3" else 0.0) for t, a in zip(targets, acc, strict=True)]
    a = p2l.fit_weights(targets, sizes, div, acc)
    b = p2l.fit_weights(targets, sizes, div, shifted)
    assert a.w_size == pytest.approx(b.w_size) and a.w_div == pytest.approx(b.w_div)


def test_weight_fit_refuses_inseparable_terms():
    # One size for every source: log-size is constant within each target.
    with pytest.raises(ValueError, match="cannot be told apart"):
        p2l.fit_weights(["t", "t", "t"], [10, 10, 10], [0.1, 0.2, 0.3], [0.9, 0.8, 0.7])


def test_weights_roundtrip_with_lineage(tmp_path):
    w = p2l.P2LWeights(0.02, 0.3, "cosine", "mean", targets=6, points=36, r2=0.7)
    url = str(tmp_path / "w.parquet")
    p2l.write_weights(w, url, tables.lineage(None, stage="p2l_fit", results="grid.parquet"))
    assert p2l.read_weights(url) == w
    assert tables.read_lineage(url)["results"] == "grid.parquet"


def _anchors_file(path, names, vectors, counts, model_id="m1", kind="normalized"):
    sums = anchors.AnchorSums(kind, len(vectors[0]), model=model_id)
    for n, v, c in zip(names, vectors, counts, strict=True):
        sums.sums[n] = np.asarray(v, np.float64) * c
        sums.counts[n] = c
    anchors.write_anchors(sums, str(path))
    return str(path)


def test_rank_summaries_reads_anchors_tables(tmp_path):
    src = _anchors_file(tmp_path / "s.parquet", NAMES, SOURCES, [300, 300, 300, 300])
    tgt = _anchors_file(tmp_path / "t.parquet", ["target"], [TARGET], [40])
    rows = p2l.rank_summaries(tgt, src, p2l.P2LWeights(), checkpoints={"near": "n.pt"})
    assert [r["candidate"] for r in rows] == ["near", "mid", "far", "farthest"]
    assert rows[0]["checkpoint"] == "n.pt" and rows[1]["checkpoint"] is None
    # Sizes from the anchors' counts, or overridden.
    rows = p2l.rank_summaries(tgt, src, p2l.P2LWeights(1.0, 0.0), sizes={"far": 10_000})
    assert rows[0]["candidate"] == "far" and rows[0]["size"] == 10_000
    table = p2l.ranking_table(rows)
    assert table.schema.equals(tables.P2L_RANKING)


def test_rank_summaries_refuses_mixed_feature_spaces(tmp_path):
    src = _anchors_file(tmp_path / "s.parquet", NAMES, SOURCES, [1] * 4, model_id="m1")
    tgt = _anchors_file(tmp_path / "t.parquet", ["target"], [TARGET], [1], model_id="m2")
    with pytest.raises(ValueError, match="model_id"):
        p2l.rank_summaries(tgt, src, p2l.P2LWeights())
    tgt = _anchors_file(tmp_path / "t2.parquet", ["target"], [TARGET], [1], kind="softmax")
    with pytest.raises(ValueError, match="vector_kind"):
        p2l.rank_summaries(tgt, src, p2l.P2LWeights())


def test_rank_summaries_picks_a_named_target(tmp_path):
    src = _anchors_file(tmp_path / "s.parquet", NAMES, SOURCES, [300] * 4)
    tgt = _anchors_file(tmp_path / "t.parquet", ["a", "b"], [TARGET, SOURCES[3]], [40, 40])
    assert p2l.rank_summaries(tgt, src, p2l.P2LWeights(), target="a")[0]["candidate"] == "near"
    assert p2l.rank_summaries(tgt, src, p2l.P2LWeights(), target="b")[0]["candidate"] == "farthest"
    with pytest.raises(ValueError, match="name the target"):
        p2l.rank_summaries(tgt, src, p2l.P2LWeights())
    with pytest.raises(ValueError, match="no target"):
        p2l.rank_summaries(tgt, src, p2l.P2LWeights(), target="c")


def test_candidates_file_forms_and_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("candidates:\n  a: {shards: x/, checkpoint: a.pt, size: 50}\n  b: y/\n")
    c = p2l.load_candidates(str(f))
    assert c.candidates["a"].size == 50 and c.candidates["b"].shards == "y/"
    f.write_text("a: x/\nb: [y/1.tar, y/2.tar]\n")  # bare name -> shards
    assert p2l.load_candidates(str(f)).candidates["b"].shards == ["y/1.tar", "y/2.tar"]
    f.write_text("candidates:\n  a: {checkpoint: a.pt}\n")
    with pytest.raises(ValueError, match="no shards"):
        p2l.load_candidates(str(f))
    f.write_text("candidates:\n  a: {shards: x/, sise: 3}\n")
    with pytest.raises(ValueError, match="sise"):
        p2l.load_candidates(str(f))


def test_rank_summaries_restricts_to_candidates(tmp_path):
    src = _anchors_file(tmp_path / "s.parquet", NAMES, SOURCES, [300] * 4)
    tgt = _anchors_file(tmp_path / "t.parquet", ["target"], [TARGET], [40])
    rows = p2l.rank_summaries(tgt, src, p2l.P2LWeights(), candidates=["far", "mid"])
    assert [r["candidate"] for r in rows] == ["mid", "far"]
    with pytest.raises(ValueError, match="no summary"):
        p2l.rank_summaries(tgt, src, p2l.P2LWeights(), candidates=["zzz"])


def test_divergence_table_matches_divergences(tmp_path):
    src = _anchors_file(tmp_path / "s.parquet", NAMES, SOURCES, [10, 20, 30, 40])
    tgt = _anchors_file(tmp_path / "t.parquet", ["a", "b"], [TARGET, SOURCES[1]], [5, 5])
    sizes, div = p2l.divergence_table(tgt, src, p2l.P2LWeights(metric="cosine"))
    assert sizes == {"far": 30, "farthest": 40, "mid": 20, "near": 10}
    want = p2l.divergences(SOURCES[1], SOURCES, "cosine")
    assert [div["b"][n] for n in NAMES] == pytest.approx(want.tolist(), abs=1e-6)
    assert div["b"]["mid"] == pytest.approx(0.0, abs=1e-6)
