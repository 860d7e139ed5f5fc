"""CLI commands of learning to transfer: ``cvpipe p2l``, ``cvpipe shallow`` and
``cvpipe transfer``. Registered on the main app by flows/cli.py (:func:`register`);
the helpers they share with the other commands are imported from there when a command
runs, so importing this module costs nothing."""

from __future__ import annotations

from typing import Any

import typer

from cvpipe.label.config import P2LConfig
from cvpipe.learn.config import ShallowConfig
from flows.cli_models import Spec, config_command


def _cli() -> Any:
    from flows import cli

    return cli


def _p2l(config: P2LConfig) -> None:
    cli = _cli()
    from flows.transfer import p2l_flow, ranking_url

    rows = cli.run_flow(p2l_flow, config)
    cli.print_table(
        [{k: r[k] for k in ("rank", "candidate", "size", "divergence", "score")} for r in rows],
        "P2L-style ranking (best first)",
    )
    typer.echo(f"ranking: {ranking_url(config.out)}")


def _shallow(config: ShallowConfig) -> None:
    cli = _cli()
    from cvpipe.learn.shallow import result_url
    from flows.transfer import shallow_flow

    row = cli.run_flow(shallow_flow, config)
    cli.print_table([row], f"shallow {config.model}")
    typer.echo(f"result: {result_url(config.out)}")


def transfer(
    config: str = typer.Argument(..., help="transfer study YAML (flows/examples/transfer.yaml)"),
    root: str = typer.Option(None, "--root", help="override the config's output root"),
) -> None:
    """The whole transfer study: P2L validated against exhaustive fine-tuning, shallow
    learners vs fine-tuning per freezing depth and LR multipliers, curricula, costs;
    writes ROOT/transfer_report.md (+ .png) recommending a source, a method and a
    freezing depth for the target."""
    cli = _cli()
    from cvpipe.core.storage import read_bytes
    from cvpipe.experiments.config import TransferStudyConfig
    from flows.transfer_study import transfer_flow

    raw = cli.load_yaml(config)
    raw.pop("experiment", None)
    if root:
        raw["root"] = root
    result = cli.run_flow(transfer_flow, cli.parse_config(TransferStudyConfig, **raw))
    typer.echo(read_bytes(result["markdown"]).decode())
    typer.echo(f"report: {result['markdown']} and {result['png']}")


def register(app: typer.Typer) -> None:
    def load_yaml(path: str) -> dict[str, Any]:
        return _cli().load_yaml(path)

    config_command(
        app,
        "p2l",
        Spec(
            P2LConfig,
            positional={"target": "shards of the target set (URL, folder, brace pattern)"},
            aliases={"reference": ["--reference", "--model"]},
        ),
        _p2l,
        help="Rank candidate source models for a target (P2L-style: size and divergence).",
        load_yaml=load_yaml,
    )
    config_command(
        app,
        "shallow",
        Spec(ShallowConfig, positional={"features": "training features (folder or files)"}),
        _shallow,
        help="A linear SVM or logistic regression on frozen features; OUT/shallow.parquet.",
        load_yaml=load_yaml,
    )
    app.command("transfer")(transfer)
