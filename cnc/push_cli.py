"""``cnc push FOLDER REPO_ID``: publish a build folder (dataset repo) or an exported pipeline (model repo) on the
Hugging Face Hub (:mod:`cnc.publish`)."""

from __future__ import annotations

from pathlib import Path

import typer

from cnc.publish import push


def push_command(
    folder: Path = typer.Argument(..., help="A build folder (cnc build / filter / score) or an exported pipeline "
                                            "folder (cnc export)."),
    repo_id: str = typer.Argument(..., help="Hub repo id, e.g. me/cnc-triplets or me/cnc-joint (created if "
                                            "missing; a dataset repo for a build, a model repo for a pipeline)."),
    private: bool = typer.Option(False, "--private/--public", help="Create the repo private."),
    dataset: list[str] = typer.Option([], "--dataset", help="Model repos: hub id of the training data for the card's "
                                      "`datasets` (e.g. the dataset repo the build was pushed to); repeatable."),
    license: str = typer.Option(None, "--license", help="Set the card's licence (Hub identifier, e.g. cc-by-4.0).",
                                show_default=False),
    revision: str = typer.Option(None, "--revision", help="Branch to push to (default: main).", show_default=False),
    token: str = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or the saved login).",
                              show_default=False),
    message: str = typer.Option(None, "--message", "-m", help="Commit message.", show_default=False),
) -> None:
    """Publish a build as a Hub dataset repo, or an exported pipeline as a model repo, with its card (resumable:
    rerun after an interruption to upload what is missing)."""
    result = push(folder, repo_id, private=private, datasets=dataset, license=license, revision=revision,
                  token=token, commit_message=message)
    typer.echo(f"pushed {folder} to {result.kind} repo {result.repo_id}: {result.url}")


def register(app: typer.Typer) -> None:
    """Add ``cnc push`` to the root app."""
    app.command("push")(push_command)
