import os

import fsspec
import pytest

from cvpipe.core import storage


def test_local_publish_is_a_rename_and_temp_files_are_hidden(tmp_path):
    url = str(tmp_path / "out" / "a.bin")
    with storage.open_atomic(url) as f:
        f.write(b"hello")
        # While writing, only a hidden temp file exists and nothing is committed.
        names = os.listdir(tmp_path / "out")
        assert len(names) == 1 and names[0].startswith(".a.bin.tmp-")
        assert not storage.is_committed(url)
        assert storage.list_committed(str(tmp_path / "out")) == []
    assert storage.read_bytes(url) == b"hello"
    assert os.listdir(tmp_path / "out") == ["a.bin"]
    assert storage.is_committed(url)


def test_failed_write_publishes_nothing(tmp_path):
    url = str(tmp_path / "b.bin")
    with pytest.raises(RuntimeError), storage.open_atomic(url) as f:
        f.write(b"partial")
        raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_stale_temps_are_invisible_then_swept_but_live_writers_keep_theirs(tmp_path):
    import subprocess
    import sys
    import time

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = storage._HOST_TAG
    (tmp_path / f".x.tar.tmp-{host}-{dead.pid}-abc").write_bytes(b"killed writer")
    (tmp_path / f".z.tar.tmp-{host}-{os.getpid()}-abc").write_bytes(b"live writer: this one")
    (tmp_path / ".w.tar.tmp-0123456789abcdef").write_bytes(b"older code, owner unknown")
    (tmp_path / "y.tar").write_bytes(b"done")
    assert storage.list_committed(str(tmp_path), ".tar") == [str(tmp_path / "y.tar")]
    assert storage.remove_stale_temps(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path))[-1] == "y.tar" and len(os.listdir(tmp_path)) == 3
    old = time.time() - 2 * storage.STALE_TEMP_AGE_S
    os.utime(tmp_path / ".w.tar.tmp-0123456789abcdef", (old, old))
    assert storage.remove_stale_temps(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == [f".z.tar.tmp-{host}-{os.getpid()}-abc", "y.tar"]


def test_a_commit_sweeps_what_a_killed_writer_of_the_same_file_left(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".a.bin.tmp-{storage._HOST_TAG}-{dead.pid}-abc"
    stale.write_bytes(b"half")
    storage.write_bytes_atomic(str(tmp_path / "a.bin"), b"whole")
    assert os.listdir(tmp_path) == ["a.bin"]


def test_object_store_commit_marker_is_written_last():
    fs = fsspec.filesystem("memory")
    root = "memory://cvpipe-test-storage"
    url = f"{root}/s/a.tar"
    with storage.open_atomic(url) as f:
        f.write(b"data")
        assert not storage.is_committed(url)
    assert storage.is_committed(url)
    assert fs.exists("/cvpipe-test-storage/s/a.tar.committed")
    # An object without its marker (a writer killed before committing) is not listed.
    with fs.open("/cvpipe-test-storage/s/b.tar", "wb") as f:
        f.write(b"orphan")
    assert storage.list_committed(f"{root}/s", ".tar") == [url]
    assert not storage.is_committed(f"{root}/s/b.tar")
    fs.rm("/cvpipe-test-storage", recursive=True)


def test_expand_urls_accepts_file_folder_and_brace_pattern(tmp_path):
    for i in range(3):
        storage.write_bytes_atomic(str(tmp_path / "p" / f"s-{i:06d}.tar"), b"x")
    folder = storage.expand_urls(str(tmp_path), ".tar")
    assert [os.path.basename(u) for u in folder] == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    assert storage.expand_urls(folder[1], ".tar") == [folder[1]]
    brace = storage.expand_urls(str(tmp_path / "p" / "s-{000000..000001}.tar"), ".tar")
    assert brace == folder[:2]
    with pytest.raises(FileNotFoundError):
        storage.expand_urls(str(tmp_path / "p" / "s-{000002..000003}.tar"), ".tar")
    with pytest.raises(FileNotFoundError):
        storage.expand_urls(str(tmp_path / "nothing"), ".tar")
