"""Per-sample failures: a sample that cannot be processed carries a stage and a reason."""

from __future__ import annotations


class SampleError(Exception):
    """A failure that belongs to one sample, not to the run.

    Args:
        stage: the stage that failed (``decode``, ``segment``, ``inpaint``, ``depth``, ``embed``, ``encode``).
        reason: a short, stable, human-readable reason (``"truncated image file"``, ``"empty mask"``...).
    """

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


class ModelUnavailableError(RuntimeError):
    """Weights of a configured model can be found neither locally nor on the hub."""
