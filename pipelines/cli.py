"""Sub-commands of ``cnc`` that belong to ``pipelines``: ``cnc build``."""

from __future__ import annotations

import typer

BUILD_HELP = """Build triplet shards from an image collection on Ray (resumable, exactly-once).

Reruns with the same --input/--config/--output resume: committed shards are skipped, partial ones
rebuilt. Exit code 0 = done; 1 = failures above max_failure_fraction or shards left uncommitted;
2 = bad config/input, missing model, or an output folder holding another build.
"""


def build(
    config: str | None = typer.Option(None, "--config", "-c", help="Build config YAML (configs/build/*.yaml)."),
    input: str = typer.Option(..., "--input", "-i", help="Image folder, COCO captions .json, .tar or brace pattern; "
                                                         "a local path or a URL (s3://, gs://, ...)."),
    output: str = typer.Option(..., "--output", "-o", help="Output folder or URL (shards at the top; plan, markers, "
                                                           "errors/, manifest and dataset card under _cnc/)."),
    overrides: list[str] = typer.Option([], "--set", help="Config override key=value (dotted keys), repeatable."),
    address: str | None = typer.Option(
        None, "--address", help="Join a Ray cluster ('auto' or HOST:PORT); default: $RAY_ADDRESS if set, else a private local "
             "Ray on 127.0.0.1."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Also recompute the failed samples of "
                                                                    "committed shards."),
    input_format: str | None = typer.Option(None, "--input-format", help="auto | folder | coco | webdataset | pickapic."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help="Live progress bar "
                                                                                   "(default: on a terminal)."),
    verify: bool = typer.Option(False, "--verify", help="On resume, re-hash every committed shard against its "
                                                        "marker (default: marker + size; downloads the whole build "
                                                        "on object stores)."),
    allow_model_change: bool = typer.Option(
        False, "--allow-model-change", help="Resume although a model's weights changed (other hub commit or weight "
                                            "hash); the plan and manifest record both identities."),
) -> None:
    from pipelines.build import build_entry

    code = build_entry(config, input, output, overrides, address=address, retry_failed=retry_failed,
                       input_format=input_format, progress=progress, verify=verify,
                       allow_model_change=allow_model_change)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command("build", help=BUILD_HELP)(build)
