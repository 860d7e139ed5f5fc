"""``cvpipe verify SHARDS``: check shards before a GPU stage and quarantine those that
fail (the flow is :func:`flows.ingest.verify_flow`). Imports are lazy: the CLI starts
fast."""

from __future__ import annotations

import typer


def verify(
    shards: str = typer.Argument(..., help="shard URL, folder or prefix of shards, or {a..b}"),
    quarantine: bool = typer.Option(True, "--quarantine/--no-quarantine"),
) -> None:
    """Check shards before a GPU stage; quarantine those that fail and name them."""
    from cvpipe.data.integrity import VerifyConfig
    from flows import preflight
    from flows.cli import check, parse_config, print_summary, run_flow
    from flows.ingest import verify_flow

    check(preflight.Checks(inputs={"SHARDS": shards}))
    config = parse_config(VerifyConfig, shards=shards, quarantine=quarantine)
    summary = run_flow(verify_flow, config)
    print_summary({k: v for k, v in summary.items() if k != "failures"}, "verify")
    for shard, why in summary["failures"].items():
        typer.echo(f"failed: {shard}: {why}")
