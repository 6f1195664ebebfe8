"""``configs/train/reference.yaml``: every training-changing deviation off, valid for all three stages."""

from __future__ import annotations

import pytest

from cnc_model.data import ConditionDropout
from cnc_model.training.config import TrainConfig, load_train_config
from tests.support import REPO

REFERENCE = REPO / "configs" / "train" / "reference.yaml"


@pytest.mark.parametrize("stage,depth,emb", [("local", 0.1, 0.0), ("global", 0.0, 0.1), ("joint", 0.1, 0.1)])
def test_reference_config_turns_off_deviations(stage, depth, emb):
    cfg = load_train_config(REFERENCE, [f"stage={stage}"])
    defaults = TrainConfig(stage=stage, output_dir="x")
    # the project defaults deviate here; the reference file must not
    assert defaults.optim.max_grad_norm is not None and cfg.optim.max_grad_norm is None
    assert defaults.train.mixed_precision != "no" and cfg.train.mixed_precision == "no"
    assert defaults.train.allow_tf32 and not cfg.train.allow_tf32
    assert (cfg.optim.learning_rate, cfg.optim.weight_decay, cfg.optim.lr_scheduler, cfg.optim.lr_warmup_steps) == (
        1e-5, 0.01, "constant", 0)
    assert (cfg.optim.adam_beta1, cfg.optim.adam_beta2, cfg.optim.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert not cfg.optim.scale_lr and not cfg.optim.use_8bit_adam and not cfg.train.use_ema
    assert cfg.train.noise_offset == 0 and cfg.train.train_batch_size == 4
    assert cfg.train.gradient_accumulation_steps == 1
    assert cfg.model.frozen_encoder_no_grad and cfg.model.soft_guidance_resize == "reference"
    assert cfg.data.resolution == 512 and cfg.data.depth_channels == 3 and cfg.data.drop_caption_prob == 0.1
    # null dropout = the stage default, which the trainer resolves exactly like this (cnc_model/training/trainer.py)
    d = ConditionDropout.for_stage(stage, caption=cfg.data.drop_caption_prob,
                                   depth=0.1 if cfg.data.drop_depth_prob is None else cfg.data.drop_depth_prob,
                                   embedding=0.1 if cfg.data.drop_embedding_prob is None
                                   else cfg.data.drop_embedding_prob)
    assert (d.fg_depth, d.bg_depth, d.fg_emb, d.bg_emb) == (depth, depth, emb, emb)


def test_stage1_from_uni_ckpt_with_the_reference_config_trains(tiny_shards, tmp_path):
    """The reference's stage 1 on tiny models: reference.yaml + model.local_fuser_init=uni.ckpt, one step."""
    import torch

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
    cfg = load_train_config(REFERENCE, [
        "stage=local", f"model.local_fuser_init={tmp_path / 'uni.ckpt'}", "model.pretrained_model_name_or_path=tiny",
        f"data.train_shards={tiny_shards}", f"output_dir={tmp_path / 'out'}", "data.resolution=64",
        "data.num_workers=0", "data.shuffle_buffer=8", "train.gradient_checkpointing=false", "train.report_to=none",
        "train.progress_bar=false", "train.train_batch_size=2", "train.max_train_steps=1", "validation.num_samples=0"])
    trainer = Trainer(cfg)
    trainer.setup()
    procs = {type(p).__name__: p for p in trainer.components.unet.attn_processors.values()}
    assert procs["SoftGuidanceAttnProcessor"].fp32_logits  # model.attention_fp32_logits from reference.yaml
    fuser = trainer.components.local_fuser
    assert torch.equal(fuser.controlnet_mid_block.weight, lf.controlnet_mid_block.weight)  # from uni.ckpt
    assert trainer.components.global_fuser is None
    trainer.train()
    assert not torch.equal(fuser.controlnet_mid_block.weight, lf.controlnet_mid_block.weight)  # trained
