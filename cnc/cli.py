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
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    setup_logging("DEBUG" if verbose else "INFO")


def _register_all() -> None:
    from triplets.cli import register as register_triplets
    from pipelines.cli import register as register_pipelines
    from cnc_model.cli import register as register_model
    from jobs.cli import register as register_jobs
    from cnc.models_cli import register as register_models

    for register in (register_pipelines, register_triplets, register_model, register_jobs, register_models):
        register(app)


_register_all()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
