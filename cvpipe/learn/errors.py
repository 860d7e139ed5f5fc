"""The error of training that a retry cannot fix."""

from __future__ import annotations

from cvpipe.core.stage import PermanentError


class TrainingError(PermanentError, RuntimeError):
    """A training output folder that cannot be resumed, data that cannot be trained on,
    a model that cannot start, or a loss that is no longer finite."""
