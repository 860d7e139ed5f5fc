"""Classification training on the bundled digits shards: freezing, LR multipliers, resume
after a crash, evaluation against a hand computation, metrics tables, chop, configs."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from cvpipe import models
from cvpipe.core import tables
from cvpipe.core.storage import is_committed, read_bytes
from cvpipe.data.shards import read_shard_samples
from cvpipe.experiments import chop
from cvpipe.experiments.config import SemiSupervisedConfig
from cvpipe.learn import loop, training, transfer
from cvpipe.learn.config import TrainConfig
from cvpipe.learn.tasks.classification import classifier_parts, initial_model

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**kw) -> TrainConfig:
    base = dict(
        arch="small_cnn",
        input_size=16,
        epochs=1,
        batch_size=32,
        lr=0.05,
        shuffle_buffer=64,
        device="cpu",
        seed=3,
    )
    return TrainConfig(**{**base, **kw})


def weights(url: str) -> dict[str, torch.Tensor]:
    model, _ = models.load_checkpoint(url)
    return model.state_dict()


@pytest.fixture(scope="module")
def base_ckpt(digits_shards, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("base"))
    return training.train(tiny(epochs=6), digits_shards["labeled"], out)


# --------------------------------------------------------------------------- freezing


def test_frozen_stages_keep_weights_and_batchnorm_stats(digits_shards, base_ckpt, tmp_path):
    before = weights(base_ckpt)
    ckpt = training.train(
        tiny(freeze_stages=2, seed=5),
        digits_shards["labeled"],
        str(tmp_path / "ft"),
        init_checkpoint=base_ckpt,
    )
    after = weights(ckpt)
    frozen = [k for k in before if k.startswith(("backbone.conv1.", "backbone.conv2."))]
    trained = [k for k in before if k.startswith(("backbone.conv3.", "head."))]
    assert any("running_mean" in k for k in frozen)  # BatchNorm statistics are covered
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    # The rest did train (same classes: the head was kept, and moved).
    for k in trained:
        if k.endswith("num_batches_tracked"):
            assert after[k] > before[k]
        else:
            assert not torch.equal(before[k], after[k]), k


def test_freezing_puts_frozen_stages_in_eval_mode():
    model = models.build("small_cnn", 10)
    frozen = transfer.freeze_stages(classifier_parts(model), 1)
    transfer.set_train_mode(model, frozen)
    assert not model.backbone.conv1.training and not model.backbone.conv1[1].training
    assert model.backbone.conv2.training and model.head.training
    assert not any(p.requires_grad for p in model.backbone.conv1.parameters())
    assert all(p.requires_grad for p in model.backbone.conv2.parameters())


def test_copy_stages_reinitializes_above_n(digits_shards, base_ckpt):
    cfg = tiny(copy_stages=1)
    model, lineage = initial_model(cfg, [str(i) for i in range(10)], base_ckpt)
    before = weights(base_ckpt)
    got = model.state_dict()
    assert torch.equal(got["backbone.conv1.0.weight"], before["backbone.conv1.0.weight"])
    assert not torch.equal(got["backbone.conv2.0.weight"], before["backbone.conv2.0.weight"])
    assert not torch.equal(got["head.weight"], before["head.weight"])
    assert lineage["init_model_id"] == models.model_id(base_ckpt)


def test_new_class_set_replaces_the_head(digits_shards, base_ckpt):
    model, lineage = initial_model(tiny(), ["a", "b", "c"], base_ckpt)
    assert model.head.out_features == 3 and lineage["init_classes_match"] is False
    before = weights(base_ckpt)
    assert torch.equal(model.backbone.conv3[0].weight, before["backbone.conv3.0.weight"])


# --------------------------------------------------------------------------- optimizer


def test_lr_multipliers_reach_the_param_groups():
    cfg = tiny(lr=0.1, lr_multipliers={"head": 1.0, "conv3": 0.5, "conv2": 0.0}, freeze_stages=1)
    model = models.build("small_cnn", 10)
    parts = classifier_parts(model)
    transfer.freeze_stages(parts, cfg.freeze_stages)
    opt = loop.build_optimizer(transfer.param_groups(model, parts, cfg.lr, cfg.lr_multipliers), cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"conv2", "conv3", "head"}  # conv1 is frozen: not optimized
    assert groups["head"]["lr"] == pytest.approx(0.1)
    assert groups["conv3"]["lr"] == pytest.approx(0.05)
    assert groups["conv2"]["lr"] == 0.0
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["conv3"] == {id(p) for p in model.backbone.conv3.parameters()}
    assert ids["head"] == {id(p) for p in model.head.parameters()}
    # The schedule scales every group alike, so the ratios survive it.
    sched = loop.build_scheduler(opt, tiny(lr=0.1, epochs=4))
    opt.step()
    sched.step()
    assert groups["conv3"]["lr"] / groups["head"]["lr"] == pytest.approx(0.5)
    assert groups["head"]["lr"] < 0.1


def test_invalid_train_config_names_the_field():
    with pytest.raises(ValidationError, match="lr_multipliers"):
        TrainConfig(lr_multipliers={"layer4": 0.1})  # small_cnn has no layer4
    with pytest.raises(ValidationError, match="freeze_stages"):
        TrainConfig(freeze_stages=4)
    with pytest.raises(ValidationError, match="epoch"):
        TrainConfig(epoch=3)  # a typo is an error, not ignored
    with pytest.raises(ValidationError, match="arch"):
        TrainConfig(arch="resnet5")


def test_demo_yaml_is_a_valid_semi_supervised_config():
    raw = yaml.safe_load((ROOT / "flows" / "examples" / "demo.yaml").read_text())
    cfg = SemiSupervisedConfig.model_validate(raw)
    assert len(cfg.seeds) >= 3 and cfg.digits is not None
    assert cfg.student.arch == cfg.baseline.arch
    raw["top_k"] = 0
    with pytest.raises(ValidationError, match="top_k"):
        SemiSupervisedConfig.model_validate(raw)


# --------------------------------------------------------------------------- resume


def test_resume_after_crash_equals_an_uninterrupted_run(digits_shards, tmp_path, monkeypatch):
    cfg = tiny(epochs=3)
    lab = digits_shards["labeled"]
    straight = training.train(cfg, lab, str(tmp_path / "straight"))

    real = loop.train_one_epoch
    calls = []

    def crash_on_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **kw)

    out = str(tmp_path / "crashed")
    monkeypatch.setattr(loop, "train_one_epoch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, lab, out)
    assert training.last_epoch(out) == 2 and not is_committed(training.final_url(out))

    calls.clear()
    monkeypatch.setattr(
        loop, "train_one_epoch", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1]
    )
    resumed = training.train(cfg, lab, out)
    assert len(calls) == 1  # only epoch 3 was trained again
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    epochs = tables.read_parquet(training.metrics_url(out)).column("epoch").to_pylist()
    assert epochs == [1, 2, 3]

    # The training state holds only tensors and primitives.
    state = torch.load(io.BytesIO(read_bytes(training.state_url(out, 3))), weights_only=True)
    assert state["epoch"] == 3 and "optimizer" in state and "rng" in state


def test_committed_final_is_skipped_and_another_config_is_refused(
    digits_shards, base_ckpt, monkeypatch
):
    def boom(*a, **kw):
        raise AssertionError("should not train")

    monkeypatch.setattr(loop, "train_one_epoch", boom)
    out = str(Path(base_ckpt).parent)
    assert training.train(tiny(epochs=6), digits_shards["labeled"], out) == base_ckpt
    with pytest.raises(training.TrainingError, match="another run"):
        training.train(tiny(epochs=6, lr=0.01), digits_shards["labeled"], out)


def test_keep_checkpoints_drops_old_epochs_and_still_resumes(digits_shards, tmp_path):
    out = str(tmp_path / "keep")
    training.train(tiny(epochs=3, keep_checkpoints=1), digits_shards["labeled"], out)
    left = sorted(Path(out, "checkpoints").iterdir())
    assert [p.name for p in left] == ["epoch-003.json", "epoch-003.pt", "state-003.pt"]
    assert training.last_epoch(out) == 3


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def test_evaluate_top1_equals_a_hand_computation(digits_shards, base_ckpt, tmp_path):
    res = training.evaluate(base_ckpt, digits_shards["test"], str(tmp_path), device="cpu")
    model, info = models.load_checkpoint(base_ckpt)
    model.eval()
    tf = models.preprocess(info)
    right = total = 0
    per_class = [0] * 10
    for url in digits_shards["test"]:
        samples, _ = read_shard_samples(url)
        for s in samples:
            pred = model(tf(s.image)[None]).argmax(1).item()
            right += info.classes[pred] == s.meta["label"]
            per_class[int(s.meta["label"])] += 1
            total += 1
    assert res.n == total == 540
    assert res.top1 == pytest.approx(right / total)
    assert 0.2 < res.top1 <= res.top5 <= 1.0  # a 6-epoch model is far above chance (0.1)

    table = tables.read_parquet(res.per_class_url)
    assert table.schema.equals(tables.PER_CLASS)
    assert table.column("count").to_pylist() == per_class
    assert sum(table.column("correct").to_pylist()) == right
    assert tables.read_lineage(res.per_class_url)["model_id"] == models.model_id(base_ckpt)

    again = training.evaluate(base_ckpt, digits_shards["test"], str(tmp_path), device="cpu")
    assert again.top1 == res.top1 and again.per_class == res.per_class


def test_metrics_parquet_has_a_row_per_epoch_and_split(digits_shards, tmp_path):
    out = str(tmp_path / "m")
    training.train(tiny(epochs=2), digits_shards["labeled"], out, val_urls=digits_shards["test"])
    table = tables.read_parquet(training.metrics_url(out))
    assert table.schema.remove_metadata().equals(tables.METRICS)
    rows = table.to_pylist()
    assert [(r["epoch"], r["split"]) for r in rows] == [
        (1, "train"),
        (1, "val"),
        (2, "train"),
        (2, "val"),
    ]
    assert all(r["images_per_s"] > 0 and 0 <= r["top1"] <= r["top5"] <= 1 for r in rows)
    # The last val row scores the final weights on the val shards.
    res = training.evaluate(training.final_url(out), digits_shards["test"], device="cpu")
    assert rows[-1]["top1"] == pytest.approx(res.top1)
    lin = tables.read_lineage(training.metrics_url(out))
    assert lin["stage"] == "train" and lin["config_hash"] == tables.config_hash(tiny(epochs=2))


# --------------------------------------------------------------------------- chop


def test_chop_configs_cover_every_n_and_mode():
    runs = chop.chop_configs(tiny())
    assert [(n, m) for n, m, _ in runs] == [
        (0, "finetuned"),
        (1, "frozen"),
        (1, "finetuned"),
        (2, "frozen"),
        (2, "finetuned"),
        (3, "frozen"),
        (3, "finetuned"),
    ]
    for n, mode, cfg in runs:
        assert cfg.copy_stages == n and cfg.freeze_stages == (n if mode == "frozen" else 0)


def test_chop_writes_table_markdown_and_plot(digits_shards, base_ckpt, tmp_path):
    urls = chop.chop(
        base_ckpt, tiny(), digits_shards["labeled"], digits_shards["test"][:1], str(tmp_path)
    )
    table = tables.read_parquet(urls["parquet"])
    assert table.num_rows == 8  # n = 0..3, both modes (n = 0 is one run, shown twice)
    assert set(table.column("mode").to_pylist()) == {"frozen", "finetuned"}
    assert read_bytes(urls["png"])[:8] == b"\x89PNG\r\n\x1a\n"
    md = read_bytes(urls["markdown"]).decode()
    assert "| 3 | conv3 |" in md
