"""The anchor experiment's report tables: pseudo-label datasets and transfer."""

from __future__ import annotations

import numpy as np
import pytest

from cvpipe.core import tables
from cvpipe.experiments import reports


def test_pseudo_label_report(tmp_path):
    counts = {"nearest1": {"a": 10, "b": 30}, "random": {"r0": 20, "r1": 19, "r2": 1}}
    urls = reports.write_pseudo_label_report(counts, str(tmp_path / "pl"), top1={"random": 0.5})
    t = tables.read_parquet(urls["parquet"]).to_pylist()
    assert t[0] == {
        "method": "nearest1",
        "labels": 2,
        "images": 40,
        "images_per_label_mean": 20.0,
        "images_per_label_std": 10.0,
        "top1": None,
    }
    assert t[1]["labels"] == 3 and t[1]["top1"] == 0.5
    assert t[1]["images_per_label_std"] == pytest.approx(np.std([20, 19, 1]))
    md = (tmp_path / urls["markdown"]).read_text()
    assert md.splitlines()[0].startswith("| method | labels |") and "| nearest1 | 2 | 40 |" in md
    assert (tmp_path / urls["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transfer_table_marks_best_per_row(tmp_path):
    rows = [
        {"target": "flowers", "method": "nearest1", "top1": 0.71},
        {"target": "flowers", "method": "random", "top1": 0.65},
        {"target": "cars", "method": "nearest1", "top1": 0.5},
        {"target": "cars", "method": "random", "top1": 0.55},
        {"target": "birds", "method": "random", "top1": 0.3},
    ]
    urls = reports.write_transfer_report(rows, str(tmp_path / "tr"))
    t = tables.read_parquet(urls["parquet"])
    assert t.column_names == ["target", "nearest1", "random", "best"]
    assert t.column("best").to_pylist() == ["nearest1", "random", "random"]
    assert t.column("nearest1").to_pylist() == [0.71, 0.5, None]
    md = (tmp_path / urls["markdown"]).read_text()
    assert "| flowers | **0.710** | 0.650 | nearest1 |" in md
    assert "| cars | 0.500 | **0.550** | random |" in md
    with pytest.raises(ValueError, match="two results"):
        reports.transfer_table(rows + rows[:1])
