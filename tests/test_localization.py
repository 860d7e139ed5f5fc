"""Object localization: a classifier with a box head, trained through the shared loop
on single-object canvases; loss down, metrics in range, evaluation table written."""

from __future__ import annotations

import pytest
import torch
from conftest import ingest_folder

from cvpipe import models
from cvpipe.core import tables
from cvpipe.data import canvases
from cvpipe.models.localization import Localizer

DIGITS = [str(i) for i in range(10)]


def test_localizer_keeps_a_classifiers_keys_and_orders_corners():
    torch.manual_seed(0)
    loc = Localizer("small_cnn", 10)
    clf = models.build("small_cnn", 10)
    own = set(loc.state_dict())
    assert set(clf.state_dict()) <= own  # any classifier checkpoint seeds it
    logits, boxes = loc(torch.rand(3, 3, 32, 32))
    assert logits.shape == (3, 10) and boxes.shape == (3, 4)
    assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
    assert ((boxes >= 0) & (boxes <= 1)).all()


@pytest.fixture(scope="module")
def single_object_shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("loc"))
    canvases.export_canvases(root, {"labeled": 128, "test": 16}, size=64, objects=(1, 1),
                             digit_px=(24, 40))  # fmt: skip
    return {s: ingest_folder(canvases.manifest_path(root, s), root, s, "canvases", 32)
            for s in ("labeled", "test")}  # fmt: skip


def test_localization_trains_and_evaluates(tmp_path, single_object_shards):
    from cvpipe.learn import loop
    from cvpipe.learn.localize import LocalizeTrainConfig, evaluate_localizer

    cfg = LocalizeTrainConfig(shards=single_object_shards["labeled"], out=str(tmp_path / "run"),
                              arch="small_cnn", input_size=48, epochs=6, batch_size=16,
                              optimizer="adamw", lr=0.003, classes=DIGITS,
                              cpu_threads=1)  # fmt: skip
    job = cfg.job()
    with models.cpu_threads(1):
        ckpt = loop.train(job.task, job.config, job.shards, job.out)
    rows = tables.read_parquet(str(tmp_path / "run" / "metrics.parquet")).to_pylist()
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < losses[0] * 0.85, losses
    assert all(0 <= r["mean_iou"] <= 1 and 0 <= r["iou_50"] <= 1 for r in rows)
    assert rows[-1]["mean_iou"] > rows[0]["mean_iou"]  # the box head learns

    res = evaluate_localizer(ckpt, single_object_shards["test"], str(tmp_path / "eval"))
    assert res["images"] == 16
    assert 0.0 <= res["correct_50"] <= min(res["top1"], res["iou_50"]) <= 1.0
    table = tables.read_parquet(str(tmp_path / "eval" / "test_localize.parquet"))
    assert table.schema.equals(tables.LOCALIZE_METRICS)
