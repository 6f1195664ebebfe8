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

Accepted checkpoints (:func:`detect_layout`):

* ``cnc`` -- the released ``cnc_v1.ckpt`` (stage 3): both fusers.
* ``local`` / ``global`` -- the reference's stage-1 / stage-2 Lightning checkpoints: one fuser each.
* ``uni`` -- Uni-ControlNet's ``uni.ckpt``: its local adapter (``local_adapter.*``, same layout, trained FDN,
  attention, extractors and zero convs) initialises the local fuser as the reference's ``init_local_fromuni`` does:
  every name/shape match is copied; Uni's 21-channel ``feature_extractor.pre_extractor`` is dropped and the CnC
  ``fg_extractor`` / ``bg_extractor`` stems are new (default ``nn.Conv2d`` init, seeded). Uni's own
  ``global_adapter.*`` (a different network) is ignored.

When the checkpoint holds the frozen UNet (``model.diffusion_model.*``) and a base model is given, its weights are
compared with the base UNet (via diffusers' own LDM -> diffusers key map) and every differing key is named.

Size: the key maps of three reference checkpoint kinds (cnc_v1, stage-1/2, uni.ckpt) and their checks live together
because they share one LDM → diffusers mapping.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from cnc.base.errors import UserError
from cnc.identity import local_identity

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


UNET_PREFIX = "model.diffusion_model."
#: Uni-ControlNet's 21-channel (7 conditions x 3) depth-free stem, replaced by CnC's fg/bg stems.
UNI_PRE_EXTRACTOR = "feature_extractor.pre_extractor."
LAYOUTS = ("cnc", "local", "global", "uni", "unet")


class ConversionError(UserError, ValueError):
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


def unet_key_to_reference(key: str, layers_per_block: int = 2) -> str:
    """``UNet2DConditionModel`` key -> LDM key (with ``model.diffusion_model.``); inverse of diffusers'
    ``convert_ldm_unet_checkpoint`` for SD-style UNets (used to write reference-layout test checkpoints)."""
    simple = {"conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    for old, new in simple.items():
        if key.startswith(old):
            return UNET_PREFIX + new + key[len(old):]
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key)
    if m is None:
        return UNET_PREFIX + local_key_to_reference(key, layers_per_block)[len(LOCAL_PREFIX):]
    block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
    per = layers_per_block + 1
    if kind == "upsamplers":
        raise KeyError(f"{key}: use unet_state_dict_to_reference (the upsampler index depends on the block)")
    i = block * per + layer
    if kind == "attentions":
        return f"{UNET_PREFIX}output_blocks.{i}.1.{rest}"
    return f"{UNET_PREFIX}output_blocks.{i}.0.{_resnet_to_reference(rest)}"


def _resnet_to_reference(rest: str) -> str:
    """Diffusers ResNet sub-key -> LDM ``ResBlock`` sub-key."""
    table = {"conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.", "conv2.": "out_layers.3.",
             "conv_shortcut.": "skip_connection.", "norm1.": "in_layers.0.", "norm2.": "out_layers.0."}
    old = next(o for o in table if rest.startswith(o))
    return table[old] + rest[len(old):]


def unet_state_dict_to_reference(state: Mapping[str, torch.Tensor], layers_per_block: int = 2) -> dict:
    """A whole diffusers UNet state dict -> LDM keys (``model.diffusion_model.*``), upsamplers included."""
    out = {}
    blocks_with_attn = {int(k.split(".")[1]) for k in state if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    for key, value in state.items():
        if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            block = int(m[1])
            i = block * (layers_per_block + 1) + layers_per_block
            slot = 2 if block in blocks_with_attn else 1
            out[f"{UNET_PREFIX}output_blocks.{i}.{slot}.conv.{m[2]}"] = value
        else:
            out[unet_key_to_reference(key, layers_per_block)] = value
    return out


#: Relative L2 difference (||theirs - ours|| / ||ours|| over all tensors) under which two UNets of one layout are
#: called "probably the EMA / non-EMA copy of the same model" (the two copies of one run differ slightly in every
#: tensor; an unrelated UNet differs by ~100 %). A heuristic, measured on synthetic UNets only (docs/reproduce.md).
EMA_COPY_RELATIVE = 0.1
#: ... and in at least this share of the tensors (the two copies of one run differ in every trained tensor).
EMA_COPY_TENSORS = 0.9
EMA_PREFIX = "model_ema."


def _block(key: str) -> str:
    """``down_blocks.1.resnets.0.conv1.weight`` -> ``down_blocks.1``; ``conv_in.weight`` -> ``conv_in``."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]


@dataclass
class UNetComparison:
    """A UNet compared tensor by tensor with a reference one (diffusers key names).

    Attributes:
        equal: every tensor present, same shape, bit-equal (in float32).
        verdict: ``equal`` | ``differs: this is probably the EMA/non-EMA copy ...`` | ``differs: another UNet ...``
            | ``differs in layout: ...``.
        blocks: per top-level block (``conv_in``, ``time_embedding``, ``down_blocks.i``, ``mid_block``,
            ``up_blocks.i``, ``conv_norm_out``, ``conv_out``): tensors, differing tensors, max |Δ|, relative L2 Δ.
        max_abs_diff, relative_diff: over all tensors.
        differing: keys of the differing tensors (``KEY (missing)`` / ``KEY (shape ...)`` included).
    """

    equal: bool
    verdict: str
    blocks: list[dict]
    max_abs_diff: float
    relative_diff: float
    differing: list[str]

    def as_dict(self) -> dict:
        return {"equal": self.equal, "verdict": self.verdict, "max_abs_diff": self.max_abs_diff,
                "relative_diff": self.relative_diff, "blocks": self.blocks, "differing": self.differing[:50],
                "num_differing": len(self.differing)}

    def table(self) -> str:
        """Markdown: one row per block (max |Δ|, relative Δ, differing tensors)."""
        rows = ["| block | tensors | differing | max abs diff | relative diff |", "|---|---|---|---|---|"]
        rows += [f"| {b['block']} | {b['tensors']} | {b['differing']} | {b['max_abs_diff']:.3g} | "
                 f"{b['relative_diff']:.3g} |" for b in self.blocks]
        return "\n".join(rows)


def compare_unet_states(theirs: Mapping[str, torch.Tensor], ours: Mapping[str, torch.Tensor]) -> UNetComparison:
    """Compare UNet ``theirs`` with ``ours`` (both diffusers key names) tensor by tensor, in float32."""
    blocks: dict[str, dict] = {}
    differing, layout = [], []
    total_sq = diff_sq = 0.0
    max_abs = 0.0
    for key, ref in ours.items():
        b = blocks.setdefault(_block(key), {"block": _block(key), "tensors": 0, "differing": 0, "max_abs_diff": 0.0,
                                            "_sq": 0.0, "_ref_sq": 0.0})
        b["tensors"] += 1
        other = theirs.get(key)
        if other is None or other.shape != ref.shape:
            note = "missing" if other is None else f"shape {tuple(other.shape)} vs {tuple(ref.shape)}"
            differing.append(f"{key} ({note})")
            layout.append(key)
            b["differing"] += 1
            continue
        r, o = ref.detach().float(), other.detach().float()
        ref_sq = float(r.pow(2).sum())
        b["_ref_sq"] += ref_sq
        total_sq += ref_sq
        if torch.equal(o, r):
            continue
        d = (o - r).abs()
        b["differing"] += 1
        b["max_abs_diff"] = max(b["max_abs_diff"], float(d.max()))
        b["_sq"] += float(d.pow(2).sum())
        differing.append(key)
    for b in blocks.values():
        diff_sq += b["_sq"]
        max_abs = max(max_abs, b["max_abs_diff"])
        b["relative_diff"] = (b.pop("_sq") ** 0.5) / max(b.pop("_ref_sq") ** 0.5, 1e-30)
    relative = diff_sq ** 0.5 / max(total_sq ** 0.5, 1e-30)
    n = len(ours)
    if not differing:
        verdict = "equal"
    elif layout:
        verdict = f"differs in layout: {len(layout)} of {n} tensors missing or of another shape"
    elif relative < EMA_COPY_RELATIVE and len(differing) >= EMA_COPY_TENSORS * n:
        verdict = (f"differs: this is probably the EMA/non-EMA copy of the same model ({len(differing)} of {n} "
                   f"tensors differ, max |diff| {max_abs:.3g}, relative {relative:.3g})")
    elif relative < EMA_COPY_RELATIVE:
        verdict = (f"differs: the same UNet with {len(differing)} of {n} tensors changed (max |diff| {max_abs:.3g}, "
                   f"relative {relative:.3g})")
    else:
        verdict = (f"differs: another UNet ({len(differing)} of {n} tensors differ, max |diff| {max_abs:.3g}, "
                   f"relative {relative:.3g})")
    return UNetComparison(equal=not differing, verdict=verdict, blocks=list(blocks.values()), max_abs_diff=max_abs,
                          relative_diff=relative, differing=differing)


def checkpoint_unet_state(state: Mapping[str, torch.Tensor], unet_config: Mapping,
                          ema: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's frozen UNet (``model.diffusion_model.*``; with ``ema`` its ``model_ema.*`` copy, as in
    ``v1-5-pruned.ckpt``) in diffusers key names, mapped by diffusers' own ``convert_ldm_unet_checkpoint``."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    keys = {k: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    if ema:
        keys.update({k: v for k, v in state.items() if k.startswith(EMA_PREFIX)})
    return convert_ldm_unet_checkpoint(keys, dict(unet_config), extract_ema=ema)


def has_ema_unet(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether the checkpoint also holds an EMA copy of its UNet (``model_ema.*``, > 100 tensors, as diffusers)."""
    return sum(k.startswith(EMA_PREFIX) for k in state) > 100


def unet_report(state: Mapping[str, torch.Tensor], unet: torch.nn.Module) -> dict[str, UNetComparison]:
    """The checkpoint's UNet copies compared with ``unet``: ``{"model.diffusion_model": ...}`` plus
    ``{"model_ema": ...}`` when the checkpoint has an EMA copy (``{}`` when it holds no UNet)."""
    if not any(k.startswith(UNET_PREFIX) for k in state):
        return {}
    ours = unet.state_dict()
    report = {"model.diffusion_model": compare_unet_states(checkpoint_unet_state(state, unet.config), ours)}
    if has_ema_unet(state):
        report["model_ema"] = compare_unet_states(checkpoint_unet_state(state, unet.config, ema=True), ours)
    return report


def compare_base_unet(state: Mapping[str, torch.Tensor], unet: torch.nn.Module) -> list[str]:
    """Keys (diffusers names) where the checkpoint's ``model.diffusion_model.*`` differs from ``unet``.

    The LDM keys are mapped with diffusers' ``convert_ldm_unet_checkpoint``; values are compared exactly (float32).
    Keys missing from the checkpoint are reported as ``KEY (missing)``. Returns ``[]`` when equal.
    """
    return compare_unet_states(checkpoint_unet_state(state, unet.config), unet.state_dict()).differing


def load_reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint safely: safetensors, or ``torch.load(weights_only=True)``; unwraps ``state_dict``.

    Lightning checkpoints keep their weights under ``state_dict``; the rest (optimizer states, loops, callbacks) is
    plain containers and tensors that a safe load accepts. When it holds other Python objects (e.g. hyper-parameter
    classes) the load is refused and the message names them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - the listing is best effort; the message stays useful without it
            names = []
        what = f"these Python objects: {', '.join(names)}" if names else f"non-tensor objects ({err})"
        raise ConversionError(
            f"{path} holds {what}, which a safe (weights_only=True) load refuses (Lightning metadata such as "
            "hyper-parameters). If you trust the file, re-save only its state_dict, e.g. "
            "`torch.save(torch.load(F, weights_only=False)['state_dict'], 'weights.ckpt')` or as safetensors, "
            "and convert that file.") from None
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return dict(state)


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``cnc`` (both fusers), ``local`` (stage 1), ``global`` (stage 2), ``uni`` (Uni-ControlNet ``uni.ckpt``) or
    ``unet`` (no fuser: a Stable Diffusion checkpoint such as ``v1-5-pruned.ckpt``; only ``--save-unet`` applies)."""
    if any(k.startswith(LOCAL_PREFIX + UNI_PRE_EXTRACTOR) for k in state):
        return "uni"
    has_local = any(k.startswith(LOCAL_PREFIX) for k in state)
    has_global = any(k.startswith(GLOBAL_PREFIX) for k in state)
    if has_local and has_global:
        return "cnc"
    if has_local or has_global:
        return "local" if has_local else "global"
    if any(k.startswith(UNET_PREFIX) for k in state):
        return "unet"
    raise ConversionError(f"not a CnC checkpoint: no '{LOCAL_PREFIX}*', '{GLOBAL_PREFIX}*' or '{UNET_PREFIX}*' keys")


def split_reference_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """-> ``(local, global)`` with prefixes stripped (either may be empty); SD parts and schedule buffers are dropped.

    For a ``uni`` layout the global part (Uni-ControlNet's own global adapter) is dropped.

    Raises:
        ConversionError: keys with an unknown prefix, or no fuser keys at all.
    """
    local = {k[len(LOCAL_PREFIX):]: v for k, v in state.items() if k.startswith(LOCAL_PREFIX)}
    glob = {k[len(GLOBAL_PREFIX):]: v for k, v in state.items() if k.startswith(GLOBAL_PREFIX)}
    unknown = [k for k in state if not k.startswith((LOCAL_PREFIX, GLOBAL_PREFIX, *SD_PREFIXES))
               and k not in SCHEDULE_KEYS and not (detect_layout(state) == "unet" and "." not in k)]
    if unknown:
        raise ConversionError(f"{len(unknown)} unmatched keys with unknown prefixes: {_preview(unknown)}")
    if detect_layout(state) == "uni":
        logger.info("uni.ckpt layout: Uni-ControlNet's global adapter (%d keys) is not used", len(glob))
        glob = {}
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


def convert_local_fuser(local: dict[str, torch.Tensor], config: dict | None = None, seed: int = 0):
    """Reference local-fuser weights (prefix stripped) -> a loaded ``LocalFuser``.

    ``config``: ``LocalFuser`` config (default SD 1.5); ``inject_channels`` and ``conditioning_channels`` are read from
    the weights. Uni-ControlNet weights (with ``feature_extractor.pre_extractor.*``) keep everything but that stem;
    the fg/bg depth stems are new, default-initialised after ``torch.manual_seed(seed)`` (``conditioning_channels``
    then comes from ``config``, default 3).
    """
    uni = [k for k in local if k.startswith(UNI_PRE_EXTRACTOR)]
    local = {k: v for k, v in local.items() if not k.startswith(UNI_PRE_EXTRACTOR)}
    from cnc_model.models.local_fuser import LocalFuser

    config = dict(config or {})
    zero = sorted((k for k in local if re.fullmatch(r"feature_extractor\.zero_convs\.\d+\.weight", k)),
                  key=lambda k: int(k.split(".")[2]))
    if zero:
        config["inject_channels"] = [int(local[k].shape[0]) for k in zero]
    if "feature_extractor.fg_extractor.0.weight" in local:
        config["conditioning_channels"] = int(local["feature_extractor.fg_extractor.0.weight"].shape[1])
    if uni:
        torch.manual_seed(seed)
    fuser = LocalFuser(**config)
    lpb = fuser.config.layers_per_block
    renamed, unmatched = {}, []
    for key, value in local.items():
        new = local_key_to_diffusers(key, lpb)
        (unmatched.append(LOCAL_PREFIX + key) if new is None else renamed.__setitem__(new, value))
    if unmatched:
        raise ConversionError(f"local fuser: {len(unmatched)} unmatched keys: {_preview(unmatched)}")
    if uni:
        stems = {k: v for k, v in fuser.state_dict().items()
                 if k.startswith(("depth_extractor.fg_extractor.", "depth_extractor.bg_extractor."))}
        clash = sorted(set(stems) & set(renamed))
        if clash:
            raise ConversionError(f"uni.ckpt layout with CnC depth stems as well: {_preview(clash)}")
        renamed.update(stems)
        logger.info("Uni-ControlNet init: dropped %d pre_extractor tensors; %d fg/bg stem tensors are new",
                    len(uni), len(stems))
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


def _base_config(unet) -> dict:
    from cnc_model.models.local_fuser import LocalFuser

    derived = LocalFuser.from_unet(unet, load_weights_from_unet=False).config
    return {k: v for k, v in derived.items() if not k.startswith("_")}


def check_base_weights(state: Mapping[str, torch.Tensor], unet, base_name: str) -> dict[str, UNetComparison]:
    """Compare the checkpoint's frozen UNet with ``unet`` (:func:`unet_report`) and raise when it differs.

    Checkpoints without ``model.diffusion_model.*`` keys (a bare state dict of the fusers) pass with a log line.

    Raises:
        ConversionError: the verdict, the most different blocks and the ways on (``--save-unet`` / ``model.unet``:
            the checkpoint's own UNet; ``--no-check-base``: the base's UNet anyway).
    """
    report = unet_report(state, unet)
    if not report:
        logger.info("checkpoint has no %s* weights: base UNet not compared", UNET_PREFIX)
        return report
    main = report["model.diffusion_model"]
    if not main.equal:
        worst = sorted(main.blocks, key=lambda b: -b["max_abs_diff"])[:3]
        blocks = ", ".join(f"{b['block']} max |diff| {b['max_abs_diff']:.3g}" for b in worst if b["differing"])
        raise ConversionError(
            f"the checkpoint's base UNet ({UNET_PREFIX}*) differs from {base_name} in {len(main.differing)} of "
            f"{len(unet.state_dict())} tensors: {_preview(main.differing, 10)} ({main.verdict.split(' (')[0]}; "
            f"{blocks}). Use the UNet its fusers were trained against: "
            "`cnc convert-reference CKPT -o OUT --base-model BASE --save-unet` writes it (OUT/unet; for training "
            "model.unet=OUT/unet), or --no-check-base to pair the fusers with the base's UNet anyway")
    logger.info("checkpoint's base UNet equals %s", base_name)
    return report


def convert_reference_checkpoint(
    checkpoint: str | Path | Mapping[str, torch.Tensor],
    output_dir: str | Path,
    base_model: str | Path | None = None,
    local_fuser_config: dict | None = None,
    check_base: bool = True,
    seed: int = 0,
    save_unet: bool = False,
) -> Path:
    """Convert a reference checkpoint (``cnc_v1.ckpt``, a stage-1 / stage-2 checkpoint, ``uni.ckpt``, or, with
    ``save_unet``, a plain SD checkpoint such as ``v1-5-pruned.ckpt``).

    Writes ``local_fuser/`` and/or ``global_fuser/`` (``save_pretrained``: config.json + safetensors), whichever the
    checkpoint holds. With ``base_model`` (a local diffusers SD 1.5 folder with ``vae``, ``text_encoder``,
    ``tokenizer``, ``unet`` and ``scheduler`` subfolders, or a hub id) the local fuser's architecture is derived from
    the base UNet, the checkpoint's ``model.diffusion_model.*`` (and ``model_ema.*``, when present) is compared with
    it tensor by tensor (:func:`unet_report`, written to ``unet_comparison.json``; a difference fails with
    ``check_base`` unless ``save_unet``), and a complete :class:`~cnc_model.pipeline_cnc.CnCPipeline` folder is
    written (model_index.json, DDIM scheduler; a missing fuser is ``None``; ``cnc_export.json`` records the source,
    the UNet and the reference's condition settings), loadable with ``CnCPipeline.from_pretrained(output_dir)``.

    ``save_unet`` (needs ``base_model``, whose UNet config it takes): the pipeline's ``unet/`` is **the checkpoint's
    own** ``model.diffusion_model.*`` -- the UNet its fusers were trained against -- instead of the base's; for a
    checkpoint without fusers only ``OUT/unet/`` is written. Training uses it as ``model.unet: OUT/unet``. ``seed``
    seeds the new fg/bg depth stems of a ``uni.ckpt`` conversion.

    Raises:
        ConversionError: unmatched, missing or mis-shaped keys, or base weights that differ (named in the message).
    """
    source = str(checkpoint) if isinstance(checkpoint, (str, Path)) else "a state dict"
    state = load_reference_state_dict(checkpoint) if isinstance(checkpoint, (str, Path)) else dict(checkpoint)
    layout = detect_layout(state)
    local, glob = split_reference_state_dict(state)
    output_dir = Path(output_dir)
    has_unet = any(k.startswith(UNET_PREFIX) for k in state)
    if save_unet and base_model is None:
        raise ConversionError("--save-unet needs --base-model (the UNet's config is taken from the base model)")
    if save_unet and not has_unet:
        raise ConversionError(f"--save-unet: the checkpoint holds no {UNET_PREFIX}* weights")
    if layout == "unet" and not save_unet:
        raise ConversionError(f"not a CnC checkpoint: no fuser ('{LOCAL_PREFIX}*' / '{GLOBAL_PREFIX}*'), only a UNet "
                              f"({UNET_PREFIX}*); --save-unet with --base-model writes that UNet")
    unet, own_unet, report = None, None, {}
    if base_model is not None:
        from diffusers import UNet2DConditionModel

        try:
            unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
        except (OSError, ValueError) as err:
            raise ConversionError(f"base model '{base_model}' (--base-model) could not be loaded as a diffusers SD "
                                  f"folder or hub id: {str(err).splitlines()[0]}") from None
        if check_base and not save_unet:
            report = check_base_weights(state, unet, str(base_model))
        else:
            report = unet_report(state, unet)
        for copy, comparison in report.items():
            logger.info("%s vs %s unet: %s\n%s", copy, base_model, comparison.verdict, comparison.table())
        if save_unet:
            own_unet = _own_unet(state, unet)
        if local_fuser_config is None:
            local_fuser_config = _base_config(unet)
    output_dir.mkdir(parents=True, exist_ok=True)
    if report:
        (output_dir / UNET_COMPARISON).write_text(json.dumps(
            {"base_model": str(base_model), "checkpoint": source,
             "copies": {k: v.as_dict() for k, v in report.items()}}, indent=1))
    if layout == "unet":
        own_unet.save_pretrained(output_dir / "unet")
        logger.info("wrote the checkpoint's own UNet to %s", output_dir / "unet")
        return output_dir
    local_fuser = convert_local_fuser(local, local_fuser_config, seed=seed) if local else None
    cross_dim = (local_fuser.config.cross_attention_dim if local_fuser is not None
                 else unet.config.cross_attention_dim if unet is not None
                 else (local_fuser_config or {}).get("cross_attention_dim"))
    global_fuser = convert_global_fuser(glob, cross_attention_dim=cross_dim) if glob else None
    logger.info("checkpoint layout %r: local fuser %s, global fuser %s", layout,
                "converted" if local_fuser is not None else "absent", "converted" if global_fuser else "absent")
    if base_model is None:
        for name, module in (("local_fuser", local_fuser), ("global_fuser", global_fuser)):
            if module is not None:
                module.save_pretrained(output_dir / name)
        logger.info("wrote the fusers to %s (no --base-model: SD parts not written)", output_dir)
        return output_dir
    _save_pipeline(base_model, own_unet if own_unet is not None else unet, local_fuser, global_fuser, output_dir)
    _write_export_meta(output_dir, source, layout, local_fuser, global_fuser, report, own_unet is not None)
    return output_dir


#: Written beside a conversion with ``--base-model``: the checkpoint's UNet copies vs the base UNet.
UNET_COMPARISON = "unet_comparison.json"


def _own_unet(state: Mapping[str, torch.Tensor], base_unet):
    """A ``UNet2DConditionModel`` of the base's config holding the checkpoint's ``model.diffusion_model.*``."""
    from diffusers import UNet2DConditionModel

    converted = checkpoint_unet_state(state, base_unet.config)
    own = UNet2DConditionModel.from_config(base_unet.config)
    _load_exact(own, converted, f"the checkpoint's UNet ({UNET_PREFIX}*)")
    return own


def _write_export_meta(output_dir: Path, source: str, layout: str, local_fuser, global_fuser, report: dict,
                       own_unet: bool) -> None:
    """``cnc_export.json`` of a converted pipeline: what ``cnc sample`` needs to know (the reference's conditions,
    which UNet the pipeline holds) and the comparison with the base UNet."""
    from triplets.conditions import reference_settings

    unet = None
    if own_unet:
        unet = {"id": f"{source} ({UNET_PREFIX}*)", "revision": None, "identity": local_identity(output_dir / "unet")}
    main = report.get("model.diffusion_model")
    meta = {"source": source, "kind": "reference", "layout": layout, "step": None, "stage": None, "weights": None,
            "fusers": [n for n, m in (("local_fuser", local_fuser), ("global_fuser", global_fuser)) if m is not None],
            "unet": unet, "unet_verdict": None if main is None else main.verdict,
            "conditions": {"builds": {}, "sampling": reference_settings().model_dump(),
                           "notes": ["the reference implementation's conditions (configs/build/reference-pickapic.yaml:"
                                     " U²-Net masks, MiDaS input without its transform), as its demo samples"]},
            "attention": {"resize_mode": "reference", "fp32_logits": True}}
    (output_dir / "cnc_export.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


def local_fuser_from_reference(path: str | Path, unet, conditioning_channels: int = 3, check_base: bool = True,
                               seed: int = 0, base_name: str = "the base model"):
    """A ``LocalFuser`` for ``unet`` initialised from a reference checkpoint holding ``local_adapter.*`` (``uni.ckpt``
    or a stage-1 / CnC checkpoint), as the reference's ``init_local_fromuni``; the base UNet is checked first.

    Raises:
        ConversionError: no local adapter in the file, differing base weights, or mismatching keys.
    """
    state = load_reference_state_dict(path)
    local, _ = split_reference_state_dict(state)
    if not local:
        raise ConversionError(f"{path} holds no '{LOCAL_PREFIX}*' weights (layout {detect_layout(state)!r})")
    if check_base:
        check_base_weights(state, unet, base_name)
    config = dict(_base_config(unet), conditioning_channels=conditioning_channels)
    return convert_local_fuser(local, config, seed=seed)


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
