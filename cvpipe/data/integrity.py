"""Shard integrity before an expensive stage: readable, complete, and as ingested.

:func:`check_shard` streams a shard once (no decoding): the tar must parse to its end,
hold as many samples as its ingest index lists, and hash to the checksum ingest
recorded in that index. A shard that fails is quarantined by :class:`VerifyStage`:
moved to ``{root}/quarantine/shards/{partition}/`` (so a GPU stage listing the partition
never opens it), its indexed samples written as reject rows
(``{root}/rejects/verify/...``, so they stay counted), and named in the summary while
the other shards go on.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

from pydantic import Field

from cvpipe.core import storage, tables
from cvpipe.core.config import Strict
from cvpipe.core.stage import Resources, Stage, Unit
from cvpipe.data import tario
from cvpipe.data.shards import indexed_keys, ingest_root, shard_id, unit_url


@dataclass
class ShardCheck:
    shard: str
    url: str
    ok: bool
    reason: str = ""
    detail: str = ""
    samples: int = 0  # samples read from the tar
    expected: int = -1  # rows of its ingest index (-1: no index to compare with)
    quarantined: bool = False
    skipped: bool = False  # checked by an earlier run

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k in tables.SHARD_CHECKS.names}


class _HashingReader:
    def __init__(self, f: BinaryIO) -> None:
        self._f, self.sha256 = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha256.update(data)
        return data

    def tell(self) -> int:
        return self._f.tell()


def _index_url(url: str) -> str | None:
    root = ingest_root(url)
    return unit_url(root, "index", shard_id(url)) if root is not None else None


def check_shard(url: str) -> ShardCheck:
    """Read ``url`` once and compare it with what ingest recorded."""
    sid = shard_id(url)
    index = _index_url(url)
    recorded: dict[str, Any] = {}
    expected = -1
    if index is not None and storage.is_committed(index):
        expected = tables.num_rows(index)
        recorded = tables.read_lineage(index)
    check = ShardCheck(sid, url, ok=False, expected=expected)
    fs, path = storage.url_to_fs(url)
    keys = 0
    try:
        with fs.open(path, "rb") as raw:
            f = _HashingReader(raw)
            last = None
            for member, _ in tario.iter_members(f):  # type: ignore[arg-type]
                key = posixpath.basename(member.name).split(".", 1)[0]
                key = posixpath.join(posixpath.dirname(member.name), key)
                if member.kind != "dir" and key != last:
                    keys, last = keys + 1, key
            while f.read(1 << 20):  # the end blocks and padding count in the checksum
                pass
    except FileNotFoundError as e:
        check.reason, check.detail = "missing_shard", str(e)
        return check
    except tario.CorruptTar as e:
        check.reason, check.detail, check.samples = "corrupt_tar", str(e), keys
        return check
    check.samples = keys
    want = recorded.get("tar_sha256")
    if want and f.sha256.hexdigest() != want:
        check.reason = "checksum_mismatch"
        check.detail = f"sha256 {f.sha256.hexdigest()} != {want} recorded at ingest"
    elif expected >= 0 and keys != expected:
        check.reason = "count_mismatch"
        check.detail = f"{keys} samples in the tar, {expected} in its ingest index"
    else:
        check.ok = True
    return check


def quarantine_url(url: str) -> str:
    """Where a failed shard goes: ``{root}/quarantine/shards/{partition}/{stem}.tar``."""
    root = ingest_root(url)
    sid = shard_id(url)
    base = root if root is not None else posixpath.dirname(posixpath.dirname(str(url)))
    return storage.join(base, "quarantine", "shards", *sid.split("/")) + ".tar"


def quarantine_shard(url: str) -> str | None:
    """Move a shard out of its partition (readers stop listing it); returns where it went,
    or None when there was nothing left to move."""
    dest = quarantine_url(url)
    fs, path = storage.url_to_fs(url)
    _, dest_path = storage.url_to_fs(dest)
    if not fs.exists(path):
        return None
    if storage.is_local(fs):
        import os

        os.makedirs(os.path.dirname(dest_path), exist_ok=True)
        os.replace(path, dest_path)
        return dest
    fs.copy(path, dest_path)
    fs.pipe_file(dest_path + storage.COMMIT_SUFFIX, b"")
    fs.rm(path + storage.COMMIT_SUFFIX)  # withdrawn: no reader lists it from here on
    fs.rm(path)
    return dest


# ------------------------------------------------------------------------- the stage


class VerifyConfig(Strict):
    """Check shards before an expensive stage; quarantine the ones that fail."""

    shards: str | list[str] = Field(description="shard URL, folder, prefix or {a..b} pattern")
    quarantine: bool = Field(True, description="move failed shards to {root}/quarantine/")


def check_url(url: str) -> str:
    """Where the check of shard ``url`` is recorded (:data:`tables.SHARD_CHECKS`)."""
    root = ingest_root(url)
    base = root if root is not None else posixpath.dirname(posixpath.dirname(str(url)))
    return unit_url(base, "checks", shard_id(url))


class VerifyStage(Stage[VerifyConfig, ShardCheck]):
    """One unit per shard: check it, quarantine it if it fails (rejects written for its
    indexed samples first), then record the check (the commit)."""

    name = "verify"
    resources = Resources(cpus=1)
    timeout_s = 1800.0

    def units(self) -> list[Unit]:
        urls = storage.expand_specs(self.config.shards, ".tar")
        return [Unit(shard_id(u), (u,)) for u in urls]

    def outputs(self, unit: Unit) -> list[str]:
        return [check_url(unit.inputs[0])]

    def process(self, unit: Unit) -> ShardCheck:
        url = unit.inputs[0]
        check = check_shard(url)
        lineage = tables.lineage(self.config, stage="verify")
        if not check.ok and self.config.quarantine:
            root = ingest_root(url)
            keys = indexed_keys(url) or [""]
            rows = [
                {"key": k, "shard": check.shard, "stage": "verify", "reason": check.reason,
                 "detail": f"shard quarantined: {check.detail}"}
                for k in keys
            ]  # fmt: skip
            if root is not None:
                rejects = unit_url(root, "rejects/verify", check.shard)
                tables.write_parquet(tables.from_rows(rows, tables.REJECTS), rejects, lineage)
            check.quarantined = quarantine_shard(url) is not None
        table = tables.from_rows([check.row()], tables.SHARD_CHECKS)
        tables.write_parquet(table, check_url(url), {**lineage, "quarantined": check.quarantined})
        return check

    def read_back(self, unit: Unit) -> ShardCheck:
        url = check_url(unit.inputs[0])
        (row,) = tables.read_parquet(url).to_pylist()
        quarantined = bool(tables.read_lineage(url).get("quarantined"))
        return ShardCheck(**row, quarantined=quarantined, skipped=True)

    def describe(self, stats: ShardCheck) -> str:
        return f"{stats.shard}: {'ok' if stats.ok else stats.reason}"

    def summarize(self, stats: Sequence[ShardCheck]) -> dict[str, Any]:
        bad = [s for s in stats if not s.ok]
        return {
            "shards": len(stats),
            "ok": len(stats) - len(bad),
            "failed": len(bad),
            "quarantined": [s.shard for s in bad if s.quarantined],
            "samples_lost": sum(max(s.expected, 0) for s in bad if s.quarantined),
            "failures": {s.shard: f"{s.reason}: {s.detail}" for s in bad},
        }
