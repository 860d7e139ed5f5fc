"""Detection architectures: torchvision's Faster R-CNN (a region proposal network + ROI
heads over a feature pyramid), built with ``weights=None, weights_backbone=None``.

A detector's class index 0 is the background: ``classes`` (the object names) map to
1..len(classes). Its backbone stages carry the names of the classifier of the same
family (``stem``, ``layer1``... for ResNet; ``features.i`` for MobileNetV3), so the
transfer controls (freeze the first n stages, per-stage learning rates) read the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from cvpipe.models.nets import ARCHITECTURES


@dataclass(frozen=True)
class Detector:
    builder: str  # the torchvision.models.detection function
    backbone_arch: str  # the classifier of ARCHITECTURES whose stages the backbone has
    stages: tuple[str, ...]


DETECTORS: dict[str, Detector] = {
    "fasterrcnn_mobilenet_v3_large_fpn": Detector(
        "fasterrcnn_mobilenet_v3_large_fpn",
        "mobilenet_v3_large",
        ARCHITECTURES["mobilenet_v3_large"].stages,
    ),
    "fasterrcnn_resnet50_fpn": Detector(
        "fasterrcnn_resnet50_fpn", "resnet50", ARCHITECTURES["resnet50"].stages
    ),
}


def build_detector(
    arch: str, num_classes: int, min_size: int = 800, max_size: int = 1333
) -> nn.Module:
    """A Faster R-CNN for ``num_classes`` object classes (plus the background), with
    random weights; images are resized inside the model to ``min_size`` (short side),
    capped at ``max_size``. The model carries its ``arch`` name for checkpoints."""
    from torchvision.models import detection

    if arch not in DETECTORS:
        raise ValueError(f"unknown detector {arch!r}; choose from {sorted(DETECTORS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    fn: Callable[..., nn.Module] = getattr(detection, DETECTORS[arch].builder)
    model = fn(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes + 1,
        min_size=min_size,
        max_size=max_size,
    )
    model.arch = arch
    return model


def detector_stage_modules(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The detector backbone's named stages, first to last, each with its modules."""
    body = model.backbone.body
    out = []
    for name in DETECTORS[model.arch].stages:
        if name == "stem":
            mods = [body.conv1, body.bn1]
        elif name.startswith("features."):  # mobilenet: the body holds features' children
            mods = [body.get_submodule(name.split(".", 1)[1])]
        else:
            mods = [body.get_submodule(name)]
        out.append((name, mods))
    return out


def detector_head_modules(model: nn.Module) -> list[nn.Module]:
    """What a new detector learns on top of its backbone: the RPN and the ROI heads (the
    FPN sits between, among the 'other' parameters)."""
    return [model.rpn, model.roi_heads]
