"""What an operator sees: one-line errors (the traceback in a log file the line names),
progress bars, a quiet mode, Prefect's noise kept out of the terminal, and a table of
what each command wrote."""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel
from rich.console import Console
from typer.testing import CliRunner

from cvpipe.core.stage import Stage, Unit
from cvpipe.learn.loop import logs_epoch
from flows import terminal
from tasks import progress


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {
        **env,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        terminal.LOG_DIR_ENV: str(tmp_path / "logs"),
        "PYTHONPATH": os.getcwd(),
        **extra,
    }


def _cvpipe(args: list[str], env: dict[str, str], timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.mark.parametrize(
    ("case", "code", "starts", "says"),
    [
        ("text_checkpoint", 1, "error: --model ", "is not a checkpoint"),
        ("missing_checkpoint", 1, "error: --model ", "does not exist"),
        ("dead_s3", 1, "error: SOURCE s3://b/in/", "does not answer"),
        ("flag", 2, "error: --top-k", "greater than or equal to 1"),
    ],
)
def test_bad_input_is_one_error_line(case, code, starts, says, tmp_path, digits_shards):
    text = tmp_path / "model.pt"
    text.write_text("not a model\n")
    shard = digits_shards["test"][0]
    extra: dict[str, str] = {}
    args = {
        "text_checkpoint": ["infer", shard, "--model", str(text), "--out", str(tmp_path / "o")],
        "missing_checkpoint": ["infer", shard, "--model", str(tmp_path / "nope.pt"),
                               "--out", str(tmp_path / "o"), "--shards-per-unit", "1"],
        "dead_s3": ["ingest", "s3://b/in/", "--out", str(tmp_path / "o"), "--partition", "p"],
        "flag": ["select", str(tmp_path), "--out", str(tmp_path / "o"), "--top-k", "0"],
    }[case]  # fmt: skip
    if case == "dead_s3":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed once the block ends: nothing listens
        extra = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
                 "AWS_SECRET_ACCESS_KEY": "y", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    r = _cvpipe(args, _env(tmp_path, **extra))
    assert r.returncode == code, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(starts) and says in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def test_a_failing_flow_is_one_line_naming_its_log(prefect_harness, tmp_path, monkeypatch):
    from flows.cli import app

    monkeypatch.setenv(terminal.LOG_DIR_ENV, str(tmp_path / "logs"))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"x")  # a folder, but of no shards
    args = ["train", str(tmp_path / "images"), "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(app, [*args, "--epochs", "1"])
    assert r.exit_code == 1
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    assert "FileNotFoundError: no committed *.tar files" in errors[0]
    log = errors[0].rsplit("(log: ", 1)[1].rstrip(")")
    text = Path(log).read_text()
    assert "Traceback" in text and "FileNotFoundError" in text
    assert Path(log).parent == tmp_path / "logs"

    verbose = CliRunner().invoke(app, ["--verbose", *args, "--epochs", "1"])
    assert verbose.exit_code == 1 and "Traceback" in verbose.output


class _ToyConfig(BaseModel):
    out: str
    units: int = 3


class _ToyStage(Stage[_ToyConfig, dict]):
    """Units that say they processed 10 images each."""

    name = "toy"
    retries = 0

    def units(self) -> list[Unit]:
        return [Unit(f"u{i}", index=i) for i in range(self.config.units)]

    def outputs(self, unit: Unit) -> list[str]:
        return [f"{self.config.out}/{unit.name}"]

    def process(self, unit: Unit) -> dict:
        return {"images": 10}

    def read_back(self, unit: Unit) -> dict:
        return {"images": 10, "skipped": True}


def test_run_units_draws_a_bar_and_keys_its_progress_artifact(prefect_harness, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client

    from tasks.stage import progress_artifact_key, run_units

    config = _ToyConfig(out=str(tmp_path / "toy"))

    @flow
    def toy_flow() -> list:
        return run_units(_ToyStage(config), what="toy units")

    buf = io.StringIO()
    progress.enable(Console(file=buf, width=150))
    try:
        assert toy_flow() == [{"images": 10}] * 3
    finally:
        progress.enable(None)
    shown = buf.getvalue()
    assert "toy units" in shown and "3/3" in shown and "img/s" in shown and "eta" in shown

    key = progress_artifact_key("toy units", config)
    assert key.startswith("progress-toy-units-")

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def found() -> list:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )

    artifacts = run_coro_as_sync(found())
    assert artifacts and artifacts[0].type == "progress" and artifacts[0].data == 100.0


def test_images_of_counts_images_not_read_back_units():
    assert progress.images_of({"images": 5}) == 5
    assert progress.images_of({"images": 5, "skipped": True}) == 0
    assert progress.images_of([{"samples": 2}, {"samples": 3}]) == 5
    assert progress.images_of({"loss": 0.1}) is None


def _record(name: str, level: int, msg: str, pathname: str = "/x/cvpipe/y.py", **extra):
    r = logging.LogRecord(name, level, pathname, 1, msg, None, None)
    r.__dict__.update(extra)
    return r


def test_the_terminal_shows_what_a_person_needs():
    prefect_file = os.path.join(terminal._prefect_dir() or "/none/", "engine.py")
    records = {
        "epoch": _record("cvpipe.learn.loop", logging.INFO, "epoch 3/10"),
        "flow note": _record("prefect.flow_runs", logging.INFO, "3 shards planned"),
        "engine": _record("prefect.flow_runs", logging.INFO, "Beginning flow run", prefect_file),
        "warning": _record("flows.ingest", logging.WARNING, "2 rejected"),
        "error": _record("prefect.task_runs", logging.ERROR, "Task run failed", prefect_file),
        "library": _record("botocore.credentials", logging.INFO, "Found credentials"),
    }

    def shown(quiet: bool = False, verbose: bool = False) -> str:
        buf = io.StringIO()
        handler = terminal.TerminalHandler(Console(file=buf, width=200), quiet, verbose)
        for r in records.values():
            handler.handle(r)
        return buf.getvalue()

    default = shown()
    assert "epoch 3/10" in default and "3 shards planned" in default
    assert "warning: 2 rejected" in default
    assert "Beginning flow run" not in default and "Task run failed" not in default
    assert "Found credentials" not in default
    quiet = shown(quiet=True)
    assert quiet.strip() == "warning: 2 rejected"
    assert "Beginning flow run" in shown(verbose=True)


def test_training_logs_about_ten_epochs_per_run():
    assert [e for e in range(1, 321) if logs_epoch(e, 0, 320)] == [1, *range(32, 321, 32)]
    assert [e for e in range(1, 6) if logs_epoch(e, 0, 5)] == [1, 2, 3, 4, 5]
    assert logs_epoch(101, 100, 320)  # the first epoch after a resume


def test_quiet_and_verbose_go_anywhere_on_the_line():
    line = ["ingest", "src", "--out", "o", "-q", "--partition", "p", "--verbose"]
    assert terminal.hoist_global_flags(line) == ["-q", "--verbose", "ingest", "src", "--out",
                                                 "o", "--partition", "p"]  # fmt: skip


@pytest.mark.slow
def test_a_command_ends_with_what_it_wrote_and_no_noise(digits_dir, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(digits_dir / "labeled", source)
    (source / "3" / "broken.png").write_bytes(b"\x89PNG not really")
    root = tmp_path / "root"
    env = _env(tmp_path)
    args = ["ingest", str(source), "--partition", "d", "--shard-size", "100", "--name", "digits"]
    r = _cvpipe([*args, "--out", str(root)], env, timeout=600)
    assert r.returncode == 0, r.stderr
    for noise in ("Traceback", "CancelledError", "Error logging to API", "INFO"):
        assert noise not in r.stderr, r.stderr
    assert "2/2 units" in r.stderr  # the bar (printed once when stderr is not a terminal)
    assert "warning: 1 file(s) rejected" in r.stderr
    assert str(root / "shards" / "d") in r.stdout
    assert str(root / "rejects" / "ingest" / "d") in r.stdout, r.stdout

    quiet = _cvpipe([*args, "--out", str(tmp_path / "quiet"), "--quiet"], env, timeout=600)
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stderr.splitlines()  # the warning only: no bar, no log lines
    assert len(lines) == 1 and lines[0].startswith("warning: 1 file(s) rejected"), lines
    assert str(tmp_path / "quiet" / "shards" / "d") in quiet.stdout
