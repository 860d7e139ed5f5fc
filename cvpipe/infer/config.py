"""Parameters of teacher inference."""

from __future__ import annotations

from pydantic import Field

from cvpipe.core.config import Strict, runtime


class InferConfig(Strict):
    """Teacher inference over shards: top-P predictions (and features) per shard."""

    shards: str | list[str] = Field(
        description="a shard URL, a folder or prefix of shards, a brace pattern, or a list"
    )
    checkpoint: str = Field(description="teacher checkpoint (NAME.pt with its NAME.json)")
    out: str = Field(description="writes OUT/predictions/, OUT/features/, OUT/rejects/infer/")
    top_p: int = Field(5, ge=1, description="classes kept per image")
    features: bool = Field(False, description="also write penultimate-layer embeddings")
    batch_size: int = runtime(256, ge=1)
    device: str = runtime("auto", description="auto | cpu | cuda | cuda:N")
    num_workers: int = runtime(2, ge=0, description="DataLoader workers per inference unit")
    shards_per_unit: int = runtime(4, ge=1, description="shards per task run (one DataLoader)")
    parallel_units: int = runtime(
        1, ge=1, description="inference units in flight; 1 = one teacher per machine/GPU"
    )
    cpu_threads: int | None = runtime(
        None, ge=1, description="torch threads on CPU (None: torch's default; 1 suits small models)"
    )
