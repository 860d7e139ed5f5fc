"""The weak-supervision commands of ``cvpipe``: ``vocab``, ``train-weak``, ``words``.
:func:`register` adds them to the main app (flows/cli.py); flags come from the config
models (flows/cli_models.py)."""

from __future__ import annotations

import inspect
from typing import Any

import typer

from cvpipe.label.config import VocabConfig
from cvpipe.learn.config import TrainConfig
from flows.cli_models import Spec, config_command

_KW = inspect.Parameter.KEYWORD_ONLY


def _load_yaml(path: str) -> dict[str, Any]:
    from flows.cli import load_yaml

    return load_yaml(path)


def _checked(spec: Spec, run: Any, **how: Any) -> Any:
    """flows.cli.checked (the preflight, then ``run``), found when the command runs
    (flows.cli imports this module)."""

    def go(config: Any, **values: Any) -> Any:
        from flows.cli import checked

        return checked(spec, run, **how)(config, **values)

    return go


def _vocab(config: VocabConfig) -> None:
    from cvpipe.label.vocab import vocab_markdown
    from flows.cli import print_summary, run_flow
    from flows.weak import vocab_flow

    print_summary(run_flow(vocab_flow, config), "vocab")
    typer.echo(vocab_markdown(config.out, top=10))


def _train_weak(
    config: TrainConfig,
    shards: str,
    vocab: str,
    out: str,
    test: str | None,
    val: str | None,
    resample: str,
    show: list[str] | None,
    top_images: int,
) -> None:
    from cvpipe.learn.config import WeakTrainConfig
    from flows.cli import parse_config, print_summary, run_flow
    from flows.weak import train_weak_flow

    weak = parse_config(
        WeakTrainConfig, shards=shards, vocab=vocab, out=out, train=config, test=test, val=val,
        resample=resample, show=show or [], top_images=top_images,
    )  # fmt: skip
    result = run_flow(train_weak_flow, weak)
    summary = {k: v for k, v in result.items() if k not in ("precision", "markdown", "last_epoch")}
    summary.update({f"last epoch {k}": v for k, v in (result.get("last_epoch") or {}).items()})
    print_summary(summary, "train-weak")
    if "markdown" in result:
        typer.echo(result["markdown"])


def _option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, _KW, annotation=annotation, default=default)


def words(
    checkpoint: str = typer.Argument(..., help="a weakly supervised checkpoint (final.pt)"),
    query: str = typer.Option(..., "--query", help="a word of its vocabulary"),
    k: int = typer.Option(10, "-k", "--k", help="how many nearest words"),
) -> None:
    """The words nearest to a word in a weakly supervised model's output layer (cosine)."""
    from flows import preflight
    from flows.cli import check, print_table, run_flow
    from flows.weak import words_flow

    if k < 1:
        from flows.cli import fail

        fail("-k must be >= 1")
    check(preflight.Checks(checkpoints={"CHECKPOINT": checkpoint}))
    print_table(run_flow(words_flow, checkpoint, query, k), f"nearest words to {query!r}")


_TRAIN_WEAK_EXTRA = [
    inspect.Parameter(
        "shards", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
        default=typer.Argument(..., help="captioned training shards"),
    ),
    _option("vocab", str, typer.Option(..., "--vocab", help="the vocabulary Parquet")),
    _option("out", str, typer.Option(..., "--out", help="targets, model and eval go here")),
    _option("test", str | None, typer.Option(None, "--test", help="held-out captioned shards")),
    _option("val", str | None, typer.Option(None, "--val", help="captioned validation shards")),
    _option("resample", str, typer.Option("none", "--resample", help="none | sqrt")),
    _option("show", list[str] | None, typer.Option(None, "--show", help="a word to show")),
    _option("top_images", int, typer.Option(8, "--top-images", help="images per shown word")),
]  # fmt: skip


def run_weak_teacher(raw: dict[str, Any]) -> None:
    """``cvpipe run`` of an ``experiment: weak_teacher`` YAML."""
    from cvpipe.experiments.config import WeakTeacherConfig
    from flows.cli import parse_config, run_flow
    from flows.weak_teacher import weak_teacher_flow

    config = parse_config(WeakTeacherConfig, **raw)
    result = run_flow(weak_teacher_flow, config)
    typer.echo("\nWord prediction on the captioned test split\n\n" + result["word_precision"])
    typer.echo("\nTeacher from scratch vs weak initialization (top-1 %)\n\n" + result["comparison"])
    typer.echo(f"tables: {config.root}/comparison.md, {config.root}/word_precision.md")


def run_weak_demo(out: str) -> None:
    """The weak-label part of ``cvpipe demo`` (flows/weak.py: weak_demo_flow)."""
    from flows.cli import print_table, run_flow
    from flows.weak import weak_demo_flow

    result = run_flow(weak_demo_flow, out)
    typer.echo("\nWeak labels: word prediction from SYNTHETIC captions\n\n" + result["markdown"])
    print_table(result["nearest_seven"], "words nearest to 'seven' (output layer, cosine)")
    typer.echo(f"top images per word: {out}/model/eval/top_images.png")


_TRAIN_WEAK_FLAGS = {
    "shards": ("SHARDS", "inputs"),
    "vocab": ("--vocab", "inputs"),
    "out": ("--out", "outputs"),
    "test": ("--test", "inputs"),
    "val": ("--val", "inputs"),
}


def register(app: typer.Typer) -> None:
    """Add the weak-supervision commands to ``app``."""
    vocab_spec = Spec(VocabConfig, positional={"shards": "captioned shards (URL, folder, {a..b})"})
    config_command(
        app,
        "vocab",
        vocab_spec,
        _checked(vocab_spec, _vocab, fields={"synonyms": "inputs"}),
        help="The vocabulary of captions and hashtags: counted per shard, merged as a tree.",
        load_yaml=_load_yaml,
    )
    train_spec = Spec(
        TrainConfig,
        aliases={
            "freeze_stages": ["--freeze", "--freeze-stages"],
            "lr_multipliers": ["--lr-mult", "--lr-multipliers"],
            "new_head": ["--new-head/--keep-head"],
        },
        exclude={"classes"},  # the vocabulary is the class list
    )
    config_command(
        app,
        "train-weak",
        train_spec,
        _checked(train_spec, _train_weak, own=_TRAIN_WEAK_FLAGS),
        extra=_TRAIN_WEAK_EXTRA,
        help="Train on the words of captions and hashtags (Joulin et al. 2016); with --test, "
        "precision@k against the frequency baseline. --config is a TrainConfig YAML.",
        load_yaml=_load_yaml,
    )
    app.command("words")(words)
