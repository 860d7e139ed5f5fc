"""Where a flow's task runs execute: threads on this machine, a Dask cluster or Ray.

- ``threads`` (default) suits one machine.
- ``dask`` starts a LocalCluster of processes (one per core); ``dask://HOST:PORT`` (or
  ``tcp://HOST:PORT``) uses a running scheduler. Needs ``pip install 'cvpipe[dask]'``.
- ``ray`` starts a local Ray instance; ``ray://HOST:PORT`` (or ``auto``) joins a running
  cluster. Needs ``pip install 'cvpipe[ray]'``.

Every task takes small, picklable arguments (a stage class, its config, a unit of
URLs), so the same flow gives the same bytes on every runner. The DaskTaskRunner costs
~0.1 s per task run and Ray a little more: use them for units of seconds or more
(shard groups, not single small shards).
"""

from __future__ import annotations

from typing import Any

RUNNERS = "threads | dask | dask://HOST:PORT | ray | ray://HOST:PORT"


def task_runner(spec: str = "threads", workers: int | None = None) -> Any:
    from prefect.task_runners import ThreadPoolTaskRunner

    if spec == "threads":
        return ThreadPoolTaskRunner(max_workers=workers or 4)
    if spec == "dask" or spec.startswith(("dask://", "tcp://")):
        return _dask(spec, workers)
    if spec == "ray" or spec.startswith("ray://") or spec == "auto":
        return _ray(spec, workers)
    raise ValueError(f"unknown runner {spec!r}: use {RUNNERS}")


def _dask(spec: str, workers: int | None) -> Any:
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
    return DaskTaskRunner(address="tcp://" + spec.split("://", 1)[1])


def _ray(spec: str, workers: int | None) -> Any:
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise ValueError("the ray runner needs the extra: pip install 'cvpipe[ray]'") from None
    if spec == "ray":  # a local instance, owned by the flow run
        init = {"include_dashboard": False, "num_cpus": workers} if workers else {
            "include_dashboard": False}  # fmt: skip
        return RayTaskRunner(init_kwargs=init)
    return RayTaskRunner(address=spec)


def with_runner(flow: Any, spec: str, workers: int | None = None) -> Any:
    """``flow`` with its task runner swapped (the default keeps the flow's own)."""
    if spec == "threads" and workers is None:
        return flow
    return flow.with_options(task_runner=task_runner(spec, workers))
