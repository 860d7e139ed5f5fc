"""Models: architectures (``nets``), checkpoints, and where they run (``device``).

``from cvpipe import models`` gives the whole public surface, as ``torchvision.models``
does: ``models.build``, ``models.load_checkpoint``, ``models.resolve_device``...
"""

from cvpipe.models.checkpoints import (
    CLASSIFIER_TASKS,
    CheckpointError,
    ModelInfo,
    check_fits,
    load_checkpoint,
    load_info,
    load_model,
    load_state,
    model_id,
    preprocess,
    save_checkpoint,
    sidecar_url,
)
from cvpipe.models.detection import (
    DETECTION_BUILD_OPTIONS,
    DETECTORS,
    Detector,
    backbone_key,
    build_detector,
    detector_head_modules,
    detector_stage_modules,
    load_detector,
    transfer_backbone,
)
from cvpipe.models.device import DeviceError, cpu_threads, cudnn_autotune, resolve_device
from cvpipe.models.nets import (
    ARCHITECTURES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Architecture,
    Classifier,
    EmbeddingNet,
    SmallCNN,
    build,
    stage_modules,
)


def stages_of(arch: str) -> tuple[str, ...]:
    """The named backbone stages of a classifier or detector architecture."""
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch].stages
    if arch in DETECTORS:
        return DETECTORS[arch].stages
    raise ValueError(
        f"unknown architecture {arch!r}; choose from {sorted([*ARCHITECTURES, *DETECTORS])}"
    )


__all__ = [
    "ARCHITECTURES",
    "CLASSIFIER_TASKS",
    "DETECTION_BUILD_OPTIONS",
    "DETECTORS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Architecture",
    "CheckpointError",
    "Classifier",
    "DeviceError",
    "Detector",
    "EmbeddingNet",
    "ModelInfo",
    "SmallCNN",
    "build",
    "backbone_key",
    "build_detector",
    "check_fits",
    "cpu_threads",
    "cudnn_autotune",
    "detector_head_modules",
    "detector_stage_modules",
    "load_checkpoint",
    "load_detector",
    "load_info",
    "load_model",
    "load_state",
    "model_id",
    "preprocess",
    "resolve_device",
    "save_checkpoint",
    "sidecar_url",
    "stage_modules",
    "stages_of",
    "transfer_backbone",
]
