"""Detection commands of the ``cvpipe`` CLI (registered by flows/cli.py):

    cvpipe datasets canvases OUT ...                      digits on photo canvases, ingested
    cvpipe detect train SHARDS --out OUT [--config detect.yaml]
    cvpipe detect eval CKPT --shards SHARDS [--out OUT]
    cvpipe detect label CKPT --shards SHARDS --out OUT [--threshold 0.7]
    cvpipe detect study --config STUDY.yaml               the teacher-student loop, 3 seeds
    cvpipe localize train SHARDS --out OUT | cvpipe localize eval CKPT --shards SHARDS

Config-backed commands take every field of their model as a flag (flows/cli_models.py).
"""

from __future__ import annotations

import json
from typing import Any

import typer

from cvpipe.data.config import CanvasesConfig
from cvpipe.label.config import PseudoBoxConfig
from cvpipe.learn.detect import NOT_FOR_DETECTION, DetectTrainConfig
from flows.cli_models import Spec, config_command

detect_app = typer.Typer(help="Faster R-CNN detectors on boxed shards, and pseudo-boxes.")
datasets_app = typer.Typer()  # the commands added to ``cvpipe datasets`` by :func:`register`


def register(app: typer.Typer, datasets: typer.Typer) -> None:
    """Add ``detect`` (and ``localize``) to the CLI, and ``canvases`` to its datasets."""
    app.add_typer(detect_app, name="detect")
    app.add_typer(localize_app, name="localize")
    for command in datasets_app.registered_commands:
        datasets.registered_commands.append(command)


def _cli() -> Any:
    # flows.cli imports this module; its helpers are reached when a command runs.
    from flows import cli

    return cli


def load_yaml(path: str) -> dict[str, Any]:
    return _cli().load_yaml(path)


def run_flow(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return _cli().run_flow(fn, *args, **kwargs)


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    _cli().print_table(rows, title)


def print_summary(summary: dict[str, Any], title: str) -> None:
    _cli().print_summary(summary, title)


def fail(message: str) -> None:
    _cli().fail(message)


def checked(spec: Spec, run: Any, **how: Any) -> Any:
    """flows.cli.checked (the preflight, then ``run``), found when the command runs."""
    return lambda config, **values: _cli().checked(spec, run, **how)(config, **values)


def _eval_inputs(checkpoint: str, shards: str, out: str, device: str) -> list[str]:
    """The preflight of an eval command, then its shard URLs, before the Prefect API
    starts; each problem is one error line."""
    from cvpipe.core import storage
    from flows import preflight

    def shard_urls() -> list[str]:
        try:
            return storage.expand_urls(shards, ".tar")
        except (OSError, ValueError) as e:  # e.g. a folder with no .tar files in it
            fix = "give .tar shards: a file, a folder of them or a {a..b} pattern"
            raise preflight.PreflightError("--shards", shards, str(e), fix) from None

    checks = preflight.Checks(
        inputs={"--shards": shards},
        checkpoints={"CHECKPOINT": checkpoint},
        outputs={"--out": out},
        devices={"--device": device},
    )
    return _cli().check(checks, then=shard_urls)


def _canvases(config: CanvasesConfig) -> None:
    from flows.datasets import canvases_flow

    summaries = run_flow(canvases_flow, config)
    rows = [{"split": k, **{m: s.get(m) for m in ("shards", "written", "rejected")}}
            for k, s in summaries.items()]  # fmt: skip
    print_table(rows, f"canvases -> {config.out}/shards")


_CANVASES_SPEC = Spec(
    CanvasesConfig, positional={"out": "output root: canvases/ and shards/<split>/"}
)
config_command(
    datasets_app,
    "canvases",
    _CANVASES_SPEC,
    checked(_CANVASES_SPEC, _canvases),
    help="Real digit scans on real photo canvases with exact boxes (labeled, unlabeled, "
    "test), ingested into OUT/shards/<split>/canvases-NNNNNN.tar.",
    load_yaml=load_yaml,
)


def _detect_train(config: DetectTrainConfig) -> None:
    from flows.detection import detect_train_flow

    print_summary(run_flow(detect_train_flow, config), "detect train")


_DETECT_TRAIN_SPEC = Spec(
    DetectTrainConfig,
    positional={"shards": "boxed training shards"},
    exclude=NOT_FOR_DETECTION | {"boxes_field"},
)
config_command(
    detect_app,
    "train",
    _DETECT_TRAIN_SPEC,
    checked(
        _DETECT_TRAIN_SPEC,
        _detect_train,
        fields={"val": "inputs", "test": "inputs", "init": "checkpoints"},
    ),
    help="Train a Faster R-CNN on boxed shards (resumes after a crash).",
    load_yaml=load_yaml,
)


@detect_app.command("eval")
def detect_eval(
    checkpoint: str = typer.Argument(..., help="a detection checkpoint (final.pt)"),
    shards: str = typer.Option(..., "--shards", help="boxed shards to score on"),
    out: str = typer.Option(None, "--out", help="default: the checkpoint's folder/eval"),
    split: str = typer.Option("test", "--split", help="names the output files"),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """mAP@[.5:.95], mAP@.5, per-class AP and a PNG of boxes (torchmetrics)."""
    from cvpipe.core import storage

    if out is None:
        out = storage.join(checkpoint.rsplit("/", 1)[0] if "/" in checkpoint else ".", "eval")
    urls = _eval_inputs(checkpoint, shards, out, device)
    from cvpipe.learn.detect_eval import DetectEvalJob
    from flows.detection import detect_eval_flow

    job = DetectEvalJob(checkpoint=checkpoint, shards=urls, out=out, split=split,
                        batch_size=batch_size, device=device)  # fmt: skip
    res = run_flow(detect_eval_flow, job)
    print_table([res.row(split)], f"detect eval {checkpoint}")
    print_table(res.per_class, "per-class AP")
    typer.echo(f"tables and {res.urls.get('png')} in {out}")


_LABEL_SPEC = Spec(PseudoBoxConfig, positional={"checkpoint": "the detection checkpoint (teacher)"})
config_command(
    detect_app,
    "label",
    _LABEL_SPEC,
    checked(
        _LABEL_SPEC,
        lambda config: print_summary(run_flow(_flow("detect_label_flow"), config), "pseudo-boxes"),
    ),
    help="Pseudo-boxes: a detector over unlabeled shards, boxes above a threshold after NMS.",
    load_yaml=load_yaml,
)


@detect_app.command("study")
def detect_study(
    config: str = typer.Option(..., "--config", help="study YAML (flows/examples/)"),
    root: str = typer.Option(None, "--root", help="override the config's output root"),
) -> None:
    """The detection teacher-student loop (STAC-like) over seeds: table + PNG."""
    from pydantic import ValidationError

    from cvpipe.experiments.config import DetectionStudyConfig

    raw = load_yaml(config)
    if root:
        raw["root"] = root
    try:
        cfg = DetectionStudyConfig(**raw)
    except ValidationError as e:
        fail(str(e))
    cli = _cli()
    checks = cli.experiment_checks(cfg, config)
    checks.add("checkpoints", f"{config}: backbone", cfg.backbone)
    if root:
        checks.outputs = {"--root": cfg.root}
    cli.check(checks)
    result = run_flow(_flow("detection_flow"), cfg)
    typer.echo(result["markdown"])
    typer.echo(json.dumps({k: result[k] for k in ("parquet", "md", "png")}))


def _flow(name: str) -> Any:
    import importlib

    return getattr(importlib.import_module("flows.detection"), name)


# --------------------------------------------------------------------------- localize

localize_app = typer.Typer(help="Object localization: a classifier with a box head.")


def _localize_train(config: Any) -> None:
    from flows.detection import localize_train_flow

    print_summary(run_flow(localize_train_flow, config), "localize train")


def _register_localize() -> None:
    from cvpipe.learn.localize import NOT_FOR_LOCALIZATION, LocalizeTrainConfig

    spec = Spec(
        LocalizeTrainConfig,
        positional={"shards": "single-object boxed shards"},
        exclude=NOT_FOR_LOCALIZATION,
    )
    config_command(
        localize_app,
        "train",
        spec,
        checked(spec, _localize_train, fields={"test": "inputs", "init": "checkpoints"}),
        help="Train a localizer (class + one box) on single-object shards.",
        load_yaml=load_yaml,
    )


_register_localize()


@localize_app.command("eval")
def localize_eval(
    checkpoint: str = typer.Argument(..., help="a localization checkpoint (final.pt)"),
    shards: str = typer.Option(..., "--shards", help="single-object boxed shards"),
    out: str = typer.Option(None, "--out", help="default: the checkpoint's folder/eval"),
    split: str = typer.Option("test", "--split"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Top-1, mean IoU, the IoU >= 0.5 rate and both right, of a localizer."""
    from cvpipe.core import storage

    if out is None:
        out = storage.join(checkpoint.rsplit("/", 1)[0] if "/" in checkpoint else ".", "eval")
    urls = _eval_inputs(checkpoint, shards, out, device)
    from flows.detection import localize_eval_flow

    row = run_flow(localize_eval_flow, checkpoint, urls, out, split, device)
    print_table([row], f"localize eval {checkpoint}")
