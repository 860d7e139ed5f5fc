"""kill -9 at a random point of ingest, infer, select, materialize and a training run
(the ``cvpipe`` commands as real processes), then a rerun: the outputs equal those of
an uninterrupted run, and no temp file is left anywhere, let alone visible to readers.

The commands talk to the test session's Prefect API (PREFECT_API_URL), so no command
starts an API server of its own that a kill would orphan; each is killed with its whole
process group (DataLoader workers included).
"""

import contextlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from cvpipe.core import storage, tables

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path]),
    }


def _cvpipe(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def _files(root: str) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names]


def kill_then_rerun(args: list[str], watch: str, rng: random.Random, tmp_path) -> str:
    """Start the command, SIGKILL it at a random moment after its first output appears
    under ``watch`` (or after a random delay), then rerun it to completion. Returns how
    far the killed run had got, for the test's message."""
    env = _env()
    proc = subprocess.Popen(
        _cvpipe(args), env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(watch) and _files(watch):
            break
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.4))
    with contextlib.suppress(ProcessLookupError):  # it may have finished already
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = f"{len(_files(watch)) if os.path.isdir(watch) else 0} file(s), rc {proc.returncode}"
    rerun = subprocess.run(_cvpipe(args), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return at_kill


def same_outputs(reference: str, rerun: str) -> None:
    ref = {u[len(reference) :]: u for u in storage.list_committed(reference, recursive=True)}
    got = {u[len(rerun) :]: u for u in storage.list_committed(rerun, recursive=True)}
    assert set(got) == set(ref)
    for rel, url in ref.items():
        if rel.endswith(".parquet"):
            a, b = tables.read_parquet(url), tables.read_parquet(got[rel])
            timing = [c for c in a.column_names if c.endswith("_per_s") or c.endswith("_s")]
            assert a.drop_columns(timing).equals(b.drop_columns(timing)), rel
        elif rel.endswith(".tar"):
            assert storage.read_bytes(url) == storage.read_bytes(got[rel]), rel
        elif rel.endswith(".pt"):  # model weights, or a training state to resume from
            import io

            import torch

            a = torch.load(io.BytesIO(storage.read_bytes(url)), weights_only=True)
            b = torch.load(io.BytesIO(storage.read_bytes(got[rel])), weights_only=True)
            assert _same(a, b), rel
    _no_temps(rerun)


def _same(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        # Timings (images_per_s ...) differ from run to run, and run_hash hashes the input
        # URLs, which name each run's own root.
        keys = [k for k in a if k != "run_hash" and not str(k).endswith(("_per_s", "_s"))]
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in keys)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _no_temps(rerun: str) -> None:
    leftovers = [p for p in _files(rerun) if storage.TEMP_MARK in os.path.basename(p)]
    assert leftovers == []


def test_kill9_at_random_points_of_every_stage_then_rerun(
    prefect_harness, digits_dir, random_checkpoint, tmp_path
):
    from cvpipe.data.config import IngestConfig
    from cvpipe.infer.config import InferConfig
    from cvpipe.label.config import MaterializeConfig, SelectConfig
    from cvpipe.learn.config import TrainConfig
    from flows.ingest import ingest_flow
    from flows.teacher import infer_flow, materialize_flow, select_flow
    from flows.training import train_flow

    rng = random.Random(15)
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    src = str(digits_dir / "unlabeled")
    # The uninterrupted reference, run in this process.
    ingest_flow(IngestConfig(source=src, root=f"{ref}/data", partition="u", name="d",
                             shard_size=60))  # fmt: skip
    infer_flow(InferConfig(shards=f"{ref}/data/shards/u", checkpoint=random_checkpoint,
                           out=f"{ref}/infer", device="cpu", num_workers=0,
                           shards_per_unit=3))  # fmt: skip
    select_flow(SelectConfig(predictions=f"{ref}/infer", out=f"{ref}/select", top_p=2,
                             top_k=30, fan_in=2))  # fmt: skip
    materialize_flow(
        MaterializeConfig(
            selection=f"{ref}/select/selection.parquet",
            shards=f"{ref}/data/shards/u",
            out=f"{ref}/mat",
        )
    )
    train_fields = {"epochs": 4, "batch_size": 32, "input_size": 16, "device": "cpu",
                    "shuffle_buffer": 100, "cpu_threads": 1}  # fmt: skip
    train_flow(TrainConfig(**train_fields), f"{ref}/mat/shards", f"{ref}/train")
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text("".join(f"{k}: {v}\n" for k, v in train_fields.items()))

    notes = {}
    notes["ingest"] = kill_then_rerun(
        ["ingest", src, "--out", f"{run}/data", "--partition", "u", "--shard-size", "60",
         "--name", "d"], f"{run}/data/shards", rng, tmp_path,
    )  # fmt: skip
    same_outputs(f"{ref}/data", f"{run}/data")
    notes["infer"] = kill_then_rerun(
        ["infer", f"{run}/data/shards/u", "--model", random_checkpoint, "--out",
         f"{run}/infer", "--device", "cpu", "--num-workers", "0", "--shards-per-unit", "3"],
        f"{run}/infer", rng, tmp_path,
    )  # fmt: skip
    same_outputs(f"{ref}/infer", f"{run}/infer")
    notes["select"] = kill_then_rerun(
        ["select", f"{run}/infer", "--top-p", "2", "--top-k", "30", "--out", f"{run}/select",
         "--fan-in", "2"], f"{run}/select", rng, tmp_path,
    )  # fmt: skip
    same_selection(f"{ref}/select", f"{run}/select")
    notes["materialize"] = kill_then_rerun(
        ["materialize", f"{run}/select/selection.parquet", "--shards", f"{run}/data/shards/u",
         "--out", f"{run}/mat"], f"{run}/mat", rng, tmp_path,
    )  # fmt: skip
    same_outputs(f"{ref}/mat", f"{run}/mat")
    notes["train"] = kill_then_rerun(
        ["train", f"{run}/mat/shards", "--out", f"{run}/train", "--config", str(train_yaml)],
        f"{run}/train", rng, tmp_path,
    )  # fmt: skip
    same_outputs(f"{ref}/train", f"{run}/train")
    print("state at each kill:", notes)


def same_selection(reference: str, rerun: str) -> None:
    """Selection outputs hold the URLs of the predictions they came from (and its merge
    parts are named by them): compare the final tables row by row with each run's root
    taken out, and the parts by folder."""
    ref = {u[len(reference) :]: u for u in storage.list_committed(reference, recursive=True)}
    got = {u[len(rerun) :]: u for u in storage.list_committed(rerun, recursive=True)}

    def folders(files: dict) -> list[str]:
        return sorted(os.path.dirname(rel) for rel in files)

    assert folders(got) == folders(ref)
    strip = os.path.dirname(reference), os.path.dirname(rerun)
    for rel in ref:
        if rel.endswith(".parquet") and "selection_parts" not in rel:
            a = [str(r).replace(strip[0], "") for r in tables.read_parquet(ref[rel]).to_pylist()]
            b = [str(r).replace(strip[1], "") for r in tables.read_parquet(got[rel]).to_pylist()]
            assert a == b, rel
    _no_temps(rerun)
