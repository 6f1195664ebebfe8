"""The one user-error contract.

Every problem the user can fix (a bad config, an input that cannot be read as a whole, a location no backend handles,
a missing model, an output folder of another build) raises a :class:`UserError` subclass. The ``cnc`` command line
catches :class:`UserError` once (:func:`cnc.cli.user_errors_exit_2`) and turns it into exit status 2 with one line per
problem — never a traceback. A run that fails on the way for a reason outside the input (:class:`RunError`, or an
``OSError`` such as a full disk under the driver's own writes) is one ``error:`` line too, with exit status 1.
Failures that belong to one sample are :class:`SampleError` and never stop a run.
"""

from __future__ import annotations

import errno as errno_mod


class UserError(Exception):
    """A problem with what the user asked for: reported as one line (one per problem), exit status 2."""

    exit_code = 2


class RunError(Exception):
    """A run that started failed for a reason outside the user's input (a full disk, a quota, a store that refuses
    writes): reported as one line, exit status 1. ``OSError`` reaching the command line is reported the same way."""

    exit_code = 1


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


def os_error_text(exc: OSError) -> str:
    """One line for an ``OSError`` that keeps what the user needs: errno name, message and path(s).

    ``ENOSPC`` reads ``disk full at PATH``, ``EDQUOT`` ``disk quota exceeded at PATH``; a write whose error carries
    no path (``write()`` on an open file) says so — wrap such writes in :func:`naming_path`.
    """

    path = exc.filename if exc.filename is not None else None
    where = str(path) if path is not None else "an unnamed file"
    if exc.filename2 is not None:
        where += f" -> {exc.filename2}"
    if exc.errno == errno_mod.ENOSPC:
        return f"disk full at {where} (ENOSPC: No space left on device)"
    if exc.errno == errno_mod.EDQUOT:
        return f"disk quota exceeded at {where} (EDQUOT)"
    code = errno_mod.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else None
    message = exc.strerror or (str(exc.args[0]) if exc.args else "") or type(exc).__name__
    head = f"{type(exc).__name__} [{code}]" if code else type(exc).__name__
    return f"{head}: {message}" + (f": {where}" if path is not None or exc.filename2 is not None else "")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (:func:`os_error_text` for ``OSError``), at most 300 characters."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return os_error_text(exc)[:300]
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return (f"{type(exc).__name__}: {first}" if first else type(exc).__name__)[:300]


class naming_path:  # noqa: N801 - used like a function: ``with naming_path(p): f.write(...)``
    """Give an ``OSError`` raised inside the block the path it concerns when it has none (``write()`` on an open file
    raises ``[Errno 28] No space left on device`` without naming the file), so the one-line reason says where."""

    def __init__(self, path) -> None:
        self.path = path

    def __enter__(self) -> naming_path:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.path)) from exc
        return False
