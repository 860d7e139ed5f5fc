"""Checkpoints: a trained model as two files, published atomically.

``NAME.pt`` is the state_dict (loaded with ``weights_only=True``), and ``NAME.json`` a
sidecar with the architecture, class names, input size, normalization and training
lineage. The sidecar is written first; the weights are the commit.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cvpipe.core.stage import PermanentError
from cvpipe.core.storage import is_committed, open_atomic, read_bytes
from cvpipe.models.nets import IMAGENET_MEAN, IMAGENET_STD, Classifier, build


class CheckpointError(PermanentError, ValueError):
    """A checkpoint that is missing, corrupt, or does not fit its architecture: a retry
    cannot fix it (a PermanentError, so a stage unit that meets it is not retried)."""


@dataclass
class ModelInfo:
    """The sidecar of a checkpoint: what a reader needs to use the weights."""

    arch: str
    classes: list[str]
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def sidecar_url(url: str) -> str:
    return (url[: -len(".pt")] if url.endswith(".pt") else url) + ".json"


def save_checkpoint(model: Classifier, info: ModelInfo, url: str) -> str:
    """Publish ``NAME.pt`` and its ``NAME.json`` sidecar atomically (sidecar first, the
    weights are the commit). Returns the model id (a hash of the weights file)."""
    if model.arch != info.arch or model.head.out_features != info.num_classes:
        raise CheckpointError(
            f"model ({model.arch}, {model.head.out_features} classes) does not match its info "
            f"({info.arch}, {info.num_classes} classes)"
        )
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    data = buf.getvalue()
    with open_atomic(sidecar_url(url)) as f:
        f.write(json.dumps(asdict(info), indent=2, sort_keys=True).encode())
    with open_atomic(url) as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()[:16]


def load_info(url: str) -> ModelInfo:
    try:
        raw = json.loads(read_bytes(sidecar_url(url)))
        raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        return ModelInfo(**raw)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint sidecar {sidecar_url(url)} is missing") from None
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise CheckpointError(f"checkpoint sidecar {sidecar_url(url)} is malformed: {e}") from None


def load_checkpoint(url: str, device: str | torch.device = "cpu") -> tuple[Classifier, ModelInfo]:
    """Load a checkpoint safely (``weights_only=True``); any problem is a CheckpointError."""
    if not is_committed(url):
        raise CheckpointError(f"checkpoint {url} does not exist")
    info = load_info(url)
    data = read_bytes(url)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {url} is corrupt: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {url} holds a {type(state).__name__}, not a state_dict")
    model = build(info.arch, info.num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint {url} does not fit architecture {info.arch} with "
            f"{info.num_classes} classes: {e}"
        ) from None
    return model.to(device), info


def model_id(url: str) -> str:
    """A stable id of a checkpoint: the hash of its weights file (for lineage columns)."""
    return hashlib.sha256(read_bytes(url)).hexdigest()[:16]


def preprocess(info: ModelInfo) -> Callable[[Any], torch.Tensor]:
    """The deterministic eval transform of a checkpoint: RGB PIL image -> normalized
    float tensor of ``input_size`` (resize the short side, center crop)."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(info.input_size, antialias=True),
            v2.CenterCrop(info.input_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(info.mean), list(info.std)),
        ]
    )
