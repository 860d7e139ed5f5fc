"""Hostile tars, built byte by byte: the reader never crashes, hangs or loops, every
sample comes out once (as a sample or a reject with a precise reason), keys are valid
UTF-8, and a shard that breaks or is gone still counts the samples its index lists."""

import os

import pytest
from badinputs import (
    pax_block,
    pax_record,
    pickle_trap,
    png,
    tar_block,
    tar_end,
    tar_header,
)

from cvpipe.core import storage, tables
from cvpipe.data import ingest, shards, tario


def write_tar(tmp_path, data: bytes, name: str = "p/bad-000000.tar") -> str:
    url = str(tmp_path / name)
    storage.write_bytes_atomic(url, data)
    return url


def outcome(url: str) -> tuple[dict, list[tuple[str, str]], list]:
    samples, rejects = shards.read_shard_samples(url)
    return {s.key: s for s in samples}, [(r.key, r.reason) for r in rejects], rejects


def run_with_alarm(fn, seconds: int = 10):
    """Fail (instead of hanging the suite) if ``fn`` loops."""
    import signal

    def boom(*_):
        raise TimeoutError("the reader hung")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


GOOD = tar_block(b"a.png", png()) + tar_block(b"a.json", b'{"label":"x"}')
# A stream that breaks rejects the sample being read (more of its members may have
# followed): "m" stands before each break below.
LEAD = GOOD + tar_block(b"m.png", png())


@pytest.mark.parametrize(
    ("records", "why"),
    [
        (b"0 path=x.png\n", "length 0"),  # once looped forever at 100% CPU
        (b"-20 path=x.png\n", "negative length"),  # once walked backwards forever
        (b"99 path=x.png\n", "longer than the header"),
        (b"13 pathx.png\n", "no key=value"),
        (b"abc path=x\n", "not a number"),
        (pax_record(b"size", b"12kb"), "size is not a number"),
        (pax_record(b"size", b"-5"), "negative size"),
        (b"15 path=x.png\n" + b"\x01junk", "junk after the records"),
    ],
)
def test_malformed_pax_headers_are_corrupt_tar_rows_not_hangs_or_crashes(tmp_path, records, why):
    url = write_tar(tmp_path, LEAD + pax_block(records) + tar_block(b"b.png", png()) + tar_end())
    good, rejected, rows = run_with_alarm(lambda: outcome(url))
    assert set(good) == {"a"}, why
    assert rejected == [("m", "corrupt_tar")] and "pax" in rows[-1].detail.lower(), why


def test_an_oversized_extended_header_is_refused_before_it_is_read(tmp_path):
    huge = tar_header(b"././@LongLink", tario.MAX_META_BYTES + 1, b"L")
    url = write_tar(tmp_path, LEAD + huge + bytes(512) + tar_end())
    good, rejected, rows = outcome(url)
    assert set(good) == {"a"} and rejected == [("m", "corrupt_tar")]
    assert "extended header" in rows[0].detail


def test_base256_sizes_beyond_the_file_end_are_corrupt_not_a_memory_blowup(tmp_path):
    size_field = b"\x80" + (2**62).to_bytes(11, "big")  # GNU base-256: 4 EiB
    url = write_tar(tmp_path, GOOD + tar_header(b"b.png", 0, size_field=size_field) + png())
    good, rejected, _ = outcome(url)
    # Not read (over the member cap), then skipping it meets the end of the file.
    assert set(good) == {"a"} and rejected == [("b", "corrupt_tar")]


@pytest.mark.parametrize(
    "blocks",
    [
        # a GNU long name in raw Latin-1 bytes
        tar_block(b"././@LongLink", b"caf\xe9.png\0", b"L") + tar_block(b"x", png()),
        # a pax path in raw bytes (hdrcharset=BINARY)
        pax_block(pax_record(b"hdrcharset", b"BINARY") + pax_record(b"path", b"caf\xe9.png"))
        + tar_block(b"x", png()),
        # a plain USTAR name in raw bytes
        tar_block(b"caf\xe9.png", png()),
    ],
    ids=["gnu-longname", "pax-binary-path", "ustar-name"],
)
def test_member_names_that_are_not_utf8_give_valid_utf8_keys(tmp_path, blocks):
    url = write_tar(tmp_path, GOOD + blocks + tar_end())
    good, rejected, _ = outcome(url)
    assert rejected == [] and set(good) == {"a", "caf\\xe9"}
    # The key can be written to Parquet (it once ended in UnicodeEncodeError).
    rows = [{"key": k, "shard": "p/x", "stage": "read", "reason": "r", "detail": ""} for k in good]
    tables.write_parquet(tables.from_rows(rows, tables.REJECTS), str(tmp_path / "r.parquet"), {})


def test_non_utf8_name_of_an_ignored_member_is_escaped_in_its_row(tmp_path):
    url = write_tar(tmp_path, GOOD + tar_block(b"a.\xff\xfepkl", pickle_trap("/nope")) + tar_end())
    good, rejected, rows = outcome(url)
    assert set(good) == {"a"} and rejected == [("a", "ignored_member")]
    rows[0].detail.encode("utf-8")  # valid UTF-8


@pytest.mark.parametrize(
    ("meta", "reason_part"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),  # once a RecursionError
        (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "nested deeper"),
        (b'{"boxes": [[1, 2, NaN, 4]]}', "NaN"),
        (b'{"w": Infinity}', "Infinity"),
        (b'{"caption": "caf\xe9"}', "UTF-8"),
        (b'["a", "list"]', "not an object"),
    ],
    ids=["deep-list", "deep-object", "nan", "infinity", "latin1", "not-object"],
)
def test_hostile_json_members_are_bad_metadata_rows(tmp_path, meta, reason_part):
    blocks = tar_block(b"b.png", png()) + tar_block(b"b.json", meta)
    url = write_tar(tmp_path, GOOD + blocks + tar_end())
    good, rejected, rows = outcome(url)
    assert set(good) == {"a"} and rejected == [("b", "bad_metadata")]
    assert reason_part in rows[0].detail


@pytest.mark.parametrize(
    ("kind", "what"),
    [(b"1", "hard link"), (b"2", "symlink"), (b"3", "char device"), (b"6", "FIFO")],
)
def test_links_devices_and_fifos_are_unsafe_members(tmp_path, kind, what):
    url = write_tar(tmp_path, GOOD + tar_block(b"b.png", b"", kind) + tar_end())
    good, rejected, _ = outcome(url)
    assert set(good) == {"a"} and rejected == [("b", "unsafe_member")], what


def test_bad_header_checksum_stops_the_stream_with_a_row(tmp_path):
    block = bytearray(tar_block(b"b.png", png()))
    block[0] = ord("c")  # name changed after the checksum was computed
    url = write_tar(tmp_path, LEAD + bytes(block) + tar_end())
    good, rejected, rows = outcome(url)
    assert set(good) == {"a"} and rejected == [("m", "corrupt_tar")]
    assert "checksum" in rows[0].detail


def test_member_over_the_cap_is_not_read(tmp_path):
    big = png(size=(64, 64))
    url = write_tar(tmp_path, GOOD + tar_block(b"b.png", big) + tar_end())
    samples, rejects = shards.read_shard_samples(url, max_member_bytes=len(big) - 1)
    assert [s.key for s in samples] == ["a"]
    assert [(r.key, r.reason) for r in rejects] == [("b", "member_too_large")]


def test_ignored_members_are_counted_apart_from_rejected_samples(tmp_path):
    members = [("k0.png", png()), ("k0.pth", pickle_trap("/nope"))]  # beside a good image
    members += [(f"k{i}.png", png()) for i in range(1, 6)] + [("k6.pyd", pickle_trap("/nope"))]
    from badinputs import tar_bytes

    url = write_tar(tmp_path, tar_bytes(members))

    class Stats:
        def __init__(self, rejects):
            self.rejects = rejects

    from collections import Counter

    _, rejects = shards.read_shard_samples(url)
    summary = ingest.reject_summary([Stats(Counter(r.reason for r in rejects))])
    # 7 keys: 6 images + 1 sample with no image; 2 pickles ignored, never unpickled.
    assert summary["rejected"] == 1 and summary["ignored_members"] == 2
    assert summary["rejects_by_reason"] == {"no_image": 1}


# -------------------------------------------------------------- lost shards are counted


@pytest.fixture
def ingested(tmp_path):
    src = tmp_path / "src"
    (src / "c").mkdir(parents=True)
    for i in range(7):
        (src / "c" / f"{i}.png").write_bytes(png(size=(20 + i, 20)))
    root = str(tmp_path / "root")
    from conftest import ingest_folder

    (url,) = ingest_folder(str(src), root, "p", "s", 10)
    return url


def test_a_shard_cut_in_the_middle_counts_every_indexed_sample(ingested):
    data = storage.read_bytes(ingested)
    with open(ingested, "wb") as f:
        f.write(data[: len(data) // 2])
    samples, rejects = shards.read_shard_samples(ingested)
    assert len(samples) + len(rejects) == 7
    assert len(samples) >= 1 and {r.reason for r in rejects} == {"corrupt_tar"}
    assert len({r.key for r in rejects} | {s.key for s in samples}) == 7


def test_a_shard_that_is_gone_is_missing_shard_for_each_indexed_sample(ingested):
    os.remove(ingested)
    samples, rejects = shards.read_shard_samples(ingested)
    assert samples == [] and len(rejects) == 7
    assert {r.reason for r in rejects} == {"missing_shard"} and all(r.key for r in rejects)


def test_a_foreign_shard_that_breaks_at_once_is_one_row(tmp_path):
    url = write_tar(tmp_path, b"\x00garbage" * 100, "elsewhere/x.tar")
    samples, rejects = shards.read_shard_samples(url)
    assert samples == [] and [(r.key, r.reason) for r in rejects] == [("", "corrupt_tar")]


def test_unknown_io_errors_raise_so_the_unit_is_retried(tmp_path, monkeypatch):
    url = write_tar(tmp_path, GOOD + tar_end())
    real = tario.iter_members

    def failing(f):
        yield from real(f)
        raise ConnectionResetError("the network went away")

    monkeypatch.setattr(tario, "iter_members", failing)
    with pytest.raises(ConnectionResetError):
        shards.read_shard_samples(url)


def test_ingest_index_records_the_tar_checksum_and_counts(ingested):
    import hashlib

    sid = shards.shard_id(ingested)
    index = storage.join(shards.ingest_root(ingested), "index", f"{sid}.parquet")
    lineage = tables.read_lineage(index)
    assert lineage["tar_sha256"] == hashlib.sha256(storage.read_bytes(ingested)).hexdigest()
    assert lineage["samples_in"] == lineage["written"] + lineage["rejected"] == 7
    assert tables.read_parquet(index).num_rows == 7
