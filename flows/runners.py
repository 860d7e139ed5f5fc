"""Where a flow's task runs execute: threads on this machine, or a Dask cluster.

``threads`` (default) suits one machine. ``dask`` starts a LocalCluster of processes
(one per core); ``dask://HOST:PORT`` (or ``tcp://HOST:PORT``) uses a running scheduler.
The DaskTaskRunner costs ~0.1 s per task run, so it pays off only for units of
seconds or more (shard groups, not single small shards).
"""

from __future__ import annotations

from typing import Any


def task_runner(spec: str = "threads", workers: int | None = None) -> Any:
    from prefect.task_runners import ThreadPoolTaskRunner

    if spec == "threads":
        return ThreadPoolTaskRunner(max_workers=workers or 4)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ValueError("the dask runner needs the extra: pip install 'cvpipe[dask]'") from None
    if spec == "dask":
        kwargs: dict[str, Any] = {"processes": True, "threads_per_worker": 1}
        if workers:
            kwargs["n_workers"] = workers
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={**kwargs, "host": "127.0.0.1", "dashboard_address": None},
        )
    if spec.startswith(("dask://", "tcp://")):
        return DaskTaskRunner(address="tcp://" + spec.split("://", 1)[1])
    raise ValueError(f"unknown runner {spec!r}: use threads, dask, or dask://HOST:PORT")


def with_runner(flow: Any, spec: str, workers: int | None = None) -> Any:
    """``flow`` with its task runner swapped (the default keeps the flow's own)."""
    if spec == "threads" and workers is None:
        return flow
    return flow.with_options(task_runner=task_runner(spec, workers))
