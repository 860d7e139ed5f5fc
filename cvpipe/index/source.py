"""Where the index reads embeddings: the features files the inference stage writes.

Everything in ``cvpipe.index`` reads vectors through :func:`iter_embeddings` (batches
of ``(keys, shards, float32 matrix)``) and :func:`count_rows`, so the features
contract has one reader here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from cvpipe.core import tables
from cvpipe.data.features import feature_dim, features_urls, iter_features

Batch = tuple[pa.Array, pa.Array, np.ndarray]  # keys, shards, matrix [n, D] float32


def embedding_files(spec: str | Sequence[str]) -> list[str]:
    """The committed features files of a folder, prefix, pattern, file or list."""
    return features_urls(spec if isinstance(spec, str) else list(spec))


def embedding_dim(url: str) -> int:
    return feature_dim(url)


def count_rows(urls: Sequence[str]) -> int:
    """Vectors in ``urls``, from the files' footers alone."""
    return sum(tables.num_rows(u) for u in urls)


def iter_embeddings(urls: Sequence[str], batch_rows: int | None = None) -> Iterator[Batch]:
    """Every vector of ``urls`` in file order, in batches of bounded size."""
    for url in urls:
        for keys, shards, matrix in iter_features(url, batch_rows):
            if len(keys):
                yield keys, shards, matrix


def model_of(url: str) -> str | None:
    """The model id in a features file's lineage (None when absent)."""
    lin = tables.read_lineage(url)
    return lin.get("model_id") or lin.get("model")
