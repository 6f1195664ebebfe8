"""Soft-guidance attention processor: equivalences, locality, grids, warnings (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from cnc.tiny import tiny_unet
from cnc_model.attention import (
    SoftGuidanceAttnProcessor,
    SoftGuidanceMask,
    install_soft_guidance,
    level_hw,
)
from cnc_model.testing.tiny import tiny_local_fuser

T, N, D = 77, 4, 32
K = T + 2 * N


def _attn(seed=0):
    torch.manual_seed(seed)
    return Attention(query_dim=D, cross_attention_dim=D, heads=4, dim_head=8).eval()


def _data(b=2, h=6, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h * w, D, generator=g)
    ctx = torch.randn(b, K, D, generator=g)
    mask = torch.zeros(b, 1, 8 * h, 8 * w)
    mask[:, :, 8:40, 16:56] = 1.0
    return x, ctx, mask


def _proc(**kw):
    return SoftGuidanceAttnProcessor(num_text_tokens=T, tokens_per_reference=N, **kw)


@pytest.mark.parametrize("mask_hw,q,expected", [
    ((512, 512), 64 * 64, (64, 64)), ((64, 64), 8 * 8, (8, 8)), ((120, 168), 15 * 21, (15, 21)),
    ((120, 168), 8 * 11, (8, 11)), ((64, 96), 4 * 6, (4, 6)), ((15, 21), 4 * 6, (4, 6)), ((7, 9), 7 * 9, (7, 9)),
])
def test_level_hw_ceil_halving(mask_hw, q, expected):
    assert level_hw(mask_hw, q) == expected


def test_level_hw_no_match_raises():
    with pytest.raises(ValueError, match="no ceil-halved grid"):
        level_hw((64, 64), 7 * 7)


def test_no_mask_equals_attn_processor_2_0():
    attn = _attn()
    x, ctx, _ = _data()
    ref = AttnProcessor2_0()(attn, x, ctx)
    torch.testing.assert_close(_proc()(attn, x, ctx, soft_guidance_mask=None), ref)
    # self-attention ignores the mask
    torch.testing.assert_close(_proc()(attn, x, None, soft_guidance_mask=_data()[2]), AttnProcessor2_0()(attn, x))


def test_all_fg_mask_equals_dropping_bg_tokens_and_vice_versa():
    attn = _attn()
    x, ctx, mask = _data()
    ones, zeros = torch.ones_like(mask), torch.zeros_like(mask)
    torch.testing.assert_close(_proc()(attn, x, ctx, soft_guidance_mask=ones),
                               AttnProcessor2_0()(attn, x, ctx[:, : T + N]))
    torch.testing.assert_close(_proc()(attn, x, ctx, soft_guidance_mask=zeros),
                               AttnProcessor2_0()(attn, x, torch.cat([ctx[:, :T], ctx[:, T + N:]], 1)))


def _einsum_reference(attn, x, ctx, mask, hw):
    """The reference's MaskedCrossAttention math (square-free version): fp32 logits, -max fill, one softmax."""
    b, h = x.shape[0], attn.heads
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    q, k, v = (t.reshape(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    fg = F.interpolate(mask, size=hw, mode="bicubic", align_corners=False).bool().flatten(2).transpose(1, 2)
    vis = torch.cat([torch.ones(b, fg.shape[1], T, dtype=torch.bool), fg.repeat(1, 1, N), (~fg).repeat(1, 1, N)], -1)
    sim = sim.masked_fill(~vis[:, None], -torch.finfo(sim.dtype).max)
    out = torch.einsum("bhij,bhjd->bhid", sim.softmax(-1), v).transpose(1, 2).reshape(b, -1, h * q.shape[-1])
    return attn.to_out[0](out)


def test_matches_reference_einsum_with_soft_mask():
    attn = _attn()
    x, ctx, mask = _data()
    mask = torch.rand(2, 1, 48, 80).round()  # ragged, bicubic ringing included
    torch.testing.assert_close(_proc()(attn, x, ctx, soft_guidance_mask=mask),
                               _einsum_reference(attn, x, ctx, mask, (6, 10)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["reference", "nearest", "area"])
def test_locality_fg_and_bg_tokens(mode):
    attn = _attn()
    x, ctx, mask = _data()
    proc = _proc(resize_mode=mode)
    base = proc(attn, x, ctx, soft_guidance_mask=mask)
    fg_grid = SoftGuidanceMask(mask).visibility(60, 2, T, N, mode)[:, 0, :, T]  # (B, Q) True inside
    assert fg_grid.any() and (~fg_grid).any()
    ctx_fg = ctx.clone()
    ctx_fg[:, T:T + N] += torch.randn(2, N, D)
    out_fg = proc(attn, x, ctx_fg, soft_guidance_mask=mask)
    changed = (out_fg - base).abs().amax(-1) > 1e-6
    assert torch.equal(changed, fg_grid)  # only queries inside the mask change
    ctx_bg = ctx.clone()
    ctx_bg[:, T + N:] += torch.randn(2, N, D)
    changed = (proc(attn, x, ctx_bg, soft_guidance_mask=mask) - base).abs().amax(-1) > 1e-6
    assert torch.equal(changed, ~fg_grid)


def test_reference_mode_dilates_and_nearest_does_not():
    mask = torch.zeros(1, 1, 64, 64)
    mask[:, :, 24:40, 24:40] = 1
    ref = SoftGuidanceMask(mask).visibility(32 * 32, 1, T, N, "reference")[0, 0, :, T].sum()
    near = SoftGuidanceMask(mask).visibility(32 * 32, 1, T, N, "nearest")[0, 0, :, T].sum()
    assert near == 8 * 8 and ref > near  # bicubic ringing != 0 counts as foreground


def test_no_nan_for_empty_full_or_fp16_masks():
    attn = _attn()
    x, ctx, mask = _data()
    for m in (torch.zeros_like(mask), torch.ones_like(mask), mask):
        assert torch.isfinite(_proc()(attn, x, ctx, soft_guidance_mask=m)).all()
    # with a large additive key mask on top (encoder_attention_mask path) there is still no NaN
    key_mask = torch.zeros(2, 1, K)
    key_mask[:, :, :T] = -10000.0
    out = _proc()(attn, x, ctx, attention_mask=key_mask, soft_guidance_mask=torch.zeros_like(mask))
    assert torch.isfinite(out).all()


def test_cfg_batch_tiles_mask_and_cache_is_per_query_length():
    attn = _attn()
    x, ctx, mask = _data(b=1)
    state = SoftGuidanceMask(mask)
    single = _proc()(attn, x, ctx, soft_guidance_mask=state)
    double = _proc()(attn, torch.cat([x, x]), torch.cat([ctx, ctx]), soft_guidance_mask=state)
    torch.testing.assert_close(double[1:], single)
    assert len(state._cache) == 2  # batch 1 and batch 2 at Q=60
    v1 = state.visibility(60, 2, T, N, "reference")
    assert v1 is state.visibility(60, 2, T, N, "reference")  # cached, not rebuilt


def test_context_length_mismatch_raises():
    attn = _attn()
    x, ctx, mask = _data()
    with pytest.raises(ValueError, match="context tokens"):
        _proc()(attn, x, ctx[:, :80], soft_guidance_mask=mask)


def test_install_on_unet_and_fuser_no_warnings_and_mask_none_unchanged(monkeypatch):
    import diffusers.models.attention_processor as ap

    warnings = []
    monkeypatch.setattr(ap.logger, "warning", lambda msg, *a, **k: warnings.append(str(msg)))
    unet = tiny_unet(seed=0)
    fuser = tiny_local_fuser(unet)
    g = torch.Generator().manual_seed(0)
    sample, ctx = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, K, D, generator=g)
    depth = torch.rand(2, 3, 64, 96, generator=g)
    ref = unet(sample, 5, ctx).sample
    install_soft_guidance(unet, fuser, num_text_tokens=T, tokens_per_reference=N)
    assert len(unet.attn_processors) == 12 and len(fuser.attn_processors) == 6
    assert all(isinstance(p, SoftGuidanceAttnProcessor) for p in unet.attn_processors.values())
    torch.testing.assert_close(unet(sample, 5, ctx, cross_attention_kwargs={"soft_guidance_mask": None}).sample, ref)
    mask = torch.zeros(2, 1, 64, 96)
    mask[:, :, 10:50, 20:70] = 1
    kwargs = {"soft_guidance_mask": SoftGuidanceMask(mask)}
    down, mid = fuser(sample, 5, ctx, depth, depth, cross_attention_kwargs=kwargs, return_dict=False)
    out = unet(sample, 5, ctx, cross_attention_kwargs=kwargs, down_block_additional_residuals=down,
               mid_block_additional_residual=mid).sample
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    assert not [w for w in warnings if "not expected" in w], warnings


def test_gradients_reach_tokens_with_checkpointing():
    unet = tiny_unet(seed=0)
    install_soft_guidance(unet, num_text_tokens=T, tokens_per_reference=N)
    unet.enable_gradient_checkpointing()
    unet.train()
    ctx = torch.randn(1, K, D, requires_grad=True)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :] = 1
    unet(torch.randn(1, 4, 8, 8), 5, ctx, cross_attention_kwargs={"soft_guidance_mask": mask}).sample.sum().backward()
    assert ctx.grad[:, T:].abs().amax() > 0
