"""The stage protocol: every stage's work units go through one skeleton.

A stage (in the spirit of NeMo Curator's ProcessingStage) declares:

- ``name`` and ``resources`` (cpus, gpus): what an orchestrator needs to place a unit;
- ``retries``, ``retry_delay_s`` and ``timeout_s`` of one unit;
- an identity: the config fields that change its output, and only those
  (:func:`cvpipe.core.config.identity`), plus a ``version`` bumped when the code's
  output changes for the same config;
- ``units()``: its work units (shards or groups of shards, never single images);
- ``outputs(unit)``: the URLs a committed unit has, the commit last;
- ``setup()`` once per worker process (load the model once), ``process(unit)`` to do
  and publish the work, ``read_back(unit)`` to get the stats of a committed unit
  without redoing it, and ``teardown()``.

:func:`run_unit` is the skeleton "committed? read back : process" and exists only
here. Units hand each other URLs, never in-memory data, so a unit can run in any
process: :func:`cached_stage` keeps one set-up stage per process and class.

Multi-phase work (a merge tree, a counting pass before labeling) is a flow that
composes stages; this module knows nothing of Prefect.
"""

from __future__ import annotations

import abc
import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel

from cvpipe.core.config import identity, identity_hash
from cvpipe.core.storage import is_committed

C = TypeVar("C", bound=BaseModel)
S = TypeVar("S")


class PermanentError(Exception):
    """An error a retry cannot fix: a missing or corrupt checkpoint, a bad config, no CUDA
    device. Orchestrators do not retry it and stop submitting more units of the stage."""


@dataclass(frozen=True)
class Resources:
    """What one unit of a stage occupies while it runs."""

    cpus: float = 1.0
    gpus: float = 0.0


@dataclass(frozen=True)
class Unit:
    """One work unit: small and hashable (URLs and an index), never data.

    ``name`` is what a person sees in logs and the UI (e.g. ``2026-11-25/img-000003``);
    ``inputs`` are the URLs the unit reads; ``index`` numbers units of one stage where
    the inputs alone do not (ingest's plan row groups)."""

    name: str
    inputs: tuple[str, ...] = ()
    index: int | None = None
    extra: tuple[tuple[str, Any], ...] = field(default=())

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.extra).get(key, default)


class Stage(abc.ABC, Generic[C, S]):
    """Base class of every stage. Subclasses set the class attributes and implement
    :meth:`units`, :meth:`outputs`, :meth:`process` and :meth:`read_back`."""

    name: ClassVar[str]
    resources: ClassVar[Resources] = Resources()
    retries: ClassVar[int] = 2
    retry_delay_s: ClassVar[float] = 5.0
    timeout_s: ClassVar[float | None] = None
    # Bump when the stage's output changes for the same config (e.g. a changed default):
    # part of the identity, so committed units of the old code are not taken as current.
    version: ClassVar[int] = 1

    def __init__(self, config: C) -> None:
        self.config = config
        self._ready = False
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- identity

    def identity(self) -> dict[str, Any]:
        """What changes this stage's output: the config's identity fields, and the
        stage's name and version."""
        return {"stage": self.name, "version": self.version, **identity(self.config)}

    def identity_hash(self) -> str:
        return identity_hash(self.identity())

    # ---------------------------------------------------------------- work

    @abc.abstractmethod
    def units(self) -> Sequence[Unit]:
        """The stage's work units, in a deterministic order."""

    @abc.abstractmethod
    def outputs(self, unit: Unit) -> list[str]:
        """The URLs a committed ``unit`` has written; the last is its commit."""

    def setup(self) -> None:
        """Once per worker process, before the first :meth:`process` (load models here)."""

    @abc.abstractmethod
    def process(self, unit: Unit) -> S:
        """Do the unit's work and publish its outputs atomically, the commit last."""

    @abc.abstractmethod
    def read_back(self, unit: Unit) -> S:
        """The stats of a committed unit, read from its outputs (no work redone)."""

    def teardown(self) -> None:
        """Release what :meth:`setup` took (GPU memory, open files)."""

    # ---------------------------------------------------------------- reporting

    def describe(self, stats: S) -> str:
        """One line about a finished unit, for logs."""
        return str(stats)

    def summarize(self, stats: Sequence[S]) -> dict[str, Any]:
        """The stage's summary over its units (a flat dict, for tables)."""
        return {"units": len(stats)}

    # ---------------------------------------------------------------- skeleton

    def ensure_setup(self) -> None:
        with self._lock:
            if not self._ready:
                self.setup()
                self._ready = True

    def close(self) -> None:
        with self._lock:
            if self._ready:
                self.teardown()
                self._ready = False

    def committed(self, unit: Unit) -> bool:
        return all(is_committed(u) for u in self.outputs(unit))


def run_unit(
    stage: Stage[Any, S],
    unit: Unit,
    admit: Callable[[], AbstractContextManager[Any]] | None = None,
) -> S:
    """The one skeleton: a committed unit is read back, any other is processed (after
    the stage's once-per-process setup) and published. ``admit`` guards the work of an
    uncommitted unit (an orchestrator's GPU slot, say); reading back needs no slot."""
    if stage.committed(unit):
        return stage.read_back(unit)
    with admit() if admit is not None else contextlib.nullcontext():
        stage.ensure_setup()
        return stage.process(unit)


def run_stage(stage: Stage[Any, S], units: Iterable[Unit] | None = None) -> list[S]:
    """Every unit of ``stage`` in this process, in order: the plain-Python runner for
    notebooks, tests and benchmarks (flows use tasks.stage.run_units)."""
    try:
        return [run_unit(stage, u) for u in (stage.units() if units is None else units)]
    finally:
        stage.close()


_CACHE: dict[type, Stage[Any, Any]] = {}
_CACHE_LOCK = threading.Lock()


def cached_stage(cls: type[Stage[C, S]], config: C) -> Stage[C, S]:
    """The process's stage of ``cls`` for ``config``, set up at most once.

    A long-lived worker (a Prefect thread, a Dask or Ray process) builds a stage once
    and reuses it for every unit it is given. One stage per class is kept: a stage
    with another config replaces it (GPU memory is not for hoarding)."""
    with _CACHE_LOCK:
        stage = _CACHE.get(cls)
        if stage is None or stage.config != config:
            if stage is not None:
                stage.close()
            stage = _CACHE[cls] = cls(config)
        return stage
