"""CLI commands generated from the config models, so the two cannot drift.

Every field of a command's pydantic model becomes a flag (``top_k`` -> ``--top-k``)
with the field's description as help; a field added to a config is reachable from the
CLI without touching it. A command may keep older spellings as aliases (``--model`` for
``checkpoint``), take some fields as positional arguments, and add flags of its own
(``--runner``). Unset flags fall back to ``--config FILE.yaml`` and then to the model's
defaults. Validation errors name the flag, not the field.

Field types map to flags: int/float/str -> a value; bool -> ``--x/--no-x`` (or the
alias pair given); ``list[...]`` -> a repeatable flag; ``dict[str, X]`` -> a repeatable
``KEY=VALUE`` flag; ``Literal[...]`` -> a value checked by the model; nested models are
set through ``--config`` only.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

# Options shared by the commands that run a flow's tasks somewhere (ingest, pipeline).
RUNNER = typer.Option(
    "threads", "--runner", help="threads | dask | dask://HOST:PORT | ray | ray://HOST:PORT"
)
WORKERS = typer.Option(None, "--workers", help="parallel task runs (threads, dask or ray workers)")


class CliError(Exception):
    """Bad command-line input: printed as one ``error:`` line."""


@dataclass
class Spec:
    """How a model's fields appear on one command."""

    model: type[BaseModel]
    positional: dict[str, str] = field(default_factory=dict)  # field -> help
    aliases: dict[str, Sequence[str]] = field(default_factory=dict)  # field -> flag spellings
    exclude: set[str] = field(default_factory=set)
    config_file: bool = True  # a --config FILE.yaml option

    def flags(self, name: str) -> list[str]:
        given = self.aliases.get(name)
        return list(given) if given else [flag_name(name)]


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        return str  # e.g. str | list[str]: one value on the command line
    return annotation


def _cli_type(annotation: Any) -> tuple[Any, str]:
    """(the click-facing type, kind) with kind in value | bool | list | dict | skip."""
    ann = _strip_optional(annotation)
    origin = get_origin(ann)
    if ann is bool:
        return bool, "bool"
    if ann in (int, float, str):
        return ann, "value"
    if origin is Literal:
        return str, "value"
    if origin in (list, tuple, Sequence) and get_args(ann):
        inner = _strip_optional(get_args(ann)[0])
        if inner in (int, float, str):
            return list[inner], "list"
        return None, "skip"
    if origin is dict:
        return list[str], "dict"
    return None, "skip"  # nested models: YAML only


def _help(info: FieldInfo, kind: str) -> str:
    text = info.description or ""
    ann = _strip_optional(info.annotation)
    if get_origin(ann) is Literal:
        choices = " | ".join(map(str, get_args(ann)))
        text = f"{text} ({choices})".strip()
    if kind == "dict":
        text = f"{text} (KEY=VALUE, repeatable)".strip()
    elif kind == "list":
        text = f"{text} (repeatable)".strip()
    default = info.default
    if default is not PydanticUndefined and default is not None and kind != "dict":
        text = f"{text} (default: {default})".strip()
    return text


def cli_fields(spec: Spec) -> dict[str, tuple[FieldInfo, Any, str]]:
    """The model's fields that appear on the command: name -> (info, type, kind)."""
    out = {}
    for name, info in spec.model.model_fields.items():
        if name in spec.exclude:
            continue
        tp, kind = _cli_type(info.annotation)
        if kind == "skip" and name not in spec.positional:
            continue
        out[name] = (info, tp, kind)
    return out


def _parameters(spec: Spec) -> list[inspect.Parameter]:
    params = []
    for name, (info, tp, kind) in cli_fields(spec).items():
        if name in spec.positional:
            # Optional on the command line: a --config file may give it; the model
            # reports it missing otherwise (naming the argument).
            ptype = tp if kind in ("value", "list", "dict") else str
            default = typer.Argument(None, help=spec.positional[name], show_default=False)
            params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            default=default, annotation=ptype | None))  # fmt: skip
            continue
        flags = spec.flags(name)
        if kind == "bool" and not any("/" in f for f in flags):
            flags = [f"{flags[0]}/--no-{flags[0][2:]}", *flags[1:]]
        option = typer.Option(None, *flags, help=_help(info, kind), show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=tp | None))  # fmt: skip
    if spec.config_file:
        option = typer.Option(
            None, "--config", help="a YAML file of these fields; flags override it"
        )
        params.append(inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY,
                                        default=option, annotation=str | None))  # fmt: skip
    return params


def parse_pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"{flag} takes KEY=VALUE, got {item!r}")
        if key in out:
            raise CliError(f"{flag}: {key!r} given twice")
        out[key] = value
    return out


def build_config(spec: Spec, given: dict[str, Any], base: dict[str, Any] | None = None) -> Any:
    """The model from YAML values (``base``) overridden by the flags that were set."""
    fields = cli_fields(spec)
    values = dict(base or {})
    for name, value in given.items():
        if value is None or name not in fields:
            continue
        kind = fields[name][2]
        if kind == "dict":
            value = parse_pairs(value, spec.flags(name)[0] if name not in spec.positional
                                else name.upper())  # fmt: skip
        elif kind == "list" and not value:
            continue
        values[name] = value
    try:
        return spec.model(**values)
    except ValidationError as e:
        raise CliError(describe_validation_error(e, spec)) from None


def describe_validation_error(e: ValidationError, spec: Spec) -> str:
    """One line per problem, naming the flag (``--top-k``) rather than the field."""
    parts = []
    for err in e.errors():
        loc = err.get("loc") or ()
        name = str(loc[0]) if loc else ""
        if name in spec.positional:
            where = name.upper()
        elif name in spec.model.model_fields and name not in spec.exclude:
            where = spec.flags(name)[0].split("/")[0]
        else:
            where = ".".join(str(x) for x in loc) or spec.model.__name__
        rest = ".".join(str(x) for x in loc[1:])
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        parts.append(f"{where}{'.' + rest if rest else ''}: {err['msg']}{shown}")
    return "; ".join(parts)


def config_command(
    app: typer.Typer,
    name: str,
    spec: Spec,
    run: Callable[..., Any],
    *,
    extra: Sequence[inspect.Parameter] = (),
    help: str | None = None,
    load_yaml: Callable[[str], dict[str, Any]] | None = None,
) -> Callable[..., Any]:
    """Register command ``name``: its flags are the model's fields (plus ``extra``);
    ``run(config, **extra_values)`` does the work with the validated model."""
    field_names = set(cli_fields(spec))
    extra_names = [p.name for p in extra]

    def command(**kwargs: Any) -> Any:
        base = {}
        path = kwargs.pop("config_file", None)
        if path:
            if load_yaml is None:
                raise CliError("--config is not supported here")
            base = load_yaml(path)
        given = {k: v for k, v in kwargs.items() if k in field_names}
        try:
            config = build_config(spec, given, base)
        except CliError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None
        return run(config, **{k: kwargs[k] for k in extra_names})

    params = [*_parameters(spec), *extra]
    # Arguments (the model's, then the command's own) before options, as Python wants.
    ordered = sorted(params, key=lambda p: p.kind is inspect.Parameter.KEYWORD_ONLY)
    command.__signature__ = inspect.Signature(ordered)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in ordered}
    command.__doc__ = help or (spec.model.__doc__ or "").strip()
    command.__name__ = name.replace("-", "_")
    app.command(name)(command)
    return command
