"""The weak-supervision commands of ``cvpipe``: ``vocab``, ``train-weak``, ``words``.
:func:`register` adds them to the main app (flows/cli.py); flags come from the config
models (flows/cli_models.py)."""

from __future__ import annotations

from typing import Any

import typer

from cvpipe.label.config import VocabConfig
from flows.cli_models import Spec, config_command


def _load_yaml(path: str) -> dict[str, Any]:
    from flows.cli import load_yaml

    return load_yaml(path)


def _vocab(config: VocabConfig) -> None:
    from cvpipe.label.vocab import vocab_markdown
    from flows.cli import print_summary, run_flow
    from flows.weak import vocab_flow

    print_summary(run_flow(vocab_flow, config), "vocab")
    typer.echo(vocab_markdown(config.out, top=10))


def register(app: typer.Typer) -> None:
    """Add the weak-supervision commands to ``app``."""
    config_command(
        app,
        "vocab",
        Spec(VocabConfig, positional={"shards": "captioned shards (URL, folder, {a..b})"}),
        _vocab,
        help="The vocabulary of captions and hashtags: counted per shard, merged as a tree.",
        load_yaml=_load_yaml,
    )
