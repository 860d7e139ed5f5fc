"""The commands that run the whole DAG and its schedule: ``cvpipe backfill``,
``pipeline``, ``serve`` and ``plan``. Registered on the main app by flows/cli.py
(:func:`register`); the helpers they share with the other commands are looked up there
when a command runs, so importing this module costs nothing."""

from __future__ import annotations

import datetime
from typing import Any

import typer

from cvpipe.core.storage import read_bytes
from flows import preflight, written
from flows.cli_models import RUNNER, WORKERS


def _cli() -> Any:
    from flows import cli

    return cli


def backfill(
    source_pattern: str = typer.Argument(
        None, help="ingest only: source URL with {partition}, per day"
    ),
    start: datetime.datetime = typer.Option(..., "--from", "--start", formats=["%Y-%m-%d"]),
    end: datetime.datetime = typer.Option(..., "--to", "--end", formats=["%Y-%m-%d"]),
    config: str = typer.Option(None, "--config", help="pipeline YAML: backfill the whole DAG"),
    deployment: str = typer.Option(
        None,
        "--deployment",
        help="FLOW/DEPLOYMENT: one flow run per partition through the "
        "API of PREFECT_API_URL's server (e.g. pipeline-partition/pipeline-daily)",
    ),
    stages: str = typer.Option(None, "--stages", help="comma-separated pipeline stages"),
    root: str = typer.Option(None, "--root", help="override the pipeline config's root"),
    out: str = typer.Option(None, "--out", help="ingest only: output root"),
    shard_size: int = typer.Option(10_000, "--shard-size", help="ingest only"),
    name: str = typer.Option("shard", "--name", help="ingest only"),
) -> None:
    """Process every daily partition from --from to --to (inclusive); done work is
    skipped, so a half-done backfill is completed with nothing twice.

    With --deployment: one flow run per partition, created through the API, named after
    its partition and bounded by the deployment's concurrency limit. With --config only:
    the pipeline runs here for each partition (the embedded default). With SOURCE_PATTERN
    and --out: ingest only."""
    cli = _cli()
    wanted = [x.strip() for x in stages.split(",") if x.strip()] if stages else None
    if deployment:
        from flows.backfill import backfill_deployment
        from flows.local_api import configured_api_url

        if not configured_api_url():
            cli.fail("--deployment needs a Prefect server: set PREFECT_API_URL (see deployments/)")
        extra = {k: v for k, v in {"config_url": config, "root": root}.items() if v}
        rows = backfill_deployment(deployment, start.date(), end.date(), wanted, extra)
        cli.print_table(rows, f"backfill {deployment}")
        return
    if config:
        from flows.backfill import backfill_pipeline_flow

        days = (start.date(), end.date())
        results = cli.run_flow(backfill_pipeline_flow, config, *days, wanted, root)
        cli.print_table([{"partition": d, "report": r["report"]} for d, r in results.items()],
                        "backfill")  # fmt: skip
        return
    if not (source_pattern and out):
        cli.fail("give --deployment, --config PIPELINE.yaml, or SOURCE_PATTERN with --out")
    from flows.backfill import backfill_flow, date_partitions

    try:
        days = date_partitions(start.date(), end.date())
    except ValueError as e:
        cli.fail(str(e), code=2)
    if "{partition}" not in source_pattern:
        cli.fail("SOURCE_PATTERN must contain {partition}, e.g. /data/{partition}", code=2)
    # The first day's source must be there; later days may still be arriving.
    cli.check(
        preflight.Checks(
            inputs={"SOURCE_PATTERN": source_pattern.format(partition=days[0])},
            outputs={"--out": out},
        )
    )
    summaries = cli.run_flow(
        backfill_flow, source_pattern, out, start.date(), end.date(), name, shard_size
    )
    rows = [
        {
            "partition": d,
            "shards": s["shards"],
            "skipped": s["shards_skipped"],
            "written": s["written"],
            "rejected": s["rejected"],
        }
        for d, s in summaries.items()
    ]
    cli.print_table(rows, "backfill")
    written.print_written(written.backfill(out, days, summaries))


def pipeline(
    config: str = typer.Argument(..., help="pipeline YAML (see flows/examples/pipeline.yaml)"),
    partition: str = typer.Option(None, "--partition", help="the partition to process"),
    stages: str = typer.Option(
        None, "--stages", help="comma-separated stages to run (default: all enabled)"
    ),
    root: str = typer.Option(None, "--root", help="override the config's output root"),
    runner: str = RUNNER,
    workers: int = WORKERS,
) -> None:
    """The whole DAG for one partition: ingest -> weak labels -> teacher -> inference ->
    anchor labels and top-K selection -> materialize -> student -> fine-tuning ->
    detection and Siamese index; committed work is skipped."""
    cli = _cli()
    from flows.pipeline_config import PipelineConfig

    cfg = cli.load_yaml_config(config, PipelineConfig, partition=partition, root=root)
    cli.check(preflight.Checks(outputs={"--root" if root else f"{config}: root": cfg.root}))
    wanted = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    flow = cli._flow("pipeline", "pipeline_flow")
    from flows.runners import with_runner

    result = cli.run_flow(with_runner(flow, runner, workers), cfg, wanted)
    typer.echo("")
    typer.echo(read_bytes(result["report"]).decode())
    typer.echo(f"report: {result['report']}")


def serve(
    config: str = typer.Argument(..., help="pipeline YAML (see flows/examples/pipeline.yaml)"),
    cron: str = typer.Option("30 2 * * *", "--cron", help="schedule (UTC)"),
    days_ago: int = typer.Option(1, "--days-ago", help="partition = scheduled day minus this"),
    root: str = typer.Option(None, "--root", help="override the config's output root"),
    name: str = typer.Option("pipeline-daily", "--name", help="the deployment's name"),
) -> None:
    """Run the daily pipeline on a schedule from this process (flow.serve): no work pool
    or worker needed. Uses PREFECT_API_URL's server, or the embedded API while it runs."""
    cli = _cli()
    import os

    from flows import local_api
    from flows.backfill import partition_pipeline_flow
    from flows.pipeline_config import PipelineConfig

    cli.load_yaml_config(config, PipelineConfig, root=root)  # a bad config fails now, not at 02:30
    params = {"config_url": os.path.abspath(config), "days_ago": days_ago,
              **({"root": root} if root else {})}  # fmt: skip
    with local_api.api():
        partition_pipeline_flow.serve(name=name, cron=cron, parameters=params)


def plan(
    images: int = typer.Option(..., "--images", help="images to process, e.g. 1000000000"),
    shard_size: int = typer.Option(10_000, "--shard-size", help="images per shard"),
    gpus: int = typer.Option(8, "--gpus", help="GPUs available"),
    cpus: int = typer.Option(64, "--cpus", help="CPU worker processes available"),
    partition_images: int = typer.Option(
        10_000_000, "--partition-images", help="images per partition (one flow run each)"
    ),
    shards_per_unit: int = typer.Option(4, "--shards-per-unit", help="shards per GPU task run"),
    sources: list[str] = typer.Option(
        None,
        "--from",
        help="folders of benchmark JSON (default: benchmarks/results and benchmarks/reference)",
    ),
) -> None:
    """What a run over N images costs: shards, partitions, flow and task runs, GPU- and
    CPU-hours, wall time and storage per stage, from the rates the benchmarks measured."""
    from flows import plan as planner

    result = planner.plan(images, shard_size, gpus, cpus, partition_images, shards_per_unit,
                          sources or None)  # fmt: skip
    typer.echo(planner.markdown(result))


def register(app: typer.Typer) -> None:
    app.command()(backfill)
    app.command()(pipeline)
    app.command()(serve)
    app.command()(plan)
