"""The first-half stages on the stage protocol: identity, unit lists, reruns that read
back, and failing units through the generic task under Prefect's harness."""

from __future__ import annotations

import csv
import os
import threading

import pyarrow as pa
import pytest
import torch

from cvpipe import models
from cvpipe.core import storage, tables
from cvpipe.core.config import Strict
from cvpipe.core.stage import PermanentError, Stage, Unit, run_stage
from cvpipe.data.shards import iter_shard, read_shard_samples, shard_id, unit_url
from cvpipe.infer import stage as infer_stage
from cvpipe.infer.config import InferConfig
from cvpipe.infer.stage import InferStage
from cvpipe.infer.teacher import features_url, predictions_url, rejects_url
from cvpipe.label import materialize
from cvpipe.label.config import LabelCheckConfig, MaterializeConfig, RelabelConfig
from cvpipe.label.materialize import LabelCheckStage, MaterializeStage, RelabelStage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _infer_config(shards, checkpoint, out, **kw) -> InferConfig:
    base = {"device": "cpu", "num_workers": 0, "batch_size": 64}
    return InferConfig(shards=shards, checkpoint=checkpoint, out=str(out), **{**base, **kw})


# ---------------------------------------------------------------------- inference


def test_infer_identity_is_what_changes_outputs(random_checkpoint, tmp_path):
    cfg = _infer_config("s", random_checkpoint, tmp_path)
    h = InferStage(cfg).identity_hash()
    for runtime in ({"num_workers": 7}, {"batch_size": 3}, {"device": "cuda"},
                    {"shards_per_unit": 9}, {"parallel_units": 4}, {"cpu_threads": 1}):  # fmt: skip
        assert InferStage(cfg.model_copy(update=runtime)).identity_hash() == h, runtime
    for output in ({"top_p": 2}, {"features": True}, {"checkpoint": "other.pt"}):
        assert InferStage(cfg.model_copy(update=output)).identity_hash() != h, output
    assert InferStage.resources.gpus == 1  # declared; a CPU run ignores it


def test_infer_units_are_groups_with_predictions_last(digits_shards, random_checkpoint, tmp_path):
    urls = digits_shards["unlabeled"]  # 11 shards
    stage = InferStage(_infer_config(urls, random_checkpoint, tmp_path, shards_per_unit=4,
                                     features=True))  # fmt: skip
    units = stage.units()
    assert [len(u.inputs) for u in units] == [4, 4, 3]
    assert [x for u in units for x in u.inputs] == urls
    assert units[0].name == f"{shard_id(urls[0])} (+3)"
    out, sid = str(tmp_path), shard_id(urls[4])
    outputs = stage.outputs(units[1])
    assert len(outputs) == 12
    assert outputs[:3] == [rejects_url(out, sid), features_url(out, sid), predictions_url(out, sid)]
    no_features = InferStage(_infer_config(urls, random_checkpoint, tmp_path, shards_per_unit=4))
    assert no_features.outputs(units[1])[:2] == [rejects_url(out, sid), predictions_url(out, sid)]


def test_infer_rerun_reads_back_without_loading_the_model(
    digits_shards, random_checkpoint, tmp_path, monkeypatch
):
    built = []
    teacher_cls = infer_stage.Teacher

    def counting_teacher(*args, **kwargs):
        built.append(args)
        return teacher_cls(*args, **kwargs)

    monkeypatch.setattr(infer_stage, "Teacher", counting_teacher)
    cfg = _infer_config(digits_shards["test"][:3], random_checkpoint, tmp_path, shards_per_unit=2)
    first = run_stage(InferStage(cfg))
    assert len(built) == 1  # once per process, not once per unit
    assert [[s.images for s in g] for g in first] == [[100, 100], [100]]
    mtimes = {u: os.stat(u).st_mtime_ns for g in InferStage(cfg).units()
              for u in InferStage(cfg).outputs(g)}  # fmt: skip
    again = run_stage(InferStage(cfg))
    assert len(built) == 1
    assert [[(s.images, s.skipped) for s in g] for g in again] == [[(100, True)] * 2, [(100, True)]]
    assert {u: os.stat(u).st_mtime_ns for u in mtimes} == mtimes
    # a unit half committed runs only its missing shard
    os.remove(predictions_url(str(tmp_path), shard_id(digits_shards["test"][1])))
    third = run_stage(InferStage(cfg))
    assert [s.skipped for g in third for s in g] == [True, False, True]


# ------------------------------------------------------------------ materialize


def _labels(root, shard: str, labels: dict[str, str]) -> str:
    url = unit_url(str(root), "", shard_id(shard))
    table = pa.table({"key": list(labels), "label": list(labels.values())})
    tables.write_parquet(table, url, tables.lineage(None, stage="test"))
    return url


def test_relabel_and_check_stages(digits_shards, digits_dir, tmp_path):
    """Relabel writes each labeled key with its new label (the source's kept); the check
    stage counts samples and measures precision against the source label or a truth
    CSV; both read back on a rerun."""
    labeled = digits_shards["labeled"][0]
    samples, _ = read_shard_samples(labeled, decode=False)
    keys = [s.key for s in samples]
    truth = {s.key: s.meta["label"] for s in samples}
    labels = {k: truth[k] if i < 30 else "x" for i, k in enumerate(keys)}
    _labels(tmp_path / "labels", labeled, labels)
    cfg = RelabelConfig(labels=str(tmp_path / "labels"), shards=[labeled], out=str(tmp_path / "re"))
    stage = RelabelStage(cfg)
    assert [u.name for u in stage.units()] == [shard_id(labeled)]
    [stats] = run_stage(stage)
    assert stats.written == len(keys) and stats.missing == 0
    assert stats.labels["x"] == len(keys) - 30 and sum(stats.labels.values()) == len(keys)
    [back] = run_stage(RelabelStage(cfg))
    assert back.skipped and back.labels == stats.labels and back.written == stats.written
    out = materialize.output_url(cfg.out, shard_id(labeled))
    written = {s.key: s.meta for s in iter_shard(out, decode=False)}
    assert {k: m["label"] for k, m in written.items()} == labels
    assert {k: m["source_label"] for k, m in written.items()} == truth

    check = LabelCheckStage(LabelCheckConfig(shards=[out], out=str(tmp_path / "check")))
    [c] = run_stage(check)
    assert (c.samples, c.checked, c.right) == (len(keys), len(keys), 30)
    summary = check.summarize([c])
    assert summary["precision"] == pytest.approx(30 / len(keys))
    [c2] = run_stage(LabelCheckStage(check.config))
    assert c2.skipped and (c2.samples, c2.checked, c2.right) == (c.samples, c.checked, 30)
    # an ingest shard with no truth to check: counted from its index footer
    [plain] = run_stage(
        LabelCheckStage(LabelCheckConfig(shards=[labeled], out=str(tmp_path / "plain")))
    )
    assert (plain.samples, plain.checked) == (len(keys), 0)

    # U's labels are hidden in a CSV keyed by file name: the truth argument
    u = digits_shards["unlabeled"][0]
    u_samples, _ = read_shard_samples(u, decode=False)
    with open(digits_dir / "unlabeled_truth.csv") as f:
        hidden = {r["image"]: r["label"] for r in csv.DictReader(f)}
    true_of = {s.key: hidden[os.path.basename(s.meta["source"])] for s in u_samples}
    good = [s.key for s in u_samples][::2]
    _labels(tmp_path / "u_labels", u, {k: true_of[k] if k in good else "x" for k in true_of})
    re_u = RelabelStage(RelabelConfig(labels=str(tmp_path / "u_labels"), shards=u,
                                      out=str(tmp_path / "re_u")))  # fmt: skip
    run_stage(re_u)
    [cu] = run_stage(
        LabelCheckStage(
            LabelCheckConfig(
                shards=materialize.output_url(str(tmp_path / "re_u"), shard_id(u)),
                out=str(tmp_path / "check_u"),
                truth=str(digits_dir / "unlabeled_truth.csv"),
            )
        )
    )
    assert (cu.samples, cu.checked, cu.right) == (100, 100, len(good))


def test_materialize_stage_units_and_identity(digits_shards, tmp_path):
    cfg = MaterializeConfig(selection="sel.parquet", shards=digits_shards["test"], out="o")
    stage = MaterializeStage(cfg)
    units = stage.units()
    assert [u.inputs[0] for u in units] == digits_shards["test"]
    assert stage.outputs(units[1]) == [materialize.output_url("o", shard_id(units[1].inputs[0]))]
    other = MaterializeStage(cfg.model_copy(update={"checkpoint": "t.pt"}))
    assert other.identity_hash() != stage.identity_hash()


# ----------------------------------------------- failing units under the Prefect harness


class FlakyConfig(Strict):
    out: str
    units: int = 20
    fail: list[int] = []
    permanent: bool = False


attempts: list[str] = []
_attempts_lock = threading.Lock()


class FlakyStage(Stage[FlakyConfig, int]):
    """Units that fail when told to: transiently (retried once) or permanently."""

    name = "flaky-test"
    retries = 1
    retry_delay_s = 0.0

    def units(self) -> list[Unit]:
        return [Unit(f"u{i}", index=i) for i in range(self.config.units)]

    def outputs(self, unit: Unit) -> list[str]:
        return [storage.join(self.config.out, f"{unit.index}.txt")]

    def process(self, unit: Unit) -> int:
        with _attempts_lock:
            attempts.append(unit.name)
        if unit.index in self.config.fail:
            error = PermanentError if self.config.permanent else RuntimeError
            raise error(f"unit {unit.index} fails")
        storage.write_bytes_atomic(self.outputs(unit)[0], b"done")
        return unit.index

    def read_back(self, unit: Unit) -> int:
        return -1 - unit.index


def _run(config: FlakyConfig, **kwargs):
    from prefect import flow

    from tasks.stage import run_units

    @flow(name="flaky-test-flow")
    def run() -> list:
        return run_units(FlakyStage(config), max_in_flight=1, **kwargs)

    attempts.clear()
    return run()


def test_failures_stop_submission_after_the_threshold(prefect_harness, tmp_path):
    from tasks.stage import UnitsFailed

    config = FlakyConfig(out=str(tmp_path), fail=list(range(3, 20)))
    with pytest.raises(UnitsFailed, match=r"3 of 20 unit\(s\) failed; 14 unit\(s\) not started"):
        _run(config, max_failures=2)
    # units 0-2 pass, 3-5 fail twice each (one retry), then nothing more is submitted
    assert attempts == ["u0", "u1", "u2", "u3", "u3", "u4", "u4", "u5", "u5"]
    # a rerun reads the committed units back and retries the rest
    ok = FlakyConfig(out=str(tmp_path))
    results = _run(ok)
    assert results[:3] == [-1, -2, -3] and results[3:] == list(range(3, 20))
    assert attempts == [f"u{i}" for i in range(3, 20)]


def test_a_permanent_error_is_not_retried(prefect_harness, tmp_path):
    from tasks.stage import UnitsFailed

    config = FlakyConfig(out=str(tmp_path), fail=[1], permanent=True)
    with pytest.raises(UnitsFailed, match=r"18 unit\(s\) not started"):
        _run(config, max_failures=5)
    assert attempts == ["u0", "u1"]  # u1 tried once, and nothing after it


def test_a_missing_checkpoint_fails_one_attempt_of_one_unit(
    prefect_harness, digits_shards, tmp_path, monkeypatch
):
    """CheckpointError is a PermanentError: the infer flow tries the first unit once
    (InferStage.retries is 2) and submits no other."""
    from flows.teacher import infer_flow
    from tasks.stage import UnitsFailed

    assert InferStage.retries == 2
    assert issubclass(models.CheckpointError, PermanentError)
    built = []
    teacher_cls = infer_stage.Teacher

    def counting_teacher(*args, **kwargs):
        built.append(args)
        return teacher_cls(*args, **kwargs)

    monkeypatch.setattr(infer_stage, "Teacher", counting_teacher)
    cfg = _infer_config(digits_shards["test"], str(tmp_path / "nope.pt"), tmp_path / "o",
                        shards_per_unit=1)  # fmt: skip
    with pytest.raises(UnitsFailed, match=r"1 of 6 unit\(s\) failed; 5 unit\(s\) not started"):
        infer_flow(cfg)
    assert len(built) == 1
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a host without CUDA")
def test_no_cuda_device_is_permanent():
    with pytest.raises(models.DeviceError) as e:
        models.resolve_device("cuda")
    assert isinstance(e.value, PermanentError)
