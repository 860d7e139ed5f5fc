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


def _commands(t: Path, ckpt: str) -> dict[str, tuple[list[str], str, str]]:
    """case -> (the command line, the flag its error names, what the line says); every
    path under ``t``: ``nope`` is missing, ``data`` exists, ``text.pt`` is no model."""
    nope, data, text, out = f"{t}/nope", f"{t}/data", f"{t}/text.pt", f"{t}/o"
    unwritable = "/proc/cvpipe-out"  # /proc takes no new files, even from root
    missing, no_model = "does not exist", "is not a checkpoint"
    return {
        "detect train": (["detect", "train", nope, "--out", out], "SHARDS", missing),
        "detect train --init": (["detect", "train", data, "--out", out, "--init", text],
                                "--init", no_model),
        "detect eval": (["detect", "eval", ckpt, "--shards", nope, "--out", out], "--shards",
                        missing),
        "detect eval no tars": (["detect", "eval", ckpt, "--shards", f"{t}/notars", "--out", out],
                                "--shards", "no committed *.tar files"),
        "detect eval checkpoint": (["detect", "eval", text, "--shards", data, "--out", out],
                                   "CHECKPOINT", no_model),
        "detect label": (["detect", "label", ckpt, "--shards", nope, "--out", out], "--shards",
                         missing),
        "detect study": (["detect", "study", "--config", f"{t}/study.yaml"],
                         f"{t}/study.yaml: labeled", missing),
        "localize train": (["localize", "train", nope, "--out", out], "SHARDS", missing),
        "localize eval": (["localize", "eval", ckpt, "--shards", nope, "--out", out], "--shards",
                          missing),
        "localize eval no tars": (["localize", "eval", ckpt, "--shards", f"{t}/notars", "--out",
                                   out], "--shards", "no committed *.tar files"),
        "vocab": (["vocab", nope, "--out", out, "--size", "8"], "SHARDS", missing),
        "vocab --synonyms": (["vocab", data, "--out", out, "--size", "8", "--synonyms", nope],
                             "--synonyms", missing),
        "train-weak": (["train-weak", data, "--vocab", nope, "--out", out], "--vocab", missing),
        "train-weak --out": (["train-weak", data, "--vocab", data, "--out", unwritable], "--out",
                             "not writable"),
        "words": (["words", text, "--query", "seven"], "CHECKPOINT", no_model),
        "index build": (["index", "build", nope, "--out", out], "EMBEDDINGS", missing),
        "index build --out": (["index", "build", data, "--out", unwritable], "--out",
                              "not writable"),
        "index add": (["index", "add", data, nope], "EMBEDDINGS", missing),
        "index query": (["index", "query", nope, "--key", "k"], "INDEX", missing),
        "index query --model": (["index", "query", data, "--image", f"{data}/a.png", "--model",
                                 text], "--model", no_model),
        "index query --embeddings": (["index", "query", data, "--embeddings", nope, "--out",
                                      f"{out}/n.parquet"], "--embeddings", missing),
        "siamese train": (["siamese", "train", data, "--out", out, "--from", text], "--from",
                          no_model),
        "siamese run": (["siamese", "run", f"{t}/siamese.yaml"], f"{t}/siamese.yaml: train_shards",
                        missing),
        "dedup": (["dedup", nope, "--threshold", "0.1", "--out", f"{out}/d.parquet"], "INDEX",
                  missing),
        "datasets canvases": (["datasets", "canvases", unwritable], "OUT", "not writable"),
    }  # fmt: skip


_CASES = list(_commands(Path("t"), "c"))


@pytest.mark.parametrize("case", _CASES)
def test_bad_input_stops_every_command_before_its_flow(
    case, tmp_path, random_checkpoint, monkeypatch
):
    """One ``error:`` line naming the flag (exit 1), nothing written, and no Prefect API
    started: the console script starts it once the preflight has passed, so here (where
    the command owns the API as there) starting one fails the test."""
    from typer.testing import CliRunner

    from flows import cli, local_api, terminal

    (tmp_path / "text.pt").write_text("not a model\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(b"x")
    (tmp_path / "notars").mkdir()
    (tmp_path / "notars" / "a.txt").write_text("x")
    data = tmp_path / "data"
    (tmp_path / "study.yaml").write_text(
        f"root: {tmp_path}/o\nlabeled: {tmp_path}/nope\nunlabeled: {data}\ntest: {data}\n"
    )
    (tmp_path / "siamese.yaml").write_text(
        f"root: {tmp_path}/o\ndigits: null\ntrain_shards: {tmp_path}/nope\neval_shards: {data}\n"
    )
    args, flag, says = _commands(tmp_path, random_checkpoint)[case]

    def no_api(*args: object, **kwargs: object) -> None:
        raise AssertionError("a Prefect API was started")

    monkeypatch.setattr(local_api, "LocalAPI", no_api)
    monkeypatch.setattr(cli, "_owns_api", True)  # as under the console script
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv(terminal.LOG_DIR_ENV, str(tmp_path / "logs"))
    try:
        r = CliRunner().invoke(cli.app, args)
    finally:
        terminal.stop()  # main() does this when it owns the API
    assert r.exit_code == 1, (r.output, r.exception)
    lines = r.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} "), r.output
    assert says in lines[0], lines[0]
    assert "prefect" not in r.output.lower()
    assert not (tmp_path / "o").exists()
