"""Sub-commands of ``cnc`` that belong to ``cnc_model``: ``sample``, ``export``, ``convert-reference`` (+ ``train``,
``eval`` from their own modules).

Heavy imports (torch, diffusers, transformers) happen inside the commands so ``cnc --help`` stays fast.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from cnc.base.errors import ModelUnavailableError, UserError
from cnc.base.location import resolve
from cnc.hub import TINY
from cnc.options import Weights, deprecated_alias, value_of
from cnc.tiny_store import TINY_SAM_TYPE
from cnc_model.evaluation.cli import register as register_eval
from cnc_model.loading import WEIGHTS_HELP, NotAPipelineError, export_pipeline
from cnc_model.sources import describe_source, load_source, resolve_sampling_models, sampling_prompts
from cnc_model.train_cli import register as register_train

logger = logging.getLogger(__name__)


#: Column titles of ``cnc sample``'s ``sheet.png`` (then one column per generated image).
SHEET_COLUMNS = ("fg photo", "bg photo", "fg depth", "bg depth", "mask M")


def sample(
    checkpoint_dir: str = typer.Argument(
        ..., help="A pipeline folder (save_pretrained / cnc export / convert-reference), a cnc train output folder "
                  "or one of its checkpoint-N folders; a local path or a URL (s3://...)."),
    prompt: str = typer.Option(None, "--prompt", help="Text prompt (default with --shard-sample: its caption)."),
    fg: Path = typer.Option(None, "--fg", help="Foreground photo (the object)."),
    bg: Path = typer.Option(None, "--bg", help="Background photo (the scene)."),
    shard_sample: str = typer.Option(
        None, "--shard-sample", help="TAR#KEY: take depths, mask and embeddings of one built triplet instead of "
                                     "--fg/--bg."),
    sam_checkpoint: str = typer.Option(
        None, "--sam-checkpoint", help="SAM .pth (or 'tiny'): mask from the builder's SAM + saliency-prior backend; "
                                       "default: mask from the foreground depth."),
    output: Path = typer.Option(Path("samples"), "--output", "-o", help="Output folder."),
    out: Path = typer.Option(None, "--out", hidden=True, help="Deprecated alias of --output."),
    steps: int = typer.Option(50, "--steps", min=1, help="DDIM steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image; image i uses seed + i (so each image is "
                                               "reproducible on its own)."),
    height: int = typer.Option(512, "--height", help="Output height (multiple of 8)."),
    width: int = typer.Option(512, "--width", help="Output width (multiple of 8)."),
    fg_scale: float = typer.Option(1.0, "--fg-scale", help="lambda of the foreground tokens (0-2)."),
    bg_scale: float = typer.Option(1.0, "--bg-scale", help="lambda of the background tokens (0-2)."),
    negative_prompt: str = typer.Option(None, "--negative-prompt",
                                        help="Unconditional-branch text (default: the reference demo's).",
                                        show_default=False),
    prompt_suffix: str = typer.Option(None, "--prompt-suffix", help="Appended to the prompt (default: the reference "
                                      "demo's ', masterpiece, ultra detailed, high resolution').", show_default=False),
    reference_prompts: bool = typer.Option(True, "--reference-prompts/--no-reference-prompts",
                                           help="Default negative prompt and suffix of the reference demo; "
                                                "--no-reference-prompts makes both empty."),
    fg_depth_scale: float = typer.Option(1.0, "--fg-depth-scale", help="Foreground depth strength (0-2)."),
    bg_depth_scale: float = typer.Option(1.0, "--bg-depth-scale", help="Background depth strength (0-2)."),
    fg_ref: Path = typer.Option(None, "--fg-ref", help="Foreground exemplar image (default: the --fg photo)."),
    bg_ref: Path = typer.Option(None, "--bg-ref", help="Background exemplar image (default: the --bg photo)."),
    n: int = typer.Option(1, "--n", "-n", min=1, help="Images to generate (seeds --seed, --seed + 1, ...)."),
    num_images: int = typer.Option(None, "--num-images", hidden=True, help="Deprecated alias of --n."),
    depth_model: str = typer.Option("Intel/dpt-large", "--depth-model",
                                    help="DPTForDepthEstimation hub id, local folder or 'tiny' (with --fg/--bg)."),
    clip_model: str = typer.Option("openai/clip-vit-large-patch14", "--clip-model",
                                   help="CLIP vision model for the --fg/--bg references (used when the checkpoint "
                                        "has none); hub id, local folder or 'tiny'."),
    image_encoder: str = typer.Option(None, "--image-encoder", hidden=True, help="Deprecated alias of --clip-model."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    weights: Weights = typer.Option(None, "--weights", help=WEIGHTS_HELP, show_default=False),
) -> None:
    """Sample CnC from a foreground and a background photo (or one built triplet): sample_*.png and a labelled
    sheet.png (columns: the conditions, then the image; one row per seed, with the prompt)."""
    import torch
    from PIL import Image


    out = deprecated_alias(output, out, "--out", "--output", default=Path("samples"))
    n = deprecated_alias(n, num_images, "--num-images", "--n", default=1)
    clip_model = deprecated_alias(clip_model, image_encoder, "--image-encoder", "--clip-model",
                                  default="openai/clip-vit-large-patch14")
    weights = value_of(weights)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if shard_sample is None and (fg is None or bg is None):
        raise UserError("give --fg and --bg photos, or --shard-sample TAR#KEY")
    for path in [*((fg, bg) if shard_sample is None else ()), *(p for p in (fg_ref, bg_ref) if p is not None)]:
        if not path.is_file():
            raise UserError(f"image not found: {path}")
    if shard_sample is None and prompt is None:
        raise UserError("--prompt is required with --fg/--bg")
    triplet = _load_shard_sample(shard_sample) if shard_sample is not None else None
    # every model is checked before any loads (one line per missing model, in seconds)
    source = describe_source(checkpoint_dir, weights=weights)
    resolved = resolve_sampling_models(source, triplet is None, depth_model, sam_checkpoint, clip_model)
    negative_prompt, prompt_suffix = sampling_prompts(negative_prompt, prompt_suffix, reference_prompts)
    seeds = [seed + i for i in range(n)]
    generator = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    common = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance, fg_scale=fg_scale,
                  bg_scale=bg_scale, negative_prompt=negative_prompt, prompt_suffix=prompt_suffix,
                  fg_depth_scale=fg_depth_scale, bg_depth_scale=bg_depth_scale, generator=generator)
    if triplet is not None:
        pipe = load_source(source)[1].to(device)
        prompt = prompt or triplet.caption
        images = pipe([prompt] * n, fg_depth=triplet.fg_depth_float(),
                      bg_depth=triplet.bg_depth_float(), mask=triplet.mask.astype("float32"),
                      fg_reference=torch.from_numpy(triplet.fg_emb)[None],
                      bg_reference=torch.from_numpy(triplet.bg_emb)[None], **common).images
        conditions = [triplet.image, triplet.background, triplet.fg_depth_float(), triplet.bg_depth_float(),
                      triplet.mask * 255]
        columns = ["I (shard sample)", "I_b (shard sample)", *SHEET_COLUMNS[2:]]
    else:
        from cnc_model.compose import DPTDepthEstimator, SamSaliencySegmenter, compose

        depth = DPTDepthEstimator(resolved["--depth-model"], device)
        segmenter = None
        if sam_checkpoint is not None:
            segmenter = SamSaliencySegmenter(resolved["--sam-checkpoint"], resolved["--depth-model"], device=device,
                                             sam_model_type=TINY_SAM_TYPE if sam_checkpoint == TINY else "vit_h")
        pipe = load_source(source)[1]
        if "--clip-model" in resolved:
            encoder, processor = _image_encoder(resolved["--clip-model"])
            pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
        pipe.to(device)
        refs = {k: None if p is None else Image.open(p)
                for k, p in (("fg_reference", fg_ref), ("bg_reference", bg_ref))}
        result = compose(pipe, Image.open(fg), Image.open(bg), [prompt] * n, depth, segmenter=segmenter,
                         **refs, **common)
        images = result.images
        conditions = [result.fg_image, result.bg_image, result.fg_depth, result.bg_depth, result.mask * 255]
        columns = list(SHEET_COLUMNS)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(out / f"sample_{i}.png")
    label = _source_label(source)
    sheet = sample_sheet(columns, conditions, images, seeds, prompt, label, (width, height),
                         footer=f"{label}: {steps} DDIM steps, guidance {guidance:g}, fg/bg scale {fg_scale:g}/"
                                f"{bg_scale:g}, depth scale {fg_depth_scale:g}/{bg_depth_scale:g}")
    sheet.save(out / "sheet.png")
    logger.info("wrote %d samples and sheet.png to %s", len(images), out)


def sample_sheet(columns: list[str], conditions: list, images: list, seeds: list[int], prompt: str, model: str,
                 size: tuple[int, int], footer: str = ""):
    """``sheet.png``: columns = the conditions (titled) + the generated image (titled with the model); one row per
    seed, its caption the seed and the prompt. ``size`` = (width, height) of a tile."""
    from triplets.inspect.grid import GridRow, labelled_grid  # PIL: heavy

    rows = [GridRow([*conditions, image], title=f"seed {s}", text=f"prompt: {prompt}")
            for s, image in zip(seeds, images)]
    return labelled_grid([*columns, f"generated: {model}"], rows, size, footer=footer)


def _source_label(source) -> str:
    """A short name of what was sampled: ``joint (checkpoint-2, ema)``, ``cnc-joint (pipeline)``."""
    name = source.path.name or "pipeline"
    if source.kind == "checkpoint":
        name = f"{source.path.parent.name}/{name}"
    return f"{name} ({source.kind}" + (f", {source.weights}" if source.weights else "") + ")"


def _image_encoder(spec: str):
    """``(CLIPVisionModelWithProjection, CLIPImageProcessor)`` from a folder / hub id (resolved up front)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection.from_pretrained(spec), CLIPImageProcessor.from_pretrained(spec)


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


def _load_shard_sample(spec: str):
    """``TAR#KEY`` → the decoded :class:`triplets.sample.TripletSample` (a :class:`UserError` when absent)."""
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
                  "Uni-ControlNet's uni.ckpt, or a .safetensors of one."),
    output_dir: Path = typer.Argument(None, help="Output folder (deprecated position: use --output).",
                                      show_default=False),
    output: Path = typer.Option(None, "--output", "-o", help="Output folder.", show_default=False),
    base_model: str = typer.Option(None, "--base-model",
                                   help="Diffusers SD 1.5 folder or hub id; checks the checkpoint's base UNet "
                                        "against it and writes a complete CnC pipeline."),
    check_base: bool = typer.Option(True, "--check-base/--no-check-base",
                                    help="Fail when the checkpoint's model.diffusion_model.* differs from "
                                         "--base-model."),
    seed: int = typer.Option(0, "--seed", help="Seed of the new fg/bg depth stems (uni.ckpt only)."),
) -> None:
    """Convert reference weights into local_fuser/ and/or global_fuser/ (and a full pipeline with --base-model)."""
    from cnc_model.convert import ConversionError, convert_reference_checkpoint

    if output is None and output_dir is None:
        raise UserError("give the output folder with --output")
    output_dir = deprecated_alias(output, output_dir, "the OUTPUT_DIR argument", "--output")
    try:
        convert_reference_checkpoint(checkpoint, output_dir, base_model=base_model, check_base=check_base,
                                     seed=seed)
    except (ConversionError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    typer.echo(f"converted {checkpoint} -> {output_dir}")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command("sample")(sample)
    app.command("export")(export)
    app.command("convert-reference")(convert_reference)
    register_train(app)
    register_eval(app)
