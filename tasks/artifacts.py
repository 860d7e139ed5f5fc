"""What a person sees in the Prefect UI: table and markdown artifacts with valid keys."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact


def artifact_key(*parts: str, location: str | None = None) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only. With ``location``
    (the output root or folder the artifact describes) the key ends in a short hash of
    it, so runs writing to different places never hide each other's artifacts."""
    text = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:60].strip("-")
    if location is not None:
        text += "-" + hashlib.sha1(str(location).rstrip("/").encode()).hexdigest()[:8]
    return text.strip("-") or "cvpipe"


def publish_table(
    rows: Sequence[Mapping[str, Any]], key: str, description: str, location: str | None = None
) -> None:
    create_table_artifact(
        table=[dict(r) for r in rows],
        key=artifact_key(key, location=location),
        description=description,
    )


def publish_markdown(
    markdown: str, key: str, description: str, location: str | None = None
) -> None:
    create_markdown_artifact(
        markdown=markdown, key=artifact_key(key, location=location), description=description
    )


def publish_rejects(
    urls: Sequence[str], key: str, description: str, location: str, limit: int = 200
) -> int:
    """A table of rejected samples (key, shard, reason, detail) read from REJECTS
    Parquet files, the first ``limit`` rows: what a person looks at first when a run
    rejected input. Returns the rows published."""
    from cvpipe.core import tables

    rows: list[dict[str, Any]] = []
    for url in urls:
        if len(rows) >= limit:
            break
        t = tables.read_parquet(url, columns=["key", "shard", "reason", "detail"])
        rows.extend(t.slice(0, limit - len(rows)).to_pylist())
    if rows:
        publish_table(rows, key, description, location=location)
    return len(rows)


def summary_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A flat (metric, value) table from a summary dict; nested dicts become prefixed rows."""
    rows: list[dict[str, Any]] = []
    for k, v in summary.items():
        if isinstance(v, Mapping):
            rows.extend({"metric": f"{k}: {kk}", "value": vv} for kk, vv in v.items())
        else:
            rows.append({"metric": k, "value": v})
    return rows


def short_spec(spec: str | Sequence[str], width: int = 60) -> str:
    """A URL, folder or list of them, shortened for a run name or a log line."""
    if not isinstance(spec, str):
        items = list(spec)
        spec = items[0] + (f" (+{len(items) - 1})" if len(items) > 1 else "") if items else "-"
    return spec if len(spec) <= width else "..." + spec[-(width - 3) :]


class _Short:
    """A run parameter as a flow-run name shows it: paths and lists shortened."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __getattr__(self, name: str) -> _Short:
        v = self.value
        return _Short(v.get(name) if isinstance(v, Mapping) else getattr(v, name))

    def __format__(self, spec: str) -> str:
        v = self.value
        if isinstance(v, str) or (isinstance(v, (list, tuple)) and v and isinstance(v[0], str)):
            return short_spec(v, width=40)
        return format(v, spec)


def run_name(template: str) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``template`` (``"infer {config.shards} ->
    {config.out}"``) formatted with the run's parameters, long paths cut to their tail
    and lists to their first item and a count, so the UI's run list stays readable."""

    def name() -> str:
        from prefect.runtime import flow_run

        return template.format(**{k: _Short(v) for k, v in flow_run.parameters.items()})

    return name
