"""The detection commands: flags generated from their configs (exact names of the
issue), the example configs accepted as they are, and errors that name the flag."""

from __future__ import annotations

from importlib.resources import files

import typer
import yaml
from typer.testing import CliRunner

from cvpipe.experiments.config import DetectionStudyConfig
from cvpipe.learn.detect import DetectTrainConfig
from flows import cli

runner = CliRunner()


def _options(*path: str) -> set[str]:
    cmd = typer.main.get_command(cli.app)
    for name in path:
        cmd = cmd.commands[name]
    return {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}


def test_detect_commands_and_their_flags():
    train = _options("detect", "train")
    assert {"--out", "--config", "--test", "--init", "--trainable-backbone-stages"} <= train
    assert {"--returned-layers", "--anchor-sizes", "--box-head-dim", "--min-size"} <= train
    assert "--augmentation" not in train and "--shift-px" not in train  # not a detector's
    assert {"--shards", "--out", "--split"} <= _options("detect", "eval")
    assert {"--shards", "--out", "--threshold", "--class-thresholds", "--nms-iou"} <= _options(
        "detect", "label"
    )
    assert {"--labeled", "--unlabeled", "--test", "--max-objects", "--seed"} <= _options(
        "datasets", "canvases"
    )
    assert {"--out", "--box-weight", "--test"} <= _options("localize", "train")
    assert {"--shards", "--out"} <= _options("localize", "eval")
    assert {"--coco", "--out", "--box-labels"} <= _options("ingest")  # ingest --coco ANN IMAGES


def test_example_configs_validate_as_they_are():
    examples = files("flows") / "examples"
    raw = yaml.safe_load((examples / "detect.yaml").read_text())
    cfg = DetectTrainConfig(shards="s", out="o", **raw)
    assert cfg.task().returned_layers == [2, 3, 4, 5] and cfg.train_config().freeze_stages == 0
    study = DetectionStudyConfig(**yaml.safe_load((examples / "detect_study.yaml").read_text()))
    assert study.seeds == [0, 1, 2]
    DetectTrainConfig.model_validate({**study.detector, "shards": "s", "out": "o"})


def test_bad_values_name_their_flag(tmp_path):
    r = runner.invoke(cli.app, ["detect", "train", str(tmp_path), "--out", "o", "--arch",
                                "resnet18"])  # fmt: skip
    assert r.exit_code == 2 and "not a detector" in r.output
    r = runner.invoke(cli.app, ["detect", "label", "ck.pt", "--shards", "s", "--out", "o",
                                "--threshold", "1.5"])  # fmt: skip
    assert r.exit_code == 2 and "--threshold" in r.output
    r = runner.invoke(cli.app, ["detect", "train", str(tmp_path), "--out", "o",
                                "--trainable-backbone-stages", "40"])  # fmt: skip
    assert r.exit_code == 2 and "trainable_backbone_stages" in r.output
