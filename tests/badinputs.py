"""Builders of bad (and good) inputs for the safety tests."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
from PIL import Image


def png(mode: str = "RGB", size: tuple[int, int] = (16, 12), **save) -> bytes:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        a = (rng.integers(0, 65536, size[::-1])).astype(np.uint16)
        im = Image.fromarray(a)
    elif mode == "P":
        im = Image.new("P", size, 1)
        im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        save.setdefault("transparency", 0)
    elif mode == "1":
        im = Image.new("1", size, 1)
    else:
        im = Image.fromarray(
            rng.integers(0, 256, (*size[::-1], len(mode)), dtype=np.uint8).squeeze(), mode
        )
    buf = io.BytesIO()
    im.save(buf, format="PNG", **save)
    return buf.getvalue()


def jpeg(mode: str = "RGB", size: tuple[int, int] = (16, 12), color=None) -> bytes:
    im = Image.new(mode, size, color if color is not None else (10,) * len(mode))
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return buf.getvalue()


class _Trap:
    """Unpickling this creates the file at ``path``: proof that something unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_trap(path: str) -> bytes:
    return pickle.dumps(_Trap(path))


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


# ------------------------------------------------------------------ raw tar blocks


def tar_header(
    name: bytes, size: int, kind: bytes = b"0", size_field: bytes | None = None
) -> bytes:
    """One USTAR header block with any name bytes, type and size field (checksum right)."""
    h = bytearray(512)
    h[0 : len(name[:100])] = name[:100]
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = size_field if size_field is not None else b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def tar_block(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
    """Header + data + padding of one member, whatever its name bytes or type."""
    return tar_header(name, len(data), kind) + data + bytes(-len(data) % 512)


def pax_block(records: bytes) -> bytes:
    """A pax extended header member holding ``records`` as they are (valid or not)."""
    return tar_block(b"././@PaxHeader", records, b"x")


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + len(str(len(body)))
    n = len(body) + len(str(n))
    return str(n).encode() + body


def tar_end() -> bytes:
    return bytes(1024)


# ------------------------------------------------------------------ hostile images


def noise(size: tuple[int, int] = (40, 30), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encode(im: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def mpo() -> bytes:
    """A camera's multi-picture JPEG (MPF): Pillow opens it as format MPO."""
    return encode(noise(seed=1), "MPO", save_all=True, append_images=[noise(seed=2)])


def jpeg_with_trailer(trailer: bytes = b"SEFH" + bytes(3000) + b"motion photo") -> bytes:
    """A phone photo: a complete JPEG followed by the phone's own data."""
    return encode(noise(), "JPEG") + trailer


def jpeg_with_sof(marker: int) -> bytes:
    """A JPEG whose frame header names another coding process (0xC3 lossless, 0xC5
    hierarchical, 0xCA arithmetic progressive), which the decoder cannot read."""
    data = bytearray(encode(noise(), "JPEG"))
    i = data.index(b"\xff\xc0")
    data[i + 1] = marker
    return bytes(data)


def float_tiff(values: np.ndarray) -> bytes:
    return encode(Image.fromarray(values.astype(np.float32), "F"), "TIFF")
