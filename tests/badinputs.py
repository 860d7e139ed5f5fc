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
