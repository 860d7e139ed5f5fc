"""The whole DAG as one flow: every stage's outputs where the layout says, a rerun of a
finished pipeline writes no file, stages can be limited, and a stage switched off
without committed outputs is a clear error."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from cvpipe import models
from cvpipe.core import storage

SMALL = {"arch": "small_cnn", "input_size": 16, "batch_size": 32, "cpu_threads": 1,
         "augmentation": "shift", "shuffle_buffer": 200}  # fmt: skip


def _config(root: str, **over):
    from flows.pipeline_config import SMALL_DETECTOR, PipelineConfig

    raw = {
        "root": root,
        "partition": "day1",
        "data": {
            "digits": {
                "labeled_fraction": 0.1,
                "test_fraction": 0.3,
                "size": 16,
                "shard_size": 200,
                "captions": True,
            },
        },  # fmt: skip
        "teacher": {"train": {**SMALL, "epochs": 4, "lr": 0.05}},
        "infer": {"top_p": 1, "cpu_threads": 1},
        "select": {"top_k": 30},
        "student": {"train": {**SMALL, "epochs": 2}},
        "finetune": {"train": {**SMALL, "epochs": 1, "freeze_stages": 2}},
        "anchors": {"enabled": True, "groups": {"round": "0689", "straight": "147"}},
        "weak": {"enabled": True, "size": 32},
        "detect": {
            "enabled": True,
            "canvases": {"labeled": 16, "test": 8, "shard_size": 8},
            "train": {**SMALL_DETECTOR, "epochs": 1, "batch_size": 4},
        },
        "siamese": {"enabled": True, "dim": 8, "train": {**SMALL, "epochs": 1}},
        "index": {"enabled": True, "kind": "flat"},
        **over,
    }
    return PipelineConfig.model_validate(raw)


def _files(root: str) -> dict[str, float]:
    return {os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns
            for d, _, names in os.walk(root) for n in names}  # fmt: skip


@pytest.mark.slow
def test_pipeline_runs_the_dag_and_a_rerun_writes_nothing(prefect_harness, tmp_path):
    from cvpipe.label.vocab import read_vocab
    from flows.pipeline import Layout, pipeline_flow

    root = str(tmp_path / "root")
    config = _config(root)
    out = pipeline_flow(config)
    layout = Layout(config)
    for folder in ("labeled", "test", "day1"):
        assert storage.list_committed(layout.shards(folder), ".tar")
    assert storage.list_committed(storage.join(layout.infer_dir, "predictions", "day1"), ".parquet")
    assert storage.is_committed(out["selection"])
    assert storage.list_committed(storage.join(layout.pseudo_dir, "shards"), ".tar", recursive=True)
    for key in ("teacher", "student", "finetuned"):
        assert storage.is_committed(out[key]["checkpoint"]) and 0 < out[key]["top1"] <= 1
    assert out["student"]["checkpoint"].startswith(layout.student_dir)
    report = storage.read_bytes(out["report"]).decode()
    assert "| student fine-tuned on D |" in report and out["finetuned"]["checkpoint"] in report

    # Weak labels: the partition's vocabulary (synonyms merged) and its word targets.
    weak = out["weak"]
    assert weak["vocab"] == layout.vocab_url("day1") and storage.is_committed(weak["vocab"])
    assert weak["targets"] == storage.join(layout.targets_dir, "day1")
    assert len(storage.list_committed(weak["targets"], ".parquet")) == len(
        storage.list_committed(layout.shards("day1"), ".tar")
    )
    assert 0 < weak["words"] <= 32 and 0 < weak["with_target"] < weak["images"]
    words = read_vocab(weak["vocab"]).words
    assert "seven" in words and "sept" not in words  # the generator's synonyms merged

    # Anchor labels of the partition, from its features in the teacher's space.
    assert storage.is_committed(layout.anchors_url)
    assert storage.list_committed(storage.join(layout.labels_dir, "day1"), ".parquet")
    assert out["anchor_labels"]["images"] > 0 and out["anchor_labels"]["labels"] <= 2
    # The detector, its backbone from the fine-tuned student, scored on test canvases.
    det = out["detector"]
    assert det["checkpoint"].startswith(layout.detector_dir) and storage.is_committed(
        det["checkpoint"]
    )
    assert 0 <= det["map_50"] <= 1 and det["images"] == 8
    assert out["finetuned"]["checkpoint"] in json.dumps(models.load_info(det["checkpoint"]).lineage)
    # The embedding net, and the index of every image of the partition.
    assert storage.is_committed(storage.join(layout.siamese_dir, "final.pt"))
    day1_images = out["index"]["vectors"]
    assert out["index"]["parts"] == 1 and day1_images > 0 and 0 <= out["index"]["precision"] <= 1
    for text in ("mAP@.5", "precision@10", "Anchor labels", "Weak labels", layout.index_dir,
                 layout.labels_dir, weak["vocab"], weak["targets"]):  # fmt: skip
        assert text in report, text

    before = _files(root)
    again = pipeline_flow(config)
    assert _files(root) == before, "a rerun of a finished pipeline wrote files"
    assert again["finetuned"]["top1"] == out["finetuned"]["top1"]

    # A new partition, only up to its index: the teacher and the embedding net are read
    # back, and the partition is ADDED to the index (the first partition's files untouched).
    from cvpipe.index.store import read_manifest

    first = read_manifest(layout.index_dir)
    ids0 = _files(storage.join(layout.index_dir, "ids"))
    day2 = config.model_copy(update={"partition": "day2"})
    only = pipeline_flow(day2, stages=["ingest", "infer", "select", "index"])
    assert storage.list_committed(storage.join(layout.infer_dir, "predictions", "day2"), ".parquet")
    assert only["selection"] == out["selection"] and "student" not in only  # no student needed
    assert only["teacher"]["checkpoint"] == out["teacher"]["checkpoint"]  # read, not retrained
    assert only["index"]["parts"] == 2 and only["index"]["vectors"] > day1_images
    # Added, not rebuilt: the same build, part 0 and its id map as they were.
    now = read_manifest(layout.index_dir)
    assert now.build_hash == first.build_hash and now.parts[0] == first.parts[0]
    assert len(now.parts) == 2 and now.parts[1].start == first.count
    assert {
        k: v for k, v in _files(storage.join(layout.index_dir, "ids")).items() if k in ids0
    } == ids0
    before = _files(root)
    pipeline_flow(day2, stages=["ingest", "infer", "select", "index"])
    assert _files(root) == before, "a partition already in the index was added again"

    # The index needs an embedding net: with other siamese settings none is committed.
    other = day2.model_copy(update={"siamese": day2.siamese.model_copy(update={"dim": 4})})
    with pytest.raises(ValueError, match="stage 'siamese' is off"):
        pipeline_flow(other, stages=["index"])


def test_an_off_stage_without_committed_outputs_is_a_clear_error(prefect_harness, tmp_path):
    from flows.pipeline import pipeline_flow

    config = _config(str(tmp_path / "root"))
    only_data = pipeline_flow(config, stages=["ingest"])  # stops after the data
    assert "teacher" not in only_data and storage.is_committed(only_data["report"])
    with pytest.raises(ValueError, match="stage 'teacher' is off"):
        pipeline_flow(config, stages=["infer"])
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline_flow(config, stages=["teleport"])

    # Weak labels need captions: the digits without them, or own data without any.
    digits = config.data.digits.model_copy(update={"captions": False})
    bare = config.model_copy(update={"data": config.data.model_copy(update={"digits": digits})})
    with pytest.raises(ValueError, match=r"^weak: partition 'day1' has no captions [^\n]*$"):
        pipeline_flow(bare, stages=["weak"])
    # Own data: the test split's committed shards, caption-less, as the partition.
    png = os.path.join(config.root, "png")
    sources = {part: os.path.join(png, part) for part in ("labeled", "test", "unlabeled")}
    own = _config(config.root, partition="test", data=sources, anchors={})
    with pytest.raises(ValueError, match=r"^weak: partition 'test' has no captions \(no caption"):
        pipeline_flow(own, stages=["weak"])


def test_the_shipped_example_is_a_valid_config():
    from importlib.resources import files

    from flows.pipeline_config import PipelineConfig

    raw = yaml.safe_load((files("flows") / "examples" / "pipeline.yaml").read_text())
    config = PipelineConfig.model_validate(raw)
    assert config.data.digits is not None and config.teacher.enabled
    assert all(
        getattr(config, s).enabled for s in ("weak", "anchors", "detect", "siamese", "index")
    )
    assert config.data.digits.captions  # weak labels need them
