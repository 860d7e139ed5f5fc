"""Run many work units as Prefect task runs, with bounded submission and UI progress.

``Task.map`` submits every unit at once, which strains the API past a few thousand task
runs; here at most ``max_in_flight`` units are submitted at a time, results come back in
unit order, and a progress artifact in the Prefect UI moves as units finish.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prefect import Task, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed


def run_units(
    task: Task,
    units: Sequence[dict[str, Any]],
    *,
    what: str,
    max_in_flight: int = 64,
    describe: Callable[[Any], str] | None = None,
    log_every: int | None = None,
) -> list[Any]:
    """Submit ``task(**unit)`` for every unit; return the results in unit order.

    A unit that fails after its retries raises here, after the units in flight finish,
    so one bad unit does not strand the others half-written.
    """
    logger = get_run_logger()
    total = len(units)
    if total == 0:
        return []
    progress = create_progress_artifact(progress=0.0, description=f"{what}: 0/{total} units")
    log_every = log_every or max(1, total // 20)
    results: list[Any] = [None] * total
    pending: dict[PrefectFuture, int] = {}
    done = 0
    failures: list[BaseException] = []
    next_unit = 0
    while next_unit < total or pending:
        while next_unit < total and len(pending) < max_in_flight:
            pending[task.submit(**units[next_unit])] = next_unit
            next_unit += 1
        future = next(as_completed(list(pending)))
        i = pending.pop(future)
        try:
            results[i] = future.result()
        except Exception as e:  # collect; raise once the units in flight are done
            failures.append(e)
        done += 1
        if done % log_every == 0 or done == total:
            note = f" ({describe(results[i])})" if describe and results[i] is not None else ""
            logger.info("%s: %d/%d units done%s", what, done, total, note)
        update_progress_artifact(
            progress, progress=100.0 * done / total, description=f"{what}: {done}/{total} units"
        )
    if failures:
        raise RuntimeError(f"{what}: {len(failures)} of {total} units failed") from failures[0]
    return results
