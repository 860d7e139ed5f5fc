"""Detection demo data with real pixels: handwritten digits placed on photo canvases.

Each canvas is a crop of one of the two real photographs scikit-learn ships (china.jpg,
flower.jpg: the background texture), with 1 to N of scikit-learn's real 8x8 handwritten
digit scans drawn on it at varying scale and position, possibly overlapping. The ink
is light on dark ground and dark on light ground, so every digit stays visible. A
digit's box is exact: the tight box of its visible stroke pixels on the canvas
``[x1, y1, x2, y2]`` in pixels, labeled with the digit's class ("0".."9").

Splits:

- ``labeled``: canvases with their boxes (what a detector trains on);
- ``unlabeled``: canvases without boxes (for pseudo-boxes); their true boxes are kept
  aside in ``unlabeled_truth.jsonl`` to measure pseudo-box quality;
- ``test``: canvases with boxes, drawn from held-out digit scans (30% of the scans,
  never seen by the other splits).

A canvas with exactly one digit also carries the digit as its image ``label``, so
single-object canvases (``max_objects=1``) serve object localization (class + one box).

:func:`export_canvases` writes ``OUT/canvases/<split>/NNNNN.jpg`` and one manifest per
split ``OUT/canvases/<split>.jsonl`` (``image``, ``boxes``, ``label``): the form ingest
reads, so the canvases enter shards through the normal ingest path. Everything is
seeded: the same arguments give the same files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

SPLITS = ("labeled", "unlabeled", "test")
HELD_OUT = 0.3  # share of the digit scans reserved for the test canvases
INK_THRESHOLD = 0.25  # a scaled digit pixel with more ink than this is part of its box


def _digit_pools(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Digit scans (N x 8 x 8 in [0, 1]) and classes, split train pool / test pool."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    n_test = round(HELD_OUT * len(order))
    test, train = order[:n_test], order[n_test:]
    scans = d.images / 16.0
    return {"train": (scans[train], d.target[train]), "test": (scans[test], d.target[test])}


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(im) for im in load_sample_images().images]


def _background(rng: np.random.Generator, photos: Sequence[np.ndarray], size: int) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    side = int(rng.integers(size, min(h, w) + 1))  # zoom varies the texture's scale
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop = crop.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(crop, dtype=np.float32)


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _scaled_digit(scan: np.ndarray, w: int, h: int) -> np.ndarray:
    img = Image.fromarray((scan * 255).astype(np.uint8), "L")
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def render_canvas(
    rng: np.random.Generator,
    photos: Sequence[np.ndarray],
    scans: np.ndarray,
    classes: np.ndarray,
    *,
    size: int,
    objects: tuple[int, int],
    digit_px: tuple[int, int],
    max_overlap: float,
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One canvas and its boxes ``[{"bbox": [x1, y1, x2, y2], "label": "7"}, ...]``."""
    canvas = _background(rng, photos, size)
    boxes: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        i = int(rng.integers(len(scans)))
        side = int(rng.integers(digit_px[0], digit_px[1] + 1))
        w = max(8, int(side * rng.uniform(0.8, 1.1)))
        alpha = _scaled_digit(scans[i], w, side)
        rows = np.flatnonzero((alpha > INK_THRESHOLD).any(axis=1))
        cols = np.flatnonzero((alpha > INK_THRESHOLD).any(axis=0))
        if len(rows) == 0:
            continue  # a blank scan: nothing to see, nothing to box
        for _try in range(50):
            x0 = int(rng.integers(0, size - w + 1))
            y0 = int(rng.integers(0, size - side + 1))
            box = [x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1]
            if all(_iou(box, b["bbox"]) <= max_overlap for b in boxes):
                break
        else:
            continue  # no room left on this canvas
        region = canvas[y0 : y0 + side, x0 : x0 + w]
        light_ground = region.mean() > 110
        ink = rng.uniform(0, 50, 3) if light_ground else rng.uniform(205, 255, 3)
        a = alpha[..., None]
        canvas[y0 : y0 + side, x0 : x0 + w] = region * (1 - a) + ink * a
        boxes.append({"bbox": [float(c) for c in box], "label": str(int(classes[i]))})
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    return image, boxes


def export_canvases(
    out: str,
    counts: dict[str, int] | None = None,
    *,
    size: int = 160,
    objects: tuple[int, int] = (1, 4),
    digit_px: tuple[int, int] = (22, 44),
    max_overlap: float = 0.2,
    seed: int = 0,
    quality: int = 92,
) -> dict[str, int]:
    """Write the canvases and their manifests under ``out/canvases/``; returns the
    number of canvases per split. See the module's docstring for the layout."""
    counts = dict(counts or {"labeled": 200, "unlabeled": 600, "test": 100})
    bad = set(counts) - set(SPLITS)
    if bad:
        raise ValueError(f"unknown split(s) {sorted(bad)}; use {', '.join(SPLITS)}")
    if not 1 <= objects[0] <= objects[1]:
        raise ValueError(f"objects must be 1 <= min <= max, got {objects}")
    if not 8 <= digit_px[0] <= digit_px[1] <= size:
        raise ValueError(f"digit_px must be 8 <= min <= max <= size ({size}), got {digit_px}")
    pools, photos = _digit_pools(seed), _photos()
    folder = os.path.join(out, "canvases")
    written = {}
    for split_index, split in enumerate(SPLITS):
        n = counts.get(split, 0)
        if n <= 0:
            continue
        scans, classes = pools["test" if split == "test" else "train"]
        rng = np.random.default_rng([seed, split_index])
        os.makedirs(os.path.join(folder, split), exist_ok=True)
        rows, truth = [], []
        for i in range(n):
            image, boxes = render_canvas(rng, photos, scans, classes, size=size, objects=objects,
                                         digit_px=digit_px, max_overlap=max_overlap)  # fmt: skip
            rel = f"{split}/{i:05d}.jpg"
            image.save(os.path.join(folder, rel), format="JPEG", quality=quality)
            label = boxes[0]["label"] if len(boxes) == 1 else None
            if split == "unlabeled":
                rows.append({"image": rel})
                truth.append({"image": rel, "boxes": boxes, "label": label})
            else:
                rows.append({"image": rel, "boxes": boxes, "label": label})
        _write_jsonl(os.path.join(folder, f"{split}.jsonl"), rows)
        if truth:
            _write_jsonl(os.path.join(folder, "unlabeled_truth.jsonl"), truth)
        written[split] = n
    return written


def export_digit_pool(out: str, size: int = 32, seed: int = 0) -> int:
    """The digit scans the labeled and unlabeled canvases draw from (never the held-out
    test scans), as ``out/digits/<class>/NNNN.png`` at ``size`` pixels: what a backbone
    classifier (the pipeline's student) may train on without seeing a test digit."""
    scans, classes = _digit_pools(seed)["train"]
    for i, (scan, cls) in enumerate(zip(scans, classes, strict=True)):
        folder = os.path.join(out, "digits", str(int(cls)))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray((scan * 255).astype(np.uint8), "L").resize(
            (size, size), Image.Resampling.BILINEAR
        ).save(os.path.join(folder, f"{i:04d}.png"))
    return len(classes)


def manifest_path(out: str, split: str) -> str:
    return os.path.join(out, "canvases", f"{split}.jsonl")


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n")
    os.replace(tmp, path)
