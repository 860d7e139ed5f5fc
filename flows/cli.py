"""The ``cvpipe`` command line. Every command runs a Prefect flow, so every run shows in
the Prefect UI (the local SQLite-backed API by default, or PREFECT_API_URL's server)."""

from __future__ import annotations

import datetime
import inspect
import json
import os
import sys
from typing import Any

# The embedded Prefect API would otherwise try to send telemetry off this machine.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import typer
from pydantic import ValidationError

from cvpipe.data.config import IngestConfig
from cvpipe.infer.config import InferConfig
from cvpipe.label.config import AnchorsConfig, LabelConfig, MaterializeConfig, SelectConfig
from cvpipe.learn.config import TrainConfig
from flows.cli_models import Spec, config_command

app = typer.Typer(
    help="cvpipe: web-scale images in, labeled data and trained models out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
datasets_app = typer.Typer(help="Export real datasets that ship inside installed packages.")
app.add_typer(datasets_app, name="datasets")
anchors_app = typer.Typer(help="Named anchor datasets in a reference model's feature space.")
app.add_typer(anchors_app, name="anchors")


RUNNER = typer.Option(
    "threads", "--runner", help="threads | dask | dask://HOST:PORT | ray | ray://HOST:PORT"
)
WORKERS = typer.Option(None, "--workers", help="parallel task runs (threads, dask or ray workers)")


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def run_flow(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a flow; turn bad input into a one-line error instead of a traceback."""
    from flows import local_api

    try:
        with local_api.api():
            return fn(*args, **kwargs)
    except ValidationError as e:
        fail(str(e))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        cause = e.__cause__ if isinstance(e, RuntimeError) and e.__cause__ else e
        fail(f"{type(cause).__name__}: {cause}")


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
    seed: int = typer.Option(0, help="seed of the split"),
) -> None:
    """scikit-learn's 1,797 real handwritten digits as an image-folder tree."""
    from flows.datasets import export_digits_flow

    counts = run_flow(export_digits_flow, out, size=size, split=split, seed=seed)
    typer.echo(json.dumps(counts))


@datasets_app.command("photos")
def datasets_photos(
    out: str = typer.Argument(..., help="output folder"),
    count: int = typer.Option(1000, help="number of crops"),
    size: int = typer.Option(256, help="crop side in pixels"),
    seed: int = typer.Option(0),
) -> None:
    """Random JPEG crops of the two real photographs scikit-learn ships."""
    from flows.datasets import export_photos_flow

    typer.echo(run_flow(export_photos_flow, out, count=count, size=size, seed=seed))


def _ingest(config: Any, runner: str, workers: int | None) -> None:
    from flows.ingest import ingest_flow
    from flows.runners import with_runner

    summary = run_flow(with_runner(ingest_flow, runner, workers), config)
    print_summary(summary, f"ingest {config.partition}")


config_command(
    app,
    "ingest",
    Spec(
        IngestConfig,
        positional={"source": "image folder tree or manifest (.parquet/.jsonl/.csv)"},
        aliases={"root": ["--out", "--root"]},
    ),
    _ingest,
    extra=[
        inspect.Parameter("runner", inspect.Parameter.KEYWORD_ONLY, default=RUNNER, annotation=str),
        inspect.Parameter(
            "workers", inspect.Parameter.KEYWORD_ONLY, default=WORKERS, annotation=int | None
        ),  # fmt: skip
    ],
    help="Ingest images into WebDataset shards {out}/shards/{partition}/{name}-NNNNNN.tar.",
    load_yaml=lambda path: load_yaml(path),
)


@app.command()
def backfill(
    source_pattern: str = typer.Argument(..., help="source URL with {partition}, per day"),
    out: str = typer.Option(..., "--out", help="output root"),
    start: datetime.datetime = typer.Option(..., "--start", formats=["%Y-%m-%d"]),
    end: datetime.datetime = typer.Option(..., "--end", formats=["%Y-%m-%d"]),
    shard_size: int = typer.Option(10_000, "--shard-size"),
    name: str = typer.Option("shard", "--name"),
) -> None:
    """Ingest every daily partition from --start to --end (inclusive); skips done work."""
    from flows.backfill import backfill_flow

    summaries = run_flow(
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
    print_table(rows, "backfill")


def parse_config(model: Any, **fields: Any) -> Any:
    """Build a config model from CLI values; a bad value is an error naming its field."""
    try:
        return model(**fields)
    except ValidationError as e:
        fail(str(e))


config_command(
    app,
    "infer",
    Spec(
        InferConfig,
        positional={"shards": "shard URL, folder or prefix of shards, or {a..b}"},
        aliases={"checkpoint": ["--model", "--checkpoint"]},
    ),
    lambda config: print_summary(run_flow(_flow("teacher", "infer_flow"), config), "infer"),
    help="Teacher inference: top-P classes and scores (and embeddings) per image.",
    load_yaml=lambda path: load_yaml(path),
)


def _select(config: Any) -> None:
    report = run_flow(_flow("teacher", "select_flow"), config)
    print_summary({k: v for k, v in report.items() if not isinstance(v, list)}, "selection")
    typer.echo(f"selection: {config.out}")


config_command(
    app,
    "select",
    Spec(SelectConfig, positional={"predictions": "folder or prefix of predictions Parquet"}),
    _select,
    help="Top-K images per class among the images whose top-P holds the class.",
    load_yaml=lambda path: load_yaml(path),
)

config_command(
    app,
    "materialize",
    Spec(
        MaterializeConfig,
        positional={"selection": "selection.parquet written by cvpipe select"},
        aliases={"checkpoint": ["--model", "--checkpoint"]},
    ),
    lambda config: print_summary(
        run_flow(_flow("teacher", "materialize_flow"), config), "materialize"
    ),
    help="Write the selected images as shards with their pseudo-labels and provenance.",
    load_yaml=lambda path: load_yaml(path),
)

config_command(
    anchors_app,
    "build",
    Spec(
        AnchorsConfig,
        positional={"sources": "NAME=SHARDS, one per anchor dataset"},
        aliases={"checkpoint": ["--model", "--checkpoint"]},
    ),
    lambda config: print_table(run_flow(_flow("anchors", "anchors_build_flow"), config), "anchors"),
    help="Summarize each NAME=SHARDS dataset as an anchor (one pass, merged partial sums).",
    load_yaml=lambda path: load_yaml(path),
)

config_command(
    app,
    "label",
    Spec(
        LabelConfig,
        positional={"features": "folder or prefix of features Parquet"},
        aliases={"checkpoint": ["--model", "--checkpoint"], "ordered": ["--ordered/--unordered"]},
    ),
    lambda config: print_summary(
        run_flow(_flow("anchors", "label_flow"), config), f"labels ({config.method})"
    ),
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


def run_semi_supervised(config: Any) -> None:
    from flows.semi_supervised import semi_supervised_flow

    result = run_flow(semi_supervised_flow, config)
    typer.echo("")
    typer.echo(result["markdown"])
    typer.echo(f"results: {config.root}/results.parquet, {config.root}/results.md")


EXPERIMENTS = ("semi_supervised", "anchor_transfer")


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
        run_anchor_transfer(parse_config(AnchorTransferConfig, **raw))
    else:
        run_semi_supervised(parse_config(SemiSupervisedConfig, **raw))


def run_anchor_transfer(config: Any) -> None:
    from flows.anchor_labels import anchor_transfer_flow

    result = run_flow(anchor_transfer_flow, config)
    typer.echo("\nPseudo-label datasets\n\n" + result["pseudo_labels"])
    typer.echo(
        "\nTransfer: top-1 of each source fine-tuned on each target\n\n" + result["transfer"]
    )


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


def _train(config: Any, shards: str, out: str, test: str | None) -> None:
    print_summary(run_flow(_flow("training", "train_flow"), config, shards, out, test), "train")


config_command(
    app,
    "train",
    _TRAIN_SPEC,
    _train,
    extra=[
        inspect.Parameter(
            "shards",
            _KW,
            annotation=str,
            default=typer.Option(..., "--shards", help="labeled training shards"),
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


config_command(
    app,
    "finetune",
    _TRAIN_SPEC,
    _finetune,
    extra=[
        inspect.Parameter(
            "shards",
            _KW,
            annotation=str,
            default=typer.Option(..., "--shards", help="labeled shards of the target task"),
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

    cfg = train_config(config, arch=load_info(init).arch, epochs=epochs, lr=lr, device=device)
    urls = run_flow(chop_flow, init, cfg, shards, test, out)
    typer.echo(read_bytes(urls["markdown"]).decode())


@app.command()
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
    """The whole DAG for one partition: ingest -> teacher -> inference -> top-K selection
    -> materialize -> student -> fine-tuning; committed work is skipped."""
    from flows.pipeline_config import PipelineConfig

    cfg = load_yaml_config(config, PipelineConfig, partition=partition, root=root)
    wanted = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    flow = _flow("pipeline", "pipeline_flow")
    from flows.runners import with_runner

    result = run_flow(with_runner(flow, runner, workers), cfg, wanted)
    typer.echo("")
    typer.echo(storage_read_text(result["report"]))
    typer.echo(f"report: {result['report']}")


def storage_read_text(url: str) -> str:
    from cvpipe.core.storage import read_bytes

    return read_bytes(url).decode()


@app.command()
def demo(
    out: str = typer.Option("demo", "--out", help="output folder of the demo"),
    seeds: int = typer.Option(None, "--seeds", help="run only the first N seeds"),
    anchors: bool = typer.Option(True, "--anchors/--no-anchors", help="the anchor part too"),
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
    run_semi_supervised(config)
    if anchors:
        run_anchor_transfer(
            load_yaml_config(
                str(examples / "anchors.yaml"), AnchorTransferConfig, root=join(out, "anchors")
            )
        )


from flows.retry_rejects import retry_rejects  # noqa: E402 (commands in modules of their own)
from flows.verify import verify  # noqa: E402

app.command("retry-rejects")(retry_rejects)
app.command("verify")(verify)


# p2l, shallow, transfer (their own module; they use the helpers above when they run).
from flows import cli_transfer  # noqa: E402

cli_transfer.register(app)


def main() -> None:
    from flows import local_api

    wants_help = len(sys.argv) < 2 or any(a in ("--help", "-h") for a in sys.argv[1:])
    try:
        if wants_help:
            app()
        else:
            with local_api.owned_api():  # started now, ready when the first flow runs
                app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
