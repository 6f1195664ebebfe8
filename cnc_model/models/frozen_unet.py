"""Frozen-UNet runner with the reference's gradient flow.

The reference runs the frozen UNet's timestep embedding, encoder and middle block under ``torch.no_grad()`` and the
decoder with autograd (weights frozen, gradients pass to the context tokens and the local fuser residuals, which are
added after the no-grad section). ``UNet2DConditionModel.forward`` is monolithic, so this module re-implements it for
SD-style UNets (no class / addition embeddings, no encoder_hid_proj) calling the UNet's own sub-modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _time_embedding(unet: nn.Module, sample: torch.Tensor, timestep) -> torch.Tensor:
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb


def _encode(unet, sample, emb, encoder_hidden_states, cross_attention_kwargs):
    """conv_in, down blocks, mid block -> ``(mid_sample, skips)``."""
    sample = unet.conv_in(sample)
    skips = (sample,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                                cross_attention_kwargs=cross_attention_kwargs)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        skips += res
    if getattr(unet.mid_block, "has_cross_attention", False):
        sample = unet.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states,
                                cross_attention_kwargs=cross_attention_kwargs)
    else:
        sample = unet.mid_block(sample, emb)
    return sample, skips


def _decode(unet, sample, emb, skips, encoder_hidden_states, cross_attention_kwargs):
    """Up blocks and output head (``UNet2DConditionModel.forward`` steps 5-6)."""
    forward_upsample_size = any(s % (2 ** unet.num_upsamplers) != 0 for s in skips[0].shape[-2:])
    upsample_size = None
    for i, block in enumerate(unet.up_blocks):
        res = skips[-len(block.resnets):]
        skips = skips[: -len(block.resnets)]
        if i < len(unet.up_blocks) - 1 and forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                           encoder_hidden_states=encoder_hidden_states,
                           cross_attention_kwargs=cross_attention_kwargs, upsample_size=upsample_size)
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


def run_frozen_unet(
    unet: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
    mid_block_additional_residual: torch.Tensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    frozen_encoder_no_grad: bool = True,
) -> torch.Tensor:
    """ε prediction ``(B, out_channels, h, w)`` of an SD-style ``UNet2DConditionModel``.

    Equals ``unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=...,
    mid_block_additional_residual=..., cross_attention_kwargs=...).sample`` numerically. With
    ``frozen_encoder_no_grad=True`` (reference default) the time embedding, encoder and middle block run under
    ``torch.no_grad()``: gradients reach ``encoder_hidden_states`` only through the decoder cross-attentions and the
    residuals directly. ``False`` keeps the full graph (ablation).
    """
    cfg = unet.config
    for key in ("class_embed_type", "num_class_embeds", "addition_embed_type", "encoder_hid_dim"):
        if cfg.get(key) is not None:
            raise ValueError(f"run_frozen_unet supports SD-style UNets only; unet.config.{key}={cfg.get(key)!r}")
    if cfg.get("center_input_sample"):
        sample = 2 * sample - 1.0
    ctx = torch.no_grad() if frozen_encoder_no_grad else contextlib.nullcontext()
    with ctx:
        emb = _time_embedding(unet, sample, timestep)
        mid, skips = _encode(unet, sample, emb, encoder_hidden_states, cross_attention_kwargs)
    if down_block_additional_residuals is not None:
        if len(down_block_additional_residuals) != len(skips):
            raise ValueError(f"expected {len(skips)} down residuals, got {len(down_block_additional_residuals)}")
        skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))
    if mid_block_additional_residual is not None:
        mid = mid + mid_block_additional_residual
    return _decode(unet, mid, emb, skips, encoder_hidden_states, cross_attention_kwargs)
