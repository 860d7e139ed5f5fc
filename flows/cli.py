"""The ``cvpipe`` command line. Every command runs a Prefect flow, so every run shows in
the Prefect UI (the local SQLite-backed API by default, or PREFECT_API_URL's server).

What a command prints and logs: flows/terminal.py. Before its flow, a command checks
its inputs, checkpoints, device and outputs (flows/preflight.py); it ends with a table
of what it wrote (flows/written.py)."""

from __future__ import annotations

import inspect
import json
import os
import sys
from typing import Any, NoReturn

# The embedded Prefect API would otherwise try to send telemetry off this machine.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import typer
from pydantic import ValidationError

from cvpipe.data.config import IngestConfig
from cvpipe.infer.config import InferConfig
from cvpipe.label.config import AnchorsConfig, LabelConfig, MaterializeConfig, SelectConfig
from cvpipe.learn.config import TrainConfig
from flows import preflight, terminal, written
from flows.cli_models import RUNNER, WORKERS, Spec, config_command
from flows.cli_weak import register as register_weak
from flows.cli_weak import run_weak_demo, run_weak_teacher

app = typer.Typer(
    help="cvpipe: web-scale images in, labeled data and trained models out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
datasets_app = typer.Typer(help="Export real datasets that ship inside installed packages.")
app.add_typer(datasets_app, name="datasets")
anchors_app = typer.Typer(help="Named anchor datasets in a reference model's feature space.")
app.add_typer(anchors_app, name="anchors")


_owns_api = False  # main() runs the local API for the command: start it after preflight


@app.callback()
def _terminal(
    ctx: typer.Context,
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="no progress or log lines: warnings, errors, the summary"
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="every log line (Prefect's too) and an error's traceback"
    ),
) -> None:
    """cvpipe: web-scale images in, labeled data and trained models out."""
    if quiet and verbose:
        fail("--quiet and --verbose exclude each other", code=2)
    terminal.start(ctx.invoked_subcommand, quiet=quiet, verbose=verbose)
    if not _owns_api:  # in-process (tests); main() stops it after the local API is gone
        ctx.call_on_close(terminal.stop)


def fail(message: str, exc: BaseException | None = None, code: int = 1) -> NoReturn:
    """One ``error:`` line (and the log file's path when ``exc`` is given); exits."""
    terminal.fail(message, exc, code)


def error_text(e: BaseException) -> str:
    """An exception as the text of an error line."""
    if isinstance(e, ValidationError):
        parts = [(".".join(str(x) for x in err["loc"]), err["msg"]) for err in e.errors()]
        return "; ".join(f"{where or 'config'}: {msg}" for where, msg in parts)
    if isinstance(e, preflight.PreflightError):
        return str(e)
    if type(e) is RuntimeError and e.__cause__ is not None:  # a wrapper: its cause is the news
        e = e.__cause__
    return f"{type(e).__name__}: {e}"


def run_flow(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a flow; any failure is one ``error:`` line naming the log file that holds the
    traceback (Prefect's own lines and tracebacks go to that file, not the terminal)."""
    from flows import local_api

    try:
        with local_api.api():
            return fn(*args, **kwargs)
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as e:
        fail(error_text(e), e)


def check(checks: preflight.Checks, then: Any = None) -> Any:
    """The preflight: seconds, before any flow; a bad value is one error line. ``then()``
    (e.g. listing the shards) runs next, its PreflightError one line too; its result is
    returned. Once both pass, the command's local Prefect API starts in the background."""
    try:
        preflight.run(checks)
        result = then() if then is not None else None
    except preflight.PreflightError as e:
        fail(str(e))
    except Exception as e:  # a check that broke: say which, keep the traceback
        fail(f"checking the inputs: {type(e).__name__}: {e}", e)
    if _owns_api:
        from flows import local_api

        local_api.start_early()
    return result


def checked(
    spec: Spec,
    run: Any,
    own: dict[str, tuple[str, str]] | None = None,
    fields: dict[str, str] | None = None,
) -> Any:
    """``run(config, **values)`` after the preflight of the config's fields and of the
    command's own flags (``own``: parameter -> (flag, kind)); ``fields`` (field -> kind)
    names the fields whose names do not tell what they are (``init``, ``embeddings``)."""

    def go(config: Any, **values: Any) -> Any:
        flags = preflight.flags_of(spec)
        checks = preflight.for_config(config, flags)
        for name, kind in (fields or {}).items():
            checks.add(
                kind, flags.get(name) or "--" + name.replace("_", "-"), getattr(config, name)
            )
        for name, (flag, kind) in (own or {}).items():
            checks.add(kind, flag, values.get(name))
        check(checks)
        return run(config, **values)

    return go


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in rows[0] if rows else []:
        table.add_column(str(col))
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)


def print_summary(summary: dict[str, Any], title: str) -> None:
    from tasks.artifacts import summary_rows

    print_table(summary_rows(summary), title)


@datasets_app.command("digits")
def datasets_digits(
    out: str = typer.Argument(..., help="output folder (class sub-folders of PNG files)"),
    size: int = typer.Option(32, help="side of the upscaled PNGs, in pixels"),
    split: str = typer.Option(
        None, help="e.g. labeled=0.1,unlabeled=0.6,test=0.3 (stratified, seeded)"
    ),
    seed: int = typer.Option(0, help="seed of the split (and of the captions)"),
    captions: bool = typer.Option(False, "--captions", help="also SYNTHETIC caption manifests"),
    caption_q: float = typer.Option(0.6, "--caption-q", help="P(a caption names the digit)"),
) -> None:
    """scikit-learn's 1,797 real handwritten digits as an image-folder tree."""
    from flows.datasets import export_digits_flow

    check(preflight.Checks(outputs={"OUT": out}))
    counts = run_flow(
        export_digits_flow, out, size=size, split=split, seed=seed, captions=captions,
        caption_q=caption_q,
    )  # fmt: skip
    typer.echo(json.dumps(counts))
    written.print_written(written.folder("digits", out))


@datasets_app.command("photos")
def datasets_photos(
    out: str = typer.Argument(..., help="output folder"),
    count: int = typer.Option(1000, help="number of crops"),
    size: int = typer.Option(256, help="crop side in pixels"),
    seed: int = typer.Option(0),
) -> None:
    """Random JPEG crops of the two real photographs scikit-learn ships."""
    from flows.datasets import export_photos_flow

    check(preflight.Checks(outputs={"OUT": out}))
    typer.echo(run_flow(export_photos_flow, out, count=count, size=size, seed=seed))
    written.print_written(written.folder("photos", out))


def _ingest(config: Any, runner: str, workers: int | None) -> None:
    from flows.ingest import ingest_flow
    from flows.runners import with_runner

    summary = run_flow(with_runner(ingest_flow, runner, workers), config)
    print_summary(summary, f"ingest {config.partition}")
    written.print_written(written.ingest(config.root, config.partition, summary))


_INGEST_SPEC = Spec(
    IngestConfig,
    positional={"source": "image folder tree or manifest (.parquet/.jsonl/.csv)"},
    aliases={"root": ["--out", "--root"]},
)
config_command(
    app,
    "ingest",
    _INGEST_SPEC,
    checked(_INGEST_SPEC, _ingest),
    extra=[
        inspect.Parameter("runner", inspect.Parameter.KEYWORD_ONLY, default=RUNNER, annotation=str),
        inspect.Parameter(
            "workers", inspect.Parameter.KEYWORD_ONLY, default=WORKERS, annotation=int | None
        ),  # fmt: skip
    ],
    help="Ingest images into WebDataset shards {out}/shards/{partition}/{name}-NNNNNN.tar.",
    load_yaml=lambda path: load_yaml(path),
)


# backfill, pipeline, serve, plan (their own module; they use the helpers here when they run)
from flows import cli_pipeline  # noqa: E402

cli_pipeline.register(app)


def parse_config(model: Any, **fields: Any) -> Any:
    """Build a config model from CLI values; a bad value is an error naming its field."""
    try:
        return model(**fields)
    except ValidationError as e:
        fail(str(e))


def _infer(config: Any) -> None:
    summary = run_flow(_flow("teacher", "infer_flow"), config)
    print_summary(summary, "infer")
    written.print_written(written.infer(config.out, config.features, summary))


_INFER_SPEC = Spec(
    InferConfig,
    positional={"shards": "shard URL, folder or prefix of shards, or {a..b}"},
    aliases={"checkpoint": ["--model", "--checkpoint"]},
)
config_command(
    app,
    "infer",
    _INFER_SPEC,
    checked(_INFER_SPEC, _infer),
    help="Teacher inference: top-P classes and scores (and embeddings) per image.",
    load_yaml=lambda path: load_yaml(path),
)


def _select(config: Any) -> None:
    report = run_flow(_flow("teacher", "select_flow"), config)
    print_summary({k: v for k, v in report.items() if not isinstance(v, list)}, "selection")
    written.print_written(written.select(config.out))


_SELECT_SPEC = Spec(
    SelectConfig, positional={"predictions": "folder or prefix of predictions Parquet"}
)
config_command(
    app,
    "select",
    _SELECT_SPEC,
    checked(_SELECT_SPEC, _select),
    help="Top-K images per class among the images whose top-P holds the class.",
    load_yaml=lambda path: load_yaml(path),
)


def _materialize(config: Any) -> None:
    print_summary(run_flow(_flow("teacher", "materialize_flow"), config), "materialize")
    written.print_written(written.materialize(config.out))


_MATERIALIZE_SPEC = Spec(
    MaterializeConfig,
    positional={"selection": "selection.parquet written by cvpipe select"},
    aliases={"checkpoint": ["--model", "--checkpoint"]},
)
config_command(
    app,
    "materialize",
    _MATERIALIZE_SPEC,
    checked(_MATERIALIZE_SPEC, _materialize),
    help="Write the selected images as shards with their pseudo-labels and provenance.",
    load_yaml=lambda path: load_yaml(path),
)


def _anchors_build(config: Any) -> None:
    print_table(run_flow(_flow("anchors", "anchors_build_flow"), config), "anchors")
    written.print_written(written.anchors(config.out))


_ANCHORS_SPEC = Spec(
    AnchorsConfig,
    positional={"sources": "NAME=SHARDS, one per anchor dataset"},
    aliases={"checkpoint": ["--model", "--checkpoint"]},
)
config_command(
    anchors_app,
    "build",
    _ANCHORS_SPEC,
    checked(_ANCHORS_SPEC, _anchors_build),
    help="Summarize each NAME=SHARDS dataset as an anchor (one pass, merged partial sums).",
    load_yaml=lambda path: load_yaml(path),
)


def _label(config: Any) -> None:
    print_summary(run_flow(_flow("anchors", "label_flow"), config), f"labels ({config.method})")
    written.print_written(written.labels(config.out))


_LABEL_SPEC = Spec(
    LabelConfig,
    positional={"features": "folder or prefix of features Parquet"},
    aliases={"checkpoint": ["--model", "--checkpoint"], "ordered": ["--ordered/--unordered"]},
)
config_command(
    app,
    "label",
    _LABEL_SPEC,
    checked(_LABEL_SPEC, _label),
    help="Anchor-distance pseudo-labels for every image of a features set.",
    load_yaml=lambda path: load_yaml(path),
)


def _flow(module: str, name: str) -> Any:
    """A flow function, imported when a command runs (importing Prefect costs seconds)."""
    import importlib

    return getattr(importlib.import_module(f"flows.{module}"), name)


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    from cvpipe.core.storage import read_bytes

    try:
        raw = yaml.safe_load(read_bytes(path)) or {}
    except FileNotFoundError:
        fail(f"config file {path} does not exist")
    except yaml.YAMLError as e:
        fail(f"{path} is not valid YAML: {e}")
    if not isinstance(raw, dict):
        fail(f"{path} must hold a mapping of fields")
    return raw


def load_yaml_config(path: str, model: Any, **overrides: Any) -> Any:
    """A config model from a YAML file; a bad field is an error that names it."""
    raw = load_yaml(path)
    raw.pop("experiment", None)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(model, **raw)


def experiment_checks(config: Any, where: str) -> preflight.Checks:
    """An experiment config's preflight: its output root, the shards it names and the
    device of each of its training configs (named ``FILE: field``)."""
    checks = preflight.Checks()
    checks.add("outputs", f"{where}: root", config.root)
    for name in ("labeled", "unlabeled", "test", "anchors"):
        checks.add("inputs", f"{where}: {name}", getattr(config, name, None))
    for name, value in config:
        if isinstance(value, TrainConfig):
            checks.add("devices", f"{where}: {name}.device", value.device)
    return checks


def run_semi_supervised(config: Any, where: str) -> None:
    from flows.semi_supervised import semi_supervised_flow

    check(experiment_checks(config, where))
    result = run_flow(semi_supervised_flow, config)
    typer.echo("")
    typer.echo(result["markdown"])
    written.print_written(written.semi_supervised(config.root), "semi-supervised: written")


EXPERIMENTS = ("semi_supervised", "anchor_transfer", "weak_teacher")


@app.command()
def run(
    config: str = typer.Argument(..., help="experiment YAML (see flows/examples/)"),
    root: str = typer.Option(None, "--root", help="override the config's output root"),
) -> None:
    """Run an experiment from YAML: `experiment: semi_supervised` (the default;
    flows/examples/demo.yaml) or `experiment: anchor_transfer` (flows/examples/anchors.yaml)."""
    from cvpipe.experiments.config import AnchorTransferConfig, SemiSupervisedConfig

    raw = load_yaml(config)
    kind = raw.pop("experiment", "semi_supervised")
    if kind not in EXPERIMENTS:
        fail(f"{config}: experiment must be one of {EXPERIMENTS}, got {kind!r}")
    if root:
        raw["root"] = root
    if kind == "anchor_transfer":
        run_anchor_transfer(parse_config(AnchorTransferConfig, **raw), config)
    elif kind == "weak_teacher":
        run_weak_teacher(raw)
    else:
        run_semi_supervised(parse_config(SemiSupervisedConfig, **raw), config)


def run_anchor_transfer(config: Any, where: str) -> None:
    from flows.anchor_labels import anchor_transfer_flow

    check(experiment_checks(config, where))
    result = run_flow(anchor_transfer_flow, config)
    typer.echo("\nPseudo-label datasets\n\n" + result["pseudo_labels"])
    typer.echo(
        "\nTransfer: top-1 of each source fine-tuned on each target\n\n" + result["transfer"]
    )
    written.print_written(written.anchor_transfer(config.root), "anchor transfer: written")


def train_config(config: str | None, **fields: Any) -> Any:
    from cvpipe.learn.config import TrainConfig

    values = {k: v for k, v in fields.items() if v is not None}
    return (
        load_yaml_config(config, TrainConfig, **values)
        if config
        else parse_config(TrainConfig, **values)
    )


TRAIN_CONFIG = typer.Option(None, "--config", help="TrainConfig YAML; flags override it")
_KW = inspect.Parameter.KEYWORD_ONLY
_POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
_TRAIN_SPEC = Spec(
    TrainConfig,
    aliases={
        "freeze_stages": ["--freeze", "--freeze-stages"],
        "lr_multipliers": ["--lr-mult", "--lr-multipliers"],
        "new_head": ["--new-head/--keep-head"],
    },
)


_TRAIN_FLAGS = {
    "shards": ("--shards", "inputs"),
    "out": ("--out", "outputs"),
    "test": ("--test", "inputs"),
}


def _train(config: Any, shards: str, out: str, test: str | None) -> None:
    print_summary(run_flow(_flow("training", "train_flow"), config, shards, out, test), "train")
    written.print_written(written.train(out, bool(test)))


config_command(
    app,
    "train",
    _TRAIN_SPEC,
    checked(_TRAIN_SPEC, _train, _TRAIN_FLAGS),
    extra=[
        inspect.Parameter(
            "shards",
            _POS,
            annotation=str,
            default=typer.Argument(..., help="labeled training shards"),
        ),
        inspect.Parameter(
            "out",
            _KW,
            annotation=str,
            default=typer.Option(..., "--out", help="checkpoints, metrics and final.pt go here"),
        ),
        inspect.Parameter(
            "test",
            _KW,
            annotation=str | None,
            default=typer.Option(None, "--test", help="labeled test shards"),
        ),
    ],  # fmt: skip
    help="Train a classifier from scratch on shards (resumes after a crash).",
    load_yaml=lambda path: load_yaml(path),
)


def _finetune(config: Any, shards: str, init: str, out: str, test: str | None) -> None:
    from cvpipe.models import load_info

    if "arch" not in config.model_fields_set:  # the checkpoint's architecture by default
        config = parse_config(
            TrainConfig, **{**config.model_dump(exclude_unset=True), "arch": load_info(init).arch}
        )
    print_summary(
        run_flow(_flow("training", "train_flow"), config, shards, out, test, init), "finetune"
    )
    written.print_written(written.train(out, bool(test)))


config_command(
    app,
    "finetune",
    _TRAIN_SPEC,
    checked(_TRAIN_SPEC, _finetune, {**_TRAIN_FLAGS, "init": ("--from", "checkpoints")}),
    extra=[
        inspect.Parameter(
            "shards",
            _POS,
            annotation=str,
            default=typer.Argument(..., help="labeled shards of the target task"),
        ),
        inspect.Parameter(
            "init",
            _KW,
            annotation=str,
            default=typer.Option(..., "--from", help="the checkpoint to start from"),
        ),
        inspect.Parameter("out", _KW, annotation=str, default=typer.Option(..., "--out")),
        inspect.Parameter(
            "test",
            _KW,
            annotation=str | None,
            default=typer.Option(None, "--test", help="labeled test shards"),
        ),
    ],  # fmt: skip
    help="Fine-tune a checkpoint on new labels (head replaced for a new class set).",
    load_yaml=lambda path: load_yaml(path),
)


@app.command()
def chop(
    shards: str = typer.Argument(..., help="labeled shards of the target task"),
    init: str = typer.Option(..., "--from", help="the base model"),
    test: str = typer.Option(..., "--test", help="labeled shards to score each run on"),
    out: str = typer.Option(..., "--out", help="writes OUT/chop.{parquet,md,png}"),
    config: str = TRAIN_CONFIG,
    epochs: int = typer.Option(None, "--epochs"),
    lr: float = typer.Option(None, "--lr"),
    device: str = typer.Option(None, "--device"),
) -> None:
    """Retrain above layer n for n = 0..L, copied layers frozen vs fine-tuned."""
    from cvpipe.core.storage import read_bytes
    from cvpipe.models import load_info
    from flows.training import chop_flow

    check(
        preflight.Checks(
            inputs={"SHARDS": shards, "--test": test},
            checkpoints={"--from": init},
            outputs={"--out": out},
            devices={"--device": device} if device else {},
        )
    )
    cfg = train_config(config, arch=load_info(init).arch, epochs=epochs, lr=lr, device=device)
    urls = run_flow(chop_flow, init, cfg, shards, test, out)
    typer.echo(read_bytes(urls["markdown"]).decode())
    written.print_written(written.chop(urls))


@app.command()
def demo(
    out: str = typer.Option("demo", "--out", help="output folder of the demo"),
    seeds: int = typer.Option(None, "--seeds", help="run only the first N seeds"),
    anchors: bool = typer.Option(True, "--anchors/--no-anchors", help="the anchor part too"),
    weak: bool = typer.Option(True, "--weak/--no-weak", help="the weak-label part too"),
) -> None:
    """The demo on the bundled digits: the semi-supervised experiment
    (flows/examples/demo.yaml), then anchor pseudo-labels and their transfer table
    (flows/examples/anchors.yaml)."""
    from importlib.resources import files

    from cvpipe.core.storage import join
    from cvpipe.experiments.config import AnchorTransferConfig, SemiSupervisedConfig

    examples = files("flows") / "examples"
    config = load_yaml_config(
        str(examples / "demo.yaml"), SemiSupervisedConfig, root=join(out, "semi_supervised")
    )
    if seeds:
        config = config.model_copy(update={"seeds": config.seeds[:seeds]})
    run_semi_supervised(config, "demo.yaml")
    if anchors:
        run_anchor_transfer(
            load_yaml_config(
                str(examples / "anchors.yaml"), AnchorTransferConfig, root=join(out, "anchors")
            ),
            "anchors.yaml",
        )
    if weak:
        run_weak_demo(join(out, "weak"))


register_weak(app)  # vocab, train-weak, words (flows/cli_weak.py)


from flows.retry_rejects import retry_rejects  # noqa: E402 (commands in modules of their own)
from flows.verify import verify  # noqa: E402

app.command("retry-rejects")(retry_rejects)
app.command("verify")(verify)
# The index, dedup and siamese commands live in their own module.
from flows.cli_index import register as _register_index  # noqa: E402

_register_index(app)

# Detection commands live in their own module.
from flows import cli_detect  # noqa: E402

cli_detect.register(app, datasets_app)


def _command_name(args: list[str]) -> str:
    """``ingest`` or ``datasets-photos``: the command a line runs, for its log file."""
    words = [a for a in args if not a.startswith("-")][:2]
    groups = {"datasets", "anchors"}
    return "-".join(words if words and words[0] in groups else words[:1]) or "cvpipe"


# p2l, shallow, transfer (their own module; they use the helpers above when they run).
from flows import cli_transfer  # noqa: E402

cli_transfer.register(app)


def main() -> None:
    """The console script. The local Prefect API (when no PREFECT_API_URL is set) starts
    once the command's input has passed its preflight, in the background while the flow
    is imported; bad input never waits for it."""
    global _owns_api
    from flows import local_api

    args = terminal.hoist_global_flags(sys.argv[1:])
    wants_help = not args or any(a in ("--help", "-h") for a in args)
    try:
        if wants_help:
            app(args=args)
        else:
            terminal.use_cli_prefect_logging()
            local_api.log_server_output_to(terminal.plan_log(_command_name(args)))
            _owns_api = True
            try:
                with local_api.owned_api(start=False):  # stopped (and reaped) at the end
                    app(args=args)
            finally:  # Prefect's last lines (at the API's stop) still go to the log file
                terminal.stop()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
