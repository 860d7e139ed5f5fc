"""Curricula: each step starts from the previous step's weights (compared tensor by
tensor), steps skip when committed, and the chain refuses to be empty."""

from __future__ import annotations

import pytest
import torch

from cvpipe import models
from cvpipe.learn import curriculum
from cvpipe.learn.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cfg(**kw) -> TrainConfig:
    base = dict(
        arch="small_cnn",
        input_size=16,
        epochs=1,
        batch_size=32,
        lr=0.05,
        shuffle_buffer=64,
        device="cpu",
        seed=1,
    )
    return TrainConfig(**{**base, **kw})


def state(url: str) -> dict[str, torch.Tensor]:
    return models.load_checkpoint(url)[0].state_dict()


def test_a_step_loads_the_previous_steps_weights(digits_shards, tmp_path):
    labeled, test = tuple(digits_shards["labeled"]), tuple(digits_shards["test"][:2])
    steps = [
        curriculum.Step("source", cfg(), labeled),
        # All three backbone stages frozen (weights and BN statistics): what the step
        # starts from is exactly what it ends with.
        curriculum.Step("pairs", cfg(freeze_stages=3, new_head=True, classes=["0", "1"]), test),
        curriculum.Step("target", cfg(new_head=True, seed=2), labeled),
    ]
    out = str(tmp_path / "chain")
    first, second, third = curriculum.run_curriculum(steps, out)
    a, b, c = state(first), state(second), state(third)
    backbone = [k for k in a if k.startswith("backbone.")]
    assert backbone and all(torch.equal(a[k], b[k]) for k in backbone)
    assert b["head.weight"].shape == (2, 48) and a["head.weight"].shape == (10, 48)
    # The third step trains everything, from the second step's weights.
    assert not all(torch.equal(b[k], c[k]) for k in backbone)
    for prev, url in ((first, second), (second, third)):
        assert models.load_info(url).lineage["init_model_id"] == models.model_id(prev)
        assert models.load_info(url).lineage["init_checkpoint"] == prev
    # A model trained from scratch with the same step config is another model.
    fresh = curriculum.run_curriculum(steps[1:2], str(tmp_path / "fresh"))[0]
    assert not torch.equal(state(fresh)["backbone.conv1.0.weight"], a["backbone.conv1.0.weight"])
    # Rerun: every step is committed, nothing is retrained.
    mtimes = [models.model_id(u) for u in (first, second, third)]
    again = curriculum.run_curriculum(steps, out)
    assert again == [first, second, third]
    assert [models.model_id(u) for u in again] == mtimes
    assert second.startswith(curriculum.step_dir(out, 1, "pairs"))


def test_an_empty_curriculum_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="at least one step"):
        curriculum.run_curriculum([], str(tmp_path))
