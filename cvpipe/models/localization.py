"""Object localization: a classifier with a second head that regresses one box.

The lecture's first CNN application after classification: one object per image, its
class and its box. :class:`Localizer` keeps a :class:`~cvpipe.models.Classifier`'s
``backbone`` (same keys, so any pipeline checkpoint of the architecture seeds it) and
``head`` (class logits from the globally pooled features), and adds ``box_head``: from
the last feature map pooled to 4 x 4 cells (the position of the object survives, which
global pooling would average away) to the box's center, width and height as fractions
of the image's sides (sigmoid), returned as corners ``[x1, y1, x2, y2]`` clipped to the
image. The last layer starts at zero, so every box starts as the image's central
quarter with the sigmoid in its linear range: started random, large backbone features
saturate it and the box never learns.
"""

from __future__ import annotations

import torch
from torch import nn

from cvpipe.models.nets import ARCHITECTURES

BOX_GRID = 4  # the box head sees the feature map pooled to BOX_GRID x BOX_GRID cells


def feature_map(backbone: nn.Module, arch: str, x: torch.Tensor) -> torch.Tensor:
    """The backbone's last feature map (before its global pooling)."""
    if arch == "small_cnn":
        return backbone.conv3(backbone.conv2(backbone.conv1(x)))
    if arch.startswith(("resnet", "resnext")):
        b = backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))
    return backbone.features(x)  # mobilenet_v3_*, efficientnet_*


class Localizer(nn.Module):
    """Class logits and one box per image (see the module's docstring)."""

    def __init__(self, arch: str, num_classes: int, box_hidden: int = 256) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
        self.arch = arch
        self.backbone, self.feature_dim = ARCHITECTURES[arch].build_backbone()
        self.head = nn.Linear(self.feature_dim, num_classes)
        with torch.no_grad():
            probe = feature_map(self.backbone.eval(), arch, torch.zeros(1, 3, 64, 64))
        channels = probe.shape[1]
        self.box_head = nn.Sequential(
            nn.AdaptiveAvgPool2d(BOX_GRID),
            nn.Flatten(),
            nn.Linear(channels * BOX_GRID * BOX_GRID, box_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(box_hidden, 4),
        )
        nn.init.zeros_(self.box_head[-1].weight)
        nn.init.zeros_(self.box_head[-1].bias)
        self.backbone.train()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = feature_map(self.backbone, self.arch, x)
        logits = self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(fmap, 1), 1))
        center, size = torch.sigmoid(self.box_head(fmap)).split(2, dim=1)
        box = torch.cat([center - size / 2, center + size / 2], dim=1).clamp(0, 1)
        return logits, box


def build_localizer(arch: str, num_classes: int) -> Localizer:
    return Localizer(arch, num_classes)


def load_localizer(url: str, device: str | torch.device = "cpu") -> tuple[Localizer, object]:
    """A localization checkpoint as a model in eval mode, and its ModelInfo."""
    from cvpipe.models.checkpoints import CheckpointError, load_state

    state, info = load_state(url)
    if info.task != "localization":
        raise CheckpointError(f"{url} holds a {info.task} model, not a localizer")
    model = Localizer(info.arch, info.num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{url} does not fit a {info.arch} localizer: {e}") from None
    return model.to(device).eval(), info
