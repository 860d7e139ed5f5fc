"""Model costs: parameters against a hand count, checkpoint bytes against the file,
latencies measured, and the memory probe sees a model's weights."""

from __future__ import annotations

import math
import os

import pytest
import torch

from cvpipe import models
from cvpipe.core import tables
from cvpipe.models import costs


def save(tmp_path, arch, size, classes=10):
    torch.manual_seed(0)
    url = str(tmp_path / f"{arch}.pt")
    info = models.ModelInfo(arch, [str(i) for i in range(classes)], size)
    models.save_checkpoint(models.build(arch, classes), info, url)
    return url


def test_small_cnn_costs(tmp_path):
    url = save(tmp_path, "small_cnn", 16)
    c = costs.measure(url, "small", batch=8, min_seconds=0.05)
    # conv weights (no bias) + BatchNorm weight and bias + the head, counted by hand.
    convs = 3 * 16 * 9 + 16 * 32 * 9 + 32 * 48 * 9
    bns = 2 * (16 + 32 + 48)
    assert c.params == convs + bns + 48 * 10 + 10 == 19546
    assert c.checkpoint_bytes == os.path.getsize(url)
    assert c.checkpoint_bytes > 4 * c.params  # float32 weights plus BN buffers
    for v in (c.latency_ms_b1, c.latency_ms_batched, c.peak_memory_mb):
        assert math.isfinite(v) and v > 0
    assert (c.model, c.arch, c.input_size, c.batch, c.device) == (
        "small",
        "small_cnn",
        16,
        8,
        "cpu",
    )
    assert c.memory_kind == "process_rss" and c.threads == 1
    assert tables.from_rows([c.row()], tables.MODEL_COSTS).num_rows == 1


def test_memory_probe_sees_the_weights(tmp_path):
    small = costs.peak_memory_mb(save(tmp_path, "small_cnn", 16), 4, torch.device("cpu"))[0]
    url = save(tmp_path, "mobilenet_v3_small", 32)
    big = costs.peak_memory_mb(url, 4, torch.device("cpu"))[0]
    weights_mb = os.path.getsize(url) / 2**20
    assert big >= weights_mb > 5 and big > small


def test_latency_counts_per_image():
    calls = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return x.sum()

    ms = costs.latency_ms(
        Probe(), 8, 4, torch.device("cpu"), warmup=2, min_repeats=3, min_seconds=0.0
    )
    assert calls == [4] * 5 and ms > 0


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(models.CheckpointError):
        costs.measure(str(tmp_path / "nope.pt"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_costs(tmp_path):
    url = save(tmp_path, "resnet18", 32)
    c = costs.measure(url, "r18", batch=16, device="cuda", min_seconds=0.05)
    assert c.memory_kind == "cuda_allocated" and c.device.startswith("cuda") and c.threads == 0
    assert c.peak_memory_mb >= os.path.getsize(url) / 2**20 * 0.9  # weights live on the GPU
    assert c.latency_ms_b1 > 0 and c.latency_ms_batched > 0
