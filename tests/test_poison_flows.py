"""The flows of poison handling under Prefect: retry-rejects re-ingests what a retry can
fix into a new round of shards with exact accounting, and verify quarantines a corrupt
shard in the middle of a partition while inference over the rest completes."""

import json
import os

import pytest
from badinputs import jpeg, png
from netfaults import http_files
from typer.testing import CliRunner

from cvpipe.core import storage, tables
from cvpipe.data import ingest, retry, shards
from cvpipe.data.config import IngestConfig


def cli(*args: str):
    from flows.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_retry_rejects_reingests_only_what_a_retry_can_fix(prefect_harness, tmp_path):
    files = {f"/{n}": png(size=(10 + i, 10)) for i, n in enumerate("abcdef")}
    failing = {"/c"}  # 503 now, fine later
    delays = {"/d": 3.0}  # slower than the timeout now, fine later
    with http_files(files, failing, delays) as url:
        manifest = tmp_path / "m.jsonl"
        rows = [{"image": f"{url}/{n}"} for n in "abcd"]
        rows += [{"image": f"{url}/status/404"}, {"image": f"{url}/e", "hashtags": "not a list"}]
        manifest.write_text("\n".join(json.dumps(r) for r in rows))
        root = str(tmp_path / "root")
        cfg = IngestConfig(source=str(manifest), root=root, partition="p", name="web",
                           shard_size=2, fetch_timeout_s=1.0)  # fmt: skip
        ingest.ingest_partition(cfg)
        before = retry.partition_accounting(root, "p")
        assert before == {
            "samples": 6, "written": 2, "rejected": 4, "retried": 0, "rounds": 0,
            "rejects_by_reason": {"bad_metadata": 1, "fetch_failed": 1, "fetch_timeout": 1,
                                  "missing_file": 1},
        }  # fmt: skip
        committed = {u: storage.read_bytes(u) for u in storage.list_committed(root, recursive=True)}

        failing.clear()
        delays.clear()
        out = cli("retry-rejects", root, "--partition", "p")
        assert "retried" in out
        after = retry.partition_accounting(root, "p")
        assert after["samples"] == 6 and after["written"] == 4 and after["rejected"] == 2
        assert after["rejects_by_reason"] == {"bad_metadata": 1, "missing_file": 1}
        assert after["retried"] == 2 and after["rounds"] == 1
        # Nothing committed before was rewritten; the round is an additional shard.
        for u, data in committed.items():
            assert storage.read_bytes(u) == data
        (extra,) = storage.list_committed(f"{root}/shards/p", ".tar")[-1:]
        assert extra.endswith("web-retry1-000000.tar")
        samples, rejects = shards.read_shard_samples(extra)
        assert rejects == [] and {s.meta["source"] for s in samples} == {f"{url}/c", f"{url}/d"}
        plan = tables.read_parquet(ingest.plan_url(root, "p", "web"))
        keys = dict(zip(plan.column("source").to_pylist(), plan.column("key").to_pylist(),
                        strict=True))  # fmt: skip
        assert {s.key for s in samples} == {keys[f"{url}/c"], keys[f"{url}/d"]}  # same keys

        # Nothing retryable is left: a rerun plans no round and changes nothing.
        cli("retry-rejects", root, "--partition", "p")
        assert retry.partition_accounting(root, "p") == after
        # Other reasons on request: the 404 is retried (and still fails), still exact.
        cli("retry-rejects", root, "--partition", "p", "--reasons", "missing_file")
        again = retry.partition_accounting(root, "p")
        assert again["rounds"] == 2 and again["retried"] == 3
        assert again["samples"] == again["written"] + again["rejected"] == 6


def test_retry_resumes_an_interrupted_round(tmp_path):
    with http_files({"/a": jpeg()}, failing={"/a"}) as url:
        manifest = tmp_path / "m.jsonl"
        manifest.write_text(json.dumps({"image": f"{url}/a"}))
        root = str(tmp_path / "root")
        cfg = IngestConfig(source=str(manifest), root=root, partition="p", name="w",
                           shard_size=5, fetch_timeout_s=1.0)  # fmt: skip
        ingest.ingest_partition(cfg)
        config = retry.plan_retry(root, "p")  # the round's plan, then killed before its shards
        assert config.name == "w-retry1"
        assert retry.plan_retry(root, "p").name == "w-retry1"  # resumed, not a new round
        ingest.ingest_partition(config)
        assert retry.round_complete(root, "p", "w-retry1")
        acc = retry.partition_accounting(root, "p")
        assert acc["samples"] == acc["written"] + acc["rejected"] == 1


@pytest.fixture
def partition_with_a_corrupt_middle_shard(digits_dir, tmp_path):
    from conftest import ingest_folder

    root = str(tmp_path / "root")
    urls = ingest_folder(str(digits_dir / "labeled"), root, "p", "d", 60)
    assert len(urls) == 3
    middle = urls[1]
    data = bytearray(storage.read_bytes(middle))
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # silent damage, sizes unchanged
    with open(middle, "wb") as f:
        f.write(data)
    return root, urls


def test_verify_quarantines_the_corrupt_shard_and_inference_completes_the_rest(
    prefect_harness, partition_with_a_corrupt_middle_shard, random_checkpoint, tmp_path
):
    root, urls = partition_with_a_corrupt_middle_shard
    out = cli("verify", f"{root}/shards/p")
    assert "failed: p/d-000001: " in out
    assert storage.list_committed(f"{root}/shards/p", ".tar") == [urls[0], urls[2]]
    assert os.path.exists(f"{root}/quarantine/shards/p/d-000001.tar")
    lost = tables.read_parquet(f"{root}/rejects/verify/p/d-000001.parquet")
    assert lost.num_rows == 60 and set(lost.column("stage").to_pylist()) == {"verify"}

    from cvpipe.data.integrity import VerifyConfig
    from flows.ingest import verify_flow

    again = verify_flow(VerifyConfig(shards=f"{root}/shards/p"))  # rerun: checks read back
    assert again["shards"] == 2 and again["failed"] == 0

    infer_out = str(tmp_path / "infer")
    cli("infer", f"{root}/shards/p", "--model", random_checkpoint, "--out", infer_out,
        "--device", "cpu", "--num-workers", "0")  # fmt: skip
    preds = storage.list_committed(f"{infer_out}/predictions", ".parquet", recursive=True)
    assert [shards.shard_id(u) for u in preds] == ["p/d-000000", "p/d-000002"]
    images = sum(tables.num_rows(u) for u in preds)
    assert images + lost.num_rows == 179  # every ingested sample: inferred or counted lost


def test_verify_names_each_kind_of_damage(tmp_path, digits_dir):
    from conftest import ingest_folder

    from cvpipe.data.integrity import check_shard

    root = str(tmp_path / "root")
    urls = ingest_folder(str(digits_dir / "test"), root, "p", "d", 100)
    assert check_shard(urls[0]).ok
    data = storage.read_bytes(urls[1])
    with open(urls[1], "wb") as f:
        f.write(data[: len(data) // 3])
    with open(urls[2], "r+b") as f:
        f.seek(700)
        f.write(b"\x00" * 16)
    storage.write_bytes_atomic(urls[3], data)  # another shard's bytes: a count or sum off
    os.remove(urls[4])
    assert check_shard(urls[1]).reason == "corrupt_tar"
    assert check_shard(urls[2]).reason in ("checksum_mismatch", "corrupt_tar")
    assert check_shard(urls[3]).reason == "checksum_mismatch"
    assert check_shard(urls[4]).reason == "missing_shard"
