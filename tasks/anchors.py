"""The anchor relabeling task, kept until materialize's relabel becomes a stage.

The anchor stages themselves (partial sums, merge, Uniform's counts and rule, labels)
run through the generic task of tasks/stage.py; see flows/anchors.py.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from cvpipe.label import materialize


@task(
    name="relabel-shard",
    task_run_name="relabel {shard_url}",
    tags=["io"],
    cache_policy=NONE,
    retries=2,
    retry_delay_seconds=5,
)
def relabel_shard(labels_url: str, shard_url: str, out: str) -> materialize.MaterializeStats:
    return materialize.relabel_shard(labels_url, shard_url, out)
