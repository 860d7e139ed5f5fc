"""Faults on a real S3 API: a fault-injecting proxy of our own (HTTP 500/503, dropped
connections before and after the request took effect, truncated bodies) in front of a
moto server on 127.0.0.1, during ingest to s3:// and inference from s3://. The outputs
equal those of a run without faults: shards byte for byte, tables row for row."""

import pytest
from netfaults import FaultProxy

from cvpipe.core import storage, tables


def _rows(url: str) -> list[dict]:
    return tables.read_parquet(url).to_pylist()


def _use_endpoint(monkeypatch, endpoint: str) -> None:
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    # Fail fast enough for a test: botocore's standard retry mode, a few attempts.
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "6")
    s3fs.S3FileSystem.clear_instance_cache()


def _tree(root: str) -> dict[str, str]:
    """Relative path -> URL of every committed file under ``root``."""
    return {u[len(root) :]: u for u in storage.list_committed(root, recursive=True)}


@pytest.mark.slow
def test_ingest_and_inference_through_a_faulty_proxy_match_a_clean_run(
    prefect_harness, digits_dir, s3_root, moto_endpoint, random_checkpoint, tmp_path, monkeypatch
):
    from cvpipe.data.config import IngestConfig
    from cvpipe.infer.config import InferConfig
    from flows.ingest import ingest_flow
    from flows.teacher import infer_flow

    source = str(digits_dir / "labeled")

    def run(root: str, infer_out: str) -> tuple[dict, dict]:
        ingest_flow(IngestConfig(source=source, root=root, partition="p", name="d",
                                 shard_size=50))  # fmt: skip
        infer_flow(InferConfig(shards=f"{root}/shards/p", checkpoint=random_checkpoint,
                               out=infer_out, device="cpu", num_workers=0,
                               shards_per_unit=2, cpu_threads=1))  # fmt: skip
        return _tree(root), _tree(infer_out)

    clean_s3, clean_infer = run(f"{s3_root}/clean", str(tmp_path / "clean"))

    proxy = FaultProxy(moto_endpoint, rate=0.1, seed=7)
    with proxy.serve() as endpoint:
        _use_endpoint(monkeypatch, endpoint)
        faulty_s3, faulty_infer = run(f"{s3_root}/faulty", str(tmp_path / "faulty"))
        proxy.enabled = False  # read the results back without faults
        assert sum(proxy.faults.values()) >= 10, proxy.faults
        assert len(proxy.faults) >= 4, proxy.faults  # most kinds of fault happened

        assert set(faulty_s3) == set(clean_s3) and len(clean_s3) >= 4 * 3
        for rel, url in clean_s3.items():
            other = faulty_s3[rel]
            if rel.endswith(".tar"):
                assert storage.read_bytes(url) == storage.read_bytes(other), rel
            else:  # Parquet: lineage holds a timestamp, the rows must be equal
                assert _rows(url) == _rows(other), rel
        assert set(faulty_infer) == set(clean_infer)
        for rel, url in clean_infer.items():
            assert _rows(url) == _rows(faulty_infer[rel]), rel
        # Nothing half-done is visible: every object has its commit marker (but the
        # partition's claim, an object created whole by one conditional PUT).
        import s3fs

        objects = s3fs.S3FileSystem().find("cvpipe-test/faulty")
        markers = {p[: -len(storage.COMMIT_SUFFIX)] for p in objects if p.endswith(".committed")}
        data = {p for p in objects if not p.endswith((".committed", ".claim.json"))}
        assert data and data <= markers
        print("faults injected:", dict(proxy.faults), "of", proxy.requests, "requests")
