"""What a person sees in the Prefect UI: table and markdown artifacts with valid keys."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact


def artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    text = "-".join(parts)
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "cvpipe"


def publish_table(rows: Sequence[Mapping[str, Any]], key: str, description: str) -> None:
    create_table_artifact(
        table=[dict(r) for r in rows], key=artifact_key(key), description=description
    )


def publish_markdown(markdown: str, key: str, description: str) -> None:
    create_markdown_artifact(markdown=markdown, key=artifact_key(key), description=description)


def summary_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A flat (metric, value) table from a summary dict; nested dicts become prefixed rows."""
    rows: list[dict[str, Any]] = []
    for k, v in summary.items():
        if isinstance(v, Mapping):
            rows.extend({"metric": f"{k}: {kk}", "value": vv} for kk, vv in v.items())
        else:
            rows.append({"metric": k, "value": v})
    return rows
