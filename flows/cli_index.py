"""The index and Siamese commands of ``cvpipe`` (registered by flows/cli.py):

    cvpipe index build EMBEDDINGS --out INDEX [--kind auto|flat|ivf|ivfpq] [--memory 4G]
    cvpipe index add INDEX EMBEDDINGS
    cvpipe index query INDEX (--image PATH --model CKPT | --key KEY) -k 10 [--sheet PNG --shards S]
    cvpipe index query INDEX --embeddings EMBEDDINGS -k 10 --out NEIGHBORS.parquet
    cvpipe dedup INDEX --threshold T --out DUPLICATES.parquet [--embeddings EMBEDDINGS]
    cvpipe siamese train SHARDS --labels LABELS --out OUT [--config siamese.yaml]
    cvpipe siamese run siamese.yaml     (train -> embed -> index -> evaluate)

Batch commands run flows; a query of one key or image answers in-process (an answer in
a second, not after a Prefect API start).
"""

from __future__ import annotations

from typing import Any

import typer

from cvpipe.index.config import DedupConfig, IndexAddConfig, IndexBuildConfig, QueryConfig
from cvpipe.learn.siamese import SiameseTrainConfig
from flows.cli_models import Spec, config_command

index_app = typer.Typer(help="A FAISS index of embeddings: build, add a partition, query.")
siamese_app = typer.Typer(help="Siamese embeddings trained on pairs mined from labels.")


def _cli() -> Any:
    import flows.cli as cli  # the shared helpers (errors, tables, YAML), imported lazily

    return cli


def _yaml(path: str) -> dict[str, Any]:
    return _cli().load_yaml(path)


def _checked(spec: Spec, run: Any, **how: Any) -> Any:
    """flows.cli.checked (the preflight, then ``run``), found when the command runs."""
    return lambda config, **values: _cli().checked(spec, run, **how)(config, **values)


def _summary(flow_name: str, title: str) -> Any:
    def run(config: Any) -> None:
        import flows.index as index_flows

        cli = _cli()
        cli.print_summary(cli.run_flow(getattr(index_flows, flow_name), config), title)

    return run


_BUILD_SPEC = Spec(
    IndexBuildConfig, positional={"embeddings": "features Parquet: folder, prefix or file"}
)
config_command(
    index_app,
    "build",
    _BUILD_SPEC,
    _checked(
        _BUILD_SPEC, _summary("index_build_flow", "index build"), fields={"embeddings": "inputs"}
    ),
    help="Build a FAISS index of every vector, chosen by size and memory budget.",
    load_yaml=_yaml,
)

_ADD_SPEC = Spec(
    IndexAddConfig,
    positional={"index": "the index folder", "embeddings": "features Parquet to add"},
)
config_command(
    index_app,
    "add",
    _ADD_SPEC,
    _checked(
        _ADD_SPEC,
        _summary("index_add_flow", "index add"),
        fields={"index": "inputs", "embeddings": "inputs"},
    ),
    help="Add new embeddings (e.g. a new partition) to a built index, without a rebuild.",
    load_yaml=_yaml,
)


@index_app.command("query")
def index_query(
    index: str = typer.Argument(..., help="the index folder"),
    key: str = typer.Option(None, "--key", help="an indexed key"),
    image: str = typer.Option(None, "--image", help="an image file (needs --model)"),
    model: str = typer.Option(None, "--model", help="the checkpoint the index's vectors came from"),
    embeddings: str = typer.Option(None, "--embeddings", help="query every vector of these"),
    out: str = typer.Option(None, "--out", help="with --embeddings: NEIGHBORS.parquet"),
    k: int = typer.Option(10, "-k", "--k", help="neighbours per query (the query excluded)"),
    nprobe: int = typer.Option(None, "--nprobe", help="default: the index's tuned nprobe"),
    sheet: str = typer.Option(None, "--sheet", help="write a PNG contact sheet here"),
    shards: str = typer.Option(None, "--shards", help="the indexed shards (for --sheet)"),
    threads: int = typer.Option(None, "--threads", help="FAISS threads"),
) -> None:
    """Neighbours of a key, an image, or every vector of an embeddings set."""
    cli = _cli()
    if sum(x is not None for x in (key, image, embeddings)) != 1:
        cli.fail("give exactly one of --key, --image (with --model), --embeddings")
    if embeddings is not None:
        if out is None:
            cli.fail("--embeddings needs --out NEIGHBORS.parquet")
        config = cli.parse_config(QueryConfig, index=index, embeddings=embeddings, out=out, k=k,
                                  nprobe=nprobe, threads=threads)  # fmt: skip
        from flows import preflight

        cli.check(preflight.Checks(inputs={"INDEX": index, "--embeddings": embeddings},
                                   outputs={"--out": out}))  # fmt: skip
        _summary("index_query_flow", "index query")(config)
        return
    if image is not None and model is None:
        cli.fail("--image needs --model (the checkpoint that made the index's vectors)")
    if sheet is not None and shards is None:
        cli.fail("--sheet needs --shards (where the neighbours' images are)")
    from flows import preflight

    checks = preflight.Checks()
    for kind, flag, value in (("inputs", "INDEX", index), ("inputs", "--image", image),
                              ("inputs", "--shards", shards), ("checkpoints", "--model", model),
                              ("outputs", "--sheet", sheet)):  # fmt: skip
        checks.add(kind, flag, value)
    cli.check(checks)
    hits, picture = cli.run_flow(_single_query, index, key, image, model, k, nprobe, threads)
    cli.print_table(
        [{"rank": h.rank, "key": h.key, "shard": h.shard, "distance": f"{h.distance:.4f}"}
         for h in hits], f"{k} nearest of {key or image}",
    )  # fmt: skip
    if sheet is not None:
        from cvpipe.index.query import contact_sheet

        typer.echo(f"contact sheet: {cli.run_flow(contact_sheet, hits, shards, sheet, picture)}")


def _single_query(
    index: str, key: str | None, image: str | None, model: str | None, k: int,
    nprobe: int | None, threads: int | None,
) -> tuple[list, Any]:  # fmt: skip
    from cvpipe.core.storage import read_bytes
    from cvpipe.data import images
    from cvpipe.index import engine, query, store

    with engine.faiss_threads(threads):
        opened = store.open_index(index)
        if key is not None:
            try:
                return query.query_key(opened, key, k, nprobe), None
            except KeyError as e:
                raise ValueError(str(e).strip('"')) from None
        data = read_bytes(image)
        return query.query_image(opened, data, model, k, nprobe), images.decode(data)


def _dedup(config: DedupConfig) -> None:
    _summary("dedup_flow", "dedup")(config)


def _siamese_train(config: SiameseTrainConfig) -> None:
    from flows.siamese import siamese_train_flow

    cli = _cli()
    cli.print_summary(cli.run_flow(siamese_train_flow, config), "siamese train")


_SIAMESE_SPEC = Spec(
    SiameseTrainConfig,
    positional={"shards": "training shards"},
    aliases={"init": ["--from", "--init"]},
)
config_command(
    siamese_app,
    "train",
    _SIAMESE_SPEC,
    _checked(_SIAMESE_SPEC, _siamese_train, fields={"val": "inputs", "init": "checkpoints"}),
    help="Train an embedding net through the shared loop on pairs mined from labels.",
    load_yaml=_yaml,
)


@siamese_app.command("run")
def siamese_run(
    config: str = typer.Argument(..., help="a SiameseConfig YAML (flows/examples/siamese.yaml)"),
    root: str = typer.Option(None, "--root", help="override the config's output root"),
) -> None:
    """Train -> embed -> index -> evaluate: the recall/precision table and the PNG."""
    from cvpipe.experiments.siamese import SiameseConfig
    from flows.siamese import siamese_flow

    cli = _cli()
    cfg = cli.load_yaml_config(config, SiameseConfig, root=root)
    checks = cli.experiment_checks(cfg, config)
    for name in ("train_shards", "eval_shards", "labels"):
        checks.add("inputs", f"{config}: {name}", getattr(cfg, name))
    checks.add("checkpoints", f"{config}: teacher", cfg.teacher)
    checks.add("devices", f"{config}: device", cfg.device)
    if root:
        checks.outputs = {"--root": cfg.root}
    cli.check(checks)
    result = cli.run_flow(siamese_flow, cfg)
    typer.echo(result["markdown"])
    typer.echo(f"projection: {result['projection']}")


def register(app: typer.Typer) -> None:
    """Add ``index``, ``dedup`` and ``siamese`` to the ``cvpipe`` app."""
    app.add_typer(index_app, name="index")
    app.add_typer(siamese_app, name="siamese")
    spec = Spec(DedupConfig, positional={"index": "the index folder"})
    config_command(
        app,
        "dedup",
        spec,
        _checked(spec, _dedup, fields={"index": "inputs", "embeddings": "inputs"}),
        help="Mark near-duplicates: keys whose earlier-added neighbour is within --threshold.",
        load_yaml=_yaml,
    )
