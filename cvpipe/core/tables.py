"""Parquet in and out, with lineage, for every table cvpipe writes.

Every Parquet file carries the run's lineage in its key-value metadata under
``cvpipe.lineage``: config hash, code version, created_at and stage-specific fields
such as the model id. The schemas live in :mod:`cvpipe.core.schemas` and are re-exported
here, so a table's schema and its I/O are one import (``tables.PREDICTIONS``).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cvpipe import __version__
from cvpipe.core.config import identity_hash
from cvpipe.core.schemas import *  # noqa: F403 (every schema, as tables.NAME)
from cvpipe.core.storage import open_atomic, url_to_fs

LINEAGE_KEY = b"cvpipe.lineage"


def config_hash(config: Any) -> str:
    """A stable short hash of what in ``config`` changes outputs (see
    :func:`cvpipe.core.config.identity`: runtime fields and defaults are left out)."""
    return identity_hash(config)


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


_CODE_VERSION: str | None = None


def code_version() -> str:
    """``cvpipe <version>`` plus the git commit when running from a checkout."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        sha = _git_sha()
        _CODE_VERSION = f"{__version__}+g{sha}" if sha else __version__
    return _CODE_VERSION


def lineage(config: Any = None, **fields: Any) -> dict[str, Any]:
    """The lineage record of one output: config hash, code version, created_at, extras."""
    return {
        "config_hash": config_hash(config) if config is not None else None,
        "code_version": code_version(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }


def write_parquet(table: pa.Table, url: str, lineage_record: Mapping[str, Any]) -> None:
    """Write ``table`` to ``url`` atomically, with ``lineage_record`` in its metadata."""
    meta = dict(table.schema.metadata or {})
    meta[LINEAGE_KEY] = json.dumps(dict(lineage_record), sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf, **parquet_write_options(table.schema))
    with open_atomic(url) as f:
        f.write(buf.getbuffer())


def parquet_write_options(schema: pa.Schema) -> dict[str, Any]:
    """Dictionary-encode string columns only and leave float vectors uncompressed:
    embeddings neither repeat nor compress (zstd saves ~5% on them), and decoding a
    dictionary-encoded, compressed fixed_size_list column costs twice the read time."""

    def is_vector(t: pa.DataType) -> bool:
        return (pa.types.is_list(t) or pa.types.is_fixed_size_list(t)) and pa.types.is_floating(
            t.value_type
        )

    return {
        "use_dictionary": [f.name for f in schema if pa.types.is_string(f.type)],
        "compression": {f.name: "none" if is_vector(f.type) else "zstd" for f in schema},
    }


def read_parquet(url: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = url_to_fs(url)
    return pq.read_table(path, filesystem=fs, columns=columns)


def num_rows(url: str) -> int:
    """Rows of a Parquet file, from its footer alone."""
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def read_lineage(url: str) -> dict[str, Any]:
    fs, path = url_to_fs(url)
    meta = pq.read_schema(path, filesystem=fs).metadata or {}
    return json.loads(meta[LINEAGE_KEY]) if LINEAGE_KEY in meta else {}


def from_rows(rows: list[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=schema)
