"""The ingest plan: a partition's frozen list of items, streamed to Parquet.

The plan lists the source once, in a deterministic order, gives every item a stable
key, marks later repeats of a key as duplicates, and is written with one row group per
shard. A rerun reuses it, so it makes the same shards. Memory does not grow with the
partition: items stream from :mod:`cvpipe.data.sources` into the Parquet writer one row
group at a time, and the keys seen so far live in an on-disk SQLite table.

A partition belongs to one config: the first ingest claims it (a create-if-absent
object holding its config hash) before writing the plan, so two ingests of one
partition with different configs cannot both pass the check.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cvpipe.core import tables
from cvpipe.core.storage import (
    create_if_absent,
    is_committed,
    join,
    open_atomic,
    read_bytes,
    url_to_fs,
)
from cvpipe.data.shards import dumps_json, finite, safe_text
from cvpipe.data.sources import DEFAULT_MAX_ROW_BYTES, iter_source

PLAN = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.string()),  # URL or path of the source image
        ("source", pa.string()),  # what a person recognizes: the relative path or the URL
        ("label", pa.string()),
        ("caption", pa.string()),
        ("hashtags", pa.string()),  # JSON list of strings
        ("boxes", pa.string()),  # JSON list of boxes
        ("duplicate", pa.bool_()),  # a later row with a key seen before
        # A row the source could not give (a broken manifest line, an unreadable folder):
        # ingest writes it as a reject row with this reason and detail.
        ("error_reason", pa.string()),
        ("error_detail", pa.string()),
        # The real bytes of a path that is not UTF-8 (image and source hold it escaped).
        ("image_raw", pa.binary()),
        ("source_raw", pa.binary()),
    ]
)


def make_key(partition: str, source: str) -> str:
    """A stable key, unique across the corpus: a readable slug of the source path plus a
    hash of (partition, source). Only ``[A-Za-z0-9_-]``, so WebDataset's rule that the
    key ends at the first dot of the member name cannot split it. A source that is not
    UTF-8 (surrogate escapes) is hashed by its real bytes."""
    stem = source.rsplit(".", 1)[0] if "." in source.rsplit("/", 1)[-1] else source
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", safe_text(stem)).strip("_")[-48:] or "img"
    raw = f"{partition}\0{source}".encode("utf-8", "surrogateescape")
    digest = hashlib.sha1(raw).hexdigest()[:12]
    return f"{slug}-{digest}"


def plan_url(root: str, partition: str, name: str) -> str:
    return join(root, "plans", partition, f"{name}.parquet")


def skipped_url(root: str, partition: str, name: str) -> str:
    """What the folder walk did not list, and why (:data:`tables.SKIPPED_FILES`)."""
    return join(root, "plans", partition, f"{name}.skipped.parquet")


def claim_url(root: str, partition: str, name: str) -> str:
    return join(root, "plans", partition, f"{name}.claim.json")


class SeenKeys:
    """A set of keys on disk (SQLite in a temp folder): constant memory at any size."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="cvpipe-keys-")
        self._db = sqlite3.connect(os.path.join(self._dir.name, "keys.db"), isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-16000"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute("CREATE TABLE k (key TEXT PRIMARY KEY) WITHOUT ROWID")
        self._db.execute("BEGIN")
        self._cur = self._db.cursor()

    def add(self, key: str) -> bool:
        """True if ``key`` is new."""
        self._cur.execute("INSERT OR IGNORE INTO k VALUES (?)", (key,))
        return self._cur.rowcount == 1

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()

    def __enter__(self) -> SeenKeys:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _text(value: Any, what: str) -> str | None:
    """A label or caption as text: strings as they are, integers (and integral floats,
    as pandas writes integer labels with a null) as digits; lists or maps are errors."""
    if value is None:
        return None
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, bool):
        raise ValueError(f"{what} is a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if finite(value) and value.is_integer():
            return str(int(value))
        raise ValueError(f"{what} is the number {value!r}, want a string or an integer")
    raise ValueError(f"{what} is a {type(value).__name__}, want a string or an integer")


def _json_field(value: Any, what: str) -> str | None:
    """A hashtags or boxes value as JSON text (strings are kept; the unit validates)."""
    if value is None or isinstance(value, str):
        return value
    try:
        return dumps_json(value)
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"{what}: {type(e).__name__}: {e}") from None


def plan_row(item: dict[str, Any], partition: str) -> dict[str, Any]:
    """One plan row from a source item (without ``duplicate``)."""
    raw = item.get("source_raw")
    row = {
        "key": make_key(partition, item["source"] if raw is None else os.fsdecode(raw)),
        "image": item["image"],
        "source": safe_text(item["source"]),
        "image_raw": item.get("image_raw"),
        "source_raw": item.get("source_raw"),
        "label": None,
        "caption": None,
        "hashtags": None,
        "boxes": None,
        "error_reason": None,
        "error_detail": None,
    }
    error = item.get("error")
    if error is None:
        try:
            row["label"] = _text(item.get("label"), "label")
            row["caption"] = _text(item.get("caption"), "caption")
            row["hashtags"] = _json_field(item.get("hashtags"), "hashtags")
            row["boxes"] = _json_field(item.get("boxes"), "boxes")
        except ValueError as e:
            error = ("bad_metadata", str(e))
    if error is not None:
        row["error_reason"], row["error_detail"] = error[0], safe_text(error[1])
    return row


def plan_rows(
    src: str, partition: str, *, skipped: Any = None, encoding: str = "utf-8",
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES, coco: str | None = None,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The plan rows of a source, streamed, keys assigned and duplicates marked. With
    ``coco`` (a COCO annotation file) the items are its images, ``src`` their folder."""
    kwargs = {"skipped": skipped} if skipped is not None else {}
    if coco:
        from cvpipe.data.coco import manifest_rows

        items: Iterable[dict[str, Any]] = manifest_rows(coco, src)[0]
    else:
        items = iter_source(src, encoding=encoding, max_row_bytes=max_row_bytes, **kwargs)
    with SeenKeys() as seen:
        for item in items:
            row = plan_row(item, partition)
            row["duplicate"] = not seen.add(row["key"])
            yield row


def build_plan(src: str, partition: str, shard_size: int, **kwargs: Any) -> pa.Table:
    """The plan of a (small) source as one table: for tests and notebooks."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return pa.Table.from_pylist(list(plan_rows(src, partition, **kwargs)), schema=PLAN)


def _batches(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_rows(f: Any, rows: Iterable[dict[str, Any]], shard_size: int, config: Any) -> int:
    meta = {tables.LINEAGE_KEY: json.dumps(plan_lineage(config, shard_size)).encode()}
    schema = PLAN.with_metadata(meta)
    total = 0
    with pq.ParquetWriter(f, schema) as writer:
        for batch in _batches(rows, shard_size):
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            total += len(batch)
    return total


def write_plan(rows: Iterable[dict[str, Any]], url: str, shard_size: int, config: Any) -> int:
    """Stream plan rows to ``url`` (one row group per shard, published atomically);
    returns the number of rows."""
    with open_atomic(url) as f:
        return _write_rows(f, rows, shard_size, config)


def plan_lineage(config: Any, shard_size: int) -> dict[str, Any]:
    dump = config.model_dump(mode="json") if hasattr(config, "model_dump") else None
    return tables.lineage(config, shard_size=shard_size, ingest_config=dump)


class _SkippedFiles:
    """The walk's skipped files, streamed to a Parquet table in bounded batches."""

    def __init__(self, f: Any, config: Any) -> None:
        lineage = json.dumps(tables.lineage(config, stage="plan")).encode()
        self.schema = tables.SKIPPED_FILES.with_metadata({tables.LINEAGE_KEY: lineage})
        self.writer = pq.ParquetWriter(f, self.schema)
        self.rows: list[dict[str, str]] = []

    def __call__(self, path: str, reason: str, detail: str) -> None:
        self.rows.append({"path": path, "reason": reason, "detail": detail})
        if len(self.rows) >= 10_000:
            self.flush()

    def flush(self) -> None:
        self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
        self.rows = []

    def __enter__(self) -> _SkippedFiles:
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        if kind is None:
            self.flush()
        self.writer.close()


def prepare_plan(
    src: str, root: str, partition: str, name: str, shard_size: int, config: Any
) -> tuple[str, int]:
    """Build and publish the partition's plan, or reuse the one an earlier run of the
    same config published. Returns (plan URL, number of shards).

    A partition's plan is frozen: ingesting it again with another source, name or shard
    size would make different shards under the same names, so that is an error, also
    when the two ingests run at the same time (the claim decides).
    """
    url = plan_url(root, partition, name)
    want = tables.config_hash(config)
    if is_committed(url):
        _check_owner(tables.read_lineage(url).get("config_hash"), want, partition, root, name)
        return url, plan_shard_count(url)
    claim = claim_url(root, partition, name)
    if not create_if_absent(claim, json.dumps({"config_hash": want}).encode()):
        have = json.loads(read_bytes(claim)).get("config_hash")
        _check_owner(have, want, partition, root, name)
        if is_committed(url):  # a run of the same config published it meanwhile
            return url, plan_shard_count(url)
    encoding = getattr(config, "manifest_encoding", "utf-8")
    # The skipped list is published first (inner block), the plan, the commit, last.
    with (
        open_atomic(url) as plan_file,
        open_atomic(skipped_url(root, partition, name)) as skipped_file,
    ):
        with _SkippedFiles(skipped_file, config) as skipped:
            rows = plan_rows(src, partition, skipped=skipped, encoding=encoding,
                             coco=getattr(config, "coco", None))  # fmt: skip
            total = _write_rows(plan_file, rows, shard_size, config)
        if total == 0:
            raise ValueError(f"source {src} holds no images")
    return url, plan_shard_count(url)


def _check_owner(have: str | None, want: str, partition: str, root: str, name: str) -> None:
    if have != want:
        raise ValueError(
            f"partition {partition!r} of {root} was ingested as {name!r} with another "
            f"config (hash {have}, now {want}): ingest into a new partition or root"
        )


def plan_shard_count(url: str) -> int:
    fs, path = url_to_fs(url)
    return pq.ParquetFile(path, filesystem=fs).num_row_groups


def plan_rows_count(url: str) -> int:
    fs, path = url_to_fs(url)
    return pq.ParquetFile(path, filesystem=fs).metadata.num_rows


def read_plan_group(url: str, index: int) -> pa.Table:
    fs, path = url_to_fs(url)
    return pq.ParquetFile(path, filesystem=fs).read_row_group(index)
