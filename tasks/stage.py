"""One Prefect task that runs a unit of any stage, and a bounded runner of many units.

The task takes small, picklable arguments (the stage class, its config, the unit), so
it runs the same on threads, a Dask cluster or Ray: each worker process builds the
stage once (:func:`cvpipe.core.stage.cached_stage`) and reuses it, model included.
Its name, retries and timeout come from the stage's class attributes; errors a
retry cannot fix (:class:`cvpipe.core.stage.PermanentError`, a config that does not
validate) are not retried.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE
from prefect.futures import PrefectFuture, as_completed
from pydantic import BaseModel, ValidationError

from cvpipe.core.stage import PermanentError, Stage, Unit, cached_stage, run_unit
from tasks import progress as terminal
from tasks.artifacts import artifact_key

PROGRESS_EVERY_S = 3.0  # the UI's progress artifact moves at most this often


def is_permanent(exc: BaseException | None) -> bool:
    return isinstance(exc, (PermanentError, ValidationError))


def _retry_condition(task: Task, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: retry unless the failure is permanent."""
    return not is_permanent(state.data if isinstance(state.data, BaseException) else None)


def gpu_limit_name() -> str:
    """The global concurrency limit that admits GPU units on this host: ``gpu:<host>``,
    or ``CVPIPE_GPU_LIMIT`` (e.g. ``gpu:<host>:<device>`` for workers pinned to one
    device each). Prefect's tag limits are global to the server, so one ``gpu`` tag
    limit would serialize a whole cluster; a limit per host admits per host."""
    return os.environ.get("CVPIPE_GPU_LIMIT") or f"gpu:{socket.gethostname()}"


def _uses_gpu(stage_cls: type[Stage], config: BaseModel) -> bool:
    if stage_cls.resources.gpus <= 0:
        return False
    device = str(getattr(config, "device", "auto"))
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


@task(cache_policy=NONE)
def run_stage_unit(stage_cls: type[Stage], config: BaseModel, unit: Unit) -> Any:
    """Run one unit of ``stage_cls`` configured by ``config`` (skipped if committed).
    A unit that works on a GPU first takes a slot of this host's GPU limit; without
    such a limit on the server, Prefect admits it at once."""
    admit = None
    if _uses_gpu(stage_cls, config):
        from prefect.concurrency.sync import concurrency

        slots = max(1, math.ceil(stage_cls.resources.gpus))
        admit = functools.partial(concurrency, gpu_limit_name(), occupy=slots, strict=False)
    return run_unit(cached_stage(stage_cls, config), unit, admit)


def unit_task(stage_cls: type[Stage]) -> Task:
    """The generic task dressed for one stage: its name, retries and timeout.

    Task runs carry no tags, on purpose: Prefect acquires a concurrency lease for the
    tags of every tagged task run, and that stalled about one unit in twenty for ~2 s
    here (a 100-unit stage of 0.4 s units: +34% over a plain loop with the tags, see
    benchmarks/bench_orchestration.py). The stage's name is the task's name, which the
    UI filters on; GPU admission is the per-host limit taken in :func:`run_stage_unit`."""
    return run_stage_unit.with_options(
        name=stage_cls.name,
        task_run_name=f"{stage_cls.name} {{unit.name}}",
        retries=stage_cls.retries,
        retry_delay_seconds=stage_cls.retry_delay_s,
        retry_condition_fn=_retry_condition,
        timeout_seconds=stage_cls.timeout_s,
    )


class UnitsFailed(RuntimeError):
    """Units of a stage failed after their retries; ``failures`` holds (unit, error)."""

    def __init__(self, what: str, failures: list[tuple[str, BaseException]], total: int,
                 stopped: int) -> None:  # fmt: skip
        first_unit, first = failures[0]
        more = f"; {stopped} unit(s) not started" if stopped else ""
        super().__init__(
            f"{what}: {len(failures)} of {total} unit(s) failed{more}; "
            f"first: {first_unit}: {type(first).__name__}: {first}"
        )
        self.failures = failures


def progress_artifact_key(what: str, config: BaseModel) -> str:
    """``progress-<what>-<hash of the output location>``: runs into different places
    keep their own progress artifacts."""
    location = getattr(config, "out", None) or getattr(config, "root", None)
    if not isinstance(location, str):
        location = repr(config)
    return artifact_key("progress", what, location=location)


def run_units(
    stage: Stage | type[Stage],
    units: Sequence[Unit] | None = None,
    config: BaseModel | None = None,
    *,
    what: str | None = None,
    max_in_flight: int = 64,
    max_failures: int | None = None,
    describe: Callable[[Any], str] | None = None,
    progress_key: str | None = None,
) -> list[Any]:
    """Run units of a stage as task runs; results come back in unit order.

    - At most ``max_in_flight`` units are submitted at a time (``Task.map`` submits all
      at once, which strains the API past a few thousand task runs).
    - Submission stops once more than ``max_failures`` units have failed (default: 10%
      of the units, at least 1) or at the first permanent error, so a bad checkpoint
      does not burn the whole partition; the units in flight finish first.
    - A progress artifact in the UI moves at most every few seconds, and the log gets a
      line per ~5% of the units; the artifact's key is ``progress_key``, else one made
      of ``what`` and the stage's output location (its config's ``out`` or ``root``).
    - In a terminal (the ``cvpipe`` command) a bar shows units done, images/s and ETA.
    """
    if isinstance(stage, type):
        if config is None:
            raise TypeError("run_units(StageClass, ...) needs config")
        stage_cls, stage_config = stage, config
        units = list(units) if units is not None else list(stage_cls(config).units())
    else:
        stage_cls, stage_config = type(stage), stage.config
        units = list(units) if units is not None else list(stage.units())
    what = what or stage_cls.name
    describe = describe or (stage.describe if isinstance(stage, Stage) else None)
    logger = get_run_logger()
    total = len(units)
    if total == 0:
        return []
    max_failures = max(1, total // 10) if max_failures is None else max_failures
    task_ = unit_task(stage_cls)
    progress = create_progress_artifact(
        progress=0.0,
        key=progress_key or progress_artifact_key(what, stage_config),
        description=f"{what}: 0/{total} units",
    )
    log_every = max(1, total // 20)
    results: list[Any] = [None] * total
    pending: dict[PrefectFuture, int] = {}
    failures: list[tuple[str, BaseException]] = []
    done, next_unit, last_update = 0, 0, time.monotonic()

    def stop_submitting() -> bool:
        return len(failures) > max_failures or any(is_permanent(e) for _, e in failures)

    with terminal.stage_bar(what, total) as bar:
        while (next_unit < total and not stop_submitting()) or pending:
            while next_unit < total and len(pending) < max_in_flight and not stop_submitting():
                unit = units[next_unit]
                pending[task_.submit(stage_cls, stage_config, unit)] = next_unit
                next_unit += 1
            future = next(as_completed(list(pending)))
            i = pending.pop(future)
            try:
                results[i] = future.result()
            except Exception as e:  # collected; raised once the units in flight are done
                failures.append((units[i].name, e))
                logger.error("%s: unit %s failed: %s: %s", what, units[i].name,
                             type(e).__name__, e)  # fmt: skip
            done += 1
            bar.advance(results[i])
            if done % log_every == 0 or done == total:
                note = f" ({describe(results[i])})" if describe and results[i] is not None else ""
                logger.info("%s: %d/%d units done%s", what, done, total, note,
                            extra={terminal.SHOWN: True})  # fmt: skip
            now = time.monotonic()
            if now - last_update >= PROGRESS_EVERY_S or done == total:
                update_progress_artifact(
                    progress, progress=100.0 * done / total,
                    description=f"{what}: {done}/{total} units",
                )  # fmt: skip
                last_update = now
    if failures:
        raise UnitsFailed(what, failures, total, total - next_unit) from failures[0][1]
    return results
