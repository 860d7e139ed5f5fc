"""Prefect tasks of the transfer study that are not stages: a model's cost probe."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from cvpipe.models import costs


@task(name="model-costs", task_run_name="costs of {name}", cache_policy=NONE, retries=1)
def measure_costs(
    checkpoint: str, name: str, batch: int, device: str = "cpu", threads: int = 1
) -> dict[str, Any]:
    """Parameters, checkpoint bytes, peak memory and latency of one checkpoint."""
    return costs.measure(checkpoint, name, batch=batch, device=device, threads=threads).row()
