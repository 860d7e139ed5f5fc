"""WebDataset tar shards: layout, a deterministic writer and a safe streaming reader.

Layout: ``{root}/shards/{partition}/{name}-{index:06d}.tar``. A sample is a run of
consecutive members sharing a key (the member path up to the first dot of its
basename, as in WebDataset): one image (``.jpg``, ``.png`` or ``.webp``) and a ``.json``
metadata member.

The reader never unpickles: image members are decoded by Pillow, ``.json`` by the json
module, ``.txt``/``.cls`` as UTF-8; every other member (``.pyd``, ``.pickle``, ``.pkl``,
``.pth``, ``.npy``, ...) is skipped unread and reported. Bad samples come out of the
stream as :class:`Reject` values instead of exceptions, so one corrupt image never stops
a shard and nothing is dropped silently.

Accounting: every sample of a shard comes out exactly once, as a Sample or a Reject.
``ignored_member`` rows (:data:`NOT_SAMPLE_REASONS`) report members, not samples, and
are counted apart. When a shard breaks (or is gone), the samples its ingest index lists
and the stream did not reach each come out as a reject, so a lost shard is counted.
Keys are valid UTF-8: a member name in raw bytes is escaped (``\xe9``).
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from cvpipe.core.storage import is_committed, join, open_atomic, url_to_fs
from cvpipe.data import images, tario

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in order of preference within a sample
TEXT_EXTS = ("txt", "cls")
DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024
# Reject reasons that describe a member, not a sample: not counted as rejected samples.
NOT_SAMPLE_REASONS = frozenset({"ignored_member"})
MAX_JSON_DEPTH = 64  # metadata nests a few levels; 10^5 levels once ended in RecursionError


def safe_text(text: str) -> str:
    """``text`` as valid UTF-8: bytes that were not UTF-8 (surrogate escapes, from a file
    or member name) become ``\\xNN``."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "backslashreplace")


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth(data: bytes) -> int:
    """How deep brackets nest in JSON text (strings skipped), at C speed: checked before
    json.loads, whose recursion 10^5 levels deep is a RecursionError."""
    a = np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)
    step = np.isin(a, (0x5B, 0x7B)).astype(np.int32) - np.isin(a, (0x5D, 0x7D))
    return int(np.cumsum(step).max(initial=0))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (only finite numbers are)")


def loads_json(data: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON: UTF-8, finite numbers only (no NaN/Infinity), nested at most
    ``max_depth`` levels. Raises ValueError with the reason."""
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8: {e}") from None
    if raw.count(b"[") + raw.count(b"{") > max_depth and json_depth(raw) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None


def dumps_json(value: Any) -> str:
    """Canonical, standard JSON (sorted keys; NaN or Infinity is a ValueError)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False)  # fmt: skip


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def shard_url(root: str, partition: str, name: str, index: int) -> str:
    return join(root, "shards", partition, f"{name}-{index:06d}.tar")


def ingest_root(url: str) -> str | None:
    """The ``{root}`` of a shard laid out as ``{root}/shards/{partition}/...tar`` (where
    its ``index/`` and ``rejects/`` live), or None for a shard outside that layout."""
    head, sep, _ = str(url).rpartition("/shards/")
    return head if sep else None


def shard_id(url: str) -> str:
    """The id a row carries in its ``shard`` column: ``{partition}/{stem}``, i.e. the
    shard's folder and file name without ``.tar``. Stable wherever the root lives.
    A stage output ``.../{partition}/{stem}.parquet`` maps back to its shard's id."""
    path = url_to_fs(url)[1] if "://" in str(url) else str(url)
    parent = posixpath.basename(posixpath.dirname(path.replace("\\", "/")))
    stem = posixpath.basename(path)
    for suffix in (".tar", ".parquet"):  # a shard, or a stage's output named after it
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    return f"{parent}/{stem}" if parent else stem


def unit_url(root: str, stage: str, shard: str, suffix: str = ".parquet") -> str:
    """Where a stage writes its output for one shard: ``{root}/{stage}/{shard}{suffix}``
    (``shard`` is a :func:`shard_id`, so partitions become folders)."""
    return join(root, stage, *shard.split("/")[:-1], shard.split("/")[-1] + suffix)


@dataclass
class Reject:
    key: str
    shard: str
    stage: str
    reason: str
    detail: str

    def row(self) -> dict[str, str]:
        return {
            "key": self.key,
            "shard": self.shard,
            "stage": self.stage,
            "reason": self.reason,
            "detail": self.detail,
        }


@dataclass
class Sample:
    key: str
    shard: str
    ext: str  # extension of the image member: jpg | jpeg | png | webp
    data: bytes  # the image member's bytes, undecoded
    meta: dict[str, Any] = field(default_factory=dict)
    image: Image.Image | None = None  # RGB, when read with decode=True


# ---------------------------------------------------------------------------- writing


class ShardWriter:
    """Writes samples into one tar opened on a binary file object."""

    def __init__(self, fileobj: BinaryIO):
        self._f = fileobj
        self.count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        self._f.write(b"".join(tario.member_bytes(f"{key}.{ext}", d) for ext, d in members.items()))
        self.count += 1

    def close(self) -> None:
        self._f.write(tario.END_OF_ARCHIVE)


def encode_meta(meta: dict[str, Any]) -> bytes:
    """Canonical JSON for a sample's metadata (sorted keys, no None values, standard
    JSON only: NaN or Infinity is a ValueError, never a non-standard token)."""
    clean = {k: v for k, v in meta.items() if v is not None}
    return dumps_json(clean).encode()


def write_shard(url: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Publish a shard atomically from ``(key, {ext: bytes})`` pairs; returns the count."""
    with open_atomic(url) as f:
        writer = ShardWriter(f)
        for key, members in samples:
            writer.add(key, members)
        writer.close()
        return writer.count


# ---------------------------------------------------------------------------- reading


def _split_member(name: str) -> tuple[str, str]:
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def _unsafe_name(name: str) -> str | None:
    if name.startswith("/") or name.startswith("\\"):
        return "absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "'..' in path"
    if "\x00" in name:
        return "NUL byte in name"
    return None


class _Group:
    """The members of one sample collected while streaming the tar."""

    def __init__(self, key: str):
        self.key = key
        self.members: dict[str, bytes] = {}
        self.problem: tuple[str, str] | None = None


def iter_shard(
    url: str,
    *,
    stage: str = "read",
    decode: bool = True,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[Sample | Reject]:
    """Stream a shard: each sample comes out as a :class:`Sample` or a :class:`Reject`.

    Members that are not decoded (any extension other than images, json and text) are
    reported as ``Reject(reason="ignored_member")`` rows for the sample's key; they do
    not make the sample itself a reject. A sample with no image member is rejected
    (``no_image``), as are duplicate keys, duplicate members, unsafe member names,
    malformed json and undecodable images. A tar that breaks mid-stream rejects the
    sample being read (``corrupt_tar``) and every later sample its ingest index lists;
    a shard that is gone is ``missing_shard`` for each indexed sample. Other I/O errors
    (a network failure) raise: a retry of the unit may succeed.
    """
    sid = shard_id(url)
    seen: set[str] = set()

    def reject(key: str, reason: str, detail: str) -> Reject:
        return Reject(key, sid, stage, reason, detail)

    def finish(group: _Group) -> Sample | Reject:
        if group.key in seen:
            return reject(group.key, "duplicate_key", "key appears again later in the shard")
        seen.add(group.key)
        if group.problem:
            return reject(group.key, *group.problem)
        ext = next((e for e in IMAGE_EXTS if e in group.members), None)
        if ext is None:
            found = ", ".join(sorted(group.members)) or "nothing"
            return reject(group.key, "no_image", f"no jpg/png/webp member (found {found})")
        meta: dict[str, Any] = {}
        if "json" in group.members:
            try:
                meta = loads_json(group.members["json"])
            except ValueError as e:
                return reject(group.key, "bad_metadata", f"json member: {e}")
            if not isinstance(meta, dict):
                return reject(group.key, "bad_metadata", "json member is not an object")
        for t in TEXT_EXTS:
            if t in group.members:
                try:
                    meta.setdefault(t, group.members[t].decode("utf-8"))
                except UnicodeDecodeError as e:
                    return reject(group.key, "bad_metadata", f"{t} member: {e}")
        sample = Sample(group.key, sid, ext, group.members[ext], meta)
        if decode:
            try:
                sample.image = images.decode(sample.data, max_pixels)
            except images.RejectedImage as e:
                return reject(group.key, e.reason, e.detail)
        return sample

    fs, path = url_to_fs(url)
    group: _Group | None = None
    broken: tuple[str, str] | None = None
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError as e:
        broken = ("missing_shard", f"{url} cannot be opened: {e}")
    else:
        with f:
            try:
                for info, data in tario.iter_members(f):
                    if info.kind == "dir":
                        continue
                    key, ext = _split_member(info.name)
                    key = safe_text(key)
                    name = safe_text(info.name)
                    if group is None or key != group.key:
                        if group is not None:
                            yield finish(group)
                        group = _Group(key)
                    why = _unsafe_name(info.name)
                    if why:
                        group.problem = ("unsafe_member", f"{name!r}: {why}")
                        continue
                    if info.kind != "file":
                        group.problem = ("unsafe_member", f"{name!r} is a link or device")
                        continue
                    if ext not in IMAGE_EXTS and ext not in TEXT_EXTS and ext != "json":
                        # Never read, never decoded: pickles, torch files, numpy, unknown.
                        yield reject(key, "ignored_member", f"member {name!r} not decoded")
                        continue
                    if ext in group.members:
                        group.problem = ("duplicate_member", f"member {name!r} appears twice")
                        continue
                    if info.size > max_member_bytes:
                        group.problem = (
                            "member_too_large",
                            f"{name!r} is {info.size} bytes > {max_member_bytes}",
                        )
                        continue
                    group.members[ext] = tario.read_data(info, data)
            except tario.CorruptTar as e:
                broken = ("corrupt_tar", str(e))
    if broken is None:
        if group is not None:
            yield finish(group)
        return
    # The sample being read, then every sample the ingest index lists that the stream
    # never reached: each is a reject, so samples in = written + rejected still holds.
    reason, detail = broken
    if group is not None and group.key not in seen:
        seen.add(group.key)
        yield reject(group.key, reason, detail)
    lost = indexed_keys(url)
    if lost is None:
        if group is None:
            yield reject("", reason, f"{detail} (no ingest index: samples lost unknown)")
        return
    for key in lost:
        if key not in seen:
            seen.add(key)
            yield reject(key, reason, f"{detail} (sample not reached)")


def indexed_keys(url: str) -> list[str] | None:
    """The keys the ingest index of shard ``url`` lists (``{root}/index/...``), or None
    for a shard without a committed index."""
    import pyarrow.parquet as pq

    root = ingest_root(url)
    if root is None:
        return None
    index = unit_url(root, "index", shard_id(url))
    if not is_committed(index):
        return None
    fs, path = url_to_fs(index)
    return pq.read_table(path, filesystem=fs, columns=["key"]).column("key").to_pylist()


def read_shard_samples(url: str, **kwargs: Any) -> tuple[list[Sample], list[Reject]]:
    """Read a whole shard into memory (small shards, tests, notebooks)."""
    samples, rejects = [], []
    for item in iter_shard(url, **kwargs):
        (samples if isinstance(item, Sample) else rejects).append(item)
    return samples, rejects
