"""cvpipe plan: figures come from the benchmarks' JSON with the machine named; a stage
with no measurement says so; task runs per flow run are warned past 2,000."""

from __future__ import annotations

import json

from flows import plan


def _write(folder, name, payload) -> None:
    (folder / f"{name}.json").write_text(json.dumps(payload))


def test_plan_from_measured_rates(tmp_path):
    _write(tmp_path, "bench_teacher", {"benchmark": "bench_teacher", "device": "cuda",
                                       "machine": {"gpu": "H100"},
                                       "stage": {"images_per_s": 10_000}})  # fmt: skip
    _write(tmp_path, "bench_shards", {"benchmark": "bench_shards", "machine": {"cpus": 2},
                                      "results": [{"dataset": "photos-256px-jpeg",
                                                   "ingest_images_per_s": 2_000}]})  # fmt: skip
    _write(tmp_path, "not_a_bench", {"hello": "world"})
    p = plan.plan(1_000_000_000, shard_size=10_000, gpus=8, cpus=100,
                  partition_images=10_000_000, folders=[str(tmp_path)])  # fmt: skip
    assert (p["shards"], p["partitions"], p["shards_per_partition"]) == (100_000, 100, 1_000)
    rows = {r["stage"]: r for r in p["rows"]}
    infer = rows["infer"]
    assert infer["rate (img/s per worker)"] == 10_000 and "H100" in infer["measured on"]
    assert infer["worker-hours"] == "27.8 GPU-h" and infer["wall (h)"] == round(
        1e9 / 1e4 / 3600 / 8, 2
    )
    assert rows["ingest"]["wall (h)"] == round(1e9 / 2_000 / 3600 / 100, 2)
    assert rows["select"]["rate (img/s per worker)"] == "not measured"
    assert infer["task runs per flow run"] == 250 and p["warnings"] == []
    big = plan.plan(1_000_000_000, partition_images=100_000_000, folders=[str(tmp_path)])
    assert any(w.startswith("ingest: 10,000 task runs") for w in big["warnings"])
    assert "| infer | 250 | 10000 |" in plan.markdown(p)
