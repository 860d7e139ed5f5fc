"""Pairs for Siamese training, mined inside a batch from (pseudo-)labels, and labels
read from a table instead of the shards' metadata.

:func:`mine_pairs` draws a set number of pairs with a controlled share of positives
(same label, Y = 0) and negatives (different labels, Y = 1); a share of the negatives
can be the batch's hardest ones (the closest dissimilar pairs in the current
embedding, Hadsell et al.'s pairs that still cost something). Draws use torch's global
generator, which the training loop seeds and saves with every epoch, so a resumed run
draws the same pairs.

:func:`read_labels` reads ``key -> label`` from any table with ``key`` and ``label``
columns: a top-K selection (``selection.parquet``), anchor pseudo-labels, or a
hand-made table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cvpipe.core import tables
from cvpipe.core.storage import expand_specs


@dataclass(frozen=True)
class Pairs:
    first: torch.Tensor  # int64 indices into the batch
    second: torch.Tensor
    dissimilar: torch.Tensor  # int64: 0 similar (same label), 1 dissimilar

    def __len__(self) -> int:
        return len(self.first)

    @property
    def positives(self) -> int:
        return int((self.dissimilar == 0).sum())


def _candidates(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every unordered pair (i < j) of the batch, split into (same, different) label
    pairs, each a [2, n] index tensor."""
    i, j = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
    same = labels[i] == labels[j]
    return torch.stack([i[same], j[same]]), torch.stack([i[~same], j[~same]])


def _draw(cands: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` columns of ``cands``: without replacement when there are enough, else
    every candidate and the rest drawn again (so the count, and the ratio, hold)."""
    have = cands.shape[1]
    if n <= 0 or have == 0:
        return cands[:, :0]
    if n <= have:
        return cands[:, torch.randperm(have)[:n].to(cands.device)]
    extra = torch.randint(have, (n - have,)).to(cands.device)
    return torch.cat([cands, cands[:, extra]], dim=1)


def mine_pairs(
    labels: torch.Tensor,
    n_pairs: int,
    positive_fraction: float = 0.5,
    hard_negatives: float = 0.0,
    embeddings: torch.Tensor | None = None,
) -> Pairs:
    """``n_pairs`` pairs of the batch whose labels are ``labels``.

    ``round(n_pairs * positive_fraction)`` are positives, the rest negatives; a batch
    with no positive (or no negative) pair gives only the other kind. Of the negatives,
    ``round(negatives * hard_negatives)`` are the closest dissimilar pairs under
    ``embeddings`` (needed then; distances are taken without gradient), the others
    are drawn at random."""
    if not 0.0 <= positive_fraction <= 1.0 or not 0.0 <= hard_negatives <= 1.0:
        raise ValueError("positive_fraction and hard_negatives must be within [0, 1]")
    labels = torch.as_tensor(labels)
    pos_c, neg_c = _candidates(labels)
    n_pos = round(n_pairs * positive_fraction) if neg_c.shape[1] else n_pairs
    n_pos = n_pos if pos_c.shape[1] else 0
    n_neg = n_pairs - n_pos if neg_c.shape[1] else 0
    n_hard = round(n_neg * hard_negatives)
    if n_hard and embeddings is None:
        raise ValueError("hard negatives need the batch's embeddings")
    parts = [_draw(pos_c, n_pos)]
    y = [torch.zeros(parts[0].shape[1], dtype=torch.int64)]
    if n_hard:
        with torch.no_grad():
            z = embeddings.float()
            d = (z[neg_c[0]] - z[neg_c[1]]).pow(2).sum(dim=1)
        hard = neg_c[:, torch.topk(d, min(n_hard, len(d)), largest=False).indices]
        parts.append(_draw(hard, n_hard))
    parts.append(_draw(neg_c, n_neg - n_hard))
    y.append(torch.ones(n_neg, dtype=torch.int64))
    both = torch.cat(parts, dim=1)
    dev = labels.device
    return Pairs(both[0], both[1], torch.cat(y).to(dev))


def read_labels(spec: str | Sequence[str]) -> dict[str, str]:
    """``key -> label`` (as text) from Parquet tables with ``key`` and ``label`` columns
    (a file, a folder of files, a pattern, or a list). A key the tables give two
    different labels (a selection keeps an image in each class it is top-K for) is
    left out: a pair holding it could not say whether it is similar."""
    out: dict[str, str] = {}
    ambiguous: set[str] = set()
    for url in expand_specs(spec if isinstance(spec, str) else list(spec), ".parquet"):
        t = tables.read_parquet(url, columns=["key", "label"])
        for key, label in zip(
            t.column("key").to_pylist(), t.column("label").to_pylist(), strict=True
        ):
            if label is None:
                continue
            label = str(label)
            if out.setdefault(key, label) != label:
                ambiguous.add(key)
    for key in ambiguous:
        del out[key]
    if not out:
        raise ValueError(f"no labeled key in {spec}")
    return out
