"""What a ``cvpipe`` command prints, and the log file behind it.

- stdout: the command's result (its summary table and the paths it wrote);
- stderr: progress bars and phase headers (tasks/progress.py), cvpipe's own log lines
  (training epochs), warnings, and on failure one ``error:`` line that ends with the
  log file's path;
- the log file (``$CVPIPE_LOG_DIR``, default ``~/.cache/cvpipe/logs``): everything at
  INFO with full tracebacks: Prefect's engine, the local API server's output, cvpipe.

``--quiet`` keeps stderr to warnings and the error line; ``--verbose`` shows every log
line (Prefect's included) and prints the traceback of an error.
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from tasks import progress

LOG_DIR_ENV = "CVPIPE_LOG_DIR"
KEEP_LOGS = 200  # older log files are removed when a command starts
OWN_LOGGERS = ("cvpipe", "flows", "tasks")
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")  # get_run_logger() lines


def log_dir() -> Path:
    given = os.environ.get(LOG_DIR_ENV)
    if given:
        return Path(given)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(cache) / "cvpipe" / "logs"


def new_log_path(command: str | None) -> str:
    """A fresh log file name for ``command`` (older files beyond KEEP_LOGS removed)."""
    folder = log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    old = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime)
    for p in old[: max(0, len(old) - KEEP_LOGS + 1)]:
        p.unlink(missing_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", command or "cvpipe")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(folder / f"{name}-{stamp}-{os.getpid()}.log")


def use_cli_prefect_logging() -> None:
    """Before Prefect is imported: its loggers feed the command's handlers (the file,
    the terminal) instead of printing every engine line; cvpipe's loggers reach the
    Prefect UI too. A user's own settings win."""
    here = Path(__file__).with_name("logging.yml")
    os.environ.setdefault("PREFECT_LOGGING_SETTINGS_PATH", str(here))
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "cvpipe")


def _prefect_dir() -> str | None:
    spec = importlib.util.find_spec("prefect")
    locations = spec.submodule_search_locations if spec else None
    return os.path.join(list(locations)[0], "") if locations else None


class _FileFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        record.where = f" [{run}]" if run else ""
        return super().format(record)


class TerminalHandler(logging.Handler):
    """Log records a person at the terminal wants: cvpipe's INFO lines (training epochs,
    a flow's own notes) and warnings; not Prefect's engine lines, not errors (the
    command's one ``error:`` line says what failed; the log file has the rest)."""

    def __init__(self, console: Console, quiet: bool, verbose: bool) -> None:
        super().__init__(logging.INFO)
        self.console, self.quiet, self.verbose = console, quiet, verbose
        self.prefect_dir = _prefect_dir()

    def wanted(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        if record.levelno >= logging.ERROR or record.name == "py.warnings":
            return False
        if self.prefect_dir and record.pathname.startswith(self.prefect_dir):
            return False  # Prefect's own engine, client and server lines
        if getattr(record, progress.SHOWN, False) and progress.console() is not None:
            return False  # a bar or header shows it
        if self.quiet:
            return record.levelno >= logging.WARNING
        return record.name.split(".")[0] in OWN_LOGGERS or record.name in RUN_LOGGERS

    def emit(self, record: logging.LogRecord) -> None:
        if not self.wanted(record):
            return
        try:
            text = record.getMessage()
            if record.levelno >= logging.WARNING:
                text = f"{record.levelname.lower()}: {text}"
            style = "yellow" if record.levelno >= logging.WARNING else None
            self.console.print(text, style=style, markup=False, highlight=False)
            if self.verbose and record.exc_info:
                self.console.print("".join(traceback.format_exception(*record.exc_info)))
        except Exception:
            self.handleError(record)


@dataclass
class Session:
    """The terminal and log file of one command."""

    log_path: str
    quiet: bool
    verbose: bool
    console: Console
    handlers: list[logging.Handler] = field(default_factory=list)


_planned_log: str | None = None
_session: Session | None = None


def plan_log(command: str | None) -> str:
    """Choose the command's log file before anything writes to it (the local API server
    starts before the command line is parsed)."""
    global _planned_log
    _planned_log = new_log_path(command)
    return _planned_log


def start(command: str | None, quiet: bool = False, verbose: bool = False) -> Session:
    """Install the command's log handlers and progress display (undone by :func:`stop`)."""
    global _session, _planned_log
    stop()
    path = _planned_log or new_log_path(command)
    _planned_log = None
    s = Session(path, quiet, verbose, Console(file=sys.stderr, soft_wrap=True))
    to_file = logging.FileHandler(path, delay=True, encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(
        _FileFormatter("%(asctime)s %(levelname)-7s %(name)s%(where)s: %(message)s")
    )
    s.handlers = [to_file, TerminalHandler(s.console, quiet, verbose)]
    root = logging.getLogger()
    for h in s.handlers:
        root.addHandler(h)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    logging.captureWarnings(True)
    progress.enable(None if quiet else s.console)
    _session = s
    return s


def stop() -> None:
    global _session
    if _session is None:
        return
    root = logging.getLogger()
    for h in _session.handlers:
        root.removeHandler(h)
        h.close()
    logging.captureWarnings(False)
    progress.enable(None)
    _session = None


def session() -> Session | None:
    return _session


def one_line(text: str, limit: int = 600) -> str:
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def fail(message: str, exc: BaseException | None = None, code: int = 1) -> NoReturn:
    """Print one ``error:`` line and exit with ``code``. With ``exc``, its traceback goes
    to the log file (whose path ends the line) and, with --verbose, to the terminal."""
    line = f"error: {one_line(message)}"
    s = _session
    if exc is not None and s is not None:
        logging.getLogger("flows.cli").error("%s", message, exc_info=exc)
        line += f" (log: {s.log_path})"
        if s.verbose:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    typer.secho(line, fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


def hoist_global_flags(args: list[str]) -> list[str]:
    """``--quiet``/``-q`` and ``--verbose``/``-v`` anywhere on the line go before the
    command, where the command group reads them."""
    flags = ("--quiet", "-q", "--verbose", "-v")
    if "--" in args:
        head, tail = args[: args.index("--")], args[args.index("--") :]
    else:
        head, tail = args, []
    return [a for a in head if a in flags] + [a for a in head if a not in flags] + tail
