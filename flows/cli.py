"""The ``cvpipe`` command line. Every command runs a Prefect flow, so every run shows in
the Prefect UI (the local SQLite-backed API by default, or PREFECT_API_URL's server)."""

from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Any

# The embedded Prefect API would otherwise try to send telemetry off this machine.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import typer
from pydantic import ValidationError

from cvpipe.data.images import DEFAULT_MAX_PIXELS
from flows.cli_weak import register as register_weak

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
    "threads", "--runner", help="threads | dask (a LocalCluster) | dask://HOST:PORT"
)
WORKERS = typer.Option(None, "--workers", help="parallel task runs (threads or dask workers)")


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def run_flow(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a flow; turn bad input into a one-line error instead of a traceback."""
    try:
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
    seed: int = typer.Option(0, help="seed of the split (and of the captions)"),
    captions: bool = typer.Option(False, "--captions", help="also SYNTHETIC caption manifests"),
    caption_q: float = typer.Option(0.6, "--caption-q", help="P(a caption names the digit)"),
) -> None:
    """scikit-learn's 1,797 real handwritten digits as an image-folder tree."""
    from flows.datasets import export_digits_flow

    counts = run_flow(
        export_digits_flow, out, size=size, split=split, seed=seed, captions=captions,
        caption_q=caption_q,
    )  # fmt: skip
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


@app.command()
def ingest(
    src: str = typer.Argument(..., help="image folder tree or manifest (.parquet/.jsonl/.csv)"),
    out: str = typer.Option(..., "--out", help="output root (local path or fsspec URL)"),
    partition: str = typer.Option(..., "--partition", help="partition name, e.g. 2026-11-25"),
    shard_size: int = typer.Option(10_000, "--shard-size", help="samples per shard"),
    name: str = typer.Option("shard", "--name", help="shard file name prefix"),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", help="pixel cap"),
    runner: str = RUNNER,
    workers: int = WORKERS,
) -> None:
    """Ingest images into WebDataset shards {out}/shards/{partition}/{name}-NNNNNN.tar."""
    from cvpipe.data.config import IngestConfig
    from flows.ingest import ingest_flow
    from flows.runners import with_runner

    config = parse_config(
        IngestConfig,
        source=src,
        root=out,
        partition=partition,
        name=name,
        shard_size=shard_size,
        max_pixels=max_pixels,
    )
    summary = run_flow(with_runner(ingest_flow, runner, workers), config)
    print_summary(summary, f"ingest {partition}")


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


@app.command()
def infer(
    shards: str = typer.Argument(..., help="shard URL, folder or prefix of shards, or {a..b}"),
    model: str = typer.Option(..., "--model", help="teacher checkpoint NAME.pt"),
    out: str = typer.Option(..., "--out", help="writes OUT/predictions/<shard>.parquet"),
    top_p: int = typer.Option(5, "--top-p", help="classes kept per image"),
    features: bool = typer.Option(False, "--features", help="also write OUT/features/"),
    batch_size: int = typer.Option(256, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    num_workers: int = typer.Option(2, "--num-workers", help="DataLoader workers"),
    shards_per_unit: int = typer.Option(4, "--shards-per-unit", help="shards per task run"),
) -> None:
    """Teacher inference: top-P classes and scores (and embeddings) per image."""
    from cvpipe.infer.config import InferConfig
    from flows.teacher import infer_flow

    config = parse_config(
        InferConfig,
        shards=shards,
        checkpoint=model,
        out=out,
        top_p=top_p,
        features=features,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        shards_per_unit=shards_per_unit,
    )
    print_summary(run_flow(infer_flow, config), "infer")


@app.command()
def select(
    predictions: str = typer.Argument(..., help="folder or prefix of predictions Parquet"),
    top_p: int = typer.Option(..., "--top-p", help="classes of each image's top-P considered"),
    top_k: int = typer.Option(..., "--top-k", help="images kept per class"),
    out: str = typer.Option(..., "--out", help="writes OUT/selection.parquet and a report"),
    fan_in: int = typer.Option(16, "--fan-in", help="partials merged per reduce task"),
) -> None:
    """Top-K images per class among the images whose top-P holds the class."""
    from cvpipe.label.config import SelectConfig
    from flows.teacher import select_flow

    config = parse_config(
        SelectConfig, predictions=predictions, out=out, top_p=top_p, top_k=top_k, fan_in=fan_in
    )
    report = run_flow(select_flow, config)
    print_summary({k: v for k, v in report.items() if not isinstance(v, list)}, "selection")
    typer.echo(f"selection: {out}")


@app.command()
def materialize(
    selection: str = typer.Argument(..., help="selection.parquet written by cvpipe select"),
    shards: str = typer.Option(..., "--shards", help="the shards the predictions came from"),
    out: str = typer.Option(..., "--out", help="writes OUT/shards/<partition>/<stem>.tar"),
    model: str = typer.Option(None, "--model", help="teacher checkpoint, to check provenance"),
) -> None:
    """Write the selected images as shards with their pseudo-labels and provenance."""
    from cvpipe.label.config import MaterializeConfig
    from flows.teacher import materialize_flow

    config = parse_config(
        MaterializeConfig, selection=selection, shards=shards, out=out, checkpoint=model
    )
    print_summary(run_flow(materialize_flow, config), "materialize")


@anchors_app.command("build")
def anchors_build(
    sources: list[str] = typer.Argument(..., help="NAME=SHARDS, one per anchor dataset"),
    model: str = typer.Option(..., "--model", help="the reference model checkpoint"),
    out: str = typer.Option(..., "--out", help="the anchors Parquet to write"),
    kind: str = typer.Option("mean", "--kind", help="mean | normalized | softmax"),
    device: str = typer.Option("auto", "--device"),
    batch_size: int = typer.Option(256, "--batch-size"),
) -> None:
    """Summarize each NAME=SHARDS dataset as an anchor (one pass, merged partial sums)."""
    from cvpipe.label.config import AnchorsConfig
    from flows.anchors import anchors_build_flow

    pairs = [s.split("=", 1) for s in sources]
    if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        fail(f"anchor sources must be NAME=SHARDS, got {sources}")
    if len({p[0] for p in pairs}) != len(pairs):
        fail("anchor names must be unique")
    config = parse_config(
        AnchorsConfig,
        sources=dict(pairs),
        checkpoint=model,
        out=out,
        kind=kind,
        device=device,
        batch_size=batch_size,
    )
    print_table(run_flow(anchors_build_flow, config), "anchors")


@app.command()
def label(
    features: str = typer.Argument(..., help="folder or prefix of features Parquet"),
    anchors: str = typer.Option(..., "--anchors", help="the anchors Parquet"),
    method: str = typer.Option(..., "--method", help="nearest | cfa | uniform | random | vanilla"),
    n: int = typer.Option(1, "--n", help="Nearest-N"),
    metric: str = typer.Option("cosine", "--metric", help="cosine | l2 | kl"),
    out: str = typer.Option(..., "--out", help="writes OUT/<shard>.parquet"),
    unordered: bool = typer.Option(False, "--unordered", help="Nearest-N as a set"),
    n_labels: int = typer.Option(None, "--n-labels", help="uniform/random: labels wanted"),
    truth: str = typer.Option(None, "--truth", help="vanilla: ingest root with index/"),
    model: str = typer.Option(None, "--model", help="reference model, for softmax anchors"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Anchor-distance pseudo-labels for every image of a features set."""
    from cvpipe.label.config import LabelConfig
    from flows.anchors import label_flow

    config = parse_config(
        LabelConfig,
        features=features,
        anchors=anchors,
        out=out,
        method=method,
        n=n,
        metric=metric,
        ordered=not unordered,
        n_labels=n_labels,
        truth=truth,
        checkpoint=model,
        seed=seed,
    )
    print_summary(run_flow(label_flow, config), f"labels ({method})")


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


def parse_multipliers(items: list[str] | None) -> dict[str, float] | None:
    if not items:
        return None
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            fail(f"--lr-mult takes STAGE=FACTOR, got {item!r}")
    return out


TRAIN_CONFIG = typer.Option(None, "--config", help="TrainConfig YAML; flags override it")


@app.command()
def train(
    shards: str = typer.Argument(..., help="labeled training shards"),
    out: str = typer.Option(..., "--out", help="checkpoints, metrics and final.pt go here"),
    config: str = TRAIN_CONFIG,
    arch: str = typer.Option(None, "--arch"),
    epochs: int = typer.Option(None, "--epochs"),
    batch_size: int = typer.Option(None, "--batch-size"),
    lr: float = typer.Option(None, "--lr"),
    input_size: int = typer.Option(None, "--input-size"),
    seed: int = typer.Option(None, "--seed"),
    device: str = typer.Option(None, "--device"),
    test: str = typer.Option(None, "--test", help="labeled shards to evaluate on"),
) -> None:
    """Train a classifier from scratch on shards (resumes after a crash)."""
    from flows.training import train_flow

    cfg = train_config(
        config,
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        input_size=input_size,
        seed=seed,
        device=device,
    )
    print_summary(run_flow(train_flow, cfg, shards, out, test), "train")


@app.command()
def finetune(
    shards: str = typer.Argument(..., help="labeled shards of the target task"),
    init: str = typer.Option(..., "--from", help="the checkpoint to start from"),
    out: str = typer.Option(..., "--out"),
    config: str = TRAIN_CONFIG,
    freeze: int = typer.Option(None, "--freeze", help="freeze the first N named stages"),
    copy_stages: int = typer.Option(None, "--copy-stages", help="copy only the first N"),
    lr_mult: list[str] = typer.Option(None, "--lr-mult", help="STAGE=FACTOR, repeatable"),
    new_head: bool = typer.Option(None, "--new-head/--keep-head"),
    arch: str = typer.Option(None, "--arch"),
    epochs: int = typer.Option(None, "--epochs"),
    lr: float = typer.Option(None, "--lr"),
    input_size: int = typer.Option(None, "--input-size"),
    seed: int = typer.Option(None, "--seed"),
    device: str = typer.Option(None, "--device"),
    test: str = typer.Option(None, "--test", help="labeled shards to evaluate on"),
) -> None:
    """Fine-tune a checkpoint on new labels (head replaced for a new class set)."""
    from cvpipe.models import load_info
    from flows.training import train_flow

    cfg = train_config(
        config,
        arch=arch or load_info(init).arch,
        epochs=epochs,
        lr=lr,
        input_size=input_size,
        seed=seed,
        device=device,
        freeze_stages=freeze,
        copy_stages=copy_stages,
        lr_multipliers=parse_multipliers(lr_mult),
        new_head=new_head,
    )
    print_summary(run_flow(train_flow, cfg, shards, out, test, init), "finetune")


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


register_weak(app)  # vocab, train-weak, words (flows/cli_weak.py)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
