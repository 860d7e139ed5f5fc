"""Planning memory and speed: the streamed plan vs holding the partition in one process.

The baseline is what the planner did before it streamed: read every manifest row into a
list of dicts, then build one Arrow table (~0.85 GB per million rows). Both run in a
fresh process each, on the same CSV manifest; the peak memory is the process's own
(VmHWM). Target: the streamed planner's peak does not grow with the partition (the
growth from N/5 to N rows under 40 MB) at >= 0.5x the baseline's rows/s.

    python benchmarks/bench_plan.py [--quick] [--out benchmarks/results/bench_plan.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

STREAMED = """
import sys, time
from cvpipe.data.plan import plan_rows, write_plan
src, out = sys.argv[1], sys.argv[2]
t = time.perf_counter()
n = write_plan(plan_rows(src, "bench"), out, 10_000, None)
dt = time.perf_counter() - t
"""

BASELINE = """
import sys, time, csv
import pyarrow as pa
import pyarrow.parquet as pq
from cvpipe.data.plan import PLAN, make_key
src, out = sys.argv[1], sys.argv[2]
t = time.perf_counter()
rows, seen = [], set()
with open(src, newline="") as f:
    for r in csv.DictReader(f):
        key = make_key("bench", r["image"])
        rows.append({"key": key, "image": r["image"], "source": r["image"],
                     "label": r["label"], "caption": r["caption"], "hashtags": None,
                     "boxes": None, "duplicate": key in seen})
        seen.add(key)
pq.write_table(pa.Table.from_pylist(rows, schema=PLAN), out, row_group_size=10_000)
n = len(rows)
dt = time.perf_counter() - t
"""

REPORT = """
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(n, dt, int(peak) / 1024)
"""


def manifest(path: str, rows: int) -> None:
    with open(path, "w") as f:
        f.write("image,label,caption\n")
        for i in range(rows):
            f.write(f"images/{i // 1000:05d}/photo_{i:09d}.jpg,{i % 1000},a caption of {i}\n")


def run(code: str, src: str, out: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    script = textwrap.dedent(code) + textwrap.dedent(REPORT)
    res = subprocess.run([sys.executable, "-c", script, src, out], env=env, check=True,
                         capture_output=True, text=True)  # fmt: skip
    n, dt, peak = res.stdout.split()
    return {"rows": int(n), "seconds": float(dt), "rows_per_s": int(n) / float(dt),
            "peak_mib": float(peak)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200k rows instead of 1M")
    p.add_argument("--out", default="benchmarks/results/bench_plan.json")
    args = p.parse_args(argv)
    big = 200_000 if args.quick else 1_000_000
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for rows in (big // 5, big):
            src = os.path.join(work, f"m{rows}.csv")
            manifest(src, rows)
            results[rows] = {
                "streamed": run(STREAMED, src, os.path.join(work, f"s{rows}.parquet")),
                "baseline": run(BASELINE, src, os.path.join(work, f"b{rows}.parquet")),
            }
    small, large = results[big // 5], results[big]
    growth = large["streamed"]["peak_mib"] - small["streamed"]["peak_mib"]
    base_growth = large["baseline"]["peak_mib"] - small["baseline"]["peak_mib"]
    speed = large["streamed"]["rows_per_s"] / large["baseline"]["rows_per_s"]
    for rows, r in results.items():
        s, b = r["streamed"], r["baseline"]
        print(
            f"{rows:>9} rows: streamed {s['rows_per_s']:8.0f} rows/s, peak {s['peak_mib']:6.0f} MiB"
            f" | in memory {b['rows_per_s']:8.0f} rows/s, peak {b['peak_mib']:6.0f} MiB"
        )
    print(f"peak growth {big // 5} -> {big} rows: streamed {growth:.0f} MiB, "
          f"in memory {base_growth:.0f} MiB; speed ratio {speed:.2f}")  # fmt: skip
    target_met = growth < 40 and speed >= 0.5
    print(f"target (growth < 40 MiB, speed >= 0.5): {'met' if target_met else 'NOT met'}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "bench_plan", "results": {str(k): v for k, v in results.items()},
                   "peak_growth_mib": growth, "baseline_peak_growth_mib": base_growth,
                   "speed_ratio": speed, "target_met": target_met}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
