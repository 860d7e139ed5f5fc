"""The whole DAG as one flow: every stage's outputs where the layout says, a rerun of a
finished pipeline writes no file, stages can be limited, and a stage switched off
without committed outputs is a clear error."""

from __future__ import annotations

import os

import pytest
import yaml

from cvpipe.core import storage

SMALL = {"arch": "small_cnn", "input_size": 16, "batch_size": 32, "cpu_threads": 1,
         "augmentation": "shift", "shuffle_buffer": 200}  # fmt: skip


def _config(root: str, **over):
    from flows.pipeline_config import PipelineConfig

    raw = {
        "root": root,
        "partition": "day1",
        "data": {
            "digits": {"labeled_fraction": 0.1, "test_fraction": 0.3, "size": 16, "shard_size": 200}
        },  # fmt: skip
        "teacher": {"train": {**SMALL, "epochs": 4, "lr": 0.05}},
        "infer": {"top_p": 1, "cpu_threads": 1},
        "select": {"top_k": 30},
        "student": {"train": {**SMALL, "epochs": 2}},
        "finetune": {"train": {**SMALL, "epochs": 1, "freeze_stages": 2}},
        **over,
    }
    return PipelineConfig.model_validate(raw)


def _files(root: str) -> dict[str, float]:
    return {os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns
            for d, _, names in os.walk(root) for n in names}  # fmt: skip


@pytest.mark.slow
def test_pipeline_runs_the_dag_and_a_rerun_writes_nothing(prefect_harness, tmp_path):
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

    before = _files(root)
    again = pipeline_flow(config)
    assert _files(root) == before, "a rerun of a finished pipeline wrote files"
    assert again["finetuned"]["top1"] == out["finetuned"]["top1"]

    # Only ingest, inference and selection of a new partition: the teacher is read back.
    day2 = config.model_copy(update={"partition": "day2"})
    only = pipeline_flow(day2, stages=["ingest", "infer", "select"])
    assert storage.list_committed(storage.join(layout.infer_dir, "predictions", "day2"), ".parquet")
    assert only["selection"] == out["selection"] and "student" not in only  # stops at select
    assert only["teacher"]["checkpoint"] == out["teacher"]["checkpoint"]  # read, not retrained


def test_an_off_stage_without_committed_outputs_is_a_clear_error(prefect_harness, tmp_path):
    from flows.pipeline import pipeline_flow

    config = _config(str(tmp_path / "root"))
    only_data = pipeline_flow(config, stages=["ingest"])  # stops after the data
    assert "teacher" not in only_data and storage.is_committed(only_data["report"])
    with pytest.raises(ValueError, match="stage 'teacher' is off"):
        pipeline_flow(config, stages=["infer"])
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline_flow(config, stages=["teleport"])


def test_the_shipped_example_is_a_valid_config():
    from importlib.resources import files

    from flows.pipeline_config import PipelineConfig

    raw = yaml.safe_load((files("flows") / "examples" / "pipeline.yaml").read_text())
    config = PipelineConfig.model_validate(raw)
    assert config.data.digits is not None and config.teacher.enabled
