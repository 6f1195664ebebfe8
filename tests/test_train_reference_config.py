"""``configs/train/reference.yaml``: every training-changing deviation off, valid for all three stages."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnc_model.data import ConditionDropout
from cnc_model.training.config import TrainConfig, load_train_config

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "train" / "reference.yaml"


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
