"""Classification architectures and checkpoints.

Every model is a :class:`Classifier`: a ``backbone`` that maps images to penultimate
features and a linear ``head`` that maps features to class logits. Replacing the head
for a new class set, freezing the backbone's first stages and reading embeddings are
then the same operation for every architecture.

All torchvision architectures are built with ``weights=None``: nothing is downloaded,
models start random or from checkpoints the pipeline trained.

A checkpoint is two files: ``NAME.pt``, the state_dict (loaded with
``weights_only=True``), and ``NAME.json``, a sidecar with the architecture, class names,
input size, normalization and training lineage.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from cvpipe.storage import is_committed, open_atomic, read_bytes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit its architecture."""


class SmallCNN(nn.Module):
    """Three conv blocks (~24k parameters) for tiny images such as the 16x16 digits."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, pool: bool) -> nn.Sequential:
            layers: list[nn.Module] = [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
            if pool:
                layers.append(nn.MaxPool2d(2))
            return nn.Sequential(*layers)

        self.conv1 = block(3, 16, pool=True)
        self.conv2 = block(16, 32, pool=True)
        self.conv3 = block(32, 48, pool=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = 48

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.conv3(self.conv2(self.conv1(x)))), 1)


def _torchvision_backbone(name: str) -> tuple[nn.Module, int]:
    """A torchvision classifier with its last Linear replaced by Identity."""
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    if hasattr(model, "fc"):  # resnet, resnext
        dim = model.fc.in_features
        model.fc = nn.Identity()
    else:  # mobilenet_v3_*, efficientnet_*: classifier = Sequential(..., Linear)
        last = model.classifier[-1]
        dim = last.in_features
        model.classifier[-1] = nn.Identity()
    return model, dim


def _small_cnn() -> tuple[nn.Module, int]:
    m = SmallCNN()
    return m, m.out_features


@dataclass(frozen=True)
class Architecture:
    build_backbone: Callable[[], tuple[nn.Module, int]]
    input_size: int
    # Named stages of the backbone, first to last: what "freeze the first n layers" counts.
    stages: tuple[str, ...]


def _tv(name: str) -> Callable[[], tuple[nn.Module, int]]:
    return lambda: _torchvision_backbone(name)


_RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
_MBV3_SMALL_STAGES = tuple(f"features.{i}" for i in range(13))
_MBV3_LARGE_STAGES = tuple(f"features.{i}" for i in range(17))
_EFFNET_STAGES = tuple(f"features.{i}" for i in range(9))

ARCHITECTURES: dict[str, Architecture] = {
    "small_cnn": Architecture(_small_cnn, 16, ("conv1", "conv2", "conv3")),
    "resnet18": Architecture(_tv("resnet18"), 224, _RESNET_STAGES),
    "resnet50": Architecture(_tv("resnet50"), 224, _RESNET_STAGES),
    "resnext50_32x4d": Architecture(_tv("resnext50_32x4d"), 224, _RESNET_STAGES),
    "mobilenet_v3_small": Architecture(_tv("mobilenet_v3_small"), 224, _MBV3_SMALL_STAGES),
    "mobilenet_v3_large": Architecture(_tv("mobilenet_v3_large"), 224, _MBV3_LARGE_STAGES),
    "efficientnet_b0": Architecture(_tv("efficientnet_b0"), 224, _EFFNET_STAGES),
}


class Classifier(nn.Module):
    """``backbone`` (images -> features) followed by a linear ``head`` (features -> logits)."""

    def __init__(self, arch: str, num_classes: int) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.arch = arch
        self.backbone, self.feature_dim = ARCHITECTURES[arch].build_backbone()
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return self.head(features), features

    def replace_head(self, num_classes: int) -> None:
        """A fresh head for a new class set (transfer learning)."""
        self.head = nn.Linear(self.feature_dim, num_classes).to(self.head.weight.device)


def build(arch: str, num_classes: int) -> Classifier:
    return Classifier(arch, num_classes)


def stage_modules(model: Classifier) -> list[tuple[str, list[nn.Module]]]:
    """The backbone's named stages, first to last, each with its modules."""
    names = ARCHITECTURES[model.arch].stages
    out = []
    for name in names:
        if name == "stem":  # resnet's conv1 + bn1 (+ relu, maxpool: no parameters)
            mods = [model.backbone.conv1, model.backbone.bn1]
        else:
            mods = [model.backbone.get_submodule(name)]
        out.append((name, mods))
    return out


# --------------------------------------------------------------------------- checkpoints


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


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads (None: leave torch's setting).

    Small models on CPU train several times faster on one thread: synchronizing threads
    costs more than their math, and spinning threads stall when other processes share
    the cores. The setting is process-wide, so it is restored afterwards."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
