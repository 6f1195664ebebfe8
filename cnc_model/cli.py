"""Sub-commands of ``cnc`` that belong to ``cnc_model``: ``export``, ``convert-reference`` (+ ``sample``, ``train``,
``eval`` from their own modules).

Heavy imports (torch, diffusers, transformers) happen inside the commands so ``cnc --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from cnc.base.errors import ModelUnavailableError, UserError
from cnc.base.location import resolve
from cnc.options import Weights, deprecated_alias, value_of
from cnc_model.evaluation.cli import register as register_eval
from cnc_model.loading import WEIGHTS_HELP, NotAPipelineError, export_pipeline
from cnc_model.sample_cli import register as register_sample
from cnc_model.train_cli import register as register_train

logger = logging.getLogger(__name__)


def export(
    source: str = typer.Argument(..., help="A cnc train output folder, one of its checkpoint-N folders or a "
                                           "pipeline folder; a local path or a URL (s3://...)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the complete pipeline."),
    weights: Weights = typer.Option(None, "--weights", help=WEIGHTS_HELP, show_default=False),
    dataset: list[str] = typer.Option([], "--dataset", help="Hub id of the training data for the model card's "
                                      "`datasets` (e.g. the repo `cnc push` published the build to); repeatable."),
    license: str = typer.Option(None, "--license", help="The model card's licence (Hub identifier).",
                                show_default="creativeml-openrail-m, the licence of the SD 1.5 parts it holds"),
) -> None:
    """Export a run or checkpoint as a complete CnCPipeline folder (model_index.json, base parts, fusers, a model
    card with Hub metadata, pipeline_cnc.py for diffusers' custom_pipeline loading)."""

    weights = value_of(weights)
    if not resolve(source).exists():
        raise UserError(f"{source} does not exist")
    try:
        export_pipeline(source, output, weights=weights, datasets=dataset, license=license)
    except (NotAPipelineError, ModelUnavailableError) as err:
        raise UserError(str(err).splitlines()[0]) from None
    typer.echo(f"exported {source} -> {output}")


def convert_reference(
    checkpoint: Path = typer.Argument(
        ..., help="Reference checkpoint: cnc_v1.ckpt, a stage-1 (local) or stage-2 (global) Lightning checkpoint, "
                  "Uni-ControlNet's uni.ckpt, a plain SD checkpoint (v1-5-pruned.ckpt, with --save-unet), or a "
                  ".safetensors of one."),
    output_dir: Path = typer.Argument(None, help="Output folder (deprecated position: use --output).",
                                      show_default=False),
    output: Path = typer.Option(None, "--output", "-o", help="Output folder.", show_default=False),
    base_model: str = typer.Option(None, "--base-model",
                                   help="Diffusers SD 1.5 folder or hub id: the checkpoint's UNet is compared with "
                                        "its UNet tensor by tensor (reported, unet_comparison.json) and a complete "
                                        "CnC pipeline is written."),
    check_base: bool = typer.Option(True, "--check-base/--no-check-base",
                                    help="Fail when the checkpoint's model.diffusion_model.* differs from "
                                         "--base-model (without --save-unet)."),
    save_unet: bool = typer.Option(False, "--save-unet", help="Write the checkpoint's own UNet (the one its fusers "
                                                              "were trained against) as OUT/unet and use it in the "
                                                              "pipeline instead of --base-model's; train with "
                                                              "model.unet=OUT/unet, sample with --unet OUT/unet."),
    seed: int = typer.Option(0, "--seed", help="Seed of the new fg/bg depth stems (uni.ckpt only)."),
) -> None:
    """Convert reference weights into local_fuser/ and/or global_fuser/ (and a full pipeline with --base-model)."""

    from cnc_model.convert import UNET_COMPARISON, ConversionError, convert_reference_checkpoint

    if output is None and output_dir is None:
        raise UserError("give the output folder with --output")
    output_dir = deprecated_alias(output, output_dir, "the OUTPUT_DIR argument", "--output")
    try:
        convert_reference_checkpoint(checkpoint, output_dir, base_model=base_model, check_base=check_base,
                                     seed=seed, save_unet=save_unet)
    except (ConversionError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    comparison = output_dir / UNET_COMPARISON
    if comparison.is_file():
        for copy, report in json.loads(comparison.read_text())["copies"].items():
            typer.echo(f"{copy} vs {base_model} unet: {report['verdict']}")
            if not report["equal"]:
                typer.echo("  block: max |diff| (relative): " + ", ".join(
                    f"{b['block']} {b['max_abs_diff']:.3g} ({b['relative_diff']:.2g})" for b in report["blocks"]))
    if save_unet:
        typer.echo(f"the checkpoint's own UNet: {output_dir / 'unet'}")
    typer.echo(f"converted {checkpoint} -> {output_dir}")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    register_sample(app)
    app.command("export")(export)
    app.command("convert-reference")(convert_reference)
    register_train(app)
    register_eval(app)
