"""The single ``cnc`` command line.

Each area of the project registers its own sub-commands (``register(app)`` in
``triplets.cli``, ``pipelines.cli``, ``cnc_model.cli``, ``jobs.cli`` and ``cnc.models_cli``); every command is
wrapped by :func:`cnc.commands.wrap_commands` (a ``UserError`` becomes ``error: ...`` and exit 2). Heavy imports
(torch, ray, diffusers) happen inside the commands so ``cnc --help`` stays fast.
"""

from __future__ import annotations

from importlib import metadata

import typer

from cnc.commands import wrap_commands
from cnc.logs import quiet_library_progress, setup_logging
from cnc.models_cli import register as register_models
from cnc.push_cli import register as register_push
from cnc_model.cli import register as register_model
from jobs.cli import register as register_jobs
from pipelines.cli import register as register_pipelines
from triplets.cli import register as register_triplets

app = typer.Typer(
    name="cnc",
    help="Build Compose-and-Conquer triplet shards, inspect them, train and sample CnC, submit cluster jobs.",
    no_args_is_help=True,
    add_completion=True,  # cnc --install-completion / --show-completion
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
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
    quiet_library_progress()  # off a terminal: no library progress bars in any command's log


def _register_all() -> None:
    for register in (register_pipelines, register_triplets, register_model, register_jobs, register_models,
                     register_push):
        register(app)
    wrap_commands(app)


_register_all()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
