"""The single ``cnc`` command line.

Each area of the project registers its own sub-commands (``register(app)`` in
``triplets.cli``, ``pipelines.cli``, ``cnc_model.cli`` and ``jobs.cli``); heavy imports
(torch, ray, diffusers) happen inside the commands so ``cnc --help`` stays fast.
"""

from __future__ import annotations

import typer

from cnc.logs import setup_logging

app = typer.Typer(
    name="cnc",
    help="Build Compose-and-Conquer triplet shards, inspect them, train and sample CnC, submit cluster jobs.",
    no_args_is_help=True,
    add_completion=True,  # cnc --install-completion / --show-completion
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib import metadata

        try:
            version = metadata.version("cnc")
        except metadata.PackageNotFoundError:  # run from a source tree without installing
            version = "unknown"
        typer.echo(f"cnc {version}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    setup_logging("DEBUG" if verbose else "INFO")


def user_errors_exit_2(fn):
    """Wrap a command: a :class:`~cnc.base.errors.UserError` becomes one ``error: ...`` line per problem on stderr
    and exit status 2; a :class:`~cnc.base.errors.RunError` or an ``OSError`` with an errno (a full disk under the
    driver's own writes) one ``error:`` line and exit status 1 (the traceback only with ``--verbose``).

    This is the one place where user errors meet the command line (every command is wrapped by
    :func:`_register_all`), so no command prints a traceback for input the user controls.
    """
    import functools
    import logging

    from cnc.base.errors import RunError, UserError, os_error_text

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
    from pathlib import PurePath

    from cnc.base.errors import LocationError
    from cnc.base.location import looks_like_url

    for name, value in kwargs.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, PurePath) and looks_like_url(str(v)):
                raise LocationError(f"{name.replace('_', '-')} takes a local path, and {str(v)!r} is a URL "
                                    f"(for a local folder whose name has a colon, write ./{v})")


def _wrap_commands(typer_app: typer.Typer) -> None:
    for info in typer_app.registered_commands:
        if info.callback is not None and not getattr(info.callback, "__wrapped__", None):
            info.callback = user_errors_exit_2(info.callback)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _wrap_commands(group.typer_instance)


def _register_all() -> None:
    from cnc.models_cli import register as register_models
    from cnc_model.cli import register as register_model
    from jobs.cli import register as register_jobs
    from pipelines.cli import register as register_pipelines
    from triplets.cli import register as register_triplets

    for register in (register_pipelines, register_triplets, register_model, register_jobs, register_models):
        register(app)
    _wrap_commands(app)


_register_all()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
