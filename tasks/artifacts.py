"""What a person sees in the Prefect UI: table and markdown artifacts with valid keys."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact


def artifact_key(*parts: str, location: str | None = None) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only. With ``location``
    (the output root or folder the artifact describes) the key ends in a short hash of
    it, so runs writing to different places never hide each other's artifacts."""
    text = "-".join(parts)
    if location is not None:
        text += "-" + hashlib.sha1(str(location).rstrip("/").encode()).hexdigest()[:8]
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "cvpipe"


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
