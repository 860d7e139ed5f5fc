"""Real image data that ships inside installed packages: no download, ever.

- ``digits``: scikit-learn's 1,797 real 8x8 handwritten digit scans, upscaled to PNG in
  class folders, optionally split into labeled / unlabeled / test parts (stratified).
- ``photos``: random crops of the two real photographs scikit-learn ships
  (china.jpg, flower.jpg), saved as JPEG: realistic JPEG bytes for benchmarks.
"""

from __future__ import annotations

import csv
import os
from collections import Counter

import numpy as np
from PIL import Image

DIGIT_SPLITS = ("labeled", "unlabeled", "test")


def parse_split(text: str) -> dict[str, float]:
    """``"labeled=0.05,unlabeled=0.65,test=0.3"`` -> fractions; they must sum to 1."""
    split: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in DIGIT_SPLITS:
            raise ValueError(f"unknown split {name!r}; use {', '.join(DIGIT_SPLITS)}")
        split[name] = float(value)
    if any(v < 0 for v in split.values()) or abs(sum(split.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {split}")
    return split


def _digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    a = np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8).reshape(8, 8)
    return Image.fromarray(a, "L").resize((size, size), Image.Resampling.BILINEAR)


def export_digits(
    out: str, size: int = 32, split: dict[str, float] | None = None, seed: int = 0
) -> dict[str, int]:
    """Write the digits as PNG files; returns image counts per folder.

    Without ``split``: ``out/<class>/<index>.png``. With a split: ``out/labeled/<class>/``,
    ``out/test/<class>/``, and ``out/unlabeled/<index>.png`` with no class folders (the
    labels are hidden from training) plus ``out/unlabeled_truth.csv`` (image, label) so
    pseudo-label precision can be measured.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data, digits.target
    assignment = np.full(len(y), "", dtype=object)
    if split:
        rng = np.random.default_rng(seed)
        for cls in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == cls))
            bounds = np.cumsum([round(split.get(s, 0.0) * len(idx)) for s in DIGIT_SPLITS])
            bounds[-1] = len(idx)
            start = 0
            for name, stop in zip(DIGIT_SPLITS, bounds, strict=True):
                assignment[idx[start:stop]] = name
                start = stop
    counts: Counter = Counter()
    truth_rows = []
    for i, (pixels, label) in enumerate(zip(x, y, strict=True)):
        part = assignment[i]
        if part == "unlabeled":
            rel = os.path.join("unlabeled", f"{i:04d}.png")
            truth_rows.append((f"{i:04d}.png", str(label)))
        else:
            rel = (
                os.path.join(part, str(label), f"{i:04d}.png")
                if part
                else os.path.join(str(label), f"{i:04d}.png")
            )
        path = os.path.join(out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _digit_image(pixels, size).save(path, format="PNG")
        counts[part or "all"] += 1
    if truth_rows:
        with open(os.path.join(out, "unlabeled_truth.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "label"])
            w.writerows(truth_rows)
    return dict(counts)


def export_photos(out: str, count: int = 1000, size: int = 256, seed: int = 0) -> int:
    """Random ``size`` x ``size`` crops of scikit-learn's two sample photos as JPEG files,
    in folders named after the photo (so they ingest with a label)."""
    from sklearn.datasets import load_sample_images

    bundle = load_sample_images()
    rng = np.random.default_rng(seed)
    for i in range(count):
        which = i % len(bundle.images)
        photo = bundle.images[which]
        name = os.path.splitext(os.path.basename(bundle.filenames[which]))[0]
        h, w = photo.shape[:2]
        s = min(size, h, w)
        top, left = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crop = Image.fromarray(photo[top : top + s, left : left + s])
        path = os.path.join(out, name, f"{i:06d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        crop.save(path, format="JPEG", quality=90)
    return count


def class_manifest(
    folder: str, classes: str, out_csv: str, per_class: int | None = None, offset: int = 0
) -> int:
    """A manifest (image, label) of the images of ``folder/<class>/`` for the digit
    classes in ``classes`` (e.g. "89"), so a group of classes ingests as one dataset;
    ``per_class`` keeps only the first images of each class (a small labeled set), from
    the ``offset``-th on (disjoint slices of one folder: train, validation, test)."""
    rows = []
    for c in classes:
        class_dir = os.path.join(folder, c)
        if os.path.isdir(class_dir):
            names = sorted(os.listdir(class_dir))[offset:]
            names = names[:per_class]
            rows += [(os.path.join(class_dir, n), c) for n in names]
    return _write_manifest(rows, out_csv)


def unlabeled_manifest(images: str, out_csv: str) -> int:
    """A manifest (image, label) of the unlabeled split of :func:`export_digits`, with
    the hidden labels, for experiments that measure against them."""
    with open(os.path.join(images, "unlabeled_truth.csv"), newline="") as f:
        rows = [
            (os.path.join(images, "unlabeled", r["image"]), r["label"]) for r in csv.DictReader(f)
        ]
    return _write_manifest(rows, out_csv)


def _write_manifest(rows: list[tuple[str, str]], out_csv: str) -> int:
    # Image paths relative to the manifest's folder: how ingest resolves them, and the
    # manifest stays valid wherever the tree is moved.
    folder = os.path.dirname(out_csv) or "."
    os.makedirs(folder, exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label"])
        w.writerows((os.path.relpath(image, folder), label) for image, label in rows)
    return len(rows)
