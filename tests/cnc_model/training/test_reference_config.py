"""The shipped reference recipe (issue 30): ``train/reference-{local,global,joint}`` and ``build/reference-{coco,
pickapic}`` load and validate, turn every training-changing deviation off, and run by epochs."""

from __future__ import annotations

import pytest

from cnc.config import ConfigError, load_config
from cnc_model.data import ConditionDropout
from cnc_model.training.config import TrainConfig, load_train_config
from triplets.config import BuildConfig

#: stage -> (depth dropout, embedding dropout, epochs) of the reference (scripts/train_*.sh, configs/*_v1.yaml).
STAGES = {"local": (0.1, 0.0, 30), "global": (0.0, 0.1, 30), "joint": (0.1, 0.1, 9)}


@pytest.mark.parametrize("stage", STAGES)
def test_reference_train_configs_turn_off_deviations(stage):
    depth, emb, epochs = STAGES[stage]
    cfg = load_train_config(f"train/reference-{stage}")
    defaults = TrainConfig(stage=stage, output_dir="x")
    assert cfg.stage == stage and cfg.output_dir == f"out/reference/{stage}"
    # the project defaults deviate here; the reference files must not
    assert defaults.optim.max_grad_norm is not None and cfg.optim.max_grad_norm is None
    assert defaults.train.mixed_precision != "no" and cfg.train.mixed_precision == "no"
    assert defaults.train.allow_tf32 and not cfg.train.allow_tf32
    assert (cfg.optim.learning_rate, cfg.optim.weight_decay, cfg.optim.lr_scheduler, cfg.optim.lr_warmup_steps) == (
        1e-5, 0.01, "constant", 0)
    assert (cfg.optim.adam_beta1, cfg.optim.adam_beta2, cfg.optim.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert not cfg.optim.scale_lr and not cfg.optim.use_8bit_adam and not cfg.train.use_ema
    assert cfg.train.noise_offset == 0 and cfg.train.train_batch_size == 4
    assert cfg.train.gradient_accumulation_steps == 1 and cfg.train.num_train_epochs == epochs
    assert cfg.model.frozen_encoder_no_grad and cfg.model.soft_guidance_resize == "reference"
    assert cfg.model.attention_fp32_logits and cfg.model.unet == "checkpoints/uni/unet"
    assert cfg.data.resolution == 512 and cfg.data.depth_channels == 3 and cfg.data.drop_caption_prob == 0.1
    assert cfg.data.train_shards == ["out/reference/coco", "out/reference/pickapic"]
    assert cfg.train.checkpointing_steps == 7000
    # the initialisation of each stage, without a --set
    if stage == "local":
        assert cfg.model.local_fuser_init == "checkpoints/uni.ckpt" and cfg.model.local_fuser is None
    elif stage == "global":
        assert cfg.model.local_fuser_init == "from_unet" and cfg.model.global_fuser is None
    else:
        assert (cfg.model.local_fuser, cfg.model.global_fuser) == ("out/reference/local", "out/reference/global")
    # null dropout = the stage default, which the trainer resolves exactly like this (cnc_model/training/trainer.py)
    d = ConditionDropout.for_stage(stage, caption=cfg.data.drop_caption_prob,
                                   depth=0.1 if cfg.data.drop_depth_prob is None else cfg.data.drop_depth_prob,
                                   embedding=0.1 if cfg.data.drop_embedding_prob is None
                                   else cfg.data.drop_embedding_prob)
    assert (d.fg_depth, d.bg_depth, d.fg_emb, d.bg_emb) == (depth, depth, emb, emb)
    with pytest.raises(ConfigError, match="num_train_epochs=null"):  # a step count would be ignored: refused
        load_train_config(f"train/reference-{stage}", ["train.max_train_steps=10"])


@pytest.mark.parametrize("source,backend,fmt", [("coco", "dataset", "coco"), ("pickapic", "u2net", "pickapic")])
def test_reference_build_configs(source, backend, fmt):
    cfg = load_config(BuildConfig, f"build/reference-{source}")
    assert (cfg.segment.backend, cfg.input_format, cfg.depth.preprocess) == (backend, fmt, "reference")
    assert (cfg.segment.min_area, cfg.segment.max_area) == (0.0, 1.0)  # the reference keeps every mask
    assert cfg.resolution == 512 and cfg.min_side == 1 and cfg.dtype == "float32"
    assert not cfg.inpaint.paste_back and not cfg.depth.mask_foreground_depth and cfg.embed.fg_source == "image"
    assert cfg.inpaint.dilation_px == 50 and cfg.inpaint.num_inference_steps == 25 and cfg.inpaint.guidance_scale == 10
    assert cfg.jpeg_quality == (75 if source == "pickapic" else 95)


def test_stage1_from_uni_ckpt_by_epochs_with_the_reference_config(tiny_shards, tmp_path):
    """The reference's stage 1 on tiny models: reference-local + uni.ckpt, run by epochs (0.3 epoch of 3 batches =
    1 step), the resolved steps recorded in the saved config."""
    import torch
    import yaml

    from cnc import tiny
    from cnc_model.convert import local_key_to_reference, unet_state_dict_to_reference
    from cnc_model.testing.tiny import randomize_zero_convs, tiny_local_fuser
    from cnc_model.training import Trainer

    unet = tiny.tiny_unet(seed=0)  # = the trainer's tiny base at seed 0
    lf = tiny_local_fuser(unet, seed=4)
    randomize_zero_convs(lf, seed=4)
    uni = {local_key_to_reference(k, 2): v for k, v in lf.state_dict().items()
           if not k.startswith(("depth_extractor.fg_extractor.", "depth_extractor.bg_extractor."))}
    uni["local_adapter.feature_extractor.pre_extractor.0.weight"] = torch.zeros(32, 21, 3, 3)
    uni.update(unet_state_dict_to_reference(unet.state_dict(), 2))
    torch.save({"state_dict": uni}, tmp_path / "uni.ckpt")
    cfg = load_train_config("train/reference-local", [
        f"model.local_fuser_init={tmp_path / 'uni.ckpt'}", "model.pretrained_model_name_or_path=tiny",
        "model.unet=null", f"data.train_shards={tiny_shards}", f"output_dir={tmp_path / 'out'}",
        "data.resolution=64", "data.num_workers=0", "data.shuffle_buffer=8", "train.gradient_checkpointing=false",
        "train.report_to=none", "train.progress_bar=false", "train.train_batch_size=2", "train.num_train_epochs=0.3",
        "validation.num_samples=0"])
    trainer = Trainer(cfg)
    trainer.setup()
    procs = {type(p).__name__: p for p in trainer.components.unet.attn_processors.values()}
    assert procs["SoftGuidanceAttnProcessor"].fp32_logits  # model.attention_fp32_logits from the reference config
    fuser = trainer.components.local_fuser
    assert torch.equal(fuser.controlnet_mid_block.weight, lf.controlnet_mid_block.weight)  # from uni.ckpt
    assert trainer.components.global_fuser is None
    assert trainer.loader.batches_per_epoch == 3  # 6 samples / batch 2
    result = trainer.train()
    assert result.global_step == 1  # ceil(0.3 epoch x 3 batches)
    saved = yaml.safe_load((tmp_path / "out" / "train_config.yaml").read_text())
    assert saved["train"]["max_train_steps"] == 1 and saved["train"]["num_train_epochs"] == 0.3
    assert saved["provenance"]["conditions"]["sampling"]["resolution"] == 64  # the shards' build settings
    assert not torch.equal(fuser.controlnet_mid_block.weight, lf.controlnet_mid_block.weight)  # trained
