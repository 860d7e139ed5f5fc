"""Ingest to and read from S3 for real: s3fs against a moto server on 127.0.0.1."""

import s3fs
from conftest import ingest_folder

from cvpipe.core import storage, tables
from cvpipe.core.stage import run_unit
from cvpipe.data import ingest, loader, shards
from cvpipe.data.config import IngestConfig


def test_ingest_to_s3_and_read_back(digits_dir, s3_root):
    root = f"{s3_root}/corpus"
    urls = ingest_folder(str(digits_dir / "labeled"), root, "day1", "digits", 50)
    assert urls == [f"{root}/shards/day1/digits-{i:06d}.tar" for i in range(4)]
    fs = s3fs.S3FileSystem()
    assert fs.exists("cvpipe-test/corpus/shards/day1/digits-000000.tar.committed")
    samples = [s for u in urls for s in shards.read_shard_samples(u)[0]]
    assert len(samples) == 179 and samples[0].image.mode == "RGB"
    index = tables.read_parquet(f"{root}/index/day1/digits-000000.parquet")
    assert (
        index.num_rows == 50
        and tables.read_lineage(f"{root}/index/day1/digits-000000.parquet")["stage"] == "ingest"
    )
    # The torch loader streams the same shards from S3.
    ds = loader.ShardDataset(urls, lambda im: im.size, classes=[str(i) for i in range(10)])
    assert sum(1 for item in ds if "reject" not in item) == 179


def test_uncommitted_upload_is_invisible_and_rerun_completes_it(digits_dir, s3_root):
    root = f"{s3_root}/corpus"
    source = str(digits_dir / "labeled")
    cfg = IngestConfig(source=source, root=root, partition="d", name="x", shard_size=100)
    ingest.prepare_plan(source, root, "d", "x", 100, cfg)
    stage = ingest.IngestStage(cfg)
    run_unit(stage, stage.units()[0])
    # A writer killed after uploading shard 1 but before its commit marker:
    fs = s3fs.S3FileSystem()
    fs.pipe("cvpipe-test/corpus/shards/d/x-000001.tar", b"half a tar")
    assert storage.list_committed(f"{root}/shards/d", ".tar") == [f"{root}/shards/d/x-000000.tar"]
    stats = ingest.ingest_partition(cfg)
    assert [s.skipped for s in stats] == [True, False]
    assert sum(s.written for s in stats) == 179
    assert len(storage.list_committed(f"{root}/shards/d", ".tar")) == 2
    assert shards.read_shard_samples(f"{root}/shards/d/x-000001.tar")[1] == []
