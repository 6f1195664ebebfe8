"""One CnC denoiser: the trainer's forward and the pipeline's forward are the same function of the same inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnc_model.denoiser import CnCDenoiser, training_target
from cnc_model.training import Trainer, load_train_config
from tests.support import REPO


def _trainer(shards, out, stage: str) -> Trainer:
    overrides = [
        f"stage={stage}", "model.pretrained_model_name_or_path=tiny", f"data.train_shards={shards}", f"output_dir={out}",
        "data.resolution=64", "data.num_workers=0", "data.shuffle_buffer=4", "train.mixed_precision=no",
        "train.gradient_checkpointing=false", "train.report_to=none", "train.progress_bar=false",
        "train.train_batch_size=2", "validation.num_samples=0", "data.drop_caption_prob=0", "data.drop_depth_prob=0",
        "data.drop_embedding_prob=0",
    ]
    trainer = Trainer(load_train_config(REPO / "configs/train/tiny.yaml", overrides))
    trainer.setup()
    return trainer


@pytest.mark.parametrize("stage", ["local", "joint"])
def test_training_forward_equals_the_pipeline_forward(tiny_shards, tmp_path, stage):
    """Same noisy latents, timesteps and conditions: Trainer.compute_loss == MSE(pipeline denoiser output, noise)."""
    from diffusers import DDIMScheduler

    from cnc_model.data import to_device_batch
    from cnc_model.pipeline_cnc import CnCPipeline
    from cnc_model.testing.tiny import randomize_zero_convs

    trainer = _trainer(tiny_shards, tmp_path / stage, stage)
    comps = trainer.components
    randomize_zero_convs(comps.local_fuser)  # make the local residuals matter
    for m in comps.trainables().values():
        m.eval()  # no dropout: both passes are deterministic
    batch = next(iter(trainer.loader))
    assert batch["pixel_values"].dtype == torch.uint8  # the loader ships compact batches; the trainer converts

    torch.manual_seed(123)
    loss_train = trainer.compute_loss(batch)
    batch = to_device_batch(batch, "cpu", trainer.cfg.data.depth_channels)  # what compute_loss saw

    pipe = CnCPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
                       local_fuser=comps.local_fuser, global_fuser=comps.global_fuser,
                       scheduler=DDIMScheduler.from_config(comps.noise_scheduler.config))
    torch.manual_seed(123)  # replay the trainer's draws: VAE sample, noise, timesteps
    with torch.no_grad():
        latents = comps.vae.encode(batch["pixel_values"]).latent_dist.sample() * comps.vae.config.scaling_factor
        noise, t = trainer.sample_noise(latents)
        noisy = comps.noise_scheduler.add_noise(latents, noise, t)
        denoiser = pipe.denoiser
        context = denoiser.build_context(pipe.encode_prompt(batch["captions"], latents.device),
                                         batch["fg_emb"], batch["bg_emb"])
        pred = denoiser.predict_noise(noisy, t, context, batch["fg_depth"], batch["bg_depth"], batch["mask"])
    loss_pipe = F.mse_loss(pred, noise)
    torch.testing.assert_close(loss_train.detach(), loss_pipe, rtol=1e-5, atol=1e-6)
    assert (stage == "joint") == pipe.denoiser.soft_guidance  # one rule: soft guidance iff a global fuser
    if stage == "joint":  # the mask is really used on both paths
        without = denoiser.predict_noise(noisy, t, context, batch["fg_depth"], batch["bg_depth"], None)
        assert (without - pred).abs().max() > 1e-6


def test_soft_guidance_rule_and_prediction_types():
    from cnc_model.testing.tiny import tiny_cnc_components

    c = tiny_cnc_components(with_image_encoder=False)
    assert not CnCDenoiser(c["unet"], c["local_fuser"]).soft_guidance
    assert CnCDenoiser(c["unet"], c["local_fuser"], c["global_fuser"]).attention_kwargs(None) is None
    assert CnCDenoiser(c["unet"]).attention_kwargs(torch.ones(1, 1, 8, 8)) is None  # no reference tokens: no mask

    from diffusers import DDPMScheduler

    x, n, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([1, 500])
    assert torch.equal(training_target(DDPMScheduler(prediction_type="epsilon"), x, n, t), n)
    v = DDPMScheduler(prediction_type="v_prediction")
    torch.testing.assert_close(training_target(v, x, n, t), v.get_velocity(x, n, t))
    assert torch.equal(training_target(DDPMScheduler(prediction_type="sample"), x, n, t), x)
    with pytest.raises(ValueError, match="unknown prediction_type 'flow'"):
        training_target(DDPMScheduler(prediction_type="flow"), x, n, t)
