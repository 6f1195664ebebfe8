"""The one error path of the command line, below every CLI module.

:func:`user_errors_exit_2` turns a :class:`~cnc.base.errors.UserError` raised by a command into one ``error: ...`` line
per problem on stderr and the error's exit status (2), a ``RunError`` or a failed write (``OSError``) into one line
and exit status 1; :func:`wrap_commands` applies it to every command of a typer
app. ``cnc.cli`` wraps the whole ``cnc`` app; ``python -m cnc_model.training`` wraps its own.
"""

from __future__ import annotations

import functools
import logging
from pathlib import PurePath

import typer

from cnc.base.errors import LocationError, RunError, UserError, os_error_text
from cnc.base.location import looks_like_url


def user_errors_exit_2(fn):
    """Wrap a command: a :class:`~cnc.base.errors.UserError` becomes one ``error: ...`` line per problem on stderr
    and exit status 2; a :class:`~cnc.base.errors.RunError` or an ``OSError`` with an errno (a full disk under the
    driver's own writes) one ``error:`` line and exit status 1 (the traceback only with ``--verbose``).

    This is the one place where user errors meet the command line (every command of ``cnc`` is wrapped by
    :func:`wrap_commands`), so no command prints a traceback for input the user controls.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _refuse_urls_in_local_paths(kwargs)
            return fn(*args, **kwargs)
        except (UserError, RunError) as exc:
            for line in str(exc).splitlines() or [type(exc).__name__]:
                typer.echo(f"error: {line}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # the disk or store failed under a write: one line (errno, path), exit 1
            if exc.errno is None:
                raise
            logging.getLogger("cnc").debug("OSError", exc_info=True)  # the traceback with --verbose
            typer.echo(f"error: {os_error_text(exc)}", err=True)
            raise typer.Exit(RunError.exit_code) from None

    return wrapper


def _refuse_urls_in_local_paths(kwargs: dict) -> None:
    """Options typed as local paths never silently turn a URL into a local folder (``s3://b/x`` → ``./s3:/b/x``)."""
    for name, value in kwargs.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, PurePath) and looks_like_url(str(v)):
                raise LocationError(f"{name.replace('_', '-')} takes a local path, and {str(v)!r} is a URL "
                                    f"(for a local folder whose name has a colon, write ./{v})")


def wrap_commands(typer_app: typer.Typer) -> None:
    """Wrap every command of ``typer_app`` (and of its groups) with :func:`user_errors_exit_2`, once."""
    for info in typer_app.registered_commands:
        if info.callback is not None and not getattr(info.callback, "__wrapped__", None):
            info.callback = user_errors_exit_2(info.callback)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            wrap_commands(group.typer_instance)
