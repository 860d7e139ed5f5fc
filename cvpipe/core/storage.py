"""Every location is an fsspec URL; outputs are published atomically.

The commit protocol (docs/ARCHITECTURE.md, "Commit protocol"):
- on a filesystem with atomic rename (local disk) a file is written under a hidden temp
  name in its destination folder and renamed into place: the rename is the commit;
- on an object store (s3://, memory://, ...) the object is written under its final name
  and an empty commit marker ``<name>.committed`` is written after it: the marker is the
  commit. Readers list only committed files, so a writer killed mid-upload leaves
  nothing a reader can see.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator, Sequence
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

COMMIT_SUFFIX = ".committed"
TEMP_MARK = ".tmp-"


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a plain path or any fsspec URL."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL (``s3://b/x`` + ``y`` -> ``s3://b/x/y``)."""
    url = str(url)
    if "://" in url:
        return posixpath.join(url, *parts)
    return os.path.join(url, *parts)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _is_temp(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


@contextlib.contextmanager
def open_atomic(url: str) -> Iterator[IO[bytes]]:
    """Open ``url`` for binary writing; the file appears to readers only on success.

    If the block raises, nothing is published (the temp file or the unfinished upload is
    discarded) and the exception propagates.
    """
    fs, path = url_to_fs(url)
    parent = posixpath.dirname(path) if not is_local(fs) else os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_local(fs):
        tmp = os.path.join(parent, f".{os.path.basename(path)}{TEMP_MARK}{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        return

    marker = path + COMMIT_SUFFIX
    if fs.exists(marker):  # republishing: withdraw the old commit first
        fs.rm(marker)
    f = fs.open(path, "wb")
    try:
        yield f
    except BaseException:
        # fsspec's buffered files upload on close(); discard() aborts instead.
        discard = getattr(f, "discard", None)
        if discard is not None:
            discard()
        with contextlib.suppress(Exception):
            f.close()
        raise
    f.close()
    with fs.open(marker, "wb"):
        pass
    fs.invalidate_cache(posixpath.dirname(path))


def write_bytes_atomic(url: str, data: bytes) -> None:
    with open_atomic(url) as f:
        f.write(data)


def write_bytes_if_changed(url: str, data: bytes) -> bool:
    """Publish ``data`` unless the committed file already holds exactly it, so a rerun
    that produces the same report writes nothing. Returns whether it wrote."""
    if is_committed(url) and read_bytes(url) == data:
        return False
    write_bytes_atomic(url, data)
    return True


def is_committed(url: str) -> bool:
    """True when ``url`` was published through :func:`open_atomic` (or placed by hand on
    local disk, where every visible file counts as committed)."""
    fs, path = url_to_fs(url)
    if is_local(fs):
        return os.path.isfile(path)
    fs.invalidate_cache(posixpath.dirname(path))
    return fs.exists(path + COMMIT_SUFFIX) and fs.exists(path)


def list_committed(url: str, suffix: str = "", recursive: bool = False) -> list[str]:
    """Sorted URLs of the committed files under the folder or prefix ``url`` whose names
    end with ``suffix``. Temp files and commit markers are never listed."""
    fs, path = url_to_fs(url)
    fs.invalidate_cache(path)
    if not fs.isdir(path):
        return []
    if recursive:
        names = [p for p in fs.find(path) if not fs.isdir(p)]
    else:
        names = [e["name"] for e in fs.ls(path, detail=True) if e["type"] == "file"]
    names = set(names)
    out = []
    for name in names:
        base = posixpath.basename(name)
        if (
            not base.endswith(suffix)
            or base.endswith(COMMIT_SUFFIX)
            or _is_temp(base)
            or base.startswith(".")
        ):
            continue
        if not is_local(fs) and name + COMMIT_SUFFIX not in names:
            continue
        # Keep the caller's spelling of the root (s3://bucket/x, memory://x, ./x).
        out.append(str(url).rstrip("/") + name[len(path.rstrip("/")) :])
    return sorted(out)


def remove_stale_temps(url: str) -> int:
    """Delete temp files that a killed writer left in the folder ``url``; returns how many.

    Only safe when no other writer is publishing into the same folder at the same time.
    """
    fs, path = url_to_fs(url)
    if not is_local(fs) or not os.path.isdir(path):
        return 0
    n = 0
    for name in os.listdir(path):
        if _is_temp(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(path, name))
                n += 1
    return n


def read_bytes(url: str) -> bytes:
    if "://" not in str(url):  # plain local path: skip fsspec's resolution (ingest hot path)
        with open(url, "rb") as f:
            return f.read()
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


def expand_urls(spec: str, suffix: str) -> list[str]:
    """Resolve a user's input spec to sorted committed file URLs ending in ``suffix``.

    ``spec`` is one file, a folder or prefix (searched recursively), or a brace pattern
    such as ``shards/day/digits-{000000..000009}.tar``.
    """
    import braceexpand

    spec = str(spec)
    if "{" in spec:
        urls = [u for u in braceexpand.braceexpand(spec)]
        missing = [u for u in urls if not is_committed(u)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} file(s) of {spec} missing, e.g. {missing[0]}")
        return urls
    fs, path = url_to_fs(spec)
    if fs.isfile(path) and path.endswith(suffix):
        if not is_committed(spec):
            raise FileNotFoundError(f"{spec} is not committed")
        return [spec]
    urls = list_committed(spec, suffix=suffix, recursive=True)
    if not urls:
        raise FileNotFoundError(f"no committed *{suffix} files under {spec}")
    return urls


def expand_specs(specs: str | Sequence[str], suffix: str) -> list[str]:
    """:func:`expand_urls` over one spec or a list of specs (URLs, folders, patterns),
    in the order given, without duplicates."""
    if isinstance(specs, str):
        return expand_urls(specs, suffix)
    return list(dict.fromkeys(u for spec in specs for u in expand_urls(spec, suffix)))
