"""The weak-supervision commands of ``cvpipe``: ``vocab``, ``train-weak``, ``words``.
:func:`register` adds them to the main app (flows/cli.py)."""

from __future__ import annotations

import typer


def vocab(
    shards: str = typer.Argument(..., help="captioned shards (URL, folder, prefix or {a..b})"),
    size: int = typer.Option(..., "--size", help="V: the most frequent words kept"),
    out: str = typer.Option(..., "--out", help="the vocabulary Parquet to write"),
    min_count: int = typer.Option(1, "--min-count", help="leave out rarer words"),
    synonyms: str = typer.Option(None, "--synonyms", help="file of VARIANT, ... => CANONICAL"),
    fan_in: int = typer.Option(16, "--fan-in", help="partials merged per merge unit"),
    partial_cap: int = typer.Option(1 << 20, "--partial-cap", help="most words per partial"),
) -> None:
    """The vocabulary of captions and hashtags: counted per shard, merged as a tree."""
    from cvpipe.label.config import VocabConfig
    from cvpipe.label.vocab import vocab_markdown
    from flows.cli import parse_config, print_summary, run_flow
    from flows.weak import vocab_flow

    config = parse_config(
        VocabConfig, shards=shards, out=out, size=size, min_count=min_count,
        synonyms=synonyms, fan_in=fan_in, partial_cap=partial_cap,
    )  # fmt: skip
    summary = run_flow(vocab_flow, config)
    print_summary(summary, "vocab")
    typer.echo(vocab_markdown(out, top=10))


def register(app: typer.Typer) -> None:
    """Add the weak-supervision commands to ``app``."""
    app.command("vocab")(vocab)
