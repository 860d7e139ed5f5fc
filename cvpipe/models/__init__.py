"""Models: architectures (``nets``), checkpoints, and where they run (``device``).

``from cvpipe import models`` gives the whole public surface, as ``torchvision.models``
does: ``models.build``, ``models.load_checkpoint``, ``models.resolve_device``...
"""

from cvpipe.models.checkpoints import (
    CheckpointError,
    ModelInfo,
    load_checkpoint,
    load_info,
    model_id,
    preprocess,
    save_checkpoint,
    sidecar_url,
)
from cvpipe.models.device import DeviceError, cpu_threads, resolve_device
from cvpipe.models.nets import (
    ARCHITECTURES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Architecture,
    Classifier,
    SmallCNN,
    build,
    stage_modules,
)

__all__ = [
    "ARCHITECTURES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Architecture",
    "CheckpointError",
    "Classifier",
    "DeviceError",
    "ModelInfo",
    "SmallCNN",
    "build",
    "cpu_threads",
    "load_checkpoint",
    "load_info",
    "model_id",
    "preprocess",
    "resolve_device",
    "save_checkpoint",
    "sidecar_url",
    "stage_modules",
]
