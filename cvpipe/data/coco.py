"""COCO-format annotation JSON -> the rows ingest takes from a manifest.

COCO (``{"images": [...], "annotations": [...], "categories": [...]}``) gives each
image a ``file_name`` (relative to an images folder) and each annotation an
``image_id``, a ``category_id`` and a ``bbox`` of ``[x, y, width, height]`` in pixels.
:func:`manifest_rows` turns them into one row per image with ``image`` (its URL),
``source`` (the file name) and ``boxes``: ``[{"bbox": [x1, y1, x2, y2], "label": the
category's name}, ...]``, the form :mod:`cvpipe.data.boxes` validates at ingest.

Nothing is dropped here: an annotation whose category is not in ``categories`` keeps
its box with no label (``category_id`` kept beside it), so ingest rejects it as
``box_unknown_label`` with the image's other boxes kept; a bbox that is not four
numbers stays as it is and is rejected as ``box_malformed``. Crowd annotations
(``iscrowd: 1``) are regions, not objects: they are left out and counted in
:class:`CocoSummary`, as are annotations of image ids the file does not list.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from cvpipe.core.storage import join, read_bytes


class CocoError(ValueError):
    """An annotation file that is not COCO-shaped (no images list, a bad category...)."""


@dataclass
class CocoSummary:
    images: int = 0
    annotations: int = 0  # boxes handed on to ingest
    crowd: int = 0  # iscrowd annotations left out
    orphans: int = 0  # annotations of image ids not in "images"
    categories: list[str] = field(default_factory=list)


def _xywh_to_xyxy(bbox: Any) -> Any:
    if (
        isinstance(bbox, (list, tuple))
        and len(bbox) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    ):
        x, y, w, h = bbox
        return [x, y, x + w, y + h]
    return bbox  # left for box validation to reject as malformed


def load(annotations: str) -> dict[str, Any]:
    try:
        data = json.loads(read_bytes(annotations))
    except FileNotFoundError:
        raise CocoError(f"COCO annotation file {annotations} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CocoError(f"{annotations} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CocoError(f"{annotations} is not COCO: no 'images' list")
    return data


def categories(data: dict[str, Any]) -> dict[Any, str]:
    """category id -> name (names must be unique: they become the class names)."""
    out: dict[Any, str] = {}
    for c in data.get("categories") or []:
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), str):
            raise CocoError(f"bad category {c!r}: want {{'id': ..., 'name': '...'}}")
        out[c["id"]] = c["name"]
    names = list(out.values())
    if len(set(names)) != len(names):
        raise CocoError(f"category names are not unique: {sorted(names)}")
    return out


def manifest_rows(annotations: str, images_dir: str) -> tuple[list[dict[str, Any]], CocoSummary]:
    """One manifest row per COCO image, in the file's image order, and a summary.

    ``image`` is ``images_dir/file_name`` (absolute file names and URLs are kept as
    they are); ``boxes`` is a JSON string; images without annotations get ``[]``."""
    data = load(annotations)
    names = categories(data)
    summary = CocoSummary(categories=list(names.values()))
    boxes_of: dict[Any, list[dict[str, Any]]] = {}
    image_ids = {im.get("id") for im in data["images"] if isinstance(im, dict)}
    for a in data.get("annotations") or []:
        if not isinstance(a, dict):
            raise CocoError(f"bad annotation {a!r}: want an object")
        if a.get("image_id") not in image_ids:
            summary.orphans += 1
            continue
        if a.get("iscrowd"):
            summary.crowd += 1
            continue
        box: dict[str, Any] = {"bbox": _xywh_to_xyxy(a.get("bbox")), "label": None}
        cat = a.get("category_id")
        if cat in names:
            box["label"] = names[cat]
        else:
            box["category_id"] = cat
        boxes_of.setdefault(a["image_id"], []).append(box)
        summary.annotations += 1
    rows = []
    for im in data["images"]:
        if not isinstance(im, dict) or not isinstance(im.get("file_name"), str):
            raise CocoError(f"bad image entry {im!r}: want {{'id': ..., 'file_name': '...'}}")
        name = im["file_name"]
        url = name if ("://" in name or os.path.isabs(name)) else join(images_dir, name)
        rows.append(
            {
                "image": url,
                "source": name,
                "label": None,
                "caption": None,
                "hashtags": None,
                "boxes": json.dumps(boxes_of.get(im.get("id"), [])),
            }
        )
    summary.images = len(rows)
    return rows, summary
