"""Retry the samples of finished shards that failed for a reason a retry can fix.

A round ``r`` re-ingests, into additional shards ``{name}-retry{r}-NNNNNN.tar`` with a
plan of their own, the rows whose latest outcome is a reject with a retryable reason
(a fetch timeout, a failed fetch, a transient read error). Committed shards are never
rewritten: a retried key's earlier reject row stays where it is and is superseded by
the key's row in the later round's plan. So, for the partition:

    samples = rows of the first plan
    written = index rows of every round
    rejected = reject rows of every round - rows of every retry plan

and samples = written + rejected holds exactly (:func:`partition_accounting`). An
interrupted round is resumed by the next call, not replaced.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow.parquet as pq

from cvpipe.core import storage, tables
from cvpipe.data.boxes import REASONS as BOX_REASONS
from cvpipe.data.config import IngestConfig
from cvpipe.data.plan import (
    claim_url,
    plan_rows_count,
    plan_url,
    read_plan_group,
    write_plan,
)
from cvpipe.data.shards import shard_id, shard_url, unit_url

RETRYABLE_REASONS = ("fetch_timeout", "fetch_failed", "unreadable_file")
_ROUND = re.compile(r"^(?P<name>.+)-retry(?P<round>\d+)$")


def round_name(name: str, round_: int) -> str:
    return name if round_ == 0 else f"{name}-retry{round_}"


def _plan_names(root: str, partition: str) -> list[str]:
    folder = storage.join(root, "plans", partition)
    out = []
    for url in storage.list_committed(folder, ".parquet"):
        stem = url.rsplit("/", 1)[-1][: -len(".parquet")]
        if "." not in stem:  # not the .skipped table
            out.append(stem)
    return out


def base_name(root: str, partition: str, name: str | None = None) -> str:
    """The partition's ingest name (its first plan), given or found."""
    names = [n for n in _plan_names(root, partition) if not _ROUND.match(n)]
    if name is not None:
        if name not in names:
            raise ValueError(f"partition {partition!r} of {root} has no plan named {name!r}")
        return name
    if len(names) != 1:
        raise ValueError(
            f"partition {partition!r} of {root} has {len(names)} plans {names}: name one"
        )
    return names[0]


def rounds(root: str, partition: str, name: str) -> list[int]:
    """The retry rounds of a partition with a committed plan, in order."""
    found = []
    for n in _plan_names(root, partition):
        m = _ROUND.match(n)
        if m and m["name"] == name:
            found.append(int(m["round"]))
    return sorted(found)


def base_config(root: str, partition: str, name: str) -> IngestConfig:
    """The config the partition was ingested with, read from its plan's lineage."""
    lineage = tables.read_lineage(plan_url(root, partition, name))
    dump = lineage.get("ingest_config")
    if not dump:
        raise ValueError(f"the plan of {partition!r} does not record its config (older code)")
    return IngestConfig.model_validate(dump)


def round_config(base: IngestConfig, round_: int) -> IngestConfig:
    return base.model_copy(update={"name": round_name(base.name, round_)})


def _shards_of(root: str, partition: str, name: str) -> int:
    fs, path = storage.url_to_fs(plan_url(root, partition, name))
    return pq.ParquetFile(path, filesystem=fs).num_row_groups


def round_complete(root: str, partition: str, name: str) -> bool:
    """Every shard of the plan ``name`` committed (its index, the commit, exists)."""
    n = _shards_of(root, partition, name)
    return all(
        storage.is_committed(unit_url(root, "index", shard_id(shard_url(root, partition, name, i))))
        for i in range(n)
    )


def _keys_of_plan(url: str) -> list[str]:
    fs, path = storage.url_to_fs(url)
    return pq.read_table(path, filesystem=fs, columns=["key"]).column("key").to_pylist()


def latest_rounds(root: str, partition: str, name: str) -> dict[str, int]:
    """Key -> the last round that planned it, for retried keys only (a few)."""
    latest: dict[str, int] = {}
    for r in rounds(root, partition, name):
        for key in _keys_of_plan(plan_url(root, partition, round_name(name, r))):
            latest[key] = r
    return latest


def _rejects_of_round(root: str, partition: str, name: str) -> Iterator[tuple[int, str]]:
    """(shard index, rejects URL) of every committed shard of plan ``name``."""
    for i in range(_shards_of(root, partition, name)):
        sid = shard_id(shard_url(root, partition, name, i))
        url = unit_url(root, "rejects/ingest", sid)
        if storage.is_committed(url):
            yield i, url


def live_rejects(
    root: str, partition: str, name: str, latest: dict[str, int] | None = None
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(round, shard index, reject row) of every reject that is a key's latest outcome."""
    latest = latest_rounds(root, partition, name) if latest is None else latest
    for r in [0, *rounds(root, partition, name)]:
        for i, url in _rejects_of_round(root, partition, round_name(name, r)):
            for row in tables.read_parquet(url).to_pylist():
                if latest.get(row["key"], 0) == r:
                    yield r, i, row


def plan_retry(
    root: str, partition: str, reasons: Sequence[str] = RETRYABLE_REASONS, name: str | None = None
) -> IngestConfig | None:
    """Publish the next retry round's plan (or find an unfinished one to resume); returns
    the round's ingest config, or None when no reject is retryable."""
    name = base_name(root, partition, name)
    base = base_config(root, partition, name)
    done = rounds(root, partition, name)
    if done and not round_complete(root, partition, round_name(name, done[-1])):
        return round_config(base, done[-1])  # an interrupted round: finish it first
    round_ = (done[-1] if done else 0) + 1
    config = round_config(base, round_)
    wanted = set(reasons)
    picked: dict[tuple[int, int], set[str]] = {}
    for r, i, row in live_rejects(root, partition, name):
        if row["reason"] in wanted:
            picked.setdefault((r, i), set()).add(row["key"])
    if not picked:
        return None
    claim = claim_url(root, partition, config.name)
    body = json.dumps({"config_hash": tables.config_hash(config)}).encode()
    storage.create_if_absent(claim, body)  # a second caller of the same round writes alike

    def rows() -> Iterator[dict[str, Any]]:
        for (r, i), keys in sorted(picked.items()):
            group = read_plan_group(plan_url(root, partition, round_name(name, r)), i)
            for row in group.to_pylist():
                if row["key"] in keys:
                    yield row

    write_plan(rows(), plan_url(root, partition, config.name), base.shard_size, config)
    return config


def partition_accounting(root: str, partition: str, name: str | None = None) -> dict[str, Any]:
    """Samples, written and rejected over every round of a partition (see the module
    doc); ``rejects_by_reason`` counts each key's latest outcome only."""
    name = base_name(root, partition, name)
    all_rounds = [0, *rounds(root, partition, name)]
    samples = plan_rows_count(plan_url(root, partition, name))
    written = 0
    for r in all_rounds:
        n = round_name(name, r)
        for i in range(_shards_of(root, partition, n)):
            index = unit_url(root, "index", shard_id(shard_url(root, partition, n, i)))
            if storage.is_committed(index):
                written += tables.num_rows(index)
    retried = sum(plan_rows_count(plan_url(root, partition, round_name(name, r)))
                  for r in all_rounds[1:])  # fmt: skip
    by_reason = Counter(
        row["reason"]
        for _, _, row in live_rejects(root, partition, name)
        if row["reason"] not in BOX_REASONS
    )  # boxes: rows of written images
    return {
        "samples": samples,
        "written": written,
        "rejected": sum(by_reason.values()),
        "rejects_by_reason": dict(sorted(by_reason.items())),
        "retried": retried,
        "rounds": len(all_rounds) - 1,
    }
