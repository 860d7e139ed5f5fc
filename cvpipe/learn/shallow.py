"""Shallow learners on frozen features: R-CNN's classifier stage, "shallow learning
driving SVMs".

Features come from any checkpoint's penultimate layer (the inference stage with
``--features``); labels are joined by key from the ingest index under a root
(``{root}/index/<partition>/<stem>.parquet``, one per shard, so each features file
reads only its own shard's index). A linear SVM (``LinearSVC``, squared hinge, one vs
rest) or a multinomial logistic regression is fitted on standardized features. The
regularization ``C`` is given, or chosen on a validation split from a grid (never on the
test split).

A fitted learner is a linear map: :meth:`ShallowModel.head` folds the standardization
into it, giving ``(W[C, D], b[C])`` such that ``argmax(W f + b)`` is the learner's
prediction, i.e. a linear head for the same backbone. It is saved as ``.npz`` of
numbers and strings only (read with ``allow_pickle=False``); nothing here pickles.

The training matrix lives in memory (scikit-learn fits in memory): this is for target
tasks of labeled images, not for the unlabeled corpus.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cvpipe.core import tables
from cvpipe.core.stage import PermanentError, Resources, Stage, Unit
from cvpipe.core.storage import is_committed, join, read_bytes, write_bytes_atomic
from cvpipe.data.features import features_urls, iter_features
from cvpipe.data.shards import shard_id, unit_url
from cvpipe.label.anchors import key_hash
from cvpipe.learn.config import ShallowConfig

MODELS = ("svm", "logistic")


def result_url(out: str) -> str:
    return join(out, "shallow.parquet")


def head_url(out: str) -> str:
    return join(out, "shallow_head.npz")


@dataclass
class Labeled:
    """Feature vectors with their labels (``x[i]`` has label ``y[i]``), and how many
    vectors had no label in the truth index."""

    x: np.ndarray
    y: np.ndarray  # str labels
    keys: list[str]
    unlabeled: int = 0

    def __len__(self) -> int:
        return len(self.y)


def _truth(root: str, features_url: str) -> dict[str, str]:
    url = unit_url(root, "index", shard_id(features_url))
    if not is_committed(url):
        raise FileNotFoundError(
            f"no ingest index {url} for {features_url}: --truth must be the root the "
            "shards were ingested into"
        )
    t = tables.read_parquet(url, columns=["key", "label"])
    return {
        k: v
        for k, v in zip(t.column("key").to_pylist(), t.column("label").to_pylist(), strict=True)
        if v is not None
    }


def load_labeled(features: str | Sequence[str], truth: str) -> Labeled:
    """Every vector of ``features`` (a spec or URLs of features files) whose key has a
    label in the ingest index under ``truth``."""
    xs: list[np.ndarray] = []
    ys: list[str] = []
    keys: list[str] = []
    unlabeled = 0
    for url in features_urls(features):
        labels = _truth(truth, url)
        for k, _, emb in iter_features(url):
            names = k.to_pylist()
            keep = np.array([n in labels for n in names], bool)
            unlabeled += int((~keep).sum())
            if keep.any():
                xs.append(np.array(emb[keep], np.float32))
                kept = [n for n, f in zip(names, keep, strict=True) if f]
                keys += kept
                ys += [labels[n] for n in kept]
    if not ys:
        raise ValueError(f"no labeled vector in {features} (labels from {truth}/index)")
    return Labeled(np.concatenate(xs), np.asarray(ys), keys, unlabeled)


def per_class_subset(data: Labeled, per_class: int | None, seed: int = 0) -> Labeled:
    """At most ``per_class`` vectors of each label, chosen by a seeded hash of the key:
    the same keys whatever the file order (None keeps everything)."""
    if per_class is None:
        return data
    order = np.lexsort((key_hash(data.keys, seed), data.y))  # by label, then hash
    keep = []
    for label in np.unique(data.y):
        rows = order[data.y[order] == label]
        keep.extend(rows[:per_class].tolist())
    keep.sort()
    return Labeled(data.x[keep], data.y[keep], [data.keys[i] for i in keep], data.unlabeled)


@dataclass
class ShallowModel:
    """A fitted linear learner over ``classes`` with the standardization it was fitted on."""

    kind: str
    classes: np.ndarray
    coef: np.ndarray  # (C, D), or (1, D) for a binary problem (sklearn's convention)
    intercept: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    c: float

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W[C, D], b[C])`` on raw features: ``argmax(W f + b)`` is the prediction."""
        w = self.coef / self.scale[None, :]
        b = self.intercept - (self.coef * (self.mean / self.scale)[None, :]).sum(axis=1)
        if len(self.classes) == 2 and w.shape[0] == 1:  # one score s: class 1 iff s > 0
            w = np.concatenate([-w / 2, w / 2])
            b = np.concatenate([-b / 2, b / 2])
        return w.astype(np.float32), b.astype(np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        w, b = self.head()
        return self.classes[np.argmax(np.asarray(x, np.float32) @ w.T + b, axis=1)]

    def save(self, url: str) -> None:
        w, b = self.head()
        buf = io.BytesIO()
        np.savez(buf, weight=w, bias=b, classes=self.classes.astype(str), c=np.float64(self.c))
        write_bytes_atomic(url, buf.getvalue())


def load_head(url: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(W, b, classes)`` of a saved shallow learner (no pickle)."""
    with np.load(io.BytesIO(read_bytes(url)), allow_pickle=False) as z:
        return z["weight"], z["bias"], [str(c) for c in z["classes"]]


def fit(
    train: Labeled, model: str = "svm", c: float = 1.0, seed: int = 0, max_iter: int = 5000
) -> ShallowModel:
    """Fit a linear SVM or logistic regression on standardized features."""
    if model not in MODELS:
        raise ValueError(f"unknown shallow model {model!r}; choose from {MODELS}")
    if c <= 0:
        raise ValueError(f"C must be > 0, got {c}")
    classes = np.unique(train.y)
    if len(classes) < 2:
        raise ValueError(f"a classifier needs two or more classes, the labels hold {classes}")
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    scaler = StandardScaler().fit(train.x)
    z = scaler.transform(train.x)
    if model == "svm":
        est = LinearSVC(C=c, max_iter=max_iter, random_state=seed)
    else:
        est = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    est.fit(z, train.y)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    return ShallowModel(
        model, est.classes_, est.coef_, np.atleast_1d(est.intercept_), scaler.mean_, scale, c
    )


def accuracy(model: ShallowModel, data: Labeled) -> float:
    """Top-1 in [0, 1]; a label the learner never saw counts as wrong."""
    if len(data) == 0:
        raise ValueError("no labeled vector to score")
    return float(np.mean(model.predict(data.x) == data.y))


def fit_select(
    train: Labeled,
    model: str,
    val: Labeled | None = None,
    c: float = 1.0,
    c_grid: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
    seed: int = 0,
) -> tuple[ShallowModel, dict[float, float]]:
    """Fit with ``c``, or, given a validation split, with the grid's C of the best
    validation accuracy (the smallest C among equals). Returns the model and the
    validation accuracy of each C tried."""
    if val is None:
        return fit(train, model, c, seed), {}
    scored = {float(cc): accuracy(fit(train, model, cc, seed), val) for cc in sorted(c_grid)}
    best = max(scored, key=lambda cc: (scored[cc], -cc))
    return fit(train, model, best, seed), scored


def run(config: ShallowConfig, lineage: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fit on ``config.features`` (labels from ``truth``), score on ``test`` (labels from
    ``test_truth``, default ``truth``); publish ``out/shallow_head.npz`` and, last,
    ``out/shallow.parquet`` (tables.SHALLOW, one row). Returns the row."""
    c = config
    start = time.perf_counter()
    train = per_class_subset(load_labeled(c.features, c.truth), c.per_class, c.seed)
    val = load_labeled(c.val, c.test_truth or c.truth) if c.val else None
    learner, val_scores = fit_select(train, c.model, val, c.c, c.c_grid, c.seed)
    seconds = time.perf_counter() - start
    test = load_labeled(c.test, c.test_truth or c.truth)
    row = {
        "model": c.model,
        "top1": accuracy(learner, test),
        "train": len(train),
        "test": len(test),
        "classes": len(learner.classes),
        "per_class": c.per_class,
        "c": learner.c,
        "unlabeled": train.unlabeled,
        "fit_seconds": seconds,
    }
    learner.save(head_url(c.out))
    first = features_urls(c.features)[0]
    lin = tables.lineage(
        c,
        stage="shallow",
        **(lineage or {}),
        shallow_config=c.model_dump(mode="json"),
        val_scores={str(k): v for k, v in val_scores.items()},
        features_model_id=tables.read_lineage(first).get("model_id"),
    )
    tables.write_parquet(tables.from_rows([row], tables.SHALLOW), result_url(c.out), lin)
    return row


class ShallowStage(Stage[ShallowConfig, dict[str, Any]]):
    """One shallow learner as a stage: a single unit whose commit is ``shallow.parquet``."""

    name = "shallow"
    resources = Resources(cpus=1)

    def units(self) -> list[Unit]:
        return [Unit(f"{self.config.model} -> {self.config.out}")]

    def outputs(self, unit: Unit) -> list[str]:
        return [head_url(self.config.out), result_url(self.config.out)]

    def process(self, unit: Unit) -> dict[str, Any]:
        return run(self.config)

    def read_back(self, unit: Unit) -> dict[str, Any]:
        url = result_url(self.config.out)
        have = tables.read_lineage(url).get("config_hash")
        if have != tables.config_hash(self.config):
            raise PermanentError(
                f"{url} was written by another config (hash {have}, now "
                f"{tables.config_hash(self.config)}): use a new --out"
            )
        return tables.read_parquet(url).to_pylist()[0]

    def describe(self, stats: dict[str, Any]) -> str:
        return f"{stats['model']}: top-1 {stats['top1']:.4f} on {stats['test']} vectors"
