"""The base of every config model, and what a config's identity is.

Unknown fields are errors, so a typo in a config file is caught before any work starts.
Flows take these models as parameters (the Prefect UI renders them as forms) and the
CLI reads the same models from YAML or flags.

Identity: lineage records and skip decisions ("this plan, this trained run, was made
by the same config") hash :func:`identity`, which leaves out

- runtime fields, declared with :func:`runtime` (threads, workers, devices, retention,
  parallelism): they change how fast an output is made, not what it is;
- fields left at their default: adding a new defaulted field to a config keeps every
  existing partition, plan and trained run valid. Changing a default is a change of
  code: bump the stage's ``version`` when it changes outputs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def runtime(default: Any = PydanticUndefined, **kwargs: Any) -> Any:
    """A config field that changes how an output is made, never what it is: left out of
    the config's identity (and marked so in its JSON schema)."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra["identity"] = False
    return Field(default, json_schema_extra=extra, **kwargs)


def is_runtime(info: FieldInfo) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and extra.get("identity") is False


def _default_of(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return info.default


def identity(value: Any) -> Any:
    """The JSON value of what changes outputs: runtime fields and fields equal to their
    default are dropped, recursively through nested models, dicts and lists."""
    if isinstance(value, BaseModel):
        out = {}
        for name, info in type(value).model_fields.items():
            if is_runtime(info):
                continue
            v = getattr(value, name)
            default = _default_of(info)
            if default is not PydanticUndefined and _same(v, default):
                continue
            out[name] = identity(v)
        return out
    if isinstance(value, dict):
        return {str(k): identity(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [identity(v) for v in value]
    return to_jsonable_python(value)


def _same(a: Any, b: Any) -> bool:
    try:
        return to_jsonable_python(a) == to_jsonable_python(b)
    except Exception:  # values pydantic cannot serialize are compared as they are
        return a == b


def identity_hash(value: Any) -> str:
    """A stable short hash of :func:`identity` (of a model, a dict or any JSON value)."""
    blob = json.dumps(identity(value), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
