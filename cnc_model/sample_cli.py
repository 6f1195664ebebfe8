"""``cnc sample``: sample a pipeline, run or checkpoint from two photos (or from one built triplet).

    cnc sample out/train/joint --prompt "a corgi on a beach" --fg corgi.jpg --bg beach.jpg -o samples/
    cnc sample out/train/joint ... --set depth.preprocess=processor     # reported and recorded as a difference
    cnc sample out/cnc-paper ... -c build/reference-pickapic            # conditions of another build config
    cnc sample out/train/joint --shard-sample out/build/000000.tar#KEY  # a built triplet's own conditions

The conditions (mask, two depth maps, two CLIP embeddings) are made by the build's own stages
(:mod:`triplets.conditions`) with the settings the model's training shards were built with (recorded by ``cnc train``
in the run's provenance, by ``cnc export`` / ``cnc convert-reference`` in ``cnc_export.json``). ``-c`` / ``--set``
choose others: every difference from the training settings is reported in one line and recorded. The output folder
gets ``sample_*.png``, ``sheet.png`` and ``conditions/`` (``mask.png``, ``fg_depth.png``, ``bg_depth.png`` in the shard
format, the embeddings, and ``conditions.json``: settings, their origin, differences, model identities, UNet).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from cnc.base.errors import ModelUnavailableError, UserError
from cnc.base.location import resolve
from cnc.identity import local_identity
from cnc.options import Weights, deprecated_alias, value_of
from cnc_model.loading import WEIGHTS_HELP
from cnc_model.sources import base_model_problems, describe_source, load_source, pipeline_dtype, sampling_prompts

logger = logging.getLogger(__name__)
#: Shortcut options of ``cnc sample`` and the build keys they set.
SHORTCUTS = {"--depth-model": ("depth.model",), "--clip-model": ("embed.model",),
             "--sam-checkpoint": ("segment.backend=sam", "segment.sam_checkpoint")}
#: Column titles of ``cnc sample``'s ``sheet.png`` (then one column per generated image).
SHEET_COLUMNS = ("fg photo", "bg photo", "fg depth", "bg depth", "mask M")


class SampleError(UserError, ValueError):
    """``cnc sample`` cannot run as asked (one line)."""


def _shortcut_overrides(depth_model, clip_model, sam_checkpoint) -> tuple[list[str], dict[str, str]]:
    """The build-key overrides the shortcut options stand for, and key → option (for error messages)."""
    overrides, options = [], {}
    if sam_checkpoint is not None:
        overrides += ["segment.backend=sam", f"segment.sam_checkpoint={sam_checkpoint}"]
        options["segment.sam_checkpoint"] = "--sam-checkpoint"
    if depth_model is not None:
        overrides.append(f"depth.model={depth_model}")
        options["depth.model"] = "--depth-model"
    if clip_model is not None:
        overrides.append(f"embed.model={clip_model}")
        options["embed.model"] = "--clip-model"
    return overrides, options


def _name_options(err: Exception, options: dict[str, str]) -> str:
    """A model error's message with the option that set each config key named beside it."""
    message = str(err)
    for key, option in options.items():
        message = message.replace(f"config key {key})", f"config key {key}, option {option})")
    return message


def override_unet(pipe, path: str, source) -> dict:
    """Load the UNet folder ``path`` (``--unet``) into ``pipe``; returns its record (identity, comparison with the
    UNet the pipeline had, i.e. the one the model was trained against) and logs one line when they differ."""
    from cnc_model.convert import compare_unet_states
    from cnc_model.training.components import load_unet_folder, unet_folder

    unet = load_unet_folder(path, "--unet")
    report = compare_unet_states(unet.state_dict(), pipe.unet.state_dict())
    record = {"id": path, "identity": local_identity(unet_folder(path, "--unet")), "comparison": report.as_dict(),
              "trained": source.unet_record()}
    if report.equal:
        logger.info("--unet %s: the same weights as the model's UNet", path)
    else:
        logger.warning("--unet %s DIFFERS from the UNet the model was trained with (%s): sampling with it anyway",
                       path, report.verdict)
    pipe.set_unet(unet.to(pipe.unet.dtype))
    return record


def sample(
    checkpoint_dir: str = typer.Argument(
        ..., help="A pipeline folder (save_pretrained / cnc export / convert-reference), a cnc train output folder "
                  "or one of its checkpoint-N folders; a local path or a URL (s3://...)."),
    prompt: str = typer.Option(None, "--prompt", help="Text prompt (default with --shard-sample: its caption)."),
    fg: Path = typer.Option(None, "--fg", help="Foreground photo (the object)."),
    bg: Path = typer.Option(None, "--bg", help="Background photo (the scene)."),
    fg_mask: Path = typer.Option(None, "--fg-mask", help="A mask of the --fg photo (PNG at its size), read by the "
                                                         "build's dataset-mask rule; needed when the conditions use "
                                                         "dataset masks (segment.backend: dataset)."),
    fg_mask_kind: str = typer.Option("binary", "--fg-mask-kind", help="binary (> half range) or cocostuff (thing "
                                                                      "classes 0-90 of a COCO-Stuff label map)."),
    shard_sample: str = typer.Option(
        None, "--shard-sample", help="TAR#KEY: take depths, mask and embeddings of one built triplet instead of "
                                     "--fg/--bg."),
    config: str = typer.Option(None, "--config", "-c", help="Build config whose conditions to use (a file or a "
                                                            "shipped name, e.g. build/reference-pickapic). Default: "
                                                            "the settings of the model's training shards.",
                               show_default=False),
    overrides: list[str] = typer.Option([], "--set", help="Override a condition setting (build config keys: "
                                                          "segment.*, depth.*, embed.*, resolution, seed, dtype); "
                                                          "repeatable; reported and recorded."),
    sam_checkpoint: str = typer.Option(None, "--sam-checkpoint", help="= --set segment.backend=sam --set "
                                                                      "segment.sam_checkpoint=...", show_default=False),
    depth_model: str = typer.Option(None, "--depth-model", help="= --set depth.model=...", show_default=False),
    clip_model: str = typer.Option(None, "--clip-model", help="= --set embed.model=... (the CLIP model of the "
                                                              "embeddings)", show_default=False),
    image_encoder: str = typer.Option(None, "--image-encoder", hidden=True, help="Deprecated alias of --clip-model."),
    unet: str = typer.Option(None, "--unet", help="A saved UNet folder (cnc convert-reference --save-unet writes "
                                                  "OUT/unet) to sample with instead of the model's frozen UNet; "
                                                  "compared with it, reported and recorded.", show_default=False),
    output: Path = typer.Option(Path("samples"), "--output", "-o", help="Output folder."),
    out: Path = typer.Option(None, "--out", hidden=True, help="Deprecated alias of --output."),
    steps: int = typer.Option(50, "--steps", help="DDIM steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image; image i uses seed + i (so each image is "
                                               "reproducible on its own)."),
    height: int = typer.Option(None, "--height", help="Output height, a multiple of 8 (default: the conditions' "
                                                      "build resolution; with --shard-sample its size).",
                               show_default=False),
    width: int = typer.Option(None, "--width", help="Output width (default as --height).", show_default=False),
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
    dtype: str = typer.Option("float32", "--dtype", help="Precision of the pipeline: float32, float16 or bfloat16."),
    attention_fp32_logits: bool = typer.Option(
        None, "--attention-fp32-logits/--no-attention-fp32-logits",
        help="Attention logits and softmax in fp32 under --dtype float16/bfloat16 (the reference's precision). "
             "Default: the run's model.attention_fp32_logits (off for other folders).", show_default=False),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    weights: Weights = typer.Option(None, "--weights", help=WEIGHTS_HELP, show_default=False),
) -> None:
    """Sample CnC from a foreground and a background photo (or one built triplet): sample_*.png, a labelled
    sheet.png (columns: the conditions, then the image; one row per seed, with the prompt) and the conditions used
    (conditions/)."""
    import torch  # lazy: torch is heavy and `cnc --help` stays fast

    out = deprecated_alias(output, out, "--out", "--output", default=Path("samples"))
    n = deprecated_alias(n, num_images, "--num-images", "--n", default=1)
    clip_model = deprecated_alias(clip_model, image_encoder, "--image-encoder", "--clip-model", default=None)
    weights = value_of(weights)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = pipeline_dtype(dtype)
    if shard_sample is None and (fg is None or bg is None):
        raise SampleError("give --fg and --bg photos, or --shard-sample TAR#KEY")
    if shard_sample is not None and (config or overrides or fg_mask or sam_checkpoint or depth_model):
        raise SampleError("--shard-sample uses the triplet's own conditions: -c, --set, --fg-mask, --sam-checkpoint "
                          "and --depth-model do not apply")
    for path in [*((fg, bg) if shard_sample is None else ()), *(p for p in (fg_ref, bg_ref, fg_mask) if p)]:
        if not path.is_file():
            raise SampleError(f"image not found: {path}")
    if shard_sample is None and prompt is None:
        raise SampleError("--prompt is required with --fg/--bg")
    negative_prompt, prompt_suffix = sampling_prompts(negative_prompt, prompt_suffix, reference_prompts)
    seeds = [seed + i for i in range(n)]
    common = dict(num_inference_steps=steps, guidance_scale=guidance, fg_scale=fg_scale, bg_scale=bg_scale,
                  negative_prompt=negative_prompt, prompt_suffix=prompt_suffix, fg_depth_scale=fg_depth_scale,
                  bg_depth_scale=bg_depth_scale,
                  generator=[torch.Generator(device="cpu").manual_seed(s) for s in seeds],
                  attention_fp32_logits=attention_fp32_logits)
    shard = _shard_conditions(shard_sample) if shard_sample is not None else None  # the inputs first, then models
    source = describe_source(checkpoint_dir, weights=weights)
    shortcut, options = _shortcut_overrides(depth_model, clip_model, sam_checkpoint)
    maker = choice = resolved = None
    missing = base_model_problems(source)  # every model is checked before any loads: one line per missing model
    if shard_sample is None:  # conditions first: a missing condition model fails before the pipeline loads
        from triplets.conditions import (  # lazy: torch / transformers
            ConditionMaker,
            choose_conditions,
            resolve_condition_models,
        )

        trained, notes = source.conditions()
        choice = choose_conditions(trained, config=config, overrides=[*shortcut, *overrides], notes=notes)
        embeddings = _has_global_fuser(source)
        try:
            resolved = resolve_condition_models(choice.settings.model_ids(embeddings), choice.settings.seed)
        except ModelUnavailableError as err:
            why = ("\nthe model records no training conditions, so the default build settings were used: give the "
                   "build config its shards were made with (-c BUILD_CONFIG)" if choice.origin == "default" else "")
            missing.append(_name_options(err, options) + why)
    if missing:
        raise ModelUnavailableError("\n".join(missing))
    if shard_sample is None:
        maker = ConditionMaker(choice.settings, device=device, embeddings=embeddings, resolved=resolved)
        (logger.warning if choice.differences or choice.trained is None else logger.info)("%s", choice.line())
    _, pipe = load_source(source)
    record: dict = {"model": str(source.path), "kind": source.kind, "weights": source.weights}
    if unet is not None:
        record["unet"] = override_unet(pipe, unet, source)
    elif source.unet_record():
        record["unet"] = source.unet_record()
    pipe.to(device, torch_dtype)
    fp32 = pipe.attention_fp32_logits if attention_fp32_logits is None else attention_fp32_logits
    record["attention"] = {"resize_mode": pipe.soft_guidance_resize, "fp32_logits": fp32, "dtype": dtype}
    if shard_sample is not None:
        cond, size, caption = shard
        height, width = height or size, width or size
        prompt = prompt or caption
        images = pipe([prompt] * n, fg_depth=cond.fg_depth_float(), bg_depth=cond.bg_depth_float(),
                      mask=cond.mask.astype("float32"), fg_reference=torch.from_numpy(cond.fg_emb)[None],
                      bg_reference=torch.from_numpy(cond.bg_emb)[None], height=height, width=width, **common).images
        from triplets.conditions import compare_builds

        check = compare_builds(source.conditions_record(), [shard_sample.rsplit("#", 1)[0]])
        (logger.warning if check["differences"] or not check["trained_known"] else logger.info)(
            "%s", check["line"].replace("evaluation shards", "shard"))
        record.update(origin=f"shard sample {shard_sample}", check={k: v for k, v in check.items() if k != "line"})
    else:
        from cnc_model.compose import compose

        if pipe.global_fuser is not None and maker.embed is None and pipe.image_encoder is None:
            raise SampleError("this pipeline's global fuser needs embeddings, and its conditions have no embed model")
        result = compose(pipe, fg, bg, [prompt] * n, maker, height=height, width=width, fg_mask=fg_mask,
                         fg_mask_kind=fg_mask_kind, fg_reference=fg_ref, bg_reference=bg_ref, **common)
        images, cond = result.images, result.conditions
        height, width = cond.mask.shape
        record.update(choice.record(), models=maker.model_identities,
                      photos={"fg": str(fg), "bg": str(bg), "fg_mask": str(fg_mask) if fg_mask else None,
                              "fg_mask_kind": fg_mask_kind, "fg_ref": str(fg_ref) if fg_ref else None,
                              "bg_ref": str(bg_ref) if bg_ref else None})
    record["size"] = [height, width]
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(out / f"sample_{i}.png")
    cond.write(out / "conditions", record)
    columns = (["I (shard sample)", "I_b (shard sample)", *SHEET_COLUMNS[2:]] if shard_sample is not None
               else list(SHEET_COLUMNS))
    conditions = [cond.fg_image, cond.bg_image, cond.fg_depth_float(), cond.bg_depth_float(), cond.mask * 255]
    label = _source_label(source)
    sheet = sample_sheet(columns, conditions, images, seeds, prompt, label, (width, height),
                         footer=f"{label}: {steps} DDIM steps, guidance {guidance:g}, fg/bg scale {fg_scale:g}/"
                                f"{bg_scale:g}, depth scale {fg_depth_scale:g}/{bg_depth_scale:g}")
    sheet.save(out / "sheet.png")
    logger.info("wrote %d samples, sheet.png and conditions/ to %s", len(images), out)


def _has_global_fuser(source) -> bool:
    """Whether the model samples with a global fuser (so the conditions need CLIP embeddings)."""
    if source.config is not None:
        return source.config.trains_global
    index = source.path / "model_index.json"
    entry = json.loads(index.read_text()).get("global_fuser") if index.is_file() else None
    return bool(entry) and entry[0] is not None


def _shard_conditions(spec: str):
    """``(Conditions, size, caption)`` of the built triplet ``TAR#KEY``."""
    from triplets.conditions import Conditions  # lazy: torch / transformers

    t = load_shard_sample(spec)
    meta = t.meta or {}
    cond = Conditions(fg_image=t.image, bg_image=t.background, mask=t.mask, mask_source=str(meta.get("mask_source")),
                      mask_area=float(meta.get("mask_area", t.mask.mean())), fg_depth=t.fg_depth, bg_depth=t.bg_depth,
                      fg_depth_range=tuple(meta.get("fg_depth_range", (0.0, 1.0))),
                      bg_depth_range=tuple(meta.get("bg_depth_range", (0.0, 1.0))), fg_emb=t.fg_emb, bg_emb=t.bg_emb)
    return cond, int(t.image.shape[0]), t.caption


def load_shard_sample(spec: str):
    """``TAR#KEY`` → the decoded :class:`triplets.sample.TripletSample` (a :class:`UserError` when absent)."""
    from triplets.sample import decode_sample  # lazy: numpy / PIL decoding
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


def sample_sheet(columns: list[str], conditions: list, images: list, seeds: list[int], prompt: str, model: str,
                 size: tuple[int, int], footer: str = ""):
    """``sheet.png``: columns = the conditions (titled) + the generated image (titled with the model); one row per
    seed, its caption the seed and the prompt. ``size`` = (width, height) of a tile."""
    from triplets.inspect.grid import GridRow, labelled_grid  # lazy: PIL is heavy

    rows = [GridRow([*conditions, image], title=f"seed {s}", text=f"prompt: {prompt}")
            for s, image in zip(seeds, images)]
    return labelled_grid([*columns, f"generated: {model}"], rows, size, footer=footer)


def _source_label(source) -> str:
    """A short name of what was sampled: ``joint (checkpoint-2, ema)``, ``cnc-joint (pipeline)``."""
    name = source.path.name or "pipeline"
    if source.kind == "checkpoint":
        name = f"{source.path.parent.name}/{name}"
    return f"{name} ({source.kind}" + (f", {source.weights}" if source.weights else "") + ")"


def register(app: typer.Typer) -> None:
    """Add ``cnc sample`` to the root app."""
    app.command("sample")(sample)
