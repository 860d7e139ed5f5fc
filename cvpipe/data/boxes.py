"""Object boxes in sample metadata: parse and validate, keep the good ones.

A sample's ``boxes`` are a JSON list of ``{"bbox": [x1, y1, x2, y2], "label": NAME}``
in pixels of the image (x to the right, y down, ``0 <= x1 < x2 <= width``). This is the
form the manifest's ``boxes`` column, the COCO reader (:mod:`cvpipe.data.coco`), the
canvases generator and the pseudo-box materializer all write, and what detection
training reads.

A bad box never costs its image: :func:`validate_boxes` returns the good boxes and one
:class:`DroppedBox` (a reason code and a precise detail) per bad one, which ingest turns
into a reject row of the sample (the image is written with its good boxes, the summary
counts the dropped boxes by reason).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

# Reason codes of dropped boxes (reject rows and summaries count by these).
MALFORMED = "box_malformed"  # not {"bbox": [4 numbers], "label": ...}
NOT_FINITE = "box_not_finite"  # NaN or an infinity among the coordinates
NEGATIVE_SIZE = "box_negative_size"  # x2 <= x1 or y2 <= y1 (empty or inverted)
OUTSIDE_IMAGE = "box_outside_image"  # a corner beyond the image
UNKNOWN_LABEL = "box_unknown_label"  # no label, or one outside the known set
REASONS = (MALFORMED, NOT_FINITE, NEGATIVE_SIZE, OUTSIDE_IMAGE, UNKNOWN_LABEL)


@dataclass(frozen=True)
class DroppedBox:
    index: int  # position in the sample's list
    reason: str
    detail: str


@dataclass
class CheckedBoxes:
    """The outcome of :func:`validate_boxes`: good boxes in the canonical form (floats,
    string labels) and the dropped ones."""

    boxes: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[DroppedBox] = field(default_factory=list)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_box(
    box: Any,
    width: int | None = None,
    height: int | None = None,
    labels: Collection[str] | None = None,
) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    """One box: (canonical box, None) when good, (None, (reason, detail)) when not.

    ``width``/``height`` (the image's, when known) bound the corners; ``labels`` (when
    given) is the set of known label names."""
    if not isinstance(box, dict) or "bbox" not in box:
        return None, (MALFORMED, f"want {{'bbox': [x1, y1, x2, y2], 'label': NAME}}, got {box!r}")
    coords = box["bbox"]
    if (
        not isinstance(coords, (list, tuple))
        or len(coords) != 4
        or not all(map(_is_number, coords))
    ):
        return None, (MALFORMED, f"bbox must be 4 numbers [x1, y1, x2, y2], got {coords!r}")
    x1, y1, x2, y2 = (float(c) for c in coords)
    if not all(math.isfinite(c) for c in (x1, y1, x2, y2)):
        return None, (NOT_FINITE, f"bbox {coords!r} holds NaN or infinity")
    if x2 <= x1 or y2 <= y1:
        return None, (NEGATIVE_SIZE, f"bbox {coords!r}: want x2 > x1 and y2 > y1")
    if width is not None and height is not None and (x1 < 0 or y1 < 0 or x2 > width or y2 > height):
        return None, (OUTSIDE_IMAGE, f"bbox {coords!r} leaves the {width}x{height} image")
    label = box.get("label")
    if label is None or (isinstance(label, str) and not label.strip()):
        return None, (UNKNOWN_LABEL, f"bbox {coords!r} has no label")
    if isinstance(label, (dict, list, bool)) or not isinstance(label, (str, int)):
        return None, (UNKNOWN_LABEL, f"label {label!r} is not a name")
    label = str(label)
    if labels is not None and label not in labels:
        return None, (UNKNOWN_LABEL, f"label {label!r} is not one of the {len(labels)} known")
    return {"bbox": [x1, y1, x2, y2], "label": label}, None


def validate_boxes(
    boxes: Any,
    width: int | None = None,
    height: int | None = None,
    labels: Collection[str] | None = None,
) -> CheckedBoxes:
    """Every box of a sample, checked (see :func:`check_box`). ``boxes`` must be a list
    (or None: no boxes); anything else is a single malformed entry."""
    out = CheckedBoxes()
    if boxes is None:
        return out
    if not isinstance(boxes, list):
        out.dropped.append(
            DroppedBox(0, MALFORMED, f"boxes must be a list, got {type(boxes).__name__}")
        )
        return out
    known = set(labels) if labels is not None else None
    for i, box in enumerate(boxes):
        good, bad = check_box(box, width, height, known)
        if good is not None:
            out.boxes.append(good)
        else:
            assert bad is not None
            out.dropped.append(DroppedBox(i, *bad))
    return out


def to_arrays(
    boxes: list[dict[str, Any]], index: dict[str, int]
) -> tuple[list[list[float]], list[int]]:
    """Coordinates and class indices of the boxes whose label is in ``index`` (name ->
    index): the targets a detector trains on."""
    coords, classes = [], []
    for b in boxes or []:
        label = str(b.get("label")) if isinstance(b, dict) else None
        if label in index:
            coords.append([float(c) for c in b["bbox"]])
            classes.append(index[label])
    return coords, classes
