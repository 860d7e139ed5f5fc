"""The loop's own promises, whatever the task: a non-finite loss stops the run with a
clear error, old epochs are pruned (and a run still resumes), checkpoints of models
without a classification head, training and evaluation as stages (identity without
runtime fields, committed runs read back), no matplotlib, and the CUDA path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import PrivateAttr

from cvpipe import models
from cvpipe.core import tables
from cvpipe.core.stage import PermanentError, run_stage
from cvpipe.core.storage import is_committed
from cvpipe.learn import loop, training
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.stages import EvalJob, EvaluateStage, TrainJob, TrainStage
from cvpipe.learn.tasks import ClassificationTask, ContrastiveTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**kw) -> TrainConfig:
    base = dict(arch="small_cnn", input_size=16, epochs=1, batch_size=32, lr=0.05,
                shuffle_buffer=64, device="cpu", seed=3)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def weights(url: str) -> dict[str, torch.Tensor]:
    return models.load_state(url)[0]


class PoisonedTask(ClassificationTask):
    """Classification whose loss turns NaN at one step (a broken target, in effect)."""

    poison_step: int = 2
    _steps: int = PrivateAttr(0)

    def forward_loss(self, model, batch, cfg):
        loss, logits = super().forward_loss(model, batch, cfg)
        self._steps += 1
        return (loss * float("nan") if self._steps == self.poison_step else loss), logits


# --------------------------------------------------------------------------- the loop


def test_a_non_finite_loss_stops_the_run_with_epoch_step_and_value(digits_shards, tmp_path):
    out = str(tmp_path)
    with pytest.raises(training.TrainingError, match=r"epoch 1, step 2: the loss is nan"):
        loop.train(PoisonedTask(), tiny(epochs=2), digits_shards["labeled"], out)
    # Nothing of the broken epoch was committed, and the error is not worth a retry.
    assert loop.last_epoch(out) == 0 and not is_committed(training.final_url(out))
    assert issubclass(training.TrainingError, PermanentError)


def test_old_epochs_are_pruned_by_listing_and_the_run_still_resumes(digits_shards, tmp_path):
    lab, out = digits_shards["labeled"], str(tmp_path / "crashed")
    assert tiny().keep_checkpoints == 2  # the default: not every epoch forever
    real = loop.train_one_epoch
    calls = []

    def crash_on_fourth(*a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **kw)

    loop.train_one_epoch = crash_on_fourth
    try:
        with pytest.raises(KeyboardInterrupt):  # keeping every epoch: 1, 2, 3 stay
            training.train(tiny(epochs=4, keep_checkpoints=None), lab, out)
    finally:
        loop.train_one_epoch = real
    assert loop.last_epoch(out) == 3
    # Retention is a runtime field: the same run resumes, and pruning after epoch 4
    # removes every epoch before 3, the leftover epoch 1 included.
    resumed = training.train(tiny(epochs=4), lab, out)
    straight = training.train(tiny(epochs=4), lab, str(tmp_path / "straight"))
    for run in (out, str(tmp_path / "straight")):
        names = sorted(p.name for p in Path(run, "checkpoints").iterdir())
        assert names == ["epoch-003.json", "epoch-003.pt", "epoch-004.json", "epoch-004.pt",
                         "state-003.pt", "state-004.pt"]  # fmt: skip
    a, b = weights(resumed), weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_exact_for_another_task_too(digits_shards, tmp_path):
    task, cfg, lab = ContrastiveTask(dim=8), tiny(epochs=2), digits_shards["labeled"]
    straight = loop.train(task, cfg, lab, str(tmp_path / "straight"))
    out = str(tmp_path / "crashed")
    loop.train(task, cfg.model_copy(update={"epochs": 1}), lab, str(tmp_path / "one"))
    real = loop.train_one_epoch
    calls = []

    def crash_on_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **kw)

    loop.train_one_epoch = crash_on_second
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.train(task, cfg, lab, out)
    finally:
        loop.train_one_epoch = real
    resumed = loop.train(task, cfg, lab, out)
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The task is part of the run: the same folder refuses another margin.
    with pytest.raises(training.TrainingError, match="another run"):
        loop.train(ContrastiveTask(dim=8, margin=0.5), cfg, lab, out)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoints_check_the_head_of_classifiers_only(tmp_path):
    info = models.ModelInfo("small_cnn", [str(i) for i in range(10)], 16)
    with pytest.raises(models.CheckpointError, match="3 head outputs"):
        models.save_checkpoint(models.build("small_cnn", 3), info, str(tmp_path / "a.pt"))
    with pytest.raises(models.CheckpointError, match="resnet18"):
        models.save_checkpoint(models.build("resnet18", 10), info, str(tmp_path / "b.pt"))
    # An embedding net has no class head: its info is a contrastive model's.
    net = models.EmbeddingNet("small_cnn", 8)
    emb = models.ModelInfo("small_cnn", [], 16, task="contrastive")
    url = str(tmp_path / "emb.pt")
    models.save_checkpoint(net, emb, url)
    state, back = models.load_state(url)
    assert back.task == "contrastive" and state["head.weight"].shape == (8, 48)
    with pytest.raises(models.CheckpointError, match="not a classifier"):
        models.load_checkpoint(url)


def test_old_sidecars_without_a_task_are_classifiers(random_checkpoint, tmp_path):
    import json

    sidecar = Path(models.sidecar_url(random_checkpoint))
    raw = json.loads(sidecar.read_text())
    raw.pop("task", None)
    old = tmp_path / "old.pt"
    old.write_bytes(Path(random_checkpoint).read_bytes())
    (tmp_path / "old.json").write_text(json.dumps(raw))
    model, info = models.load_checkpoint(str(old))
    assert info.task == "classification" and model.head.out_features == 10


# --------------------------------------------------------------------------- stages


def test_train_stage_reads_back_and_ignores_runtime_fields(digits_shards, tmp_path, monkeypatch):
    job = TrainJob(config=tiny(epochs=2), shards=digits_shards["labeled"], out=str(tmp_path))
    (first,) = run_stage(TrainStage(job))
    assert first.checkpoint == training.final_url(str(tmp_path))
    assert [r["epoch"] for r in first.metrics] == [1, 2]
    lin = models.load_info(first.checkpoint).lineage
    assert lin["run_hash"] == TrainStage(job).identity_hash() == first.run_hash

    def boom(*a, **kw):
        raise AssertionError("should not train")

    monkeypatch.setattr(loop, "train", boom)
    runtime = tiny(epochs=2, num_workers=2, cpu_threads=1, keep_checkpoints=5, device="auto")
    again = job.model_copy(update={"config": runtime})
    assert TrainStage(again).identity_hash() == TrainStage(job).identity_hash()
    (second,) = run_stage(TrainStage(again))
    assert second.model_id == first.model_id and second.metrics == first.metrics
    other = job.model_copy(update={"config": tiny(epochs=2, lr=0.01)})
    with pytest.raises(PermanentError, match="another run"):
        run_stage(TrainStage(other))


def test_a_train_job_names_its_task(digits_shards, tmp_path):
    plain = TrainJob(config=tiny(), shards=["a.tar"], out="x")
    siamese = TrainJob.model_validate(
        {"config": tiny(), "shards": ["a.tar"], "out": "x", "task": {"kind": "contrastive"}}
    )
    assert isinstance(siamese.task, ContrastiveTask)
    assert TrainStage(plain).identity_hash() != TrainStage(siamese).identity_hash()
    # A classification run keeps the hash it had before tasks existed.
    legacy = {"config": tiny(), "train": ["a.tar"], "val": [], "init": None}
    assert TrainStage(plain).identity_hash() == tables.config_hash(legacy)


def test_evaluate_stage_scores_once_and_reads_back(digits_shards, tmp_path, monkeypatch):
    ckpt = training.train(tiny(), digits_shards["labeled"], str(tmp_path / "run"))
    job = EvalJob(checkpoint=ckpt, shards=digits_shards["test"][:1], out=str(tmp_path / "ev"),
                  device="cpu")  # fmt: skip
    (res,) = run_stage(EvaluateStage(job))
    assert res.n == 100 and res.per_class_url is not None
    monkeypatch.setattr(training, "evaluate", lambda *a, **kw: pytest.fail("re-evaluated"))
    (back,) = run_stage(EvaluateStage(job))
    counts = lambda r: [row[:4] for row in r.per_class]  # noqa: E731 (top1 may be NaN)
    assert (back.top1, back.n, counts(back)) == (res.top1, res.n, counts(res))
    # Other shards in the same folder are not taken as committed.
    more = job.model_copy(update={"shards": digits_shards["test"][:2]})
    assert not EvaluateStage(more).committed(EvaluateStage(more).units()[0])


# --------------------------------------------------------------------------- house rules


def test_the_training_modules_import_no_matplotlib():
    code = (
        "import sys\n"
        "import cvpipe.learn.training, cvpipe.learn.loop, cvpipe.learn.stages\n"
        "print('matplotlib' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16/channels_last path needs CUDA")
def test_cuda_run_uses_bf16_and_leaves_cudnn_flags_alone(digits_shards, tmp_path):
    before = torch.backends.cudnn.benchmark
    # 10 epochs: 2 left validation at chance (0.10 on CPU too), so "it learned" could
    # not be told apart from "it ran".
    cfg = tiny(epochs=10, device="cuda")
    ckpt = training.train(cfg, digits_shards["labeled"], str(tmp_path), digits_shards["test"])
    assert torch.backends.cudnn.benchmark == before
    rows = tables.read_parquet(training.metrics_url(str(tmp_path))).to_pylist()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    val = [r for r in rows if r["split"] == "val"][-1]
    assert val["top1"] > 0.5  # 0.82 on CPU with the same seed
    res = training.evaluate(ckpt, digits_shards["test"], device="cuda")
    assert res.top1 == pytest.approx(val["top1"], abs=0.02)  # bf16 vs bf16: near
