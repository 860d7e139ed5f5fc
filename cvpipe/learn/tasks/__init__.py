"""Training tasks: what the loop trains and how (see :mod:`cvpipe.learn.tasks.base`).

``AnyTask`` is the config-level choice of a task (a discriminated union on ``kind``),
so a training stage's config names its task and the task's parameters like any other
field. A new task subclasses :class:`TrainTask` and joins the union here.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from cvpipe.learn.tasks.base import Built, Meter, TaskBatch, TrainTask
from cvpipe.learn.tasks.classification import ClassificationTask
from cvpipe.learn.tasks.contrastive import ContrastiveTask
from cvpipe.learn.tasks.detection import DetectionTask
from cvpipe.learn.tasks.localization import LocalizationTask
from cvpipe.learn.tasks.multilabel import MultiLabelTask
from cvpipe.learn.tasks.weak import WeakTask

AnyTask = Annotated[
    ClassificationTask
    | MultiLabelTask
    | DetectionTask
    | ContrastiveTask
    | LocalizationTask
    | WeakTask,
    Field(discriminator="kind"),
]

__all__ = [
    "AnyTask",
    "Built",
    "ClassificationTask",
    "ContrastiveTask",
    "DetectionTask",
    "LocalizationTask",
    "Meter",
    "MultiLabelTask",
    "WeakTask",
    "TaskBatch",
    "TrainTask",
]
