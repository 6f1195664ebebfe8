"""LocalFuser / GlobalFuser / FDN / frozen-UNet runner on tiny seeded models (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from cnc.tiny import TINY_CROSS_ATTENTION_DIM, TINY_IMAGE_EMBED_DIM, tiny_unet
from cnc_model.models import FDNResnetBlock2D, GlobalFuser, LocalFuser, run_frozen_unet
from cnc_model.models.depth_extractor import default_inject_channels
from cnc_model.testing.tiny import randomize_zero_convs, tiny_global_fuser, tiny_local_fuser

K = 77 + 8


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=0)


@pytest.fixture()
def fuser(unet):
    return tiny_local_fuser(unet)


def _inputs(b=2, h=8, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, h, w, generator=g), torch.randn(b, K, TINY_CROSS_ATTENTION_DIM, generator=g),
            torch.rand(b, 3, 8 * h, 8 * w, generator=g), torch.rand(b, 3, 8 * h, 8 * w, generator=g))


def test_inject_channels_follow_reference_and_scale():
    assert default_inject_channels((320, 640, 1280, 1280)) == (192, 256, 384, 512)
    assert default_inject_channels((32, 64)) == (16, 24)


def test_from_unet_structure(unet, fuser):
    # 1 conv_in + 2 levels x 2 resnets + 1 downsampler = 6 residuals; first resnet of each level is FDN.
    assert len(fuser.controlnet_down_blocks) == 6
    assert all(isinstance(b.resnets[0], FDNResnetBlock2D) for b in fuser.down_blocks)
    assert not any(isinstance(b.resnets[1], FDNResnetBlock2D) for b in fuser.down_blocks)
    # copied weights: conv1 of the FDN resnet and the attention projections equal the UNet's
    torch.testing.assert_close(fuser.down_blocks[0].resnets[0].conv1.weight,
                               unet.down_blocks[0].resnets[0].conv1.weight)
    torch.testing.assert_close(fuser.mid_block.attentions[0].transformer_blocks[0].attn2.to_k.weight,
                               unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k.weight)
    torch.testing.assert_close(fuser.time_embedding.linear_1.weight, unet.time_embedding.linear_1.weight)


def test_fdn_resnet_loads_sd_resnet_with_exact_mismatch(unet):
    resnet = unet.down_blocks[1].resnets[0]  # 32 -> 64, has conv_shortcut
    fdn = FDNResnetBlock2D.from_resnet(resnet, feat_channels=24)
    missing, unexpected = fdn.load_state_dict(resnet.state_dict(), strict=False)
    assert sorted(missing) == sorted(f"{n}.{c}.{p}" for n in ("norm1", "norm2") for c in ("conv_gamma", "conv_beta")
                                     for p in ("weight", "bias"))
    assert sorted(unexpected) == ["norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight"]


@pytest.mark.parametrize("hw", [(8, 12), (7, 9)])  # 64x96 images, and odd latents
def test_residual_shapes_match_unet_skips(fuser, unet, hw):
    sample, ctx, fg, bg = _inputs(h=hw[0], w=hw[1])
    down, mid = fuser(sample, 10, ctx, fg, bg, return_dict=False)
    assert len(down) == 6
    assert [tuple(d.shape[1:]) for d in down][-1] == (64, (hw[0] + 1) // 2, (hw[1] + 1) // 2)
    assert mid.shape == (2, 64, (hw[0] + 1) // 2, (hw[1] + 1) // 2)
    out = unet(sample, 10, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert out.shape == sample.shape


def test_fresh_fuser_is_identity_for_any_depth(fuser, unet):
    sample, ctx, _, _ = _inputs()
    ref = unet(sample, 10, ctx).sample
    for seed in range(2):
        g = torch.Generator().manual_seed(100 + seed)
        fg, bg = torch.rand(2, 3, 64, 96, generator=g), torch.rand(2, 3, 64, 96, generator=g) * 5
        down, mid = fuser(sample, 10, ctx, fg, bg, return_dict=False)
        out = unet(sample, 10, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_depth_conditions_output_once_zero_convs_are_trained(fuser):
    randomize_zero_convs(fuser)
    sample, ctx, fg, bg = _inputs()
    _, mid_a = fuser(sample, 10, ctx, fg, bg, return_dict=False)
    _, mid_b = fuser(sample, 10, ctx, fg, torch.zeros_like(bg), return_dict=False)
    _, mid_c = fuser(sample, 10, ctx, torch.zeros_like(fg), bg, return_dict=False)
    assert (mid_a - mid_b).abs().max() > 1e-4 and (mid_a - mid_c).abs().max() > 1e-4


def test_gradient_checkpointing_same_grads(unet):
    grads = []
    for ckpt in (False, True):
        fuser = tiny_local_fuser(unet)
        randomize_zero_convs(fuser)
        fuser.train()
        if ckpt:
            fuser.enable_gradient_checkpointing()
        sample, ctx, fg, bg = _inputs()
        down, mid = fuser(sample, 10, ctx, fg, bg, return_dict=False)
        (sum(d.square().mean() for d in down) + mid.square().mean()).backward()
        grads.append(fuser.depth_extractor.fg_extractor[0].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_local_fuser_save_load_roundtrip(fuser, tmp_path):
    randomize_zero_convs(fuser)
    fuser.save_pretrained(tmp_path / "lf")
    assert (tmp_path / "lf" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = LocalFuser.from_pretrained(tmp_path / "lf")
    assert list(loaded.config.inject_channels) == [16, 24]
    sample, ctx, fg, bg = _inputs()
    for a, b in zip(fuser(sample, 3, ctx, fg, bg, return_dict=False)[0], loaded(sample, 3, ctx, fg, bg,
                                                                                    return_dict=False)[0]):
        torch.testing.assert_close(a, b)


def test_global_fuser_shapes_scales_and_roundtrip(tmp_path):
    gf = tiny_global_fuser()
    fg, bg = torch.randn(3, TINY_IMAGE_EMBED_DIM), torch.randn(3, TINY_IMAGE_EMBED_DIM)
    tokens = gf(fg, bg)
    assert tokens.shape == (3, 8, TINY_CROSS_ATTENTION_DIM)
    scaled = gf(fg, bg, fg_scale=0.5, bg_scale=2.0)
    torch.testing.assert_close(scaled[:, :4], 0.5 * tokens[:, :4])
    torch.testing.assert_close(scaled[:, 4:], 2.0 * tokens[:, 4:])
    per_sample = gf(fg, bg, fg_scale=torch.tensor([0.0, 1.0, 2.0]))
    assert per_sample[0, :4].abs().max() == 0 and torch.allclose(per_sample[2, :4], 2 * tokens[2, :4])
    # fg tokens depend only on the fg embedding
    assert torch.equal(gf(fg, torch.zeros_like(bg))[:, :4], tokens[:, :4])
    # zero embedding still gives non-zero "null" tokens (LayerNorm bias / FF biases), as the reference
    assert gf(torch.zeros(1, TINY_IMAGE_EMBED_DIM), torch.zeros(1, TINY_IMAGE_EMBED_DIM)).abs().max() > 0
    gf.save_pretrained(tmp_path / "gf")
    torch.testing.assert_close(GlobalFuser.from_pretrained(tmp_path / "gf")(fg, bg), tokens)


def test_global_fuser_reference_key_shapes():
    with torch.device("meta"):
        sd = GlobalFuser().state_dict()  # SD 1.5 sizes
    assert sd["ff1_fg.net.0.proj.weight"].shape == (6144, 768)
    assert sd["ff1_fg.net.2.weight"].shape == (1536, 3072)
    assert sd["ff2_bg.net.0.proj.weight"].shape == (12288, 1536)
    assert sd["ff2_bg.net.2.weight"].shape == (3072, 6144)


@pytest.mark.parametrize("hw", [(8, 12), (7, 9)])
def test_frozen_unet_runner_equals_unet(unet, fuser, hw):
    randomize_zero_convs(fuser)
    sample, ctx, fg, bg = _inputs(h=hw[0], w=hw[1])
    down, mid = fuser(sample, 10, ctx, fg, bg, return_dict=False)
    ref = unet(sample, 10, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    for no_grad in (True, False):
        out = run_frozen_unet(unet, sample, 10, ctx, down, mid, frozen_encoder_no_grad=no_grad)
        torch.testing.assert_close(out, ref)


def test_frozen_unet_runner_gradient_paths(unet):
    sample, ctx, _, _ = _inputs()
    grads = {}
    for no_grad in (True, False):
        c = ctx.clone().requires_grad_(True)
        mid = torch.zeros(2, 64, 4, 6, requires_grad=True)
        run_frozen_unet(unet, sample, 10, c, None, mid, frozen_encoder_no_grad=no_grad).square().mean().backward()
        assert mid.grad is not None and mid.grad.abs().max() > 0
        grads[no_grad] = c.grad.clone()
    # context gradients exist either way (decoder cross-attention) but the encoder part is cut with no_grad
    assert grads[True].abs().max() > 0
    assert not torch.allclose(grads[True], grads[False])
