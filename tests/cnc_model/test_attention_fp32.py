"""fp32 attention logits in the soft-guidance processor (the reference's ``_ATTN_PRECISION = "fp32"``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from cnc.tiny import tiny_unet
from cnc_model.attention import SoftGuidanceAttnProcessor, install_soft_guidance

T, N, D = 77, 4, 32


def _setup(dtype):
    torch.manual_seed(0)
    attn = Attention(query_dim=D, cross_attention_dim=D, heads=4, dim_head=8).eval().to(dtype)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 6 * 10, D, generator=g) * 4).to(dtype)
    ctx = (torch.randn(2, T + 2 * N, D, generator=g) * 4).to(dtype)
    mask = torch.zeros(2, 1, 48, 80)
    mask[:, :, 8:40, 16:56] = 1.0
    return attn, x, ctx, mask


def _hand_reference(attn, x, ctx, mask):
    """Q, K, V in the model dtype; logits, -max fill and softmax in fp32; probabilities cast back for P @ V."""
    b, h = x.shape[0], attn.heads
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    q, k, v = (t.reshape(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
    sim = torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) * q.shape[-1] ** -0.5
    fg = F.interpolate(mask, size=(6, 10), mode="bicubic", align_corners=False).bool().flatten(2).transpose(1, 2)
    vis = torch.cat([torch.ones(b, 60, T, dtype=torch.bool), fg.repeat(1, 1, N), (~fg).repeat(1, 1, N)], -1)
    sim = sim.masked_fill(~vis[:, None], -torch.finfo(torch.float32).max).softmax(-1)
    out = torch.einsum("bhij,bhjd->bhid", sim.to(v.dtype), v).transpose(1, 2).reshape(b, -1, h * q.shape[-1])
    return attn.to_out[0](out)


def test_fp32_logits_in_bf16_match_hand_computed_reference():
    attn, x, ctx, mask = _setup(torch.bfloat16)
    proc = SoftGuidanceAttnProcessor(T, N, fp32_logits=True)
    out = proc(attn, x, ctx, soft_guidance_mask=mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, _hand_reference(attn, x, ctx, mask), rtol=0, atol=0)
    # closer to the all-fp32 result than bf16 SDPA is (or as close)
    attn32 = Attention(query_dim=D, cross_attention_dim=D, heads=4, dim_head=8).eval()
    attn32.load_state_dict({k: v.float() for k, v in attn.state_dict().items()})
    exact = SoftGuidanceAttnProcessor(T, N)(attn32, x.float(), ctx.float(), soft_guidance_mask=mask)
    plain = SoftGuidanceAttnProcessor(T, N)(attn, x, ctx, soft_guidance_mask=mask)
    assert (out.float() - exact).abs().mean() <= (plain.float() - exact).abs().mean() * 1.05


def test_fp32_models_unchanged_and_install_passes_flag():
    attn, x, ctx, mask = _setup(torch.float32)
    on = SoftGuidanceAttnProcessor(T, N, fp32_logits=True)(attn, x, ctx, soft_guidance_mask=mask)
    off = SoftGuidanceAttnProcessor(T, N)(attn, x, ctx, soft_guidance_mask=mask)
    assert torch.equal(on, off)
    unet = tiny_unet(seed=0)
    proc = install_soft_guidance(unet, num_text_tokens=T, tokens_per_reference=N, fp32_logits=True)
    assert proc.fp32_logits and all(p is proc for p in unet.attn_processors.values())
