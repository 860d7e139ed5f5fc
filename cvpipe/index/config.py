"""Parameters of the index stages: build, add, query, dedup."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from cvpipe.core.config import Strict, runtime
from cvpipe.index.plan import parse_memory


class IndexBuildConfig(Strict):
    """A FAISS index of every vector of an embeddings set, chosen by size and memory."""

    embeddings: str | list[str] = Field(
        description="features Parquet: a folder or prefix, a pattern, a file, or a list"
    )
    out: str = Field(description="the index folder: manifest.json, index-*.faiss, ids/")
    kind: Literal["auto", "flat", "ivf", "ivfpq"] = Field(
        "auto", description="auto picks by size and memory: flat, IVF-Flat, OPQ+IVF-PQ"
    )
    memory: str = Field("4G", description="memory budget of the index, e.g. 4G, 512M")
    metric: Literal["l2", "cosine"] = Field("l2", description="l2 (Euclidean) or cosine")
    seed: int = Field(0, description="seeds the training sample and k-means")
    target_recall: float = Field(
        0.95, gt=0, le=1, description="nprobe is tuned to reach this recall@10 vs exact"
    )
    tune_queries: int = Field(256, ge=0, description="sample queries used to tune nprobe")
    batch_rows: int | None = runtime(None, ge=1, description="vectors read per batch")
    threads: int | None = runtime(None, ge=1, description="FAISS threads (None: all cores)")

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        parse_memory(v)
        return v


class IndexAddConfig(Strict):
    """Add a new embeddings set (e.g. a new partition) to a built index, no rebuild."""

    index: str = Field(description="the index folder written by build")
    embeddings: str | list[str] = Field(description="features Parquet of the new vectors")
    batch_rows: int | None = runtime(None, ge=1)
    threads: int | None = runtime(None, ge=1, description="FAISS threads (None: all cores)")


class QueryConfig(Strict):
    """Neighbours of every vector of an embeddings set, as a Parquet table."""

    index: str = Field(description="the index folder")
    embeddings: str | list[str] = Field(description="features Parquet of the queries")
    out: str = Field(description="the neighbours Parquet: key, neighbors, distances")
    k: int = Field(10, ge=1, description="neighbours per query (the query itself excluded)")
    nprobe: int | None = Field(None, ge=1, description="None: the index's tuned nprobe")
    batch_rows: int | None = runtime(None, ge=1)
    threads: int | None = runtime(None, ge=1, description="FAISS threads (None: all cores)")


class DedupConfig(Strict):
    """Near-duplicates: keys whose neighbour, added before them, is closer than a threshold."""

    index: str = Field(description="the index folder")
    out: str = Field(description="the duplicates Parquet: key, shard, duplicate_of, distance")
    threshold: float = Field(gt=0, description="a distance in the index's metric")
    embeddings: str | list[str] | None = Field(
        None, description="the vectors to check; None: every source of the index"
    )
    k: int = Field(10, ge=1, description="neighbours looked at per key")
    nprobe: int | None = Field(None, ge=1)
    batch_rows: int | None = runtime(None, ge=1)
    threads: int | None = runtime(None, ge=1, description="FAISS threads (None: all cores)")
