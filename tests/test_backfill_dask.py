"""Backfill over a date range, and the same ingest flow on a Dask LocalCluster."""

import datetime as dt
import shutil

import pytest

from cvpipe.core import storage
from cvpipe.data.config import IngestConfig


def test_backfill_over_a_half_done_range_finishes_it(prefect_harness, digits_dir, tmp_path):
    from flows.backfill import backfill_flow, date_partitions
    from flows.ingest import ingest_flow

    incoming = tmp_path / "incoming"
    for day in ("2026-11-01", "2026-11-02", "2026-11-03"):
        shutil.copytree(digits_dir / "labeled" / "3", incoming / day / "3")
    root = str(tmp_path / "root")
    # Day 2 was ingested by its scheduled run already.
    ingest_flow(
        IngestConfig(
            source=str(incoming / "2026-11-02"),
            root=root,
            partition="2026-11-02",
            name="d",
            shard_size=10,
        )
    )
    out = backfill_flow(
        str(incoming / "{partition}"),
        root,
        dt.date(2026, 11, 1),
        dt.date(2026, 11, 3),
        name="d",
        shard_size=10,
    )
    assert list(out) == ["2026-11-01", "2026-11-02", "2026-11-03"]
    assert out["2026-11-02"]["shards_skipped"] == out["2026-11-02"]["shards"] == 2
    assert out["2026-11-01"]["shards_skipped"] == 0
    for day in out:
        assert len(storage.list_committed(f"{root}/shards/{day}", ".tar")) == 2
    with pytest.raises(ValueError, match="before its start"):
        date_partitions(dt.date(2026, 11, 3), dt.date(2026, 11, 1))


def test_ingest_flow_on_a_dask_local_cluster(prefect_harness, digits_dir, tmp_path):
    from flows.ingest import ingest_flow
    from flows.runners import with_runner

    root = str(tmp_path / "root")
    cfg = IngestConfig(
        source=str(digits_dir / "labeled"), root=root, partition="p", name="digits", shard_size=60
    )
    summary = with_runner(ingest_flow, "dask", workers=2)(cfg)
    assert summary["shards"] == 3 and summary["written"] == 179
    assert len(storage.list_committed(f"{root}/shards/p", ".tar")) == 3


def test_daily_ingest_takes_the_day_before_its_scheduled_time(
    prefect_harness, digits_dir, tmp_path
):
    from flows.backfill import daily_ingest_flow

    yesterday = (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)).isoformat()
    shutil.copytree(digits_dir / "labeled" / "7", tmp_path / "in" / yesterday / "7")
    out = daily_ingest_flow(
        str(tmp_path / "in" / "{partition}"), str(tmp_path / "root"), name="d", shard_size=100
    )
    assert list(out) == [yesterday] and out[yesterday]["written"] == 18
