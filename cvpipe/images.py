"""Safe image decoding: bytes in, an RGB PIL image out, or a precise reason why not.

Only JPEG, PNG and WebP are accepted as shard members. Pixels are capped before any
pixel is decoded (Pillow's own decompression-bomb check is a warning below twice its
limit; ours is an error at the limit). Odd modes become correct RGB: 16-bit grayscale is
scaled rather than clamped to white, CMYK is converted, alpha is composited on white.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's warning threshold, enforced as a hard limit
IMAGE_EXTENSIONS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
SHARD_EXTENSION = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

# Never decode a partial image: a truncated file is a reject, not a grey bottom half.
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS


class RejectedImage(ValueError):
    """An image that cannot be used; ``reason`` is a short code to count by."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageHeader:
    format: str  # JPEG | PNG | WEBP | other Pillow format names
    width: int
    height: int
    mode: str


def _decode_error(e: Exception) -> RejectedImage:
    msg = f"{type(e).__name__}: {e}"
    truncated = any(w in msg.lower() for w in ("truncated", "broken data", "end of file"))
    return RejectedImage("truncated_image" if truncated else "corrupt_image", msg)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise RejectedImage("empty_image", "zero-byte image")
    try:
        # Pillow only warns between its limit and twice it: here that warning is an error.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RejectedImage("too_many_pixels", str(e)) from None
    except UnidentifiedImageError:
        raise RejectedImage(
            "not_an_image", f"cannot identify an image in {len(data)} bytes"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise _decode_error(e) from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise RejectedImage("corrupt_image", f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise RejectedImage("too_many_pixels", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    return im


def _check_complete(fmt: str, data: bytes) -> None:
    """Cheap structural checks for truncation, without decoding pixels."""
    tail = data.rstrip(b"\x00")[-16:]
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        raise RejectedImage("truncated_image", "JPEG has no end-of-image marker")
    if fmt == "PNG" and b"IEND" not in tail:
        raise RejectedImage("truncated_image", "PNG has no IEND chunk")
    if fmt == "WEBP" and len(data) >= 8:
        declared = int.from_bytes(data[4:8], "little") + 8
        if len(data) < declared:
            raise RejectedImage(
                "truncated_image", f"WebP declares {declared} bytes, has {len(data)}"
            )


def inspect(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Validate an image from its header and trailer only (no pixel decoding): the fast
    check done at ingest. Raises :class:`RejectedImage`."""
    im = _open(data, max_pixels)
    _check_complete(im.format or "", data)
    return ImageHeader(im.format or "", im.size[0], im.size[1], im.mode)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB correctly."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit int) grayscale: scale to 8 bits; convert() would clamp at 255.
        a = np.asarray(im)
        peak = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a8 = np.clip(a.astype(np.float64) * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a8 = np.clip(a * 255.0 if a.max(initial=0) <= 1.0 else a, 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode image bytes into an RGB image (EXIF orientation applied).

    Raises :class:`RejectedImage` with a precise reason for anything unusable.
    """
    im = _open(data, max_pixels)
    if im.format not in SHARD_EXTENSION:
        raise RejectedImage("unsupported_format", f"{im.format} images are not accepted")
    try:
        im.load()
    except OSError as e:
        msg = str(e)
        reason = (
            "truncated_image" if "truncated" in msg or "broken data" in msg else "corrupt_image"
        )
        raise RejectedImage(reason, msg) from None
    except (SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RejectedImage("corrupt_image", f"{type(e).__name__}: {e}") from None
    with contextlib.suppress(Exception):  # a broken EXIF block is not worth the image
        im = ImageOps.exif_transpose(im)
    return to_rgb(im)


def reencode_png(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """Decode any Pillow-readable image and re-encode it as RGB PNG (for ingesting
    formats that shards do not carry, such as BMP, TIFF or GIF)."""
    im = _open(data, max_pixels)
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise _decode_error(e) from None
    out = io.BytesIO()
    to_rgb(im).save(out, format="PNG")
    return out.getvalue()
