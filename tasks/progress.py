"""Progress a person at a terminal sees: a bar per stage and headers between phases.

The ``cvpipe`` command turns it on (:func:`enable`) with the console it prints to; with
no console (a flow served by a Prefect worker, a notebook, a test) every call here is a
no-op but the log line of :func:`header`, so flows call these unconditionally.

A bar shows the units done out of the total, images per second when the units' stats
carry image counts (units read back from an earlier run count as done, not as images),
the elapsed time and an estimate of the time left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

log = logging.getLogger(__name__)

# Records a bar or header already shows carry this attribute; the terminal's log
# handler drops them while a console is on (the Prefect UI still gets them).
SHOWN = "cvpipe_shown"

_console: Console | None = None


def enable(console: Console | None) -> None:
    """Show bars and headers on ``console`` (None: show nothing)."""
    global _console
    _console = console


def console() -> Console | None:
    return _console


def images_of(stats: Any) -> int | None:
    """Images a unit's stats say it processed: ``images``, else ``samples`` (a list of
    stats: their sum); 0 for a unit read back from an earlier run; None if unknown."""
    if isinstance(stats, (list, tuple)):
        counts = [images_of(s) for s in stats]
        known = [c for c in counts if c is not None]
        return sum(known) if known else None
    get = stats.get if isinstance(stats, Mapping) else lambda k: getattr(stats, k, None)
    if get("skipped") is True:
        return 0
    for name in ("images", "samples"):
        value = get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class _Rate(ProgressColumn):
    """Images per second over the bar's life, when the units report images."""

    def render(self, task: Task) -> Text:
        images = task.fields.get("images")
        if images is None or not task.elapsed:
            return Text("")
        return Text(f"{images / task.elapsed:,.0f} img/s", style="cyan")


@dataclasses.dataclass
class Bar:
    """One stage's bar; :meth:`advance` after each finished unit."""

    progress: Progress | None
    task_id: int | None = None
    images: int | None = None

    def advance(self, stats: Any = None) -> None:
        if self.progress is None or self.task_id is None:
            return
        n = images_of(stats)
        if n is not None:
            self.images = (self.images or 0) + n
        self.progress.update(self.task_id, advance=1, images=self.images)


@contextlib.contextmanager
def stage_bar(what: str, total: int) -> Iterator[Bar]:
    """A bar for ``total`` units of ``what``, shown while the block runs."""
    if _console is None or total == 0:
        yield Bar(None)
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn("units"),
        _Rate(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=_console,
        transient=False,
    )
    with progress:
        bar = Bar(progress, progress.add_task(what, total=total, images=None))
        yield bar


def header(text: str) -> None:
    """A phase of a longer run ("seed 2/3: teacher"): a rule in the terminal, a line in
    the flow run's log."""
    if _console is not None:
        _console.rule(f"[bold]{text}", align="left")
    _run_logger().info(text, extra={SHOWN: True})


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run
        return log
