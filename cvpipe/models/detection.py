"""Detection architectures: torchvision's Faster R-CNN (a region proposal network + ROI
heads over a feature pyramid), built with ``weights=None, weights_backbone=None``.

A detector's class index 0 is the background: ``classes`` (the object names) map to
1..len(classes). Its backbone stages carry the names of the classifier of the same
family (``stem``, ``layer1``... for ResNet; ``features.i`` for MobileNetV3), so the
transfer controls (freeze the first n stages, per-stage learning rates) read the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
    arch: str,
    num_classes: int,
    min_size: int = 800,
    max_size: int = 1333,
    *,
    anchor_sizes: Sequence[int] | None = None,
    box_head_dim: int | None = None,
    returned_layers: Sequence[int] | None = None,
    **options: Any,
) -> nn.Module:
    """A Faster R-CNN for ``num_classes`` object classes (plus the background), with
    random weights; images are resized inside the model to ``min_size`` (short side),
    capped at ``max_size``. The model carries its ``arch`` name for checkpoints.

    Small images and CPUs want a smaller detector than torchvision's defaults (sized for
    800-pixel COCO photos): ``anchor_sizes`` replaces the anchor sizes of every feature
    level (aspect ratios 0.5, 1, 2), ``box_head_dim`` the width of the ROI box head
    (1024), and ``options`` are FasterRCNN's own keywords (``rpn_pre_nms_top_n_train``,
    ``rpn_post_nms_top_n_test``, ``box_batch_size_per_image``, ``box_score_thresh``,
    ``box_nms_thresh``, ``box_detections_per_img``...).

    ``returned_layers`` picks the backbone stages the FPN reads (torchvision's own
    argument; its MobileNetV3 detector reads only the two stride-32 stages, [4, 5] of
    stem..5, too coarse for objects of 20-60 pixels: [2, 3, 4, 5] adds strides 8 and 16)."""
    from torchvision.models import detection

    if arch not in DETECTORS:
        raise ValueError(f"unknown detector {arch!r}; choose from {sorted(DETECTORS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if returned_layers:
        model = _with_returned_layers(arch, num_classes, min_size, max_size,
                                      list(returned_layers), options)  # fmt: skip
    else:
        fn: Callable[..., nn.Module] = getattr(detection, DETECTORS[arch].builder)
        model = fn(
            weights=None,
            weights_backbone=None,
            num_classes=num_classes + 1,
            min_size=min_size,
            max_size=max_size,
            **options,
        )
    if anchor_sizes:
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        default = model.rpn.anchor_generator.sizes
        levels = len(default)
        if len(anchor_sizes) == levels and all(len(d) == 1 for d in default):
            sizes = tuple((int(a),) for a in anchor_sizes)  # one size per level (ResNet-FPN)
        else:
            sizes = (tuple(int(a) for a in anchor_sizes),) * levels  # every size everywhere
        per_level = len(sizes[0]) * len(ASPECT_RATIOS)
        if per_level != model.rpn.anchor_generator.num_anchors_per_location()[0]:
            # The RPN head predicts a fixed number of anchors per location: rebuild it.
            from torchvision.models.detection.rpn import RPNHead

            model.rpn.head = RPNHead(model.backbone.out_channels, per_level)
        model.rpn.anchor_generator = AnchorGenerator(sizes, (ASPECT_RATIOS,) * levels)
    if box_head_dim:
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

        resolution = model.roi_heads.box_roi_pool.output_size[0]
        model.roi_heads.box_head = TwoMLPHead(
            model.backbone.out_channels * resolution**2, box_head_dim
        )
        model.roi_heads.box_predictor = FastRCNNPredictor(box_head_dim, num_classes + 1)
    model.arch = arch
    return model


ASPECT_RATIOS = (0.5, 1.0, 2.0)


def _with_returned_layers(
    arch: str, num_classes: int, min_size: int, max_size: int, returned: list[int],
    options: dict[str, Any],
) -> nn.Module:  # fmt: skip
    """torchvision's Faster R-CNN of ``arch`` with the FPN on the ``returned`` backbone
    stages (random weights, trainable BatchNorm, as its builders make with weights=None)."""
    from torchvision.models import mobilenet_v3_large, resnet50
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import (
        _resnet_fpn_extractor,
        mobilenet_backbone,
    )

    levels = len(returned) + 1  # the FPN adds a max-pooled level on top
    if arch.startswith("fasterrcnn_mobilenet"):
        backbone = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None,
                                      fpn=True, norm_layer=nn.BatchNorm2d, trainable_layers=6,
                                      returned_layers=returned)  # fmt: skip
        del mobilenet_v3_large  # built by mobilenet_backbone
        sizes = ((32, 64, 128, 256, 512),) * levels
    else:
        body = resnet50(weights=None, norm_layer=nn.BatchNorm2d)
        backbone = _resnet_fpn_extractor(body, 5, returned_layers=returned)
        sizes = tuple((32 * 2**i,) for i in range(levels))
    anchors = AnchorGenerator(sizes, (ASPECT_RATIOS,) * levels)
    return FasterRCNN(backbone, num_classes + 1, min_size=min_size, max_size=max_size,
                      rpn_anchor_generator=anchors, **options)  # fmt: skip


def backbone_key(arch: str, classifier_key: str) -> str | None:
    """Where a classifier's state_dict key lives in a detector of ``arch`` (None when
    the detector's backbone has no such tensor, e.g. the classifier's head)."""
    if not classifier_key.startswith("backbone."):
        return None
    rest = classifier_key[len("backbone.") :]
    if arch.startswith("fasterrcnn_mobilenet"):
        # The detector's body is the classifier's ``features``, children renumbered alike.
        return "backbone.body." + rest[len("features.") :] if rest.startswith("features.") else None
    head, _, _ = rest.partition(".")
    if head in ("conv1", "bn1") or head.startswith("layer"):
        return "backbone.body." + rest
    return None


def transfer_backbone(
    detector: nn.Module, state: dict[str, Any], classifier_arch: str
) -> list[str]:
    """Copy a classifier's backbone weights (a state_dict of the architecture
    ``DETECTORS[detector.arch].backbone_arch``: e.g. the pipeline's student) into the
    detector's backbone; returns the detector keys written. The FPN, the RPN and the ROI
    heads keep their (random) weights. A classifier of another architecture, or a
    tensor of the wrong shape, is a ValueError."""
    want = DETECTORS[detector.arch].backbone_arch
    if classifier_arch != want:
        raise ValueError(
            f"{detector.arch} takes the backbone of a {want} classifier, not a {classifier_arch}"
        )
    own = detector.state_dict()
    update = {}
    for key, value in state.items():
        target = backbone_key(detector.arch, key)
        if target is None:
            continue
        if target not in own or own[target].shape != value.shape:
            got = tuple(own[target].shape) if target in own else "no such tensor"
            raise ValueError(f"{key} {tuple(value.shape)} does not fit {target} ({got})")
        update[target] = value
    body = [k for k in own if k.startswith("backbone.body.")]
    missing = sorted(set(body) - set(update))
    if missing:
        raise ValueError(f"the classifier lacks {len(missing)} backbone tensors, e.g. {missing[0]}")
    detector.load_state_dict({**own, **update})
    return sorted(update)


def load_detector(url: str, device: str | Any = "cpu") -> tuple[nn.Module, Any]:
    """A detection checkpoint as a model in eval mode, built with the options its
    training recorded (the sidecar's ``lineage.task``), and its ModelInfo."""
    from cvpipe.models.checkpoints import CheckpointError, load_state

    state, info = load_state(url)
    if info.task != "detection" or info.arch not in DETECTORS:
        raise CheckpointError(f"{url} holds a {info.task} {info.arch}, not a detector")
    task = dict(info.lineage.get("task") or {})
    kwargs = {k: task[k] for k in DETECTION_BUILD_OPTIONS if task.get(k) is not None}
    model = build_detector(info.arch, len(info.classes), **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{url} does not fit {info.arch}: {e}") from None
    return model.to(device).eval(), info


# The detection task's fields that shape the model (cvpipe.learn.tasks.detection),
# read back from a checkpoint's sidecar to rebuild the same model.
DETECTION_BUILD_OPTIONS = (
    "min_size",
    "max_size",
    "anchor_sizes",
    "box_head_dim",
    "returned_layers",
    "rpn_pre_nms_top_n_train",
    "rpn_post_nms_top_n_train",
    "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_test",
    "rpn_batch_size_per_image",
    "box_batch_size_per_image",
    "box_score_thresh",
    "box_nms_thresh",
    "box_detections_per_img",
)


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
