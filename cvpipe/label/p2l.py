"""P2L-style source selection: rank candidate source models for a target without
fine-tuning them all.

After Bhattacharjee et al. 2019, "P2L: Predicting Transfer Learning for Images and
Semantic Relations" (arXiv 1908.07630): one forward pass of the target set through one
reference model gives the target's summary; each candidate source has a cached summary
in the same feature space (the anchors stage's summaries: :mod:`cvpipe.label.anchors`,
one anchor per candidate) and a size. The published formula could not be read here, so
this is a documented, parameterized *P2L-style* score::

    score(s, t) = w_size * log|S_s| - w_div * D(t, s)

- ``|S_s|`` is the number of images of source s (natural log);
- ``D(t, s)`` is a divergence between the target's summary t and the source's summary
  s, computed exactly as the anchors stage computes image-to-anchor distances
  (:func:`cvpipe.label.anchors.anchor_distances`, the target summary in the place of
  the image):

  - ``kl`` (summaries that are distributions: anchor kind ``normalized`` or
    ``softmax``): ``KL(t || s) = sum_i t_i log(t_i / s_i)`` with
    ``kl_direction="image_anchor"`` (the default; ``"anchor_image"`` gives
    ``KL(s || t)``). Both vectors are smoothed first: ``eps`` (default 1e-8) is added
    to every entry and the vector renormalized, so a zero never gives an infinite
    divergence;
  - ``cosine``: ``1 - cos(t, s)``; ``l2``: the Euclidean distance.

A higher score is a better predicted source; ranks start at 1, ties are broken by the
candidate name (ascending) so a ranking is deterministic.

The weights are fitted on held-out transfer results (:func:`fit_weights`): for each
target, the accuracies of the sources fine-tuned on it are modelled as
``acc(s, t) = c_t + w_size * log|S_s| - w_div * D(t, s)`` with a free offset ``c_t`` per
target (targets differ in difficulty; only the order within a target matters to a
pick). Centering every column within its target removes ``c_t``; ordinary least
squares on the centered columns gives the weights in accuracy units. Leave-one-target-out
use (fit on every target but one, rank the one) lives in
:mod:`cvpipe.experiments.p2l_validation`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import ValidationError

from cvpipe.core import tables
from cvpipe.core.storage import read_bytes
from cvpipe.label.anchors import DEFAULT_EPS, anchor_distances, read_anchors
from cvpipe.label.config import CandidatesFile

METRICS = ("kl", "cosine", "l2")


@dataclass(frozen=True)
class P2LWeights:
    """The two weights of the score and the divergence they were fitted with."""

    w_size: float = 1.0
    w_div: float = 1.0
    metric: str = "kl"
    kind: str = "normalized"
    kl_direction: str = "image_anchor"
    eps: float = DEFAULT_EPS
    targets: int = 0  # targets the fit saw (0: given by hand)
    points: int = 0  # (target, source) results the fit saw
    r2: float = math.nan  # share of the within-target variance the fit explains


def divergences(
    target: np.ndarray,
    sources: np.ndarray,
    metric: str = "kl",
    kl_direction: str = "image_anchor",
    eps: float = DEFAULT_EPS,
) -> np.ndarray:
    """``D(t, s)`` for one target summary (D,) against source summaries (A, D): (A,)."""
    if metric not in METRICS:
        raise ValueError(f"unknown divergence {metric!r}; choose from {METRICS}")
    t = np.asarray(target, np.float32).reshape(1, -1)
    s = np.asarray(sources, np.float32)
    if metric == "kl" and (t.min() < 0 or s.min() < 0):
        raise ValueError(
            "KL needs summaries that are distributions (anchor kind normalized or softmax), "
            "found negative entries"
        )
    return anchor_distances(t, s, metric, kl_direction, eps)[0].astype(np.float64)


def scores(sizes: Sequence[int] | np.ndarray, div: np.ndarray, weights: P2LWeights) -> np.ndarray:
    """``w_size * log|S| - w_div * D`` per candidate."""
    sizes = np.asarray(sizes, np.float64)
    if (sizes < 1).any():
        raise ValueError(f"source sizes must be >= 1 image, got {sizes.tolist()}")
    return weights.w_size * np.log(sizes) - weights.w_div * np.asarray(div, np.float64)


def rank(
    names: Sequence[str],
    sizes: Sequence[int],
    div: Sequence[float] | np.ndarray,
    weights: P2LWeights,
    checkpoints: Mapping[str, str | None] | None = None,
) -> list[dict[str, Any]]:
    """Rows of the ranking (candidate, size, divergence, score, rank, checkpoint), best
    first; equal scores are ordered by candidate name."""
    if not (len(names) == len(sizes) == len(div)):
        raise ValueError("names, sizes and divergences must have one entry per candidate")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate candidate names in {list(names)}")
    s = scores(sizes, np.asarray(div), weights)
    order = sorted(range(len(names)), key=lambda i: (-s[i], names[i]))
    return [
        {
            "candidate": names[i],
            "size": int(sizes[i]),
            "divergence": float(div[i]),
            "score": float(s[i]),
            "rank": r + 1,
            "checkpoint": (checkpoints or {}).get(names[i]),
        }
        for r, i in enumerate(order)
    ]


def rank_summaries(
    target_url: str,
    sources_url: str,
    weights: P2LWeights,
    sizes: Mapping[str, int] | None = None,
    checkpoints: Mapping[str, str | None] | None = None,
    target: str | None = None,
    candidates: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Rank the candidates of an anchors table (one anchor per source; all of them, or
    only ``candidates``) for a target summarized in another anchors table (its only
    anchor, or the one named ``target``). Both must come from the same reference model
    and vector kind; ``sizes`` overrides the image counts of the sources table."""
    t_lin, s_lin = tables.read_lineage(target_url), tables.read_lineage(sources_url)
    for field in ("model_id", "vector_kind"):
        if t_lin.get(field) != s_lin.get(field):
            raise ValueError(
                f"target and source summaries differ in {field}: {t_lin.get(field)!r} "
                f"({target_url}) vs {s_lin.get(field)!r} ({sources_url}); summarize both "
                "with the same reference model and kind"
            )
    if s_lin.get("vector_kind") != weights.kind:
        raise ValueError(
            f"the weights were fitted on {weights.kind!r} summaries, the summaries are "
            f"{s_lin.get('vector_kind')!r}"
        )
    t_names, t_vec, _ = read_anchors(target_url)
    if target is None and len(t_names) != 1:
        raise ValueError(f"{target_url} holds {t_names}: name the target")
    if target is not None and target not in t_names:
        raise ValueError(f"{target_url} has no target {target!r} (it holds {t_names})")
    t = t_vec[t_names.index(target) if target is not None else 0]
    names, vec, counts = read_anchors(sources_url)
    if candidates is not None:
        missing = sorted(set(candidates) - set(names))
        if missing:
            raise ValueError(f"{sources_url} has no summary of candidate(s) {missing}")
        keep = [i for i, n in enumerate(names) if n in set(candidates)]
        names, vec, counts = [names[i] for i in keep], vec[keep], counts[keep]
    size = [int((sizes or {}).get(n, c)) for n, c in zip(names, counts, strict=True)]
    div = divergences(t, vec, weights.metric, weights.kl_direction, weights.eps)
    return rank(names, size, div, weights, checkpoints)


def divergence_table(
    targets_url: str, sources_url: str, weights: P2LWeights
) -> tuple[dict[str, int], dict[str, dict[str, float]]]:
    """Every target of one anchors table against every source of another: the sources'
    sizes (image counts) and ``D[target][source]`` under ``weights``' divergence."""
    t_names, t_vec, _ = read_anchors(targets_url)
    s_names, s_vec, s_counts = read_anchors(sources_url)
    sizes = {n: int(c) for n, c in zip(s_names, s_counts, strict=True)}
    div = {}
    for t, vec in zip(t_names, t_vec, strict=True):
        d = divergences(vec, s_vec, weights.metric, weights.kl_direction, weights.eps)
        div[t] = dict(zip(s_names, d.tolist(), strict=True))
    return sizes, div


def ranking_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return tables.from_rows(list(rows), tables.P2L_RANKING)


def write_ranking(
    rows: Sequence[Mapping[str, Any]], url: str, weights: P2LWeights, lineage: Mapping[str, Any]
) -> None:
    """The ranking Parquet, with the weights and divergence that made it in the lineage."""
    tables.write_parquet(
        ranking_table(rows), url, {**tables.lineage(), **lineage, "weights": asdict(weights)}
    )


def load_candidates(url: str) -> CandidatesFile:
    """CANDIDATES.yaml (see :class:`cvpipe.label.config.CandidatesFile`); a bare
    ``name: shards`` mapping is read as candidates with shards only."""
    import yaml

    raw = yaml.safe_load(read_bytes(url))
    if not isinstance(raw, dict):
        raise ValueError(f"{url} must hold a mapping (candidates: name -> shards/checkpoint)")
    if "candidates" not in raw:
        raw = {"candidates": raw}
    raw["candidates"] = {
        str(k): {"shards": v} if isinstance(v, (str, list)) else v
        for k, v in (raw["candidates"] or {}).items()
    }
    try:
        cands = CandidatesFile.model_validate(raw)
    except ValidationError as e:
        raise ValueError(f"{url}: {e}") from None
    if cands.summaries is None:
        bare = sorted(n for n, c in cands.candidates.items() if not c.shards)
        if bare:
            raise ValueError(
                f"{url}: candidate(s) {bare} have no shards and no summaries are given"
            )
    return cands


# ------------------------------------------------------------------------ weight fit


def _centered(groups: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Subtract each group's mean from its rows (columns of ``x`` independently)."""
    out = np.array(x, np.float64, copy=True)
    for g in np.unique(groups):
        m = groups == g
        out[m] -= out[m].mean(axis=0)
    return out


def fit_weights(
    targets: Sequence[str],
    sizes: Sequence[int],
    div: Sequence[float],
    accuracy: Sequence[float],
    *,
    metric: str = "kl",
    kind: str = "normalized",
    kl_direction: str = "image_anchor",
    eps: float = DEFAULT_EPS,
) -> P2LWeights:
    """Least-squares weights from transfer results, one entry per (target, source):
    ``accuracy`` of the source fine-tuned on the target, the source's size and ``D``.

    Within-target centering removes each target's offset (see the module docstring),
    so a target with a single source carries no information and is ignored."""
    targets = np.asarray(targets)
    n = len(targets)
    if not (len(sizes) == len(div) == len(accuracy) == n):
        raise ValueError("targets, sizes, divergences and accuracies must align")
    sizes_a = np.asarray(sizes, np.float64)
    if (sizes_a < 1).any():
        raise ValueError("source sizes must be >= 1 image")
    x = np.column_stack([np.log(sizes_a), -np.asarray(div, np.float64)])
    y = np.asarray(accuracy, np.float64)
    if not np.isfinite(x).all() or not np.isfinite(y).all():
        raise ValueError("non-finite sizes, divergences or accuracies")
    xc, yc = _centered(targets, x), _centered(targets, y[:, None])[:, 0]
    used = [g for g in np.unique(targets) if (targets == g).sum() > 1]
    if not used:
        raise ValueError("need at least one target with two or more sources")
    if np.linalg.matrix_rank(xc) < 2:
        raise ValueError(
            "log-size and divergence do not vary independently within targets: "
            "the two weights cannot be told apart"
        )
    w, *_ = np.linalg.lstsq(xc, yc, rcond=None)
    resid = yc - xc @ w
    total = float((yc**2).sum())
    r2 = 1.0 - float((resid**2).sum()) / total if total > 0 else math.nan
    return P2LWeights(
        w_size=float(w[0]),
        w_div=float(w[1]),
        metric=metric,
        kind=kind,
        kl_direction=kl_direction,
        eps=eps,
        targets=len(used),
        points=int(sum((targets == g).sum() for g in used)),
        r2=r2,
    )


def write_weights(weights: P2LWeights, url: str, lineage: Mapping[str, Any]) -> None:
    """One row (tables.P2L_WEIGHTS) with the lineage of the transfer results it came from."""
    tables.write_parquet(tables.from_rows([asdict(weights)], tables.P2L_WEIGHTS), url, lineage)


def read_weights(url: str) -> P2LWeights:
    rows = tables.read_parquet(url).to_pylist()
    if len(rows) != 1:
        raise ValueError(f"{url}: a weights table holds one row, found {len(rows)}")
    return P2LWeights(**rows[0])
