"""GPU admission is per host: a unit that works on a GPU takes a slot of the global
concurrency limit named after its host (``gpu:<host>``, or CVPIPE_GPU_LIMIT), so a
host's GPUs are never oversubscribed while other hosts run freely. Units that are
already committed are read back without a slot.

No GPU here: the stage declares gpus=1 and the check for a CUDA device is replaced by
True; the slots, the limit and the waiting are Prefect's real ones."""

from __future__ import annotations

import threading
import time

import pytest

from cvpipe.core.config import Strict
from cvpipe.core.stage import Resources, Stage, Unit

_lock = threading.Lock()
_now = {"running": 0, "peak": 0}


class SleepConfig(Strict):
    out: str
    device: str = "auto"


class GpuSleepStage(Stage[SleepConfig, str]):
    name = "gpu-sleep"
    resources = Resources(cpus=1, gpus=1)
    retries = 0

    def units(self) -> list[Unit]:
        return [Unit(f"u{i}", index=i) for i in range(6)]

    def outputs(self, unit: Unit) -> list[str]:
        return [f"{self.config.out}/{unit.name}.done"]

    def process(self, unit: Unit) -> str:
        with _lock:
            _now["running"] += 1
            _now["peak"] = max(_now["peak"], _now["running"])
        time.sleep(0.4)
        with _lock:
            _now["running"] -= 1
        with open(self.outputs(unit)[0], "w") as f:
            f.write("ok")
        return "processed"

    def read_back(self, unit: Unit) -> str:
        return "read back"


@pytest.mark.parametrize("limit", [1, 2])
def test_gpu_units_wait_for_their_hosts_slots(prefect_harness, tmp_path, monkeypatch, limit):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.task_runners import ThreadPoolTaskRunner

    import tasks.stage as ts

    name = f"gpu:test-host-{limit}"
    monkeypatch.setenv("CVPIPE_GPU_LIMIT", name)
    monkeypatch.setattr(ts, "_uses_gpu", lambda cls, cfg: True)  # no GPU on this machine
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=limit, slot_decay_per_second=0)
        )
    _now.update(running=0, peak=0)
    stage = GpuSleepStage(SleepConfig(out=str(tmp_path)))

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=6))
    def run() -> list[str]:
        return ts.run_units(stage)

    assert run() == ["processed"] * 6
    assert _now["peak"] == limit  # never more than the host's slots, and they were used
    assert run() == ["read back"] * 6  # committed: no slot needed


def test_gpu_limit_name_is_per_host(monkeypatch):
    import socket

    from tasks.stage import gpu_limit_name

    monkeypatch.delenv("CVPIPE_GPU_LIMIT", raising=False)
    assert gpu_limit_name() == f"gpu:{socket.gethostname()}"
    monkeypatch.setenv("CVPIPE_GPU_LIMIT", "gpu:h1:0")
    assert gpu_limit_name() == "gpu:h1:0"
