"""Preflight: each bad input is found before any flow runs, as one error naming the flag,
the value and the fix; a good command passes. The S3 checks meet a real closed port and
a real S3 API (moto on 127.0.0.1)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from cvpipe import models
from cvpipe.infer.config import InferConfig
from flows import preflight
from flows.cli_models import Spec
from flows.preflight import Checks, PreflightError


def _fails(checks: Checks, *words: str) -> str:
    with pytest.raises(PreflightError) as e:
        preflight.run(checks)
    text = str(e.value)
    assert "\n" not in text
    for w in words:
        assert w in text, text
    return text


def test_a_good_command_passes(digits_shards, random_checkpoint, tmp_path):
    config = InferConfig(
        shards=digits_shards["test"], checkpoint=random_checkpoint, out=str(tmp_path / "o")
    )
    spec = Spec(InferConfig, positional={"shards": ""}, aliases={"checkpoint": ["--model"]})
    checks = preflight.for_config(config, preflight.flags_of(spec))
    assert checks.inputs == {"SHARDS": digits_shards["test"]}
    assert checks.checkpoints == {"--model": random_checkpoint}
    assert checks.outputs == {"--out": str(tmp_path / "o")}
    preflight.run(checks)  # no error
    assert not (tmp_path / "o").exists()  # checking writes nothing


def test_inputs_must_exist_and_hold_something(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "zero.csv").write_bytes(b"")
    _fails(Checks(inputs={"SOURCE": str(tmp_path / "nope")}), "SOURCE", "does not exist")
    _fails(Checks(inputs={"SOURCE": str(tmp_path / "empty")}), "is an empty folder")
    _fails(Checks(inputs={"SOURCE": str(tmp_path / "zero.csv")}), "is an empty file")
    pattern = str(tmp_path / "s-{000000..000003}.tar")
    _fails(Checks(inputs={"SHARDS": pattern}), "s-000000.tar does not exist")
    # a dict of NAME -> shards (anchors build) is checked value by value
    _fails(Checks(inputs={"SOURCES": {"a": str(tmp_path / "nope")}}), "SOURCES", "does not exist")


def test_a_text_file_is_not_a_checkpoint(tmp_path, random_checkpoint):
    text = tmp_path / "model.pt"
    text.write_text("hello, I am not a model\n")
    msg = _fails(Checks(checkpoints={"--model": str(text)}), "--model", "is not a checkpoint")
    assert "give a .pt written by cvpipe train" in msg
    # the library says so too, whatever the sidecar
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(models.CheckpointError, match="is not a checkpoint"):
        models.load_state(str(text))
    _fails(Checks(checkpoints={"--from": str(tmp_path / "nope.pt")}), "--from", "does not exist")
    _fails(Checks(checkpoints={"--model": str(tmp_path)}), "is a folder")


def test_a_checkpoint_needs_its_sidecar(tmp_path, random_checkpoint):
    bare = tmp_path / "bare.pt"
    bare.write_bytes(Path(random_checkpoint).read_bytes())
    _fails(Checks(checkpoints={"--model": str(bare)}), "sidecar", "is missing")
    (tmp_path / "bare.json").write_text("not json")
    _fails(Checks(checkpoints={"--model": str(bare)}), "is not JSON")
    (tmp_path / "bare.json").write_text('{"arch": "small_cnn"}')  # JSON, but not a sidecar
    _fails(Checks(checkpoints={"--model": str(bare)}), "sidecar", "malformed")


def test_devices():
    preflight.run(Checks(devices={"--device": "auto"}))
    preflight.run(Checks(devices={"--device": "cpu"}))
    _fails(Checks(devices={"--device": "cuda:99"}), "--device cuda:99", "CUDA device")
    _fails(Checks(devices={"--device": "gpu0"}), "is not a device", "use auto, cpu, cuda")


def test_outputs_must_be_writable(tmp_path):
    (tmp_path / "file").write_text("x")
    preflight.run(Checks(outputs={"--out": str(tmp_path / "new" / "deeper")}))
    _fails(Checks(outputs={"--out": str(tmp_path / "file" / "o")}), "is a file", "--out")
    _fails(Checks(outputs={"--out": str(tmp_path / "file")}), "is a file, not a folder")
    if sys.platform.startswith("linux"):  # /proc takes no new files, even from root
        _fails(Checks(outputs={"--out": "/proc/cvpipe-out"}), "is not writable")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_aws_files(monkeypatch, tmp_path):
    """No credentials from files or an instance metadata service, whatever the host has."""
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_a_dead_s3_endpoint_fails_fast(monkeypatch, no_aws_files):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    _fails(Checks(inputs={"SOURCE": "s3://b/in/"}), "SOURCE s3://b/in/", "does not answer",
           "AWS_ENDPOINT_URL")  # fmt: skip


def test_s3_without_credentials(monkeypatch, no_aws_files, moto_endpoint):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    _fails(Checks(outputs={"--out": "s3://b/o"}), "--out s3://b/o", "no S3 credentials",
           "AWS_ACCESS_KEY_ID")  # fmt: skip


def test_s3_bucket_must_exist_and_a_good_one_passes(s3_root):
    _fails(Checks(inputs={"SOURCE": "s3://no-such-bucket/x"}), "bucket no-such-bucket")
    import s3fs

    s3fs.S3FileSystem().pipe(f"{s3_root}/in/a.jpg", b"x")
    preflight.run(Checks(inputs={"SOURCE": f"{s3_root}/in/"}, outputs={"--out": f"{s3_root}/o"}))
    _fails(Checks(inputs={"SOURCE": f"{s3_root}/missing/"}), "does not exist")
