"""Word prediction: precision@k on held-out captioned shards (a weakly supervised model
against the frequency baseline), the top-scoring images of some words, and the output
layer as a word embedding.

- :func:`evaluate_words` streams held-out shards once through a weakly supervised
  checkpoint (:class:`~cvpipe.learn.tasks.weak.WeakTask` targets): mean precision@1/5/10
  of its word prediction and of the frequency baseline (always the k most frequent words
  of the training vocabulary: indices 0..k-1) over the samples with at least one
  vocabulary word, in one table; and for a few words the best-scoring samples (a
  running top-M per word: memory O(words x M)), as a table and a PNG contact sheet.
- :func:`nearest_words`: the head's weight rows are word vectors (Joulin et al. 2016);
  the words closest to a query by cosine.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from cvpipe import models
from cvpipe.core import tables
from cvpipe.core.config import Strict, runtime
from cvpipe.core.stage import Resources, Stage, Unit
from cvpipe.core.storage import is_committed, join, read_bytes, write_bytes_atomic
from cvpipe.data.loader import make_loader
from cvpipe.data.shards import Sample, iter_shard, shard_id
from cvpipe.label.text import Tokenizer
from cvpipe.label.vocab import read_vocab
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.tasks.multilabel import PRECISION_AT, precision_at_k, soft_targets
from cvpipe.learn.tasks.weak import WeakTask

FREQUENCY = "frequency baseline"


def precision_url(out: str) -> str:
    return join(out, "word_precision.parquet")


def top_images_url(out: str) -> str:
    return join(out, "top_images.parquet")


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    samples = [it for it in items if "reject" not in it]
    return {
        "images": torch.stack([it["image"] for it in samples]) if samples else torch.empty(0),
        "words": [it["words"] for it in samples],
        "keys": [it["key"] for it in samples],
        "shards": [it["shard"] for it in samples],
        "rejects": sum("reject" in it for it in items),
    }


class _TopImages:
    """The best ``m`` samples of each of some words, by the word's softmax score."""

    def __init__(self, word_ids: Sequence[int], m: int) -> None:
        self.word_ids, self.m = list(word_ids), m
        self.scores = torch.full((len(self.word_ids), 0), -1.0)
        self.refs: list[list[tuple[str, str]]] = [[] for _ in self.word_ids]

    def update(self, probs: torch.Tensor, keys: list[str], shards: list[str]) -> None:
        if not self.word_ids:
            return
        batch = probs[:, self.word_ids].T.cpu()  # words x n
        both = torch.cat([self.scores, batch], dim=1)
        k = min(self.m, both.shape[1])
        top = both.topk(k, dim=1)
        old = self.scores.shape[1]
        refs = []
        for w, idx in enumerate(top.indices.tolist()):
            refs.append([self.refs[w][i] if i < old else (keys[i - old], shards[i - old])
                         for i in idx])  # fmt: skip
        self.scores, self.refs = top.values, refs

    def rows(self, words: Sequence[str]) -> list[dict[str, Any]]:
        return [
            {"word": words[wid], "rank": r + 1, "key": key, "shard": shard,
             "score": float(self.scores[w, r])}
            for w, wid in enumerate(self.word_ids)
            for r, (key, shard) in enumerate(self.refs[w])
        ]  # fmt: skip


@dataclass
class WordEval:
    images: int
    precision: dict[str, dict[int, float]]  # method -> k -> mean precision@k
    top_images: list[dict[str, Any]]
    skipped: int = 0
    rejects: int = 0


def score_words(
    checkpoint: str,
    shards: Sequence[str],
    targets: str,
    show: Sequence[str] = (),
    top_images: int = 8,
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int = 0,
) -> WordEval:
    """Precision@k of the model and of the frequency baseline, and the top images of the
    words ``show`` (words outside the vocabulary are ignored)."""
    dev = models.resolve_device(device)
    model, info = models.load_checkpoint(checkpoint, dev)
    model.eval()
    task = WeakTask(targets=targets)
    ds = task.dataset(TrainConfig(), list(shards), info, stage="evaluate-words", train=False)
    loader = make_loader(ds, batch_size, num_workers, collate_fn=_collate)
    index = {w: i for i, w in enumerate(info.classes)}
    tops = _TopImages([index[w] for w in show if w in index], top_images)
    n_words = len(info.classes)
    sums = {m: dict.fromkeys(PRECISION_AT, 0.0) for m in ("model", FREQUENCY)}
    baseline = -torch.arange(n_words, dtype=torch.float32)  # index 0 = most frequent
    n = skipped = rejects = 0
    with torch.no_grad():
        for b in loader:
            rejects += b["rejects"]
            keep = [i for i, ws in enumerate(b["words"]) if ws]
            skipped += len(b["words"]) - len(keep)
            if not keep:
                continue
            x = b["images"][keep].to(dev)
            logits = model(x).float().cpu()
            words = [b["words"][i] for i in keep]
            rows = torch.tensor([r for r, ws in enumerate(words) for _ in ws])
            cols = torch.tensor([c for ws in words for c in ws])
            weights = torch.tensor([1.0 / len(ws) for ws in words for _ in ws])
            y = soft_targets(rows, cols, weights, len(keep), n_words)
            base = baseline.expand(len(keep), -1)
            for k in PRECISION_AT:
                sums["model"][k] += float(precision_at_k(logits, y, k).sum())
                sums[FREQUENCY][k] += float(precision_at_k(base, y, k).sum())
            probs = F.softmax(logits, dim=1)
            tops.update(probs, [b["keys"][i] for i in keep], [b["shards"][i] for i in keep])
            n += len(keep)
    precision = {
        m: {k: total / n if n else float("nan") for k, total in v.items()} for m, v in sums.items()
    }
    return WordEval(n, precision, tops.rows(info.classes), skipped, rejects)


def precision_markdown(result: WordEval) -> str:
    lines = [
        f"Word prediction on {result.images} held-out images "
        f"({result.skipped} without a vocabulary word left out)",
        "",
        "| method | P@1 | P@5 | P@10 |",
        "|---|---:|---:|---:|",
    ]
    for method, p in result.precision.items():
        lines.append(f"| {method} | " + " | ".join(f"{p[k]:.3f}" for k in PRECISION_AT) + " |")
    return "\n".join(lines) + "\n"


def contact_sheet(
    rows: Sequence[dict[str, Any]], shard_urls: Sequence[str], thumb: int = 48
) -> bytes:
    """A PNG: one row per word, its top images left to right. Only the shards holding a
    shown sample are read."""
    from PIL import Image, ImageDraw

    by_id = {shard_id(url): url for url in shard_urls}
    wanted: dict[str, set[str]] = {}
    for r in rows:
        wanted.setdefault(r["shard"], set()).add(r["key"])
    pictures: dict[tuple[str, str], Image.Image] = {}
    for sid, keys in wanted.items():
        for item in iter_shard(by_id[sid], decode=True):
            if isinstance(item, Sample) and item.key in keys:
                pictures[(sid, item.key)] = item.image.resize((thumb, thumb))
    words = list(dict.fromkeys(r["word"] for r in rows))
    cols = max((r["rank"] for r in rows), default=0)
    label_w = 90
    sheet = Image.new("RGB", (label_w + cols * (thumb + 4), len(words) * (thumb + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for i, w in enumerate(words):
        y = 4 + i * (thumb + 4)
        draw.text((4, y + thumb // 3), w[:14], fill="black")
        for r in rows:
            picture = pictures.get((r["shard"], r["key"]))
            if r["word"] == w and picture is not None:
                sheet.paste(picture, (label_w + (r["rank"] - 1) * (thumb + 4), y))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def nearest_words(checkpoint: str, query: str, k: int = 10) -> list[tuple[str, float]]:
    """The ``k`` words whose output-layer rows are closest to the query word's (cosine).
    The query is read by the tokenizer rules (and the vocabulary's synonyms when the
    checkpoint names its vocabulary)."""
    info = models.load_info(checkpoint)
    synonyms: dict[str, str] = {}
    vocab_url = (info.lineage.get("task") or {}).get("vocab")
    if vocab_url and is_committed(vocab_url):
        synonyms = read_vocab(vocab_url).synonyms
    words = Tokenizer(synonyms).words(query)
    if len(words) != 1:
        raise ValueError(f"query {query!r} is not one word after the tokenizer rules ({words})")
    index = {w: i for i, w in enumerate(info.classes)}
    if words[0] not in index:
        raise ValueError(f"{words[0]!r} is not in the vocabulary of {checkpoint}")
    model, _ = models.load_checkpoint(checkpoint)
    w = F.normalize(model.head.weight.detach().float(), dim=1)
    sims = w @ w[index[words[0]]]
    sims[index[words[0]]] = -float("inf")
    top = sims.topk(min(k, len(info.classes) - 1))
    return [(info.classes[i], float(s)) for s, i in zip(top.values, top.indices, strict=True)]


# --------------------------------------------------------------------------- the stage


class WordEvalJob(Strict):
    """A weakly supervised checkpoint scored on held-out captioned shards."""

    checkpoint: str
    shards: list[str] = Field(min_length=1)
    targets: str = Field(description="the word targets folder holding these shards' targets")
    out: str = Field(description="writes word_precision.{parquet,md}, top_images.{parquet,png}")
    show: list[str] = Field(default_factory=list, description="words of the contact sheet")
    top_images: int = Field(8, ge=1, description="images per shown word")
    batch_size: int = runtime(256, ge=1)
    device: str = runtime("auto")
    num_workers: int = runtime(0, ge=0)
    cpu_threads: int | None = runtime(None, ge=1)


class WordEvalStage(Stage[WordEvalJob, dict[str, Any]]):
    """One unit: :func:`score_words`, published as tables, markdown and a PNG; committed
    scores of the same weights, shards and words are read back."""

    name = "evaluate-words"
    resources = Resources(cpus=1, gpus=1)
    retries = 1

    def identity(self) -> dict[str, Any]:
        j = self.config
        return {**super().identity(), "model_id": models.model_id(j.checkpoint)}

    def units(self) -> list[Unit]:
        return [Unit(f"words {self.config.checkpoint}", (self.config.checkpoint,
                                                          *self.config.shards))]  # fmt: skip

    def outputs(self, unit: Unit) -> list[str]:
        out = self.config.out
        return [top_images_url(out), join(out, "top_images.png"),
                join(out, "word_precision.md"), precision_url(out)]  # fmt: skip

    def committed(self, unit: Unit) -> bool:
        return super().committed(unit) and (
            tables.read_lineage(precision_url(self.config.out)).get("eval_id")
            == self.identity_hash()
        )

    def process(self, unit: Unit) -> dict[str, Any]:
        j = self.config
        show = j.show or models.load_info(j.checkpoint).classes[:8]
        with models.cpu_threads(j.cpu_threads):
            result = score_words(j.checkpoint, j.shards, j.targets, show, j.top_images,
                                 j.batch_size, j.device, j.num_workers)  # fmt: skip
        lin = tables.lineage(
            None, stage=self.name, eval_id=self.identity_hash(), checkpoint=j.checkpoint,
            model_id=models.model_id(j.checkpoint), shards=len(j.shards), images=result.images,
            skipped=result.skipped, rejects=result.rejects,
        )  # fmt: skip
        tables.write_parquet(tables.from_rows(result.top_images, tables.WORD_TOP_IMAGES),
                             top_images_url(j.out), lin)  # fmt: skip
        write_bytes_atomic(
            join(j.out, "top_images.png"), contact_sheet(result.top_images, j.shards)
        )
        write_bytes_atomic(join(j.out, "word_precision.md"), precision_markdown(result).encode())
        rows = [
            {"method": m, "images": result.images,
             **{f"p_at_{k}": p[k] for k in PRECISION_AT}}
            for m, p in result.precision.items()
        ]  # fmt: skip
        tables.write_parquet(
            tables.from_rows(rows, tables.WORD_PRECISION), precision_url(j.out), lin
        )
        return self.read_back(unit)

    def read_back(self, unit: Unit) -> dict[str, Any]:
        out = self.config.out
        return {
            "precision": tables.read_parquet(precision_url(out)).to_pylist(),
            "markdown": read_bytes(join(out, "word_precision.md")).decode(),
            "top_images": top_images_url(out),
            "contact_sheet": join(out, "top_images.png"),
        }
