"""Soft guidance: CnC's token-group masked cross-attention as a diffusers attention processor.

In every cross-attention of the frozen UNet and of the local fuser, the context is ``[T text, N fg, N bg]`` tokens
(T = 77, N = 4 for the released weights). Text columns are visible to every query, fg columns only to queries inside
the mask M, bg columns only outside it; one softmax runs over all keys (the mask acts on the logits). Self-attention
ignores the mask. ``soft_guidance_mask=None`` is plain SDPA attention (identical to ``AttnProcessor2_0``).

The mask reaches the processors through ``cross_attention_kwargs={"soft_guidance_mask": m}``, where ``m`` is a
``(B, 1, H, W)`` tensor in [0, 1] (image or latent size) or a :class:`SoftGuidanceMask` wrapping one; the wrapper caches
the boolean visibility per query length so it is built once per forward (or once per sampling run), not per layer.

Usage::

    install_soft_guidance(unet, local_fuser)  # every Attention layer of both
    unet(x, t, context, cross_attention_kwargs={"soft_guidance_mask": SoftGuidanceMask(mask)})
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

#: ``reference``: bicubic, antialias off, any non-zero value is foreground (the reference's rule; dilates ~1 latent
#: pixel at edges). ``nearest``: nearest-exact resize, >= 0.5. ``area``: area average, >= 0.5 (majority vote).
RESIZE_MODES = ("reference", "nearest", "area")


def level_hw(mask_hw: tuple[int, int], query_len: int) -> tuple[int, int]:
    """Grid ``(h, w)`` of a layer with ``query_len`` queries, found by ceil-halving the mask size.

    UNet downsamplers map ``h -> ceil(h / 2)``, and the VAE downsamples by an exact power of two, so halving an
    image- or latent-size mask until ``h * w == query_len`` finds the level (``h * w`` strictly decreases, so the first
    match is the only one). Works for non-square and odd sizes, unlike ``sqrt(query_len)``.

    Raises:
        ValueError: when no halving of ``mask_hw`` has ``query_len`` cells.
    """
    h, w = int(mask_hw[0]), int(mask_hw[1])
    while h * w > query_len and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != query_len:
        raise ValueError(
            f"soft_guidance_mask of size {tuple(mask_hw)} has no ceil-halved grid with {query_len} cells; "
            "resize the mask to the image (or latent) size first")
    return h, w


def resize_mask(mask: torch.Tensor, hw: tuple[int, int], mode: str = "reference") -> torch.Tensor:
    """``(B, 1, H, W)`` float mask in [0, 1] -> boolean foreground ``(B, 1, h, w)`` by the rule of ``mode``."""
    mask = mask.float()
    if mode == "reference":
        return F.interpolate(mask, size=hw, mode="bicubic", align_corners=False, antialias=False) != 0
    if mode == "nearest":
        return F.interpolate(mask, size=hw, mode="nearest-exact") >= 0.5
    if mode == "area":
        return F.interpolate(mask, size=hw, mode="area") >= 0.5
    raise ValueError(f"unknown resize mode {mode!r}; valid: {RESIZE_MODES}")


class SoftGuidanceMask:
    """A ``(B, 1, H, W)`` mask in [0, 1] plus a cache of per-layer boolean visibilities.

    Pass one instance (instead of the raw tensor) as ``soft_guidance_mask`` to share the cache between the UNet and the
    local fuser and across denoising steps. The cache is keyed by query length, hidden batch, token counts and mode.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise ValueError(f"soft_guidance_mask must be (B, 1, H, W), got {tuple(mask.shape)}")
        self.mask = mask
        self._cache: dict[tuple, torch.Tensor] = {}

    def visibility(self, query_len: int, batch: int, num_text: int, num_tokens: int, mode: str) -> torch.Tensor:
        """Boolean ``(batch, 1, query_len, num_text + 2 * num_tokens)``, True = attend.

        ``batch`` may be a multiple of the mask batch (classifier-free guidance concatenates branches along the batch;
        the mask is tiled, so every branch sees the same mask).
        """
        key = (query_len, batch, num_text, num_tokens, mode)
        if key not in self._cache:
            self._cache[key] = self._build(query_len, batch, num_text, num_tokens, mode)
        return self._cache[key]

    def _build(self, query_len: int, batch: int, num_text: int, num_tokens: int, mode: str) -> torch.Tensor:
        mb = self.mask.shape[0]
        if batch % mb:
            raise ValueError(f"hidden batch {batch} is not a multiple of the soft_guidance_mask batch {mb}")
        fg = resize_mask(self.mask, level_hw(self.mask.shape[-2:], query_len), mode)  # (mb, 1, h, w)
        fg = fg.flatten(2).transpose(1, 2)  # (mb, Q, 1)
        text = torch.ones(mb, query_len, num_text, dtype=torch.bool, device=fg.device)
        vis = torch.cat([text, fg.expand(-1, -1, num_tokens), (~fg).expand(-1, -1, num_tokens)], dim=-1)
        return vis.repeat(batch // mb, 1, 1).unsqueeze(1)  # (batch, 1, Q, K), broadcast over heads


class SoftGuidanceAttnProcessor:
    """SDPA attention processor with CnC soft guidance in cross-attention (drop-in for ``AttnProcessor2_0``).

    Args:
        num_text_tokens: T, text tokens at the start of the context (77).
        tokens_per_reference: N, tokens per reference image (4); the context has ``T + 2N`` keys.
        resize_mode: how the mask is brought to each layer's grid, one of :data:`RESIZE_MODES`.
        fp32_logits: when the model runs in fp16/bf16, compute the logits ``Q K^T / sqrt(d)`` (from fp32 Q and K, with
            autocast off) and the softmax in fp32, then multiply the probabilities (cast back) with V -- the
            reference's ``_ATTN_PRECISION = "fp32"``. fp32 models are unaffected (SDPA already works in fp32).
    """

    def __init__(self, num_text_tokens: int = 77, tokens_per_reference: int = 4, resize_mode: str = "reference",
                 fp32_logits: bool = False):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode {resize_mode!r}; valid: {RESIZE_MODES}")
        self.num_text_tokens = num_text_tokens
        self.tokens_per_reference = tokens_per_reference
        self.resize_mode = resize_mode
        self.fp32_logits = fp32_logits

    def _soft_mask(self, soft_guidance_mask, query_len: int, batch: int, num_keys: int, device) -> torch.Tensor:
        expected = self.num_text_tokens + 2 * self.tokens_per_reference
        if num_keys != expected:
            raise ValueError(f"soft guidance expects {expected} context tokens "
                             f"({self.num_text_tokens} text + 2x{self.tokens_per_reference}), got {num_keys}")
        if torch.is_tensor(soft_guidance_mask):
            soft_guidance_mask = SoftGuidanceMask(soft_guidance_mask)
        vis = soft_guidance_mask.visibility(
            query_len, batch, self.num_text_tokens, self.tokens_per_reference, self.resize_mode)
        return vis.to(device)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        soft_guidance_mask: torch.Tensor | SoftGuidanceMask | None = None,
    ) -> torch.Tensor:
        """Same contract as ``AttnProcessor2_0.__call__`` plus ``soft_guidance_mask`` (used in cross-attention only)."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = hidden_states.shape if not is_cross else encoder_hidden_states.shape
        query_len = hidden_states.shape[1]

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if is_cross and soft_guidance_mask is not None:
            vis = self._soft_mask(soft_guidance_mask, query_len, batch_size, sequence_length, hidden_states.device)
            if attention_mask is None:
                attention_mask = vis
            else:  # combine with an additive key mask; finite minimum, never -inf
                neg = torch.finfo(attention_mask.dtype).min
                attention_mask = (attention_mask + torch.where(vis, 0.0, neg).to(attention_mask.dtype)).clamp(min=neg)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, Q, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, K, d)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # Text columns are always visible, so no row is fully masked and the softmax never sees an all -inf row.
        if self.fp32_logits and query.dtype != torch.float32:
            hidden_states = fp32_logits_attention(query, key, value, attention_mask, attn.scale)
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def fp32_logits_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention with fp32 logits and softmax: ``(B, h, Q, d)``, ``(B, h, K, d)`` x2 -> ``(B, h, Q, d)`` in
    ``value.dtype``. ``attention_mask``: boolean (True = attend) or additive, broadcastable to ``(B, h, Q, K)``;
    hidden entries get ``-finfo(float32).max`` as in the reference."""
    with torch.autocast(device_type=query.device.type, enabled=False):
        logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale  # (B, h, Q, K)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                logits = logits.masked_fill(~attention_mask, -torch.finfo(torch.float32).max)
            else:
                logits = logits + attention_mask.float()
        probs = logits.softmax(dim=-1)
    return torch.matmul(probs.to(value.dtype), value)


def install_soft_guidance(
    *models,
    num_text_tokens: int = 77,
    tokens_per_reference: int = 4,
    resize_mode: str = "reference",
    fp32_logits: bool = False,
) -> SoftGuidanceAttnProcessor:
    """Install one :class:`SoftGuidanceAttnProcessor` on **every** attention layer of each model.

    Every layer, not only ``attn2``: diffusers passes the same ``cross_attention_kwargs`` to self-attention, and a
    processor without a ``soft_guidance_mask`` parameter would log "not expected" warnings. Do not call
    ``enable_xformers_memory_efficient_attention`` / ``set_default_attn_processor`` / ``fuse_qkv_projections``
    afterwards: they replace the processors.
    """
    processor = SoftGuidanceAttnProcessor(num_text_tokens, tokens_per_reference, resize_mode, fp32_logits)
    for model in models:
        if model is not None:
            model.set_attn_processor(processor)
    return processor


def has_soft_guidance(model) -> bool:
    """True when every attention processor of ``model`` is a :class:`SoftGuidanceAttnProcessor`."""
    procs = model.attn_processors.values()
    return bool(procs) and all(isinstance(p, SoftGuidanceAttnProcessor) for p in procs)
