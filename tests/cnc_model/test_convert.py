"""Conversion of the reference checkpoint layout (synthetic, scaled-down state dict) and ``cnc convert-reference``."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from cnc import tiny
from cnc_model.convert import (
    ConversionError,
    convert_reference_checkpoint,
    local_key_to_reference,
)
from cnc_model.models import GlobalFuser, LocalFuser
from cnc_model.testing.tiny import randomize_zero_convs, tiny_global_fuser, tiny_local_fuser


def _config(module) -> dict:
    return {k: v for k, v in module.config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def fusers():
    lf = tiny_local_fuser(seed=1)
    randomize_zero_convs(lf, seed=1)
    return lf, tiny_global_fuser(seed=1)


@pytest.fixture(scope="module")
def reference_sd(fusers):
    """Reference-named state dict (scaled down) + SD parts and schedule buffers the converter must skip."""
    lf, gf = fusers
    sd = {local_key_to_reference(k, 2): v.clone() for k, v in lf.state_dict().items()}
    sd.update({f"global_adapter.{k}": v.clone() for k, v in gf.state_dict().items()})
    sd.update({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(1),
               "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.zeros(1),
               "betas": torch.zeros(3), "alphas_cumprod": torch.zeros(3)})
    return sd


def test_hand_checked_reference_key_names(fusers, reference_sd):
    """Names from the reference's LocalFuser, written out by hand (not from the inverse map)."""
    lf, gf = fusers
    sd = lf.state_dict()
    pairs = {
        "local_adapter.time_embed.0.weight": "time_embedding.linear_1.weight",
        "local_adapter.time_embed.2.bias": "time_embedding.linear_2.bias",
        "local_adapter.input_blocks.0.0.weight": "conv_in.weight",
        "local_adapter.input_blocks.1.0.norm_in.conv_gamma.weight": "down_blocks.0.resnets.0.norm1.conv_gamma.weight",
        "local_adapter.input_blocks.1.0.norm_out.conv_beta.bias": "down_blocks.0.resnets.0.norm2.conv_beta.bias",
        "local_adapter.input_blocks.1.0.in_layers.2.weight": "down_blocks.0.resnets.0.conv1.weight",
        "local_adapter.input_blocks.1.0.out_layers.3.weight": "down_blocks.0.resnets.0.conv2.weight",
        "local_adapter.input_blocks.2.0.in_layers.0.weight": "down_blocks.0.resnets.1.norm1.weight",
        "local_adapter.input_blocks.2.0.emb_layers.1.weight": "down_blocks.0.resnets.1.time_emb_proj.weight",
        "local_adapter.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight":
            "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight",
        "local_adapter.input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
        "local_adapter.input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut.weight",
        "local_adapter.input_blocks.4.0.norm_in.conv_gamma.weight": "down_blocks.1.resnets.0.norm1.conv_gamma.weight",
        "local_adapter.middle_block.1.proj_in.weight": "mid_block.attentions.0.proj_in.weight",
        "local_adapter.middle_block.2.out_layers.0.bias": "mid_block.resnets.1.norm2.bias",
        "local_adapter.zero_convs.0.0.weight": "controlnet_down_blocks.0.weight",
        "local_adapter.zero_convs.5.0.bias": "controlnet_down_blocks.5.bias",
        "local_adapter.middle_block_out.0.weight": "controlnet_mid_block.weight",
        "local_adapter.feature_extractor.fg_extractor.6.weight": "depth_extractor.fg_extractor.6.weight",
        "local_adapter.feature_extractor.extractors.1.0.weight": "depth_extractor.extractors.1.0.weight",
        "local_adapter.feature_extractor.zero_convs.0.weight": "depth_extractor.zero_convs.0.weight",
    }
    for ref_key, ours in pairs.items():
        assert torch.equal(reference_sd[ref_key], sd[ours]), ref_key
    assert "global_adapter.ff1_fg.net.0.proj.weight" in reference_sd
    assert "global_adapter.norm2_bg.weight" in reference_sd and "global_adapter.ff2_bg.net.2.bias" in reference_sd
    n_local = sum(k.startswith("local_adapter.") for k in reference_sd)
    assert n_local == len(sd)


def test_convert_synthetic_checkpoint(fusers, reference_sd, tmp_path):
    lf, gf = fusers
    path = tmp_path / "cnc_v1.ckpt"
    torch.save({"state_dict": reference_sd}, path)  # Lightning-style wrapper, loaded with weights_only=True
    out = convert_reference_checkpoint(path, tmp_path / "out", local_fuser_config=_config(lf))
    lf2 = LocalFuser.from_pretrained(out / "local_fuser")
    gf2 = GlobalFuser.from_pretrained(out / "global_fuser")
    for k, v in lf.state_dict().items():
        assert torch.equal(lf2.state_dict()[k], v), k
    emb = torch.randn(2, tiny.TINY_IMAGE_EMBED_DIM)
    torch.testing.assert_close(gf2(emb, emb), gf(emb, emb))
    assert list(lf2.config.inject_channels) == [16, 24]


def test_unmatched_and_missing_keys_are_named(fusers, reference_sd, tmp_path):
    cfg = _config(fusers[0])
    bad = dict(reference_sd)
    bad["local_adapter.input_blocks.1.2.weird.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"local_adapter\.input_blocks\.1\.2\.weird\.weight"):
        convert_reference_checkpoint(bad, tmp_path / "a", local_fuser_config=cfg)
    missing = {k: v for k, v in reference_sd.items() if k != "local_adapter.middle_block_out.0.weight"}
    with pytest.raises(ConversionError, match=r"missing keys \(1\): controlnet_mid_block\.weight"):
        convert_reference_checkpoint(missing, tmp_path / "b", local_fuser_config=cfg)
    unknown = dict(reference_sd, **{"something_else.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="something_else.weight"):
        convert_reference_checkpoint(unknown, tmp_path / "c", local_fuser_config=cfg)
    shape = dict(reference_sd, **{"global_adapter.norm2_fg.bias": torch.zeros(5)})
    with pytest.raises(ConversionError, match=r"norm2_fg\.bias \(5,\)"):
        convert_reference_checkpoint(shape, tmp_path / "d", local_fuser_config=cfg)
    with pytest.raises(ConversionError, match="not a CnC checkpoint"):
        convert_reference_checkpoint({"model.diffusion_model.x": torch.zeros(1)}, tmp_path / "e")


def test_cli_convert_with_base_model(fusers, reference_sd, tmp_path):
    from cnc.cli import app
    from cnc_model.pipeline_cnc import CnCPipeline

    base = tmp_path / "sd"
    tiny.tiny_vae(0).save_pretrained(base / "vae")
    tiny.tiny_text_encoder(0).save_pretrained(base / "text_encoder")
    tiny.tiny_tokenizer().save_pretrained(base / "tokenizer")
    tiny.tiny_unet(seed=0).save_pretrained(base / "unet")
    tiny.tiny_scheduler("pndm").save_pretrained(base / "scheduler")
    ckpt = tmp_path / "cnc_v1.ckpt"
    torch.save(reference_sd, ckpt)
    # the fixture's model.diffusion_model.* is a placeholder, not the tiny base: skip the base-UNet check
    result = CliRunner().invoke(app, ["convert-reference", str(ckpt), "--output", str(tmp_path / "pipe"),
                                      "--base-model", str(base), "--no-check-base"])
    assert result.exit_code == 0, result.output
    pipe = CnCPipeline.from_pretrained(tmp_path / "pipe")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert torch.equal(pipe.local_fuser.controlnet_mid_block.weight, fusers[0].controlnet_mid_block.weight)
    bad = CliRunner().invoke(app, ["convert-reference", str(tmp_path / "nope.ckpt"), str(tmp_path / "x")])
    assert bad.exit_code == 2 and "checkpoint not found" in bad.output  # the old positional OUTPUT_DIR still works
    assert "the OUTPUT_DIR argument is deprecated; use --output" in bad.output
