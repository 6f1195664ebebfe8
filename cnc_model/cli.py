"""Sub-commands of ``cnc`` that belong to ``cnc_model``: ``export``, ``convert-reference`` (+ ``sample``, ``train``,
``eval`` from their own modules).

Heavy imports (torch, diffusers, transformers) happen inside the commands so ``cnc --help`` stays fast.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from cnc.base.errors import UserError
from cnc_model.evaluation.cli import register as register_eval
from cnc_model.loading import WEIGHTS_HELP
from cnc_model.sample_cli import register as register_sample
from cnc_model.train_cli import register as register_train

logger = logging.getLogger(__name__)


def sampling_prompts(negative_prompt: str | None, prompt_suffix: str | None, reference: bool) -> tuple[str, str]:
    """Resolve the negative prompt and prompt suffix: explicit values win, else the reference demo's (or "")."""
    from cnc_model.pipeline_cnc import REFERENCE_NEGATIVE_PROMPT, REFERENCE_PROMPT_SUFFIX

    if negative_prompt is None:
        negative_prompt = REFERENCE_NEGATIVE_PROMPT if reference else ""
    if prompt_suffix is None:
        prompt_suffix = REFERENCE_PROMPT_SUFFIX if reference else ""
    return negative_prompt, prompt_suffix


def load_pipeline_or_fail(path: str, option: str = "PIPELINE", weights: str | None = None):
    """:func:`cnc_model.loading.load_pipeline`; an unloadable folder, weights it does not hold or a missing base
    model are a :class:`UserError` (one line)."""
    return load_source_or_fail(path, option, weights)[1]


def describe_or_fail(path: str, option: str = "PIPELINE", weights: str | None = None):
    """:func:`cnc_model.loading.describe` (cheap: no model is loaded); failures are a :class:`UserError` (one
    line)."""
    from cnc.base.location import resolve
    from cnc_model.loading import NotAPipelineError, describe
    from triplets.errors import ModelUnavailableError

    if not resolve(path).exists():
        raise UserError(f"{option} {path} does not exist")
    try:
        return describe(path, weights)
    except (NotAPipelineError, ModelUnavailableError) as err:
        raise UserError(str(err).splitlines()[0]) from None


def load_source_or_fail(path, option: str = "PIPELINE", weights: str | None = None):
    """``(Source, CnCPipeline)`` of ``path`` (a folder, or a :class:`~cnc_model.loading.Source` already described)
    with the selected ``weights``; failures are a :class:`UserError` (one line)."""
    from cnc_model.loading import NotAPipelineError, Source, load_pipeline
    from triplets.errors import ModelUnavailableError

    source = path if isinstance(path, Source) else describe_or_fail(path, option, weights)
    try:
        return source, load_pipeline(source)
    except (NotAPipelineError, ModelUnavailableError) as err:
        raise UserError(str(err).splitlines()[0]) from None


def export(
    source: str = typer.Argument(..., help="A cnc train output folder, one of its checkpoint-N folders or a "
                                           "pipeline folder; a local path or a URL (s3://...)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the complete pipeline."),
    weights: str = typer.Option(None, "--weights", help=WEIGHTS_HELP, show_default=False),
) -> None:
    """Export a run or checkpoint as a complete CnCPipeline folder (model_index.json, base parts, fusers, model
    cards)."""
    from cnc.base.location import resolve
    from cnc_model.loading import NotAPipelineError, export_pipeline
    from triplets.errors import ModelUnavailableError

    if not resolve(source).exists():
        raise UserError(f"{source} does not exist")
    try:
        export_pipeline(source, output, weights=weights)
    except (NotAPipelineError, ModelUnavailableError) as err:
        raise UserError(str(err).splitlines()[0]) from None
    typer.echo(f"exported {source} -> {output}")


def _load_shard_sample(spec: str):
    """``TAR#KEY`` → the decoded :class:`triplets.sample.TripletSample` (a :class:`UserError` when absent)."""
    from cnc.base.location import resolve
    from triplets.sample import decode_sample
    from triplets.shardio import TarStream

    if "#" not in spec:
        raise UserError(f"--shard-sample takes TAR#KEY, got {spec!r}")
    tar, key = spec.rsplit("#", 1)
    if not resolve(tar).isfile():
        raise UserError(f"shard not found: {tar}")
    for raw in TarStream(tar).samples():
        if raw["__key__"] == key:
            return decode_sample(raw)
    raise UserError(f"no sample with key {key!r} in {tar}")


def convert_reference(
    checkpoint: Path = typer.Argument(
        ..., help="Reference checkpoint: cnc_v1.ckpt, a stage-1 (local) or stage-2 (global) Lightning checkpoint, "
                  "Uni-ControlNet's uni.ckpt, a plain SD checkpoint (v1-5-pruned.ckpt, with --save-unet), or a "
                  ".safetensors of one."),
    output_dir: Path = typer.Argument(..., help="Output folder."),
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
    import json

    from cnc_model.convert import UNET_COMPARISON, ConversionError, convert_reference_checkpoint

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
