"""Identity survives upgrades: lineage and skip decisions hash only the fields that
change an output. Runtime fields (threads, workers, devices, retention) and fields left
at their default are not part of it, so adding a defaulted field to a config keeps
every committed partition, plan and trained run valid."""

from __future__ import annotations

import os

import pytest
from pydantic import Field

from cvpipe.core import tables
from cvpipe.core.config import identity, identity_hash, runtime
from cvpipe.data import ingest
from cvpipe.data.config import IngestConfig
from cvpipe.infer.config import InferConfig
from cvpipe.learn.config import TrainConfig


class IngestConfigNext(IngestConfig):
    """IngestConfig as a later release might ship it: one new field, defaulted."""

    dedup_threshold: float = Field(0.0, description="a knob added after the data was made")


class TrainConfigNext(TrainConfig):
    warmup_style: str = "linear"
    prefetch: int = runtime(4, description="a new runtime knob")


def test_identity_leaves_out_runtime_fields_and_defaults() -> None:
    base = InferConfig(shards="s", checkpoint="c.pt", out="o")
    faster = base.model_copy(update={"num_workers": 8, "batch_size": 1024, "cpu_threads": 1,
                                     "device": "cuda", "parallel_units": 4})  # fmt: skip
    assert identity_hash(faster) == identity_hash(base)
    assert identity(base) == {"shards": "s", "checkpoint": "c.pt", "out": "o"}
    assert identity_hash(base.model_copy(update={"top_p": 3})) != identity_hash(base)
    # A field set explicitly to its default is the default.
    assert identity_hash(InferConfig(shards="s", checkpoint="c.pt", out="o", top_p=5)) == (
        identity_hash(base)
    )


def test_nested_models_and_lists_are_walked() -> None:
    a = {"runs": [TrainConfig(epochs=3), TrainConfig(epochs=3, num_workers=4)]}
    assert identity(a) == {"runs": [{"epochs": 3}, {"epochs": 3}]}


def test_a_new_defaulted_field_keeps_a_committed_plan_and_its_shards(digits_dir, tmp_path):
    root = str(tmp_path / "root")
    old = IngestConfig(source=str(digits_dir / "labeled"), root=root, partition="d",
                       name="x", shard_size=100)  # fmt: skip
    first = ingest.ingest_partition(old)
    new = IngestConfigNext(**old.model_dump())
    assert tables.config_hash(new) == tables.config_hash(old)
    again = ingest.ingest_partition(new)  # the frozen-plan check passes, nothing is redone
    assert [s.skipped for s in again] == [True] * len(first)
    changed = IngestConfigNext(**{**old.model_dump(), "dedup_threshold": 0.5})
    with pytest.raises(ValueError, match="another config"):
        ingest.ingest_partition(changed)


@pytest.mark.slow
def test_a_new_field_or_runtime_change_keeps_a_trained_run(digits_shards, tmp_path):
    from cvpipe.learn import training

    out = str(tmp_path / "run")
    cfg = TrainConfig(epochs=1, batch_size=32, input_size=16, cpu_threads=1)
    final = training.train(cfg, digits_shards["labeled"], out)
    mtime = os.stat(final).st_mtime_ns
    upgraded = TrainConfigNext(**cfg.model_dump(), prefetch=2)
    upgraded = upgraded.model_copy(update={"num_workers": 1, "keep_checkpoints": 1})
    assert training.train(upgraded, digits_shards["labeled"], out) == final
    assert os.stat(final).st_mtime_ns == mtime
    with pytest.raises(training.TrainingError, match="another run"):
        training.train(cfg.model_copy(update={"epochs": 2}), digits_shards["labeled"], out)
