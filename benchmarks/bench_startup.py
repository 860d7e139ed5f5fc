"""Start-up of a ``cvpipe`` command: the embedded Prefect API against one running
``prefect server``, and the time a bad input takes to its error line; same run.

Cases, each a fresh process, interleaved round by round so other load on the machine
hits them alike (medians reported):

- ``import``: ``python -c "import flows.cli"`` (the floor of any command);
- ``bad_checkpoint``: ``cvpipe infer SHARD --model text.pt`` to its one error line;
- ``photos_embedded``: ``cvpipe datasets photos OUT --count 10`` with no PREFECT_API_URL
  (the command starts and stops its own API);
- ``photos_server``: the same against a ``prefect server start`` this script started
  once (its own start-up is reported apart);
- with ``--baseline-tree DIR`` (e.g. a checkout of main): ``photos_embedded`` and
  ``bad_checkpoint`` run from that tree too, as ``baseline_*``.

Ratios: ``photos_server / photos_embedded`` (what a local server saves per command) and
``photos_embedded / baseline_photos_embedded`` (this tree against the baseline).

    python benchmarks/bench_startup.py [--rounds 3] [--baseline-tree /path/to/main]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tree: Path, home: str, api: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PYTHONPATH=str(tree), PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if api:
        env["PREFECT_API_URL"] = api
    return env


def timed_run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - t, r.returncode, r.stderr


def start_server(home: str) -> tuple[subprocess.Popen, str, float]:
    port = _port()
    api = f"http://127.0.0.1:{port}/api"
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port)],
        env=_env(HERE, home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    while time.perf_counter() - t < 300:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, api, time.perf_counter() - t
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("prefect server did not start in 300 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline-tree", default=None, help="another checkout to compare with")
    p.add_argument("--out", default="benchmarks/results/bench_startup.json")
    args = p.parse_args(argv)
    baseline = Path(args.baseline_tree).resolve() if args.baseline_tree else None
    py = sys.executable
    times: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as work:
        w = Path(work)
        (w / "model.pt").write_text("not a model\n")
        subprocess.run([py, "-c", "from cvpipe.data import datasets, ingest\n"
                        f"datasets.export_digits('{w}/digits', size=16)"],
                       env=_env(HERE, str(w / "h0")), check=True, cwd=HERE)  # fmt: skip
        shard_dir = w / "digits"  # an existing input: the checkpoint is what is wrong
        server, api, server_start_s = start_server(str(w / "server-home"))
        try:
            for r in range(args.rounds):
                cases = {
                    "import": ([py, "-c", "import flows.cli"], HERE, None),
                    "bad_checkpoint": (
                        [py, "-m", "flows.cli", "infer", str(shard_dir), "--model",
                         str(w / "model.pt"), "--out", str(w / f"o{r}")], HERE, None),
                    "photos_embedded": (
                        [py, "-m", "flows.cli", "datasets", "photos", str(w / f"pe{r}"),
                         "--count", "10"], HERE, None),
                    "photos_server": (
                        [py, "-m", "flows.cli", "datasets", "photos", str(w / f"ps{r}"),
                         "--count", "10"], HERE, api),
                }  # fmt: skip
                if baseline is not None:
                    cases["baseline_bad_checkpoint"] = (cases["bad_checkpoint"][0], baseline, None)
                    cases["baseline_photos_embedded"] = (
                        [py, "-m", "flows.cli", "datasets", "photos", str(w / f"pb{r}"),
                         "--count", "10"], baseline, None)  # fmt: skip
                for name, (cmd, tree, api_url) in cases.items():
                    home = str(w / f"home-{name}-{r}")
                    seconds, code, stderr = timed_run(cmd, _env(tree, home, api_url), tree)
                    times.setdefault(name, []).append(seconds)
                    if name.endswith("bad_checkpoint"):
                        errors[name] = f"rc={code}, {len(stderr.splitlines())} line(s): " + (
                            stderr.strip().splitlines()[-1] if stderr.strip() else ""
                        )
                    elif code != 0:
                        raise RuntimeError(f"{name} failed: {stderr[-2000:]}")
                    print(f"round {r}: {name:>26} {seconds:6.1f} s", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "bench_startup",
        "rounds": args.rounds,
        "median_s": med,
        "all_s": times,
        "server_start_s": server_start_s,
        "server_over_embedded": med["photos_server"] / med["photos_embedded"],
        "errors": errors,
    }
    if baseline is not None:
        result["baseline_tree"] = str(baseline)
        result["embedded_over_baseline"] = med["photos_embedded"] / med["baseline_photos_embedded"]
    print(json.dumps({k: v for k, v in result.items() if k != "all_s"}, indent=2))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
