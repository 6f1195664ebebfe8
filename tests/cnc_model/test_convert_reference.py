"""Issue 14: Uni-ControlNet ``uni.ckpt`` init, stage-1 / stage-2 checkpoints, base-UNet check, safe loading.

Every checkpoint is synthetic: tiny modules written out under the reference's (LDM / Lightning) key names.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from cnc import tiny
from cnc_model.convert import (
    UNET_PREFIX,
    ConversionError,
    compare_base_unet,
    convert_reference_checkpoint,
    detect_layout,
    local_fuser_from_reference,
    local_key_to_reference,
    unet_state_dict_to_reference,
)
from cnc_model.models import GlobalFuser, LocalFuser
from cnc_model.testing.tiny import randomize_zero_convs, tiny_global_fuser, tiny_local_fuser

#: Uni-ControlNet's pre_extractor: 5 convs 21->32, 32->64 (s2), 64->64, 64->128 (s2), 128->128.
UNI_PRE = ((0, 21, 32), (2, 32, 64), (4, 64, 64), (6, 64, 128), (8, 128, 128))


def _config(module) -> dict:
    return {k: v for k, v in module.config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def parts():
    unet = tiny.tiny_unet(seed=0)
    lf = tiny_local_fuser(unet, seed=3)
    randomize_zero_convs(lf, seed=3)
    with torch.no_grad():  # trained-looking FDN convs (non-default values)
        for name, p in lf.named_parameters():
            if ".conv_gamma." in name:
                p.add_(0.01)
    return unet, lf, tiny_global_fuser(seed=3)


def _local_sd(lf) -> dict:
    return {local_key_to_reference(k, 2): v.clone() for k, v in lf.state_dict().items()}


def _global_sd(gf) -> dict:
    return {f"global_adapter.{k}": v.clone() for k, v in gf.state_dict().items()}


def _uni_sd(lf, unet) -> dict:
    """uni.ckpt layout: CnC local adapter without the fg/bg stems, plus Uni's pre_extractor and global adapter."""
    sd = {k: v for k, v in _local_sd(lf).items() if ".fg_extractor." not in k and ".bg_extractor." not in k}
    g = torch.Generator().manual_seed(0)
    for idx, cin, cout in UNI_PRE:
        sd[f"local_adapter.feature_extractor.pre_extractor.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=g)
        sd[f"local_adapter.feature_extractor.pre_extractor.{idx}.bias"] = torch.randn(cout, generator=g)
    sd["global_adapter.ff1.net.0.proj.weight"] = torch.randn(64, 32, generator=g)  # Uni's own global adapter
    sd.update(unet_state_dict_to_reference(unet.state_dict(), 2))
    sd.update({"first_stage_model.decoder.conv_in.weight": torch.zeros(1), "betas": torch.zeros(3)})
    return sd


def _base_folder(tmp_path, unet):
    base = tmp_path / "sd"
    tiny.tiny_vae(0).save_pretrained(base / "vae")
    tiny.tiny_text_encoder(0).save_pretrained(base / "text_encoder")
    tiny.tiny_tokenizer().save_pretrained(base / "tokenizer")
    unet.save_pretrained(base / "unet")
    tiny.tiny_scheduler("pndm").save_pretrained(base / "scheduler")
    return base


def _residuals(fuser, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 5, tiny.TINY_CROSS_ATTENTION_DIM, generator=g)
    fg, bg = torch.rand(1, 3, 64, 64, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        out = fuser(x, 10, ctx, fg, bg)
    return torch.cat([t.flatten() for t in (*out.down_block_res_samples, out.mid_block_res_sample)])


def test_unet_inverse_map_agrees_with_diffusers_converter(parts):
    """Our diffusers -> LDM map, read back by diffusers' own LDM -> diffusers converter, is the identity."""
    unet = parts[0]
    ldm = unet_state_dict_to_reference(unet.state_dict(), 2)
    assert f"{UNET_PREFIX}output_blocks.2.1.conv.weight" in ldm  # up block 0 has no attention: upsampler at .1
    assert f"{UNET_PREFIX}out.2.weight" in ldm and f"{UNET_PREFIX}middle_block.1.proj_in.weight" in ldm
    assert compare_base_unet(ldm, unet) == []
    ldm[f"{UNET_PREFIX}output_blocks.3.0.in_layers.2.weight"] = ldm[
        f"{UNET_PREFIX}output_blocks.3.0.in_layers.2.weight"] + 1e-3
    del ldm[f"{UNET_PREFIX}out.2.bias"]
    assert compare_base_unet(ldm, unet) == ["up_blocks.1.resnets.0.conv1.weight", "conv_out.bias (missing)"]


def test_uni_ckpt_initialises_the_local_fuser(parts, tmp_path):
    unet, lf, _ = parts
    sd = _uni_sd(lf, unet)
    assert detect_layout(sd) == "uni"
    path = tmp_path / "uni.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 100}, path)
    out = convert_reference_checkpoint(path, tmp_path / "out", local_fuser_config=_config(lf), seed=5)
    assert (out / "local_fuser").is_dir() and not (out / "global_fuser").exists()
    conv = LocalFuser.from_pretrained(out / "local_fuser")
    stems = ("depth_extractor.fg_extractor.", "depth_extractor.bg_extractor.")
    for k, v in lf.state_dict().items():
        if not k.startswith(stems):
            assert torch.equal(conv.state_dict()[k], v), k
    torch.manual_seed(5)  # the new stems: default nn.Conv2d init after the seed, as a fresh LocalFuser
    fresh = LocalFuser(**_config(lf)).state_dict()
    for k in fresh:
        if k.startswith(stems):
            assert torch.equal(conv.state_dict()[k], fresh[k]), k
            assert not torch.equal(conv.state_dict()[k], lf.state_dict()[k]), k
    # numerically the same module as the original once the stems are the same
    ref = LocalFuser(**_config(lf))
    ref.load_state_dict({**lf.state_dict(), **{k: v for k, v in fresh.items() if k.startswith(stems)}})
    torch.testing.assert_close(_residuals(conv), _residuals(ref.eval()), rtol=0, atol=1e-5)


def test_stage_checkpoints_convert_alone(parts, tmp_path):
    from cnc_model.pipeline_cnc import CnCPipeline

    unet, lf, gf = parts
    base = _base_folder(tmp_path, unet)
    sd_unet = unet_state_dict_to_reference(unet.state_dict(), 2)
    stage1 = {"state_dict": {**_local_sd(lf), **sd_unet, "betas": torch.zeros(3)}, "epoch": 28,
              "global_step": 231000, "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-5}]}],
              "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None}}}
    torch.save(stage1, tmp_path / "local.ckpt")
    torch.save({"state_dict": {**_global_sd(gf), **sd_unet}}, tmp_path / "global.ckpt")
    assert detect_layout(stage1["state_dict"]) == "local"

    out1 = convert_reference_checkpoint(tmp_path / "local.ckpt", tmp_path / "p1", base_model=base)
    pipe = CnCPipeline.from_pretrained(out1)
    assert pipe.global_fuser is None
    torch.testing.assert_close(_residuals(pipe.local_fuser), _residuals(lf), rtol=0, atol=1e-5)

    out2 = convert_reference_checkpoint(tmp_path / "global.ckpt", tmp_path / "p2")
    assert not (out2 / "local_fuser").exists()
    gf2 = GlobalFuser.from_pretrained(out2 / "global_fuser")
    emb = torch.randn(2, tiny.TINY_IMAGE_EMBED_DIM)
    torch.testing.assert_close(gf2(emb, emb), gf(emb, emb), rtol=0, atol=0)


def test_base_check_names_keys_and_cli_fails_in_one_line(parts, tmp_path):
    unet, lf, gf = parts
    base = _base_folder(tmp_path, unet)
    sd = {**_local_sd(lf), **_global_sd(gf), **unet_state_dict_to_reference(unet.state_dict(), 2)}
    sd[f"{UNET_PREFIX}input_blocks.1.1.proj_out.bias"] = sd[f"{UNET_PREFIX}input_blocks.1.1.proj_out.bias"] + 1
    with pytest.raises(ConversionError, match=r"differs from .* in 1 of \d+ tensors: "
                                              r"down_blocks\.0\.attentions\.0\.proj_out\.bias"):
        convert_reference_checkpoint(sd, tmp_path / "x", base_model=base)
    ckpt = tmp_path / "cnc_v1.ckpt"
    torch.save(sd, ckpt)
    cmd = [sys.executable, "-m", "cnc.cli", "convert-reference", str(ckpt), "-o", str(tmp_path / "y"), "--base-model",
           str(base)]
    bad = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert bad.returncode == 2, bad.stderr
    assert "Traceback" not in bad.stderr and "proj_out.bias" in bad.stderr
    from typer.testing import CliRunner

    from cnc.cli import app

    ok = CliRunner().invoke(app, cmd[3:] + ["--no-check-base"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "y" / "model_index.json").is_file()
    missing = CliRunner().invoke(app, [*cmd[3:5], str(tmp_path / "z"), "--base-model", str(tmp_path / "no-sd")])
    assert missing.exit_code == 2 and "--base-model" in missing.output and "no-sd" in missing.output


def test_lightning_metadata_needing_an_allow_list_is_named(parts, tmp_path):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": _global_sd(parts[2]), "hyper_parameters": argparse.Namespace(lr=1e-5)}, path)
    with pytest.raises(ConversionError, match=r"argparse\.Namespace.*weights_only=True"):
        convert_reference_checkpoint(path, tmp_path / "out")


def test_train_config_local_fuser_init_from_uni(parts, tmp_path):
    from cnc_model.training.components import build_local_fuser
    from cnc_model.training.config import TrainConfig
    from triplets.errors import ModelUnavailableError

    unet, lf, _ = parts
    path = tmp_path / "uni.ckpt"
    torch.save({"state_dict": _uni_sd(lf, unet)}, path)
    cfg = TrainConfig(stage="local", output_dir=str(tmp_path / "o"), seed=7,
                      model={"pretrained_model_name_or_path": "tiny", "local_fuser_init": str(path)})
    fuser = build_local_fuser(cfg, unet)
    assert torch.equal(fuser.controlnet_mid_block.weight, lf.controlnet_mid_block.weight)
    assert torch.equal(fuser.down_blocks[0].resnets[0].norm1.conv_gamma.weight,
                       lf.down_blocks[0].resnets[0].norm1.conv_gamma.weight)
    direct = local_fuser_from_reference(path, unet, seed=7)
    assert torch.equal(fuser.depth_extractor.fg_extractor[0].weight, direct.depth_extractor.fg_extractor[0].weight)
    with pytest.raises(ModelUnavailableError, match="model.local_fuser_init"):
        build_local_fuser(cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"local_fuser_init": str(tmp_path / "nope.ckpt")})}), unet)
    other = tiny.tiny_unet(seed=9)  # a different base: the check names it through the config key
    with pytest.raises(ModelUnavailableError, match=r"model\.local_fuser_init: .*differs"):
        build_local_fuser(cfg, other)
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(stage="local", output_dir="o", model={"local_fuser": "x", "local_fuser_init": str(path)})


# ------------------------------------------------------------------------------------------ issue 30: the base UNet
def _perturbed(unet, scale: float, seed: int = 11):
    """A copy of ``unet`` with every tensor moved by ``scale`` x its own std (an "EMA copy" of the same model)."""
    other = tiny.tiny_unet(seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p, ref in zip(other.parameters(), unet.parameters()):
            size = (ref.std() if ref.numel() > 1 else 0) + ref.abs().mean() + 1e-3  # norms start at 1 / 0
            p.copy_(ref + scale * size * torch.randn(ref.shape, generator=g))
    return other


def _ema_flat(ldm: dict) -> dict:
    """LDM UNet keys -> the flattened ``model_ema.*`` keys of an SD checkpoint (``v1-5-pruned.ckpt``)."""
    return {"model_ema." + "".join(k.split(".")[1:]): v for k, v in ldm.items()}


def test_unet_report_says_equal_ema_copy_or_another_unet(parts):
    from cnc_model.convert import unet_report

    unet = parts[0]
    ldm = unet_state_dict_to_reference(unet.state_dict(), 2)
    (same,) = unet_report(ldm, unet).values()
    assert same.equal and same.verdict == "equal" and same.max_abs_diff == 0.0
    ema_like = unet_state_dict_to_reference(_perturbed(unet, 1e-3).state_dict(), 2)
    (close,) = unet_report(ema_like, unet).values()
    assert not close.equal and "probably the EMA/non-EMA copy" in close.verdict
    assert 0 < close.relative_diff < 0.01 and {b["block"] for b in close.blocks} >= {
        "conv_in", "time_embedding", "down_blocks.0", "mid_block", "up_blocks.1", "conv_out"}
    assert all(b["differing"] == b["tensors"] for b in close.blocks)  # every tensor of every block moved
    (other,) = unet_report(unet_state_dict_to_reference(tiny.tiny_unet(seed=5).state_dict(), 2), unet).values()
    assert "another UNet" in other.verdict and other.relative_diff > 0.5
    # an SD checkpoint with both copies (v1-5-pruned.ckpt): which one equals the base is named
    both = unet_report({**ema_like, **_ema_flat(ldm), "model_ema.decay": torch.tensor(0.9999)}, unet)
    assert not both["model.diffusion_model"].equal and both["model_ema"].equal


def test_save_unet_round_trips_and_samples_with_the_checkpoints_unet(parts, tmp_path):
    """A cnc_v1-like checkpoint whose frozen UNet is not the base's: --save-unet writes that UNet bit-exactly, the
    pipeline samples with it (= the reference formula's noise prediction on the checkpoint's UNet), and pairing the
    fusers with the base UNet instead gives another prediction. cnc sample --unet takes the saved UNet."""
    import json

    from typer.testing import CliRunner

    from cnc.cli import app
    from cnc_model.attention import SoftGuidanceMask, install_soft_guidance
    from cnc_model.pipeline_cnc import CnCPipeline

    unet, lf, gf = parts
    base = _base_folder(tmp_path, unet)
    own = _perturbed(unet, 1e-3)
    ckpt = tmp_path / "cnc_v1.ckpt"
    torch.save({**_local_sd(lf), **_global_sd(gf), **unet_state_dict_to_reference(own.state_dict(), 2)}, ckpt)
    run = CliRunner().invoke(app, ["convert-reference", str(ckpt), str(tmp_path / "paper"), "--base-model", str(base),
                                   "--save-unet"])
    assert run.exit_code == 0, run.output
    assert "model.diffusion_model vs" in run.output and "probably the EMA/non-EMA copy" in run.output
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "paper" / "unet").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in own.state_dict().items())  # bit-exact round trip
    meta = json.loads((tmp_path / "paper" / "cnc_export.json").read_text())
    assert meta["unet"]["identity"].startswith("sha256:") and "EMA/non-EMA" in meta["unet_verdict"]
    assert meta["conditions"]["sampling"]["segment"]["backend"] == "u2net"  # the reference's conditions recorded
    assert json.loads((tmp_path / "paper" / "unet_comparison.json").read_text())["copies"]["model.diffusion_model"][
        "equal"] is False
    refused = CliRunner().invoke(app, ["convert-reference", str(ckpt), str(tmp_path / "x"), "--base-model", str(base)])
    assert refused.exit_code == 2 and "--save-unet" in refused.output and "EMA/non-EMA" in refused.output
    # a plain SD checkpoint (v1-5-pruned.ckpt: non-EMA + model_ema copies, no fuser): both compared, its UNet written
    ldm = unet_state_dict_to_reference(unet.state_dict(), 2)
    sd_ckpt = {**unet_state_dict_to_reference(own.state_dict(), 2), **_ema_flat(ldm), "betas": torch.zeros(3)}
    convert_reference_checkpoint(sd_ckpt, tmp_path / "sd15", base_model=base, save_unet=True)
    copies = json.loads((tmp_path / "sd15" / "unet_comparison.json").read_text())["copies"]
    assert copies["model_ema"]["equal"] and not copies["model.diffusion_model"]["equal"]
    assert not (tmp_path / "sd15" / "model_index.json").exists()
    written = UNet2DConditionModel.from_pretrained(tmp_path / "sd15" / "unet").state_dict()
    assert all(torch.equal(written[k], v) for k, v in own.state_dict().items())  # the non-EMA copy, as the reference

    # the reference formula: eps = UNet_ckpt(x_t, t, [text; lambda_f G_f(e_f); lambda_b G_b(e_b)] + local residuals),
    # soft guidance in every cross-attention -- on the checkpoint's own modules
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    text = torch.randn(1, 77, tiny.TINY_CROSS_ATTENTION_DIM, generator=g)
    emb_f, emb_b = torch.randn(1, tiny.TINY_IMAGE_EMBED_DIM, generator=g), torch.randn(1, tiny.TINY_IMAGE_EMBED_DIM,
                                                                                    generator=g)
    fg, bg = torch.rand(1, 3, 64, 64, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    mask = (torch.rand(1, 1, 64, 64, generator=g) > 0.5).float()
    ref_unet, ref_lf = _perturbed(unet, 1e-3), tiny_local_fuser(unet, seed=3)
    ref_lf.load_state_dict(lf.state_dict())
    install_soft_guidance(ref_unet, ref_lf, num_text_tokens=77, tokens_per_reference=gf.config.tokens_per_reference)
    kw = {"soft_guidance_mask": SoftGuidanceMask(mask)}
    with torch.no_grad():
        context = torch.cat([text, gf.eval()(emb_f, emb_b)], dim=1)
        res = ref_lf.eval()(x, t, context, fg, bg, cross_attention_kwargs=kw, return_dict=False)
        expected = ref_unet.eval()(x, t, context, down_block_additional_residuals=res[0],
                                   mid_block_additional_residual=res[1], cross_attention_kwargs=kw).sample

    def predict(pipe):
        with torch.no_grad():
            d = pipe.denoiser
            return d.predict_noise(x, t, d.build_context(text, emb_f, emb_b), fg, bg, SoftGuidanceMask(mask), 1.0)

    paper = CnCPipeline.from_pretrained(tmp_path / "paper")
    torch.testing.assert_close(predict(paper), expected, rtol=0, atol=1e-5)
    convert_reference_checkpoint(ckpt, tmp_path / "base-unet", base_model=base, check_base=False)
    base_pipe = CnCPipeline.from_pretrained(tmp_path / "base-unet")
    assert (predict(base_pipe) - expected).abs().max() > 1e-4  # the fusers on another UNet: another prediction
    base_pipe.set_unet(UNet2DConditionModel.from_pretrained(tmp_path / "paper" / "unet"))  # = cnc sample --unet
    torch.testing.assert_close(predict(base_pipe), expected, rtol=0, atol=1e-5)


def test_sample_with_unet_is_reported_and_recorded(parts, tmp_path):
    import json

    from typer.testing import CliRunner

    from cnc.cli import app

    unet, lf, gf = parts
    base = _base_folder(tmp_path, unet)
    own = _perturbed(unet, 1e-3)
    ckpt = tmp_path / "stage1.ckpt"
    torch.save({**_local_sd(lf), **_global_sd(gf), **unet_state_dict_to_reference(own.state_dict(), 2)}, ckpt)
    convert_reference_checkpoint(ckpt, tmp_path / "own", base_model=base, save_unet=True)
    convert_reference_checkpoint(ckpt, tmp_path / "plain", base_model=base, check_base=False)
    photo = tmp_path / "p.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)
    args = ["sample", str(tmp_path / "plain"), "--prompt", "p", "--fg", str(photo), "--bg", str(photo), "-c",
            "build/tiny", "--set", "resolution=64", "--set", "segment.backend=u2net", "--set",
            "segment.u2net_checkpoint=tiny", "--steps", "1"]
    run = CliRunner().invoke(app, [*args, "--unet", str(tmp_path / "own" / "unet"), "-o", str(tmp_path / "s")])
    assert run.exit_code == 0, run.output
    record = json.loads((tmp_path / "s" / "conditions" / "conditions.json").read_text())
    assert record["unet"]["comparison"]["equal"] is False and "EMA/non-EMA" in record["unet"]["comparison"]["verdict"]
    assert record["unet"]["identity"].startswith("sha256:")
    # the reference's conditions recorded by convert-reference, changed by -c/--set: every change is listed
    assert record["trained"]["segment"]["backend"] == "u2net" and "depth.preprocess: reference -> processor" in \
        record["differences"]
    again = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "t")])
    assert again.exit_code == 0, again.output
    a, b = (np.asarray(Image.open(tmp_path / d / "sample_0.png")) for d in ("s", "t"))
    assert np.abs(a.astype(int) - b).max() > 0  # another UNet, another image


def test_model_unet_lets_a_reference_init_keep_its_own_unet(parts, tmp_path):
    """uni.ckpt whose frozen UNet is not the base's: model.local_fuser_init alone is refused (naming --save-unet);
    with model.unet = the UNet --save-unet wrote, the run trains against exactly that UNet (recorded)."""
    from cnc_model.training.components import load_components
    from cnc_model.training.config import TrainConfig
    from cnc_model.training.provenance import training_provenance
    from triplets.errors import ModelUnavailableError

    unet, lf, _ = parts  # unet = the tiny base model's UNet (seed 0)
    own = _perturbed(unet, 1e-3)
    path = tmp_path / "uni.ckpt"
    torch.save({"state_dict": _uni_sd(lf, own)}, path)
    cfg = TrainConfig(stage="local", output_dir=str(tmp_path / "o"), model={
        "pretrained_model_name_or_path": "tiny", "local_fuser_init": str(path)})
    with pytest.raises(ModelUnavailableError, match=r"model\.local_fuser_init: .*differs.*--save-unet"):
        load_components(cfg, tiny.TINY_IMAGE_EMBED_DIM)
    convert_reference_checkpoint(path, tmp_path / "uni", base_model=_base_folder(tmp_path, unet), save_unet=True)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"unet": str(tmp_path / "uni" / "unet")})})
    comps = load_components(cfg, tiny.TINY_IMAGE_EMBED_DIM)
    assert all(torch.equal(comps.unet.state_dict()[k], v) for k, v in own.state_dict().items())
    assert torch.equal(comps.local_fuser.controlnet_mid_block.weight, lf.controlnet_mid_block.weight)
    record = training_provenance(cfg, None)["models"]["model.unet"]
    assert record["id"] == str(tmp_path / "uni" / "unet") and record["identity"].startswith("sha256:")
