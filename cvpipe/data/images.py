"""Safe image decoding: bytes in, an RGB PIL image out, or a precise reason why not.

Only JPEG, PNG and WebP are accepted as shard members. Pixels are capped before any
pixel is decoded (Pillow's own decompression-bomb check is a warning below twice its
limit; ours is an error at the limit). Odd modes become correct RGB: 16-bit grayscale is
scaled rather than clamped to white, CMYK is converted, alpha is composited on white.

Ingest (:func:`inspect`, header and structure only) and the reader (:func:`decode`)
apply one set of rules, so a sample ingest writes is one the reader accepts: the same
formats (a camera's multi-picture JPEG is a JPEG), the same JPEG coding processes, the
same completeness checks (bytes after a JPEG's end marker are allowed, as every decoder
allows them), the same caps. Pillow only opens the formats of :data:`OPEN_FORMATS`
(never EPS, which would start Ghostscript).
"""

from __future__ import annotations

import contextlib
import functools
import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's warning threshold, enforced as a hard limit
SHARD_EXTENSION = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# Pillow's names for variants of a shard format: a camera's multi-picture JPEG (Pillow's
# JPEG opener returns it as MPO; its first frame is an ordinary JPEG).
FORMAT_ALIASES = {"MPO": "JPEG"}
# What Pillow may open: ingest re-encodes these to PNG. Formats Pillow can read through
# an external program (EPS via Ghostscript) or barely knows are not here.
OPEN_FORMATS = (
    "JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "AVIF", "PPM", "TGA", "ICO",
    "JPEG2000", "PCX", "SGI", "QOI", "PSD",
)  # fmt: skip
# JPEG coding processes the bundled libjpeg-turbo decodes: baseline, extended and
# progressive Huffman, and sequential arithmetic. Lossless and hierarchical JPEGs are not.
_JPEG_DECODED_SOF = {0xC0, 0xC1, 0xC2, 0xC9}

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
    sof: int = 0  # JPEG only: the frame marker (0xC0 baseline, 0xC2 progressive, ...)


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
                    exif=exif, sof=marker,
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


@functools.cache
def source_suffixes() -> tuple[str, ...]:
    """File name suffixes of :data:`OPEN_FORMATS` (what a folder walk takes as images)."""
    registered = Image.registered_extensions()
    return tuple(sorted(ext for ext, fmt in registered.items() if fmt in OPEN_FORMATS))


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
            im = Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RejectedImage("too_many_pixels", str(e)) from None
    except UnidentifiedImageError:
        raise RejectedImage(
            "not_an_image", f"cannot identify an image in {len(data)} bytes"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise _decode_error(e) from None
    _check_size(*im.size, max_pixels)
    return im


def _check_size(w: int, h: int, max_pixels: int) -> None:
    if w <= 0 or h <= 0:
        raise RejectedImage("corrupt_image", f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise RejectedImage("too_many_pixels", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")


_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}


def _scan_end(data: bytes, pos: int) -> int:
    """Where the entropy-coded data starting at ``pos`` ends: the first 0xFF followed by
    a marker (not 0x00 stuffing, a restart marker 0xD0-0xD7 or a fill byte); -1 if none."""
    n = len(data)
    while True:
        j = data.find(b"\xff", pos)
        if j < 0 or j + 1 >= n:
            return -1
        nxt = data[j + 1]
        if nxt == 0 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
            pos = j + 1
            continue
        return j


def _jpeg_complete(data: bytes) -> str | None:
    """None when the JPEG's segments and scans run to an end-of-image marker (bytes
    after it are allowed: phones append their own data), else what is wrong."""
    if data[-2:] == b"\xff\xd9":  # the usual case: nothing after the end marker
        return None
    i, n = 2, len(data)
    while True:
        while i < n and data[i] == 0xFF and i + 1 < n and data[i + 1] == 0xFF:
            i += 1  # fill bytes
        if i + 2 > n:
            return "JPEG ends before its end-of-image marker"
        if data[i] != 0xFF:
            return f"JPEG segment expected at byte {i}"
        marker = data[i + 1]
        if marker == 0xD9:
            return None
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        if i + 4 > n:
            return "JPEG ends inside a segment header"
        end = i + 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
        if end > n:
            return "JPEG ends inside a segment"
        if marker != 0xDA:  # not a scan: skip the segment
            i = end
            continue
        i = _scan_end(data, end)
        if i < 0:
            return "JPEG scan data has no end-of-image marker"


def _png_complete(data: bytes) -> str | None:
    """None when the PNG's chunks run to IEND (later bytes are ignored by decoders)."""
    i, n = 8, len(data)
    while i + 8 <= n:
        length = struct.unpack(">I", data[i : i + 4])[0]
        kind = data[i + 4 : i + 8]
        i += 12 + length
        if i > n:
            return f"PNG ends inside its {kind.decode('latin-1')!r} chunk"
        if kind == b"IEND":
            return None
    return "PNG has no IEND chunk"


def _check_complete(fmt: str, data: bytes) -> None:
    """Cheap structural checks for truncation, without decoding pixels."""
    problem = None
    if fmt == "JPEG":
        problem = _jpeg_complete(data)
    elif fmt == "PNG":
        problem = _png_complete(data)
    elif fmt == "WEBP" and len(data) >= 8:
        declared = int.from_bytes(data[4:8], "little") + 8
        if len(data) < declared:
            problem = f"WebP declares {declared} bytes, has {len(data)}"
    if problem:
        raise RejectedImage("truncated_image", problem)


def _check_jpeg_process(header: ImageHeader) -> None:
    if header.format == "JPEG" and header.sof not in _JPEG_DECODED_SOF and header.sof:
        raise RejectedImage(
            "unsupported_format", f"JPEG coding process SOF{header.sof - 0xC0} is not decoded"
        )
    if header.format == "JPEG" and header.components not in (None, 1, 3, 4):
        raise RejectedImage("unsupported_format", f"JPEG with {header.components} components")


def inspect(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Validate an image from its header and trailer only (no pixel decoding): the fast
    check done at ingest. Raises :class:`RejectedImage`."""
    if not data:
        raise RejectedImage("empty_image", "zero-byte image")
    header = _sniff(data)
    if header is None:
        im = _open(data, max_pixels)
        fmt = FORMAT_ALIASES.get(im.format or "", im.format or "")
        header = ImageHeader(fmt, im.size[0], im.size[1])
    _check_size(header.width, header.height, max_pixels)
    _check_jpeg_process(header)
    _check_complete(header.format, data)
    return header


def _rescale(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    span = hi - lo
    if span <= 0:
        return np.zeros(a.shape, np.uint8)
    return np.clip((a - lo) * (255.0 / span) + 0.5, 0, 255).astype(np.uint8)


def _wide_to_8bit(im: Image.Image, notes: list[str] | None) -> Image.Image:
    """Float and 32-bit integer grayscale to 8 bits, never silently clipped: [0, 1] and
    [0, 255] data keep their meaning, any other range is rescaled and noted."""
    a = np.asarray(im, dtype=np.float64)
    if a.size and not np.isfinite(a).all():
        raise RejectedImage("corrupt_image", f"{im.mode} image holds NaN or infinite pixels")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode == "F" and lo >= 0 and hi <= 1.0:
        return Image.fromarray(_rescale(a, 0.0, 1.0), "L")
    if lo >= 0 and hi <= 255:
        return Image.fromarray(_rescale(a, 0.0, 255.0), "L")
    if im.mode == "I" and lo >= 0 and hi <= 65535:
        return Image.fromarray(_rescale(a, 0.0, 65535.0), "L")
    if notes is not None:
        notes.append(f"{im.mode} pixel range [{lo:g}, {hi:g}] rescaled to 8 bits")
    return Image.fromarray(_rescale(a, lo, hi), "L")


def to_rgb(im: Image.Image, notes: list[str] | None = None) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB correctly; what had to change beyond the
    mode (a wide range rescaled) is appended to ``notes``."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit grayscale: scale to 8 bits; convert() would clamp at 255.
        a = np.asarray(im)
        return Image.fromarray(_rescale(a.astype(np.float64), 0.0, 65535.0), "L").convert("RGB")
    if mode in ("I", "F"):
        return _wide_to_8bit(im, notes).convert("RGB")
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

    Applies the checks of :func:`inspect` first (the same verdicts as ingest), then
    decodes. Raises :class:`RejectedImage` with a precise reason for anything unusable.
    """
    header = inspect(data, max_pixels)
    if header.format not in SHARD_EXTENSION:
        raise RejectedImage("unsupported_format", f"{header.format} images are not accepted")
    if header.width * header.height > _PIL_LIMIT:  # allowed by a raised max_pixels
        im = _open(data, max_pixels)
    else:  # below every limit: skip the warnings guard, and tell Pillow the format
        try:
            im = Image.open(io.BytesIO(data), formats=[header.format])
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
            raise _decode_error(e) from None
    try:
        im.load()
    except OSError as e:
        msg = str(e)
        reason = (
            "truncated_image" if "truncated" in msg or "broken data" in msg else "corrupt_image"
        )
        raise RejectedImage(reason, msg) from None
    except (SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as e:
        raise RejectedImage("corrupt_image", f"{type(e).__name__}: {e}") from None
    if "exif" in im.info:  # parsing EXIF costs; most images carry none
        with contextlib.suppress(Exception):  # a broken EXIF block is not worth the image
            im = ImageOps.exif_transpose(im)
    return to_rgb(im)


def reencode_png(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, notes: list[str] | None = None
) -> bytes:
    """Decode any image of :data:`OPEN_FORMATS` and re-encode it as RGB PNG (for
    ingesting formats that shards do not carry, such as BMP, TIFF, GIF or AVIF). What
    the conversion changed beyond the format (a float range rescaled) goes to ``notes``."""
    im = _open(data, max_pixels)
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise _decode_error(e) from None
    out = io.BytesIO()
    to_rgb(im, notes).save(out, format="PNG")
    return out.getvalue()
