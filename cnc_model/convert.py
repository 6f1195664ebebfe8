"""Convert the reference's released checkpoint (``cnc_v1.ckpt``, LDM / ControlNet layout) to this project's layout.

The reference state dict holds ``local_adapter.*`` (local fuser), ``global_adapter.*`` (global fuser),
``model.diffusion_model.*`` (frozen SD 1.5 UNet), ``first_stage_model.*`` (VAE), ``cond_stage_model.*`` (CLIP text)
and DDPM schedule buffers. Only the two fusers were trained; the SD parts equal SD 1.5, so they are taken from a
diffusers SD 1.5 folder (``base_model``) instead of being converted.

Key renaming of the local fuser (LDM ``input_blocks`` -> diffusers, as ``diffusers.loaders.single_file_utils``):

=====================================================  ==========================================================
reference (``local_adapter.`` stripped)                 ``LocalFuser``
=====================================================  ==========================================================
``time_embed.0`` / ``time_embed.2``                    ``time_embedding.linear_1`` / ``linear_2``
``input_blocks.0.0``                                   ``conv_in``
``input_blocks.i.0.<resnet>`` (level b, layer l)       ``down_blocks.b.resnets.l.<resnet renamed>``
``input_blocks.i.1.*``                                 ``down_blocks.b.attentions.l.*``
``input_blocks.i.0.op`` (l == layers_per_block)        ``down_blocks.b.downsamplers.0.conv``
``middle_block.0`` / ``.1`` / ``.2``                   ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``
``zero_convs.i.0`` / ``middle_block_out.0``            ``controlnet_down_blocks.i`` / ``controlnet_mid_block``
``feature_extractor.*``                                ``depth_extractor.*``
=====================================================  ==========================================================

with ``b = (i - 1) // (layers_per_block + 1)``, ``l = (i - 1) % (layers_per_block + 1)`` and the ResNet renames
``in_layers.0 -> norm1``, ``in_layers.2 -> conv1``, ``emb_layers.1 -> time_emb_proj``, ``out_layers.0 -> norm2``,
``out_layers.3 -> conv2``, ``skip_connection -> conv_shortcut``, ``norm_in -> norm1`` and ``norm_out -> norm2`` (FDN).
The global fuser keys load unchanged.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Mapping

import torch

logger = logging.getLogger(__name__)

LOCAL_PREFIX = "local_adapter."
GLOBAL_PREFIX = "global_adapter."
#: Prefixes of the frozen SD parts (not converted; taken from ``base_model``).
SD_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.")
#: DDPM schedule buffers of the LDM wrapper (recomputed by the diffusers scheduler).
SCHEDULE_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
}
_RESNET_RENAMES = (
    ("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."),
    ("norm_in.", "norm1."), ("norm_out.", "norm2."),
)


class ConversionError(ValueError):
    """The checkpoint does not match the target modules; the message names the offending keys."""


def _rename_resnet(rest: str) -> str | None:
    for old, new in _RESNET_RENAMES:
        if rest.startswith(old):
            return new + rest[len(old):]
    return None


def local_key_to_diffusers(key: str, layers_per_block: int = 2) -> str | None:
    """Reference local-fuser key (without ``local_adapter.``) -> ``LocalFuser`` key, or ``None`` if unknown."""
    simple = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
              "input_blocks.0.0.": "conv_in.", "middle_block_out.0.": "controlnet_mid_block.",
              "feature_extractor.": "depth_extractor."}
    for old, new in simple.items():
        if key.startswith(old):
            return new + key[len(old):]
    if m := re.fullmatch(r"zero_convs\.(\d+)\.0\.(.+)", key):
        return f"controlnet_down_blocks.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", key):
        idx, rest = int(m[1]), m[2]
        if idx == 1:
            return f"mid_block.attentions.0.{rest}"
        renamed = _rename_resnet(rest)
        return None if renamed is None or idx not in (0, 2) else f"mid_block.resnets.{idx // 2}.{renamed}"
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        block, layer = (i - 1) // (layers_per_block + 1), (i - 1) % (layers_per_block + 1)
        if layer == layers_per_block:
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}" if rest.startswith("op.") and j == 0 else None
        if j == 1:
            return f"down_blocks.{block}.attentions.{layer}.{rest}"
        renamed = _rename_resnet(rest) if j == 0 else None
        return None if renamed is None else f"down_blocks.{block}.resnets.{layer}.{renamed}"
    return None


def local_key_to_reference(key: str, layers_per_block: int = 2) -> str:
    """``LocalFuser`` key -> reference key (with ``local_adapter.``); the inverse of :func:`local_key_to_diffusers`."""
    inverse = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
               "conv_in.": "input_blocks.0.0.", "controlnet_mid_block.": "middle_block_out.0.",
               "depth_extractor.": "feature_extractor."}
    resnet = {"conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.", "conv2.": "out_layers.3.",
              "conv_shortcut.": "skip_connection.", "norm1.conv_": "norm_in.conv_", "norm2.conv_": "norm_out.conv_",
              "norm1.": "in_layers.0.", "norm2.": "out_layers.0."}

    def res(rest: str) -> str:
        old = next(o for o in resnet if rest.startswith(o))
        return resnet[old] + rest[len(old):]

    for old, new in inverse.items():
        if key.startswith(old):
            return LOCAL_PREFIX + new + key[len(old):]
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
        return f"{LOCAL_PREFIX}zero_convs.{m[1]}.0.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", key):
        if m[1] == "attentions":
            return f"{LOCAL_PREFIX}middle_block.1.{m[3]}"
        return f"{LOCAL_PREFIX}middle_block.{2 * int(m[2])}.{res(m[3])}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if m is None:
        raise KeyError(key)
    block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
    if kind == "downsamplers":
        return f"{LOCAL_PREFIX}input_blocks.{1 + block * (layers_per_block + 1) + layers_per_block}.0.op.{rest[5:]}"
    i = 1 + block * (layers_per_block + 1) + layer
    if kind == "attentions":
        return f"{LOCAL_PREFIX}input_blocks.{i}.1.{rest}"
    return f"{LOCAL_PREFIX}input_blocks.{i}.0.{res(rest)}"


def load_reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint safely: safetensors, or ``torch.load(weights_only=True)``; unwraps ``state_dict``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConversionError(
            f"{path} contains non-tensor objects that a safe (weights_only) load refuses: {err}. Re-save its "
            "state_dict as safetensors in a trusted environment and convert that file instead.") from err
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return dict(state)


def split_reference_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """-> ``(local, global)`` with prefixes stripped; SD parts and schedule buffers are dropped.

    Raises:
        ConversionError: keys with an unknown prefix, or no fuser keys at all.
    """
    local = {k[len(LOCAL_PREFIX):]: v for k, v in state.items() if k.startswith(LOCAL_PREFIX)}
    glob = {k[len(GLOBAL_PREFIX):]: v for k, v in state.items() if k.startswith(GLOBAL_PREFIX)}
    unknown = [k for k in state if not k.startswith((LOCAL_PREFIX, GLOBAL_PREFIX, *SD_PREFIXES))
               and k not in SCHEDULE_KEYS]
    if unknown:
        raise ConversionError(f"{len(unknown)} unmatched keys with unknown prefixes: {_preview(unknown)}")
    if not local or not glob:
        raise ConversionError(f"not a CnC checkpoint: {len(local)} '{LOCAL_PREFIX}*' and {len(glob)} "
                              f"'{GLOBAL_PREFIX}*' keys (both are required)")
    return local, glob


def _preview(keys: list[str], n: int = 20) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``module``; raise :class:`ConversionError` naming unmatched, missing and mis-shaped keys."""
    target = module.state_dict()
    unmatched = [k for k in state if k not in target]
    missing = [k for k in target if k not in state]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in state
              if k in target and state[k].shape != target[k].shape]
    if unmatched or missing or shapes:
        parts = [f"{name} ({len(keys)}): {_preview(keys)}" for name, keys in
                 (("unmatched keys", unmatched), ("missing keys", missing), ("shape mismatches", shapes)) if keys]
        raise ConversionError(f"{what} does not match: " + "; ".join(parts))
    module.load_state_dict({k: v.to(target[k].dtype) for k, v in state.items()}, strict=True)


def convert_local_fuser(local: dict[str, torch.Tensor], config: dict | None = None):
    """Reference local-fuser weights (prefix stripped) -> a loaded ``LocalFuser``.

    ``config``: ``LocalFuser`` config (default SD 1.5); ``inject_channels`` and ``conditioning_channels`` are read from
    the weights.
    """
    from cnc_model.models.local_fuser import LocalFuser

    config = dict(config or {})
    zero = sorted((k for k in local if re.fullmatch(r"feature_extractor\.zero_convs\.\d+\.weight", k)),
                  key=lambda k: int(k.split(".")[2]))
    if zero:
        config["inject_channels"] = [int(local[k].shape[0]) for k in zero]
    if "feature_extractor.fg_extractor.0.weight" in local:
        config["conditioning_channels"] = int(local["feature_extractor.fg_extractor.0.weight"].shape[1])
    fuser = LocalFuser(**config)
    lpb = fuser.config.layers_per_block
    renamed, unmatched = {}, []
    for key, value in local.items():
        new = local_key_to_diffusers(key, lpb)
        (unmatched.append(LOCAL_PREFIX + key) if new is None else renamed.__setitem__(new, value))
    if unmatched:
        raise ConversionError(f"local fuser: {len(unmatched)} unmatched keys: {_preview(unmatched)}")
    _load_exact(fuser, renamed, "local fuser")
    return fuser


def convert_global_fuser(glob: dict[str, torch.Tensor], cross_attention_dim: int | None = None,
                         tokens_per_reference: int = 4):
    """Reference global-fuser weights (prefix stripped) -> a loaded ``GlobalFuser`` (sizes read from the weights)."""
    from cnc_model.models.global_fuser import GlobalFuser

    try:
        embed = int(glob["norm1_fg.weight"].shape[0])
        hidden = int(glob["norm2_fg.weight"].shape[0])
        out = int(glob["ff2_fg.net.2.weight"].shape[0])
    except KeyError as err:
        raise ConversionError(f"global fuser: missing key {GLOBAL_PREFIX}{err.args[0]}") from err
    fuser = GlobalFuser(image_embed_dim=embed, cross_attention_dim=cross_attention_dim or out // tokens_per_reference,
                        tokens_per_reference=tokens_per_reference, hidden_mult=hidden // embed)
    _load_exact(fuser, glob, "global fuser")
    return fuser


def convert_reference_checkpoint(
    checkpoint: str | Path | Mapping[str, torch.Tensor],
    output_dir: str | Path,
    base_model: str | Path | None = None,
    local_fuser_config: dict | None = None,
) -> Path:
    """Convert ``cnc_v1.ckpt`` into ``output_dir``.

    Always writes ``local_fuser/`` and ``global_fuser/`` (``save_pretrained``: config.json + safetensors). With
    ``base_model`` (a local diffusers SD 1.5 folder with ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` and
    ``scheduler`` subfolders, or a hub id) it writes a complete :class:`~cnc_model.pipeline_cnc.CnCPipeline` folder
    (model_index.json, DDIM scheduler) loadable with ``CnCPipeline.from_pretrained(output_dir)``; the local fuser's
    architecture is then derived from the base UNet's config.

    Raises:
        ConversionError: unmatched, missing or mis-shaped keys (named in the message).
    """
    state = load_reference_state_dict(checkpoint) if isinstance(checkpoint, (str, Path)) else dict(checkpoint)
    local, glob = split_reference_state_dict(state)
    output_dir = Path(output_dir)
    unet = None
    if base_model is not None:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
        if local_fuser_config is None:
            from cnc_model.models.local_fuser import LocalFuser

            derived = LocalFuser.from_unet(unet, load_weights_from_unet=False).config
            local_fuser_config = {k: v for k, v in derived.items() if not k.startswith("_")}
    local_fuser = convert_local_fuser(local, local_fuser_config)
    global_fuser = convert_global_fuser(glob, cross_attention_dim=local_fuser.config.cross_attention_dim)
    if base_model is None:
        local_fuser.save_pretrained(output_dir / "local_fuser")
        global_fuser.save_pretrained(output_dir / "global_fuser")
        logger.info("wrote local_fuser/ and global_fuser/ to %s (no --base-model: SD parts not written)", output_dir)
        return output_dir
    _save_pipeline(base_model, unet, local_fuser, global_fuser, output_dir)
    return output_dir


def _save_pipeline(base_model, unet, local_fuser, global_fuser, output_dir: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from cnc_model.pipeline_cnc import CnCPipeline

    pipe = CnCPipeline(
        vae=AutoencoderKL.from_pretrained(base_model, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer"),
        unet=unet, local_fuser=local_fuser, global_fuser=global_fuser,
        # Reference sampler: DDIM, "uniform" spacing = leading, steps_offset 1, set_alpha_to_one False.
        scheduler=DDIMScheduler.from_pretrained(base_model, subfolder="scheduler", timestep_spacing="leading",
                                                steps_offset=1, set_alpha_to_one=False, clip_sample=False),
    )
    pipe.save_pretrained(output_dir)
    logger.info("wrote a CnC pipeline (base %s) to %s", base_model, output_dir)
