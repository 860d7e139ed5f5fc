"""The CLI is generated from the config models: every field is a flag, errors name
flags, older spellings keep working, and --config YAML is overridden by flags."""

from __future__ import annotations

from typing import Literal

import pytest
import typer
from pydantic import Field
from typer.testing import CliRunner

from cvpipe.core.config import Strict
from cvpipe.infer.config import InferConfig
from cvpipe.label.config import LabelConfig
from flows import cli
from flows.cli_models import Spec, cli_fields, config_command, flag_name

runner = CliRunner()


def _options(app: typer.Typer, *path: str) -> set[str]:
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize(
    ("path", "model", "positional", "renamed"),
    [
        (("infer",), InferConfig, {"shards"}, {"checkpoint": "--model"}),
        (("label",), LabelConfig, {"features"}, {"checkpoint": "--model", "ordered": "--ordered"}),
        (("select",), cli.SelectConfig, {"predictions"}, {}),
        (("materialize",), cli.MaterializeConfig, {"selection"}, {"checkpoint": "--model"}),
        (("ingest",), cli.IngestConfig, {"source"}, {"root": "--out"}),
        (
            ("train",),
            cli.TrainConfig,
            set(),
            {"freeze_stages": "--freeze", "lr_multipliers": "--lr-mult", "new_head": "--new-head"},
        ),
        (("anchors", "build"), cli.AnchorsConfig, {"sources"}, {"checkpoint": "--model"}),
    ],  # fmt: skip
)
def test_every_config_field_is_a_flag(path, model, positional, renamed) -> None:
    opts = _options(cli.app, *path)
    spec = Spec(model, positional=dict.fromkeys(positional, ""))
    missing = [
        f
        for f in cli_fields(spec)
        if f not in positional and renamed.get(f, flag_name(f)) not in opts
    ]
    assert missing == []


def test_flags_the_old_cli_lacked_are_there() -> None:
    assert {"--parallel-units", "--cpu-threads"} <= _options(cli.app, "infer")
    assert {"--kl-direction", "--eps", "--unordered"} <= _options(cli.app, "label")


class Toy(Strict):
    """A toy config."""

    source: str = Field(description="where from")
    top_k: int = Field(5, ge=1, description="how many")
    mode: Literal["a", "b"] = "a"
    checkpoint: str | None = None
    ordered: bool = True
    weights: dict[str, float] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)


def _toy_app(model=Toy) -> tuple[typer.Typer, list]:
    app = typer.Typer()
    seen: list = []
    aliases = {"checkpoint": ["--model"], "ordered": ["--ordered/--unordered"]}
    spec = Spec(model, positional={"source": "src"}, aliases=aliases)
    config_command(app, "go", spec, seen.append, load_yaml=_yaml)
    app.command("noop")(lambda: None)  # a group, so the command is named on the line
    return app, seen


def _yaml(path: str) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def test_values_aliases_pairs_and_lists_reach_the_model() -> None:
    app, seen = _toy_app()
    args = ["go", "s3://x", "--top-k", "7", "--model", "m.pt", "--unordered"]
    args += ["--weights", "head=0.1", "--weights", "layer4=2", "--tags", "a", "--tags", "b"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    [cfg] = seen
    assert cfg == Toy(source="s3://x", top_k=7, checkpoint="m.pt", ordered=False,
                      weights={"head": 0.1, "layer4": 2.0}, tags=["a", "b"])  # fmt: skip
    assert cfg.model_fields_set == {"source", "top_k", "checkpoint", "ordered", "weights", "tags"}


def test_errors_name_the_flag_not_the_field() -> None:
    app, seen = _toy_app()
    result = runner.invoke(app, ["go", "x", "--top-k", "0"])
    assert result.exit_code == 2 and seen == []
    assert "--top-k" in result.output and "top_k" not in result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["go", "x", "--mode", "c"])
    assert result.exit_code == 2 and "--mode" in result.output
    result = runner.invoke(app, ["go", "x", "--weights", "nokey"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    result = runner.invoke(app, ["go"])
    assert result.exit_code == 2 and "SOURCE: Field required" in result.output


def test_yaml_config_is_overridden_by_flags(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("source: from-yaml\ntop_k: 3\nmode: b\n")
    app, seen = _toy_app()
    assert runner.invoke(app, ["go", "--config", str(path), "--top-k", "9"]).exit_code == 0
    assert (seen[0].source, seen[0].top_k, seen[0].mode) == ("from-yaml", 9, "b")


def test_a_field_added_to_a_config_is_on_the_cli_without_touching_it() -> None:
    class Grown(Toy):
        new_knob: float = Field(0.5, description="added later")

    app, seen = _toy_app(Grown)
    result = runner.invoke(app, ["go", "x", "--new-knob", "0.25"])
    assert result.exit_code == 0, result.output
    assert seen[0].new_knob == 0.25


def test_train_and_finetune_take_shards_as_their_argument() -> None:
    for name in ("train", "finetune"):
        cmd = typer.main.get_command(cli.app).commands[name]
        args = [p for p in cmd.params if not p.opts[0].startswith("-")]
        assert [p.name for p in args] == ["shards"] and args[0].required
