"""Safe image decoding: bytes in, an RGB PIL image out, or a precise reason why not.

Only JPEG, PNG and WebP are accepted as shard members. Pixels are capped before any
pixel is decoded (Pillow's own decompression-bomb check is a warning below twice its
limit; ours is an error at the limit). Odd modes become correct RGB: 16-bit grayscale is
scaled rather than clamped to white, CMYK is converted, alpha is composited on white.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's warning threshold, enforced as a hard limit
SHARD_EXTENSION = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

# Never decode a partial image: a truncated file is a reject, not a grey bottom half.
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS
_PIL_LIMIT = DEFAULT_MAX_PIXELS


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
    # JPEG only, read from the frame header: colour components (1 gray, 3 YCbCr/RGB,
    # 4 CMYK/YCCK), progressive coding, and whether an EXIF block (maybe a rotation)
    # precedes the frame. None/False where unknown or not a JPEG.
    components: int | None = None
    progressive: bool = False
    exif: bool = False


_JPEG_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _sniff(data: bytes) -> ImageHeader | None:
    """Format and size of a PNG, JPEG or WebP read straight from its header bytes
    (Pillow's open costs more than the rest of ingest together). None when unsure:
    the caller then asks Pillow, which also gives the precise error."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return ImageHeader("PNG", w, h)
    if data[:2] == b"\xff\xd8":
        i, n, exif = 2, len(data), False
        while i + 4 <= n:
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in _JPEG_SOF:
                if i + 10 > n:
                    return None
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                return ImageHeader(
                    "JPEG", w, h, components=data[i + 9], progressive=marker in _JPEG_PROGRESSIVE,
                    exif=exif,
                )  # fmt: skip
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
                i += 2
                continue
            if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\x00\x00":
                exif = True
            i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
        return None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
            w, h = struct.unpack("<HH", data[26:30])
            return ImageHeader("WEBP", w & 0x3FFF, h & 0x3FFF)
        if chunk == b"VP8L" and data[20] == 0x2F:
            bits = int.from_bytes(data[21:25], "little")
            return ImageHeader("WEBP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        if chunk == b"VP8X":
            w = int.from_bytes(data[24:27], "little") + 1
            h = int.from_bytes(data[27:30], "little") + 1
            return ImageHeader("WEBP", w, h)
    return None


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
    _check_size(*im.size, max_pixels)
    return im


def _check_size(w: int, h: int, max_pixels: int) -> None:
    if w <= 0 or h <= 0:
        raise RejectedImage("corrupt_image", f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise RejectedImage("too_many_pixels", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")


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
    if not data:
        raise RejectedImage("empty_image", "zero-byte image")
    header = _sniff(data)
    if header is None:
        im = _open(data, max_pixels)
        header = ImageHeader(im.format or "", im.size[0], im.size[1])
    _check_size(header.width, header.height, max_pixels)
    _check_complete(header.format, data)
    return header


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
    header = _sniff(data)
    if header is not None and header.width * header.height <= min(max_pixels, _PIL_LIMIT):
        # Below every limit: skip the warnings guard, and tell Pillow the format.
        _check_size(header.width, header.height, max_pixels)
        try:
            im = Image.open(io.BytesIO(data), formats=[header.format])
        except (OSError, SyntaxError, ValueError) as e:
            raise _decode_error(e) from None
    else:
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
    if "exif" in im.info:  # parsing EXIF costs; most images carry none
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
