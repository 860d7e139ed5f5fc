"""Checkpoints: a trained model as two files, published atomically.

``NAME.pt`` is the state_dict (loaded with ``weights_only=True``), and ``NAME.json`` a
sidecar with the task, architecture, class names, input size, normalization and
training lineage. The sidecar is written first; the weights are the commit.

Classifiers (``task`` classification or multilabel: a :class:`Classifier` whose head
has one output per class) load with :func:`load_checkpoint`. Other models (a detector,
an embedding net) are built by their training task, which reads the weights with
:func:`load_state`.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from cvpipe.core.stage import PermanentError
from cvpipe.core.storage import is_committed, open_atomic, read_bytes
from cvpipe.models.nets import IMAGENET_MEAN, IMAGENET_STD, Classifier, EmbeddingNet, build


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
    # What the weights are: "classification" and "multilabel" are Classifiers (one head
    # output per class); "detection", "contrastive" and later tasks are built by their
    # task. Sidecars written before the field existed are classifiers.
    task: str = "classification"

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def sidecar_url(url: str) -> str:
    return (url[: -len(".pt")] if url.endswith(".pt") else url) + ".json"


CLASSIFIER_TASKS = ("classification", "multilabel")


def check_fits(model: nn.Module, info: ModelInfo) -> None:
    """A model must be the architecture its info names; a classifier's linear head must
    have one output per class. Models without such a head (a detector, an embedding
    net) are checked on the architecture only."""
    arch = getattr(model, "arch", None)
    if arch is not None and arch != info.arch:
        raise CheckpointError(f"model is a {arch}, its info says {info.arch}")
    if info.task in CLASSIFIER_TASKS:
        head = getattr(model, "head", None)
        out = head.out_features if isinstance(head, nn.Linear) else None
        if out != info.num_classes:
            raise CheckpointError(
                f"model ({arch}, {out} head outputs) does not match its info "
                f"({info.arch}, {info.num_classes} classes)"
            )


def save_checkpoint(model: nn.Module, info: ModelInfo, url: str) -> str:
    """Publish ``NAME.pt`` and its ``NAME.json`` sidecar atomically (sidecar first, the
    weights are the commit). Returns the model id (a hash of the weights file)."""
    check_fits(model, info)
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


# What torch.save writes: a zip archive (the default since torch 1.6) or, in the legacy
# format, a pickle stream (protocol 2+ opens with 0x80).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def check_magic(url: str, head: bytes) -> None:
    """A file whose first bytes are not torch.save's is not a checkpoint at all (a text
    file, an image): say so, rather than blame its sidecar or torch's unpickler."""
    if not head.startswith(_TORCH_MAGIC):
        shown = head[:16]
        raise CheckpointError(
            f"{url} is not a checkpoint (a file written by torch.save, e.g. final.pt of "
            f"cvpipe train); it starts with {shown!r}"
        )


def load_state(url: str) -> tuple[dict[str, torch.Tensor], ModelInfo]:
    """The state_dict (on CPU, read with ``weights_only=True``) and the sidecar of any
    checkpoint; any problem is a CheckpointError."""
    if not is_committed(url):
        raise CheckpointError(f"checkpoint {url} does not exist")
    data = read_bytes(url)
    check_magic(url, data[:16])
    info = load_info(url)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {url} is corrupt: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {url} holds a {type(state).__name__}, not a state_dict")
    return state, info


def load_checkpoint(url: str, device: str | torch.device = "cpu") -> tuple[Classifier, ModelInfo]:
    """Load a classifier checkpoint safely (``weights_only=True``); any problem is a
    CheckpointError."""
    state, info = load_state(url)
    if info.task not in CLASSIFIER_TASKS:
        raise CheckpointError(
            f"checkpoint {url} holds a {info.task} model, not a classifier: "
            "load it with its training task"
        )
    model = build(info.arch, info.num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint {url} does not fit architecture {info.arch} with "
            f"{info.num_classes} classes: {e}"
        ) from None
    return model.to(device), info


def load_model(url: str, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """A checkpoint that inference can run: a classifier (:func:`load_checkpoint`) or an
    embedding net (``task`` contrastive: its features are the embeddings). Anything else
    is a CheckpointError."""
    if not is_committed(url):
        raise CheckpointError(f"checkpoint {url} does not exist")
    info = load_info(url)
    if info.task in CLASSIFIER_TASKS:
        return load_checkpoint(url, device)
    if info.task != "contrastive":
        raise CheckpointError(f"checkpoint {url} holds a {info.task} model: nothing to infer")
    state, info = load_state(url)
    if "head.weight" not in state:
        raise CheckpointError(f"checkpoint {url} has no embedding head")
    task = info.lineage.get("task") or {}
    model = EmbeddingNet(info.arch, state["head.weight"].shape[0], task.get("normalize", True))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {url} does not fit {info.arch}: {e}") from None
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
