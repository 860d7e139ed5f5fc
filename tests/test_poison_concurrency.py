"""Concurrency and leftovers with real processes: one config per partition even when two
ingests race, cleanup that spares live writers, an index never ahead of its tar, open
S3 uploads aborted, and a plan whose memory does not grow with the partition."""

import os
import subprocess
import sys
import textwrap
import time

import pytest
from badinputs import png

from cvpipe.core import storage, tables
from cvpipe.data import ingest, plan, shards
from cvpipe.data.config import IngestConfig

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}


def python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "src" / "c"
    src.mkdir(parents=True)
    for i in range(300):
        (src / f"{i:04d}.png").write_bytes(png(size=(8, 8)))
    return str(tmp_path / "src")


RACER = """
import os, sys, time
from cvpipe.data.config import IngestConfig
from cvpipe.data.plan import prepare_plan
src, root, size, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cfg = IngestConfig(source=src, root=root, partition="p", name="s", shard_size=size)
while not os.path.exists(go):
    time.sleep(0.001)
try:
    prepare_plan(src, root, "p", "s", size, cfg)
    print("won")
except ValueError as e:
    print("refused:", e)
"""


@pytest.mark.parametrize("trial", range(3))
def test_two_ingests_with_different_configs_cannot_both_plan_a_partition(folder, tmp_path, trial):
    root = str(tmp_path / f"root{trial}")
    go = str(tmp_path / f"go{trial}")
    racers = [python(RACER, folder, root, str(size), go) for size in (7, 11)]
    time.sleep(1.5)  # both imported and waiting
    open(go, "w").close()
    outs = [p.communicate(timeout=120) for p in racers]
    results = [out.strip() for out, _ in outs]
    assert sorted(r.split(":")[0] for r in results) == ["refused", "won"], outs
    winner = (7, 11)[results.index("won")]
    url = plan.plan_url(root, "p", "s")
    assert plan.plan_shard_count(url) == -(-300 // winner)
    assert tables.read_lineage(url)["shard_size"] == winner


def test_a_claimed_partition_refuses_another_config_even_before_its_plan_exists(folder, tmp_path):
    root = str(tmp_path / "root")
    a = IngestConfig(source=folder, root=root, partition="p", name="s", shard_size=7)
    b = a.model_copy(update={"shard_size": 11})
    # A first ingest claimed the partition and was killed before publishing its plan.
    storage.create_if_absent(plan.claim_url(root, "p", "s"), b'{"config_hash": "%s"}' % (
        tables.config_hash(a).encode()
    ))  # fmt: skip
    with pytest.raises(ValueError, match="another config"):
        plan.prepare_plan(folder, root, "p", "s", 11, b)
    url, count = plan.prepare_plan(folder, root, "p", "s", 7, a)  # its own config resumes
    assert count == 43


WRITER = """
import os, sys, time
from cvpipe.core.storage import open_atomic
url, started, go = sys.argv[1], sys.argv[2], sys.argv[3]
with open_atomic(url) as f:
    f.write(b"first half ")
    f.flush()
    open(started, "w").close()
    while not os.path.exists(go):
        time.sleep(0.01)
    f.write(b"second half")
print("published")
"""


def test_a_second_process_cleanup_spares_a_live_writers_temp(tmp_path):
    folder = tmp_path / "shards"
    url = str(folder / "x.tar")
    started, go = str(tmp_path / "started"), str(tmp_path / "go")
    writer = python(WRITER, url, started, go)
    deadline = time.time() + 60
    while not os.path.exists(started) and time.time() < deadline:
        time.sleep(0.01)
    cleaner = python(
        "import sys; from cvpipe.core import storage;"
        "print(storage.remove_stale_temps(sys.argv[1]))",
        str(folder),
    )
    out, err = cleaner.communicate(timeout=60)
    assert out.strip() == "0", err  # the live writer's temp is not touched
    open(go, "w").close()
    out, err = writer.communicate(timeout=60)
    assert out.strip() == "published", err
    assert storage.read_bytes(url) == b"first half second half"
    assert os.listdir(folder) == ["x.tar"]


def test_a_killed_writers_temp_is_gone_after_the_rerun_publishes(tmp_path):
    folder = tmp_path / "selection_parts" / "map"
    url = str(folder / "part.parquet")
    started, go = str(tmp_path / "started"), str(tmp_path / "never")
    writer = python(WRITER, url, started, go)
    while not os.path.exists(started):
        time.sleep(0.01)
    writer.kill()
    writer.communicate()
    assert len(os.listdir(folder)) == 1 and os.listdir(folder)[0].startswith(".part.parquet")
    storage.write_bytes_atomic(url, b"rerun")  # the rerun publishes the same output
    assert os.listdir(folder) == ["part.parquet"]


def test_the_index_is_published_after_its_tar_and_is_the_commit(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(png())
    root = str(tmp_path / "root")
    cfg = IngestConfig(source=str(src), root=root, partition="p", name="s", shard_size=10)
    plan.prepare_plan(str(src), root, "p", "s", 10, cfg)
    stage = ingest.IngestStage(cfg)
    (unit,) = stage.units()
    tar, rejects, index = stage.outputs(unit)
    seen = []
    real = tables.write_parquet

    def watch(table, url, lineage):
        seen.append((url, storage.is_committed(tar)))
        if url == index:
            raise OSError("killed before the index")
        return real(table, url, lineage)

    monkeypatch.setattr(tables, "write_parquet", watch)
    with pytest.raises(OSError):
        stage.process(unit)
    assert seen == [(rejects, True), (index, True)]  # both tables after the tar's commit
    assert storage.is_committed(tar) and not storage.is_committed(index)
    assert not stage.committed(unit)  # so a rerun redoes it
    first = storage.read_bytes(tar)
    monkeypatch.setattr(tables, "write_parquet", real)
    stats = ingest.ingest_partition(cfg)
    assert [s.written for s in stats] == [3] and storage.read_bytes(tar) == first


def test_an_open_multipart_upload_of_a_killed_writer_is_aborted(s3_root):
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = s3_root.split("://")[1]
    key = "corpus/shards/p/s-000000.tar"
    mpu = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    fs.call_s3(
        "upload_part", Bucket=bucket, Key=key, UploadId=mpu["UploadId"], PartNumber=1,
        Body=b"x" * 1024,
    )  # fmt: skip
    other = fs.call_s3("create_multipart_upload", Bucket=bucket, Key="corpus/other.tar")

    def open_uploads():
        listing = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix="corpus/")
        return sorted(u["Key"] for u in listing.get("Uploads", []))

    assert open_uploads() == ["corpus/other.tar", key]
    # Moto stamps every upload with a fixed date in 2010, so "begun before this write"
    # holds for both; on AWS the time tells a killed writer's upload from a live one.
    storage.write_bytes_atomic(f"{s3_root}/{key}", b"the rerun's shard")
    assert open_uploads() == ["corpus/other.tar"]  # only this object's upload
    assert storage.abort_stale_uploads(f"{s3_root}/corpus", older_than_s=3600) == 1
    assert open_uploads() == []
    del other


PLANNER = """
import sys
from cvpipe.data.plan import plan_rows, write_plan
src, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
total = write_plan(plan_rows(src, "p"), out, 1000, None)
assert total == n, total
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(int(peak) // 1024)
"""


def test_planning_memory_does_not_grow_with_the_partition(tmp_path):
    peaks = {}
    for n in (20_000, 200_000):
        manifest = tmp_path / f"m{n}.csv"
        with open(manifest, "w") as f:
            f.write("image,label,caption\n")
            for i in range(n):
                f.write(f"images/{i // 1000:04d}/photo_{i:08d}.jpg,{i % 100},a caption {i}\n")
        p = python(PLANNER, str(manifest), str(tmp_path / f"plan{n}.parquet"), str(n))
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        peaks[n] = int(out)
    # 10x the rows: the old planner grew by ~150 MB here (~0.85 GB per million rows).
    assert peaks[200_000] - peaks[20_000] < 40, peaks


def test_keys_seen_are_exact_on_disk():
    with plan.SeenKeys() as seen:
        assert [seen.add(k) for k in ["a", "b", "a", "c", "b"]] == [True, True, False, True, False]


def test_shard_reader_keys_and_plan_keys_agree_for_raw_byte_names(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / os.fsdecode(b"\xe9t\xe9.png")).write_bytes(png())
    root = str(tmp_path / "root")
    cfg = IngestConfig(source=str(src), root=root, partition="p", name="s", shard_size=10)
    ingest.ingest_partition(cfg)
    (url,) = storage.list_committed(f"{root}/shards/p", ".tar")
    samples, rejects = shards.read_shard_samples(url)
    assert rejects == [] and samples[0].key == ingest.make_key("p", os.fsdecode(b"\xe9t\xe9.png"))
