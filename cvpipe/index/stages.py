"""The index operations as stages (cvpipe.core.stage): one unit each, so the generic
Prefect task runs them with the stage's retries and tags, and committed work is read
back instead of redone.

- :class:`IndexBuildStage`: the unit is the whole build (training needs a sample of
  every vector); committed = the manifest, read back after checking it is this build.
- :class:`IndexAddStage`: committed = the manifest lists a part of these same files.
- :class:`QueryStage` / :class:`DedupStage`: committed = the output Parquet.
"""

from __future__ import annotations

from typing import Any

from cvpipe.core import tables
from cvpipe.core.stage import Resources, Stage, Unit
from cvpipe.index import query, store
from cvpipe.index.config import IndexAddConfig, IndexBuildConfig
from cvpipe.index.engine import gpu_available


def _specs(spec: str | list[str] | None) -> tuple[str, ...]:
    if spec is None:
        return ()
    return (spec,) if isinstance(spec, str) else tuple(spec)


class IndexBuildStage(Stage[IndexBuildConfig, store.IndexStats]):
    name = "index-build"
    # k-means is the costly part; it runs on a GPU when faiss-gpu sees one.
    resources = Resources(cpus=2, gpus=1 if gpu_available() else 0)
    retries = 1

    def units(self) -> list[Unit]:
        return [Unit(f"build {self.config.out}", _specs(self.config.embeddings))]

    def outputs(self, unit: Unit) -> list[str]:
        return [store.manifest_url(self.config.out)]

    def process(self, unit: Unit) -> store.IndexStats:
        return store.build_index(self.config)

    def read_back(self, unit: Unit) -> store.IndexStats:
        return store.build_index(self.config)  # checks the build hash, builds nothing

    def describe(self, stats: store.IndexStats) -> str:
        return f"{stats.factory}: {stats.count} vectors, nprobe {stats.nprobe}"

    def summarize(self, stats: list[store.IndexStats]) -> dict[str, Any]:
        return stats[0].to_dict() if stats else {}


class IndexAddStage(Stage[IndexAddConfig, store.IndexStats]):
    name = "index-add"
    resources = Resources(cpus=2)
    retries = 1

    def units(self) -> list[Unit]:
        return [Unit(f"add to {self.config.index}", _specs(self.config.embeddings))]

    def outputs(self, unit: Unit) -> list[str]:
        return [store.manifest_url(self.config.index)]

    def committed(self, unit: Unit) -> bool:
        return store.already_added(self.config.index, self.config.embeddings)

    def process(self, unit: Unit) -> store.IndexStats:
        return store.add_to_index(self.config)

    def read_back(self, unit: Unit) -> store.IndexStats:
        return store.add_to_index(self.config)  # finds the part, adds nothing

    def describe(self, stats: store.IndexStats) -> str:
        return f"+{stats.added} vectors: {stats.count} in {stats.parts} part(s)"

    def summarize(self, stats: list[store.IndexStats]) -> dict[str, Any]:
        return stats[0].to_dict() if stats else {}


class _TableStage(Stage[Any, dict[str, Any]]):
    """A stage whose one unit writes the Parquet table ``config.out``."""

    resources = Resources(cpus=2)

    def units(self) -> list[Unit]:
        c = self.config
        return [Unit(f"{self.name} {c.out}", (c.index, *_specs(c.embeddings)))]

    def outputs(self, unit: Unit) -> list[str]:
        return [self.config.out]

    def read_back(self, unit: Unit) -> dict[str, Any]:
        lin = tables.read_lineage(self.config.out)
        kept = {k: lin.get(k) for k in ("k", "nprobe", "threshold")}
        return {"out": self.config.out, "rows": tables.num_rows(self.config.out), **kept,
                "skipped": True}  # fmt: skip

    def summarize(self, stats: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(stats[0]) if stats else {}


class QueryStage(_TableStage):
    name = "index-query"

    def process(self, unit: Unit) -> dict[str, Any]:
        return query.query_embeddings(self.config)


class DedupStage(_TableStage):
    name = "dedup"

    def process(self, unit: Unit) -> dict[str, Any]:
        return query.dedup(self.config)
