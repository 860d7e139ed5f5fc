import pyarrow as pa
import pytest

from cvpipe.core import tables
from cvpipe.data.config import IngestConfig


def test_parquet_carries_lineage_and_schema(tmp_path):
    cfg = IngestConfig(source="a", root="b", partition="p")
    rows = [
        {"key": "k1", "shard": "p/s-000000", "width": 8, "height": 9, "label": "3", "caption": None}
    ]
    url = str(tmp_path / "index" / "p" / "s-000000.parquet")
    tables.write_parquet(
        tables.from_rows(rows, tables.SHARD_INDEX),
        url,
        tables.lineage(cfg, stage="ingest", model_id="m1"),
    )
    back = tables.read_parquet(url)
    assert back.schema.remove_metadata() == tables.SHARD_INDEX
    assert back.to_pylist() == rows
    lin = tables.read_lineage(url)
    assert lin["config_hash"] == tables.config_hash(cfg)
    assert lin["stage"] == "ingest" and lin["model_id"] == "m1"
    assert lin["code_version"].startswith("0.")
    assert lin["created_at"]


def test_config_hash_is_stable_and_sensitive():
    a = IngestConfig(source="a", root="b", partition="p")
    assert tables.config_hash(a) == tables.config_hash(
        IngestConfig(source="a", root="b", partition="p")
    )
    assert tables.config_hash(a) != tables.config_hash(a.model_copy(update={"shard_size": 5}))


def test_rows_that_do_not_fit_the_schema_are_an_error():
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        tables.from_rows([{"key": "k", "shard": "s", "width": "wide"}], tables.SHARD_INDEX)
