"""CLI commands of learning to transfer: ``cvpipe p2l``, ``cvpipe shallow`` and
``cvpipe transfer``. Registered on the main app by flows/cli.py (:func:`register`);
the helpers they share with the other commands are imported from there when a command
runs, so importing this module costs nothing."""

from __future__ import annotations

from typing import Any

import typer

from cvpipe.core.storage import join
from cvpipe.label.config import P2LConfig
from cvpipe.learn.config import ShallowConfig
from flows import written
from flows.cli_models import Spec, config_command

# The study's tables under its root, besides the report.
STUDY_OUTPUTS = (
    "grid.parquet",
    "methods.parquet",
    "costs.parquet",
    "p2l/p2l_validation.md",
    "p2l/p2l_weights.parquet",
)


def _cli() -> Any:
    from flows import cli

    return cli


_P2L_SPEC = Spec(
    P2LConfig,
    positional={"target": "shards of the target set (URL, folder, brace pattern)"},
    aliases={"reference": ["--reference", "--model"]},
)
_SHALLOW_SPEC = Spec(ShallowConfig, positional={"features": "training features (folder or files)"})


def _preflight(
    spec: Spec, config: Any, inputs: dict[str, Any], checkpoints: dict[str, Any]
) -> None:
    """The shared preflight (flows/preflight.py) of a config's fields, plus the fields it
    cannot tell are inputs or checkpoints by their names (``field -> value``)."""
    from flows import preflight

    cli = _cli()
    flags = preflight.flags_of(spec)
    checks = preflight.for_config(config, flags)
    for kind, values in (("inputs", inputs), ("checkpoints", checkpoints)):
        for name, value in values.items():
            checks.add(kind, flags.get(name, "--" + name.replace("_", "-")), value)
    cli.check(checks)


def _p2l(config: P2LConfig) -> None:
    cli = _cli()
    _preflight(
        _P2L_SPEC,
        config,
        inputs={
            "target": config.target,
            "candidates": config.candidates,
            "weights": config.weights,
        },
        checkpoints={"reference": config.reference},
    )
    from flows.transfer import p2l_flow, ranking_url

    rows = cli.run_flow(p2l_flow, config)
    cli.print_table(
        [{k: r[k] for k in ("rank", "candidate", "size", "divergence", "score")} for r in rows],
        "P2L-style ranking (best first)",
    )
    written.print_written(
        [("ranking", ranking_url(config.out)), ("summaries", join(config.out, "summaries"))]
    )


def _shallow(config: ShallowConfig) -> None:
    cli = _cli()
    _preflight(
        _SHALLOW_SPEC,
        config,
        inputs={"test": config.test, "val": config.val, "test_truth": config.test_truth},
        checkpoints={},
    )
    from cvpipe.learn.shallow import head_url, result_url
    from flows.transfer import shallow_flow

    row = cli.run_flow(shallow_flow, config)
    cli.print_table([row], f"shallow {config.model}")
    written.print_written([("result", result_url(config.out)), ("head", head_url(config.out))])


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

    study = cli.load_yaml_config(config, TransferStudyConfig, root=root)
    checks = cli.experiment_checks(study, config)
    if root:
        checks.outputs = {"--root": study.root}
    cli.check(checks)
    result = cli.run_flow(transfer_flow, study)
    typer.echo(read_bytes(result["markdown"]).decode())
    written.print_written(
        [("report", result["markdown"]), ("figure", result["png"])]
        + [(name, join(study.root, name)) for name in STUDY_OUTPUTS],
        "transfer study: written",
    )


def register(app: typer.Typer) -> None:
    def load_yaml(path: str) -> dict[str, Any]:
        return _cli().load_yaml(path)

    config_command(
        app,
        "p2l",
        _P2L_SPEC,
        _p2l,
        help="Rank candidate source models for a target (P2L-style: size and divergence).",
        load_yaml=load_yaml,
    )
    config_command(
        app,
        "shallow",
        _SHALLOW_SPEC,
        _shallow,
        help="A linear SVM or logistic regression on frozen features; OUT/shallow.parquet.",
        load_yaml=load_yaml,
    )
    app.command("transfer")(transfer)
