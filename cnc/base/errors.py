"""The one user-error contract.

Every problem the user can fix (a bad config, an input that cannot be read as a whole, a location no backend handles,
a missing model, an output folder of another build) raises a :class:`UserError` subclass. The ``cnc`` command line
catches :class:`UserError` once (:func:`cnc.cli.main`) and turns it into exit status 2 with one line per problem —
never a traceback. Failures that belong to one sample are :class:`SampleError` and never stop a run.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for: reported as one line (one per problem), exit status 2."""

    exit_code = 2


class LocationError(UserError, ValueError):
    """A path or URL that no installed filesystem backend can handle (or that is malformed)."""


class ModelUnavailableError(UserError, RuntimeError):
    """Weights of a configured model can be found neither locally nor on the hub."""


class OutputBusyError(UserError, RuntimeError):
    """The output location is held by another running build."""


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
