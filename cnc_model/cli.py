"""Sub-commands of ``cnc`` that belong to ``cnc_model``: ``sample``, ``export``, ``convert-reference`` (+ ``train``,
``eval`` from their own modules).

Heavy imports (torch, diffusers, transformers) happen inside the commands so ``cnc --help`` stays fast.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from cnc.base.errors import UserError
from cnc.hub import TINY
from cnc_model.evaluation.cli import register as register_eval
from cnc_model.loading import WEIGHTS_HELP
from cnc_model.train_cli import register as register_train

logger = logging.getLogger(__name__)


def _looks_local(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


def _load_model(spec: str, what: str, option: str, loader):
    """``loader(spec)``; any failure to find the model is a :class:`UserError` naming it and the option."""
    hint = f"{what} '{spec}' not found; pass {option} with a local folder or Hugging Face id"
    if spec == TINY:
        from cnc.tiny_store import KIND_OF_KEY, materialize

        spec = str(materialize(KIND_OF_KEY[option]))
    if _looks_local(spec) and not Path(spec).expanduser().exists():
        raise UserError(hint)
    try:
        return loader(str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec)
    except Exception as err:  # noqa: BLE001 - any load failure is reported as one line
        raise UserError(f"{hint} ({type(err).__name__})") from None


def _sheet(tiles, height: int, width: int):
    """Tiles (PIL images or (H, W[, 3]) arrays in [0, 1] / uint8) side by side -> one PIL image."""
    import numpy as np
    from PIL import Image

    row = Image.new("RGB", (width * len(tiles), height))
    for i, tile in enumerate(tiles):
        if not isinstance(tile, Image.Image):
            arr = np.asarray(tile)
            if arr.dtype != np.uint8:
                arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
            tile = Image.fromarray(arr)
        row.paste(tile.convert("RGB").resize((width, height)), (i * width, 0))
    return row


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
    steps: int = typer.Option(50, "--steps", help="DDIM steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
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
    num_images: int = typer.Option(1, "--num-images", help="Images to generate."),
    depth_model: str = typer.Option("Intel/dpt-large", "--depth-model",
                                    help="DPTForDepthEstimation hub id or local folder."),
    image_encoder: str = typer.Option("openai/clip-vit-large-patch14", "--image-encoder",
                                      help="CLIP vision model (used when the checkpoint has none)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    weights: str = typer.Option(None, "--weights", help=WEIGHTS_HELP, show_default=False),
) -> None:
    """Sample CnC from a foreground and a background photo (or one built triplet): sample_*.png and sheet.png."""
    import torch
    from PIL import Image

    from cnc.options import deprecated_alias

    out = deprecated_alias(output, out, "--out", "--output", default=Path("samples"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if shard_sample is None and (fg is None or bg is None):
        raise UserError("give --fg and --bg photos, or --shard-sample TAR#KEY")
    for path in [*((fg, bg) if shard_sample is None else ()), *(p for p in (fg_ref, bg_ref) if p is not None)]:
        if not path.is_file():
            raise UserError(f"image not found: {path}")
    negative_prompt, prompt_suffix = sampling_prompts(negative_prompt, prompt_suffix, reference_prompts)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    common = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance, fg_scale=fg_scale,
                  bg_scale=bg_scale, negative_prompt=negative_prompt, prompt_suffix=prompt_suffix,
                  fg_depth_scale=fg_depth_scale, bg_depth_scale=bg_depth_scale, generator=generator)
    if shard_sample is not None:
        triplet = _load_shard_sample(shard_sample)
        pipe = load_pipeline_or_fail(checkpoint_dir, weights=weights).to(device)
        images = pipe([prompt or triplet.caption] * num_images, fg_depth=triplet.fg_depth_float(),
                      bg_depth=triplet.bg_depth_float(), mask=triplet.mask.astype("float32"),
                      fg_reference=torch.from_numpy(triplet.fg_emb)[None],
                      bg_reference=torch.from_numpy(triplet.bg_emb)[None], **common).images
        tiles = [triplet.image, triplet.background, triplet.fg_depth_float(), triplet.bg_depth_float(),
                 triplet.mask * 255, *images]
    else:
        from cnc_model.compose import DPTDepthEstimator, SamSaliencySegmenter, compose

        if prompt is None:
            raise UserError("--prompt is required with --fg/--bg")
        depth = _load_model(depth_model, "depth model", "--depth-model", lambda s: DPTDepthEstimator(s, device))
        segmenter = None
        if sam_checkpoint is not None:
            from cnc.hub import resolve_pretrained
            from cnc.tiny_store import TINY_SAM_TYPE
            from triplets.errors import ModelUnavailableError

            try:
                sam_path = resolve_pretrained(sam_checkpoint, "--sam-checkpoint", is_file=True)
                saliency = resolve_pretrained(depth_model, "--depth-model")
            except ModelUnavailableError as err:
                raise UserError(str(err)) from None
            segmenter = SamSaliencySegmenter(sam_path, saliency, device=device,
                                             sam_model_type=TINY_SAM_TYPE if sam_checkpoint == TINY else "vit_h")
        pipe = load_pipeline_or_fail(checkpoint_dir, weights=weights)
        if pipe.global_fuser is not None and (pipe.image_encoder is None or pipe.feature_extractor is None):
            encoder, processor = _load_model(image_encoder, "image encoder", "--image-encoder", _image_encoder)
            pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
        pipe.to(device)
        refs = {k: None if p is None else Image.open(p)
                for k, p in (("fg_reference", fg_ref), ("bg_reference", bg_ref))}
        result = compose(pipe, Image.open(fg), Image.open(bg), [prompt] * num_images, depth, segmenter=segmenter,
                         **refs, **common)
        images = result.images
        tiles = [result.fg_image, result.bg_image, result.fg_depth, result.bg_depth, result.mask * 255, *images]
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(out / f"sample_{i}.png")
    _sheet(tiles, height, width).save(out / "sheet.png")
    logger.info("wrote %d samples and sheet.png to %s", len(images), out)


def _image_encoder(spec: str):
    """``(CLIPVisionModelWithProjection, CLIPImageProcessor)`` from a folder / hub id, or the seeded tiny pair."""
    if spec == "tiny":
        from cnc.tiny import tiny_clip_vision

        return tiny_clip_vision(0)
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection.from_pretrained(spec), CLIPImageProcessor.from_pretrained(spec)


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
    from cnc.base.errors import one_line
    from cnc_model.loading import NotAPipelineError, Source, load_pipeline
    from triplets.errors import ModelUnavailableError

    source = path if isinstance(path, Source) else describe_or_fail(path, option, weights)
    try:
        return source, load_pipeline(source)
    except (NotAPipelineError, ModelUnavailableError) as err:
        raise UserError(str(err).splitlines()[0]) from None
    except Exception as err:  # noqa: BLE001 - a user-given folder that does not load is one line, never a traceback
        raise UserError(f"{option} {source.path} does not load: {one_line(err)}") from None


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
                  "Uni-ControlNet's uni.ckpt, or a .safetensors of one."),
    output_dir: Path = typer.Argument(..., help="Output folder."),
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
