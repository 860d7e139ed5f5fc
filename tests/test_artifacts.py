"""The Prefect UI: every artifact keyed by the output it describes, short flow-run
names, markdown tables that render."""

from __future__ import annotations

import ast
from pathlib import Path

import pyarrow as pa
from prefect import flow

from cvpipe.experiments import reports
from tasks.artifacts import artifact_key, run_name

ROOT = Path(__file__).resolve().parent.parent
PUBLISHERS = {"publish_table", "publish_markdown", "publish_rejects"}


def test_every_published_artifact_is_keyed_by_its_location():
    """Runs writing to different places must not hide each other's artifacts: each
    publish call in flows/ and tasks/ passes ``location=``."""
    unkeyed = []
    for path in sorted([*ROOT.glob("flows/*.py"), *ROOT.glob("tasks/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in PUBLISHERS and not any(k.arg == "location" for k in node.keywords):
                unkeyed.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert unkeyed == []


def test_artifact_keys_differ_by_location_and_stay_valid():
    a = artifact_key("infer-summary", location="s3://bucket/a/infer")
    b = artifact_key("infer-summary", location="s3://bucket/b/infer")
    assert a != b and a.startswith("infer-summary-")
    assert artifact_key("infer-summary", location="/x/y/") == artifact_key(
        "infer-summary", location="/x/y"
    )
    long = artifact_key("count and check " + "/very/long" * 30, location="/o")
    assert len(long) <= 70 and set(long) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")


def test_flow_run_names_are_short(prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    shards = [f"s3://bucket/corpus/2026-11-25/shard-{i:06d}.tar" for i in range(500)]
    out = "s3://bucket/" + "deep/" * 20 + "infer"

    @flow(flow_run_name=run_name("infer {shards} -> {out}"))
    def named(shards: list[str], out: str) -> None:
        return None

    state = named(shards, out, return_state=True)

    async def name() -> str:
        async with get_client() as client:
            return (await client.read_flow_run(state.state_details.flow_run_id)).name

    got = run_coro_as_sync(name())
    assert len(got) <= 100, got
    assert "(+499)" in got and got.endswith("deep/infer"), got


def test_markdown_cells_escape_pipes():
    table = pa.table({"|D|": ["a|b", "c"], "top1": [0.5, 0.25]})
    md = reports.markdown_table(table)
    header, rule, *rows = md.strip().splitlines()
    assert header == "| \\|D\\| | top1 |"
    for line in (header, *rows):  # two cells: three unescaped pipes
        assert line.replace("\\|", "").count("|") == 3, line
    rows_ssl = [
        {"seed": 0, "method": m, "top1": 0.9, "labeled": 60, "pseudo": 600, "precision": 0.99}
        for m in reports.SSL_METHODS
    ]
    md = reports.ssl_results_markdown(rows_ssl)
    assert md.splitlines()[0].startswith("| seed | \\|D\\| | \\|D^\\| |")
    assert reports.ssl_seed_bars(rows_ssl)[:4] == b"\x89PNG"
