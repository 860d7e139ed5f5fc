"""Flows that export the real datasets bundled inside installed packages."""

from __future__ import annotations

from prefect import flow, get_run_logger

from cvpipe.data import datasets
from tasks.artifacts import run_name


@flow(name="export-digits", flow_run_name=run_name("export digits -> {out}"))
def export_digits_flow(
    out: str, size: int = 32, split: str | None = None, seed: int = 0
) -> dict[str, int]:
    """scikit-learn's handwritten digits as PNG class folders (optionally split)."""
    counts = datasets.export_digits(
        out, size=size, split=datasets.parse_split(split) if split else None, seed=seed
    )
    get_run_logger().info("exported digits to %s: %s", out, counts)
    return counts


@flow(name="export-photos", flow_run_name=run_name("export photos -> {out}"))
def export_photos_flow(out: str, count: int = 1000, size: int = 256, seed: int = 0) -> int:
    """Random JPEG crops of scikit-learn's two sample photographs."""
    n = datasets.export_photos(out, count=count, size=size, seed=seed)
    get_run_logger().info("exported %d photo crops to %s", n, out)
    return n
