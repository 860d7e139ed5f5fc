"""``cvpipe retry-rejects ROOT --partition P [--reasons ...]``: re-ingest the retryable
rejects of a finished partition into an additional round of shards (the flow is
:func:`flows.ingest.retry_rejects_flow`). Imports are lazy: the CLI starts fast."""

from __future__ import annotations

import typer


def retry_rejects(
    root: str = typer.Argument(..., help="the ingest root (shards/, index/, rejects/, plans/)"),
    partition: str = typer.Option(..., "--partition", help="the partition to retry"),
    reasons: list[str] = typer.Option(
        None,
        "--reasons",
        help="reject reasons to retry (default: fetch_timeout, "
        "fetch_failed, unreadable_file); repeatable",
    ),  # fmt: skip
    name: str = typer.Option(None, "--name", help="the ingest name, if the partition has several"),
) -> None:
    """Re-ingest retryable rejects (fetch timeouts, transient read errors) of a partition."""
    from flows import preflight
    from flows.cli import check, print_summary, run_flow
    from flows.ingest import retry_rejects_flow

    check(preflight.Checks(inputs={"ROOT": root}, outputs={"ROOT": root}))
    summary = run_flow(retry_rejects_flow, root, partition, reasons or None, name)
    print_summary(summary, f"retry-rejects {partition}")
