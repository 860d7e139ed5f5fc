"""Classification architectures.

Every model is a :class:`Classifier`: a ``backbone`` that maps images to penultimate
features and a linear ``head`` that maps features to class logits. Replacing the head
for a new class set, freezing the backbone's first stages and reading embeddings are
then the same operation for every architecture.

All torchvision architectures are built with ``weights=None``: nothing is downloaded,
models start random or from checkpoints the pipeline trained.

"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def stage_modules(model: Classifier | EmbeddingNet) -> list[tuple[str, list[nn.Module]]]:
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


class EmbeddingNet(nn.Module):
    """A classifier's ``backbone`` followed by a linear projection ``head`` to ``dim``
    dimensions, optionally L2-normalized: the G(x) of a Siamese network. The backbone's
    keys are a Classifier's, so any pipeline checkpoint can seed it.

    ``feature_dim`` is ``dim``: what :meth:`forward_with_features` gives as features, so
    the inference stage writes the embeddings where a classifier's penultimate layer
    would go."""

    def __init__(self, arch: str, dim: int, normalize: bool = True) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
        if dim < 1:
            raise ValueError(f"embedding dim must be >= 1, got {dim}")
        self.arch = arch
        self.normalize = normalize
        self.backbone, backbone_dim = ARCHITECTURES[arch].build_backbone()
        self.head = nn.Linear(backbone_dim, dim)
        self.feature_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.backbone(x))
        return nn.functional.normalize(z, dim=1) if self.normalize else z

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class scores, features) as a Classifier gives them: an embedding net has no
        class scores (an empty ``[n, 0]`` tensor) and its features are the embeddings."""
        z = self(x)
        return z.new_zeros((len(z), 0)), z
