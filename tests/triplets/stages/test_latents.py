"""The latents stage (:mod:`triplets.stages.latents`): the VAE distribution of I stored in the shard and drawn by the
trainer exactly as ``latent_dist.sample()``."""

import numpy as np
import pytest
import torch

from cnc.tiny import synthetic_photo

R = 64


def test_latents_build_output_and_trainer_sampling(tmp_path):
    """latents.enabled stores the VAE distribution of I (fp16, round-trips through the tar); the trainer's
    data.use_latents draws from it exactly as ``latent_dist.sample()`` draws; shards without it are refused."""
    from types import SimpleNamespace

    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image

    from cnc.config import load_config
    from cnc_model.data import TrainingDataError, collate, sample_latents, sample_to_tensors
    from cnc_model.training.trainer import Trainer
    from triplets.builder import TripletBuilder
    from triplets.config import BuildConfig
    from triplets.readers import read_items
    from triplets.sample import decode_sample, encode_sample

    src = tmp_path / "photos"
    src.mkdir()
    for i in range(2):
        Image.fromarray(synthetic_photo(i, 80, 96)).save(src / f"p{i}.jpg", quality=92)
    cfg = load_config(BuildConfig, "configs/build/tiny.yaml", [
        f"resolution={R}", "min_side=32", "inpaint.num_inference_steps=1", "quality.enabled=false",
        "latents.enabled=true"])
    builder = TripletBuilder(cfg)
    samples, failures = builder(read_items(str(src)))
    assert not failures and len(samples) == 2
    vae = builder.model_stages[1].pipe.vae
    s = decode_sample(encode_sample(samples[0]))
    assert s.latent.dtype == np.float16 and s.latent.shape == (2, vae.config.latent_channels, R // 8, R // 8)
    assert s.meta["latents"] == {"resolution": R, "vae": "inpaint.model"}
    with torch.inference_mode():
        x = torch.from_numpy(samples[0].image).permute(2, 0, 1)[None].float() / 127.5 - 1  # before JPEG
        ref = vae.encode(x).latent_dist
    torch.testing.assert_close(torch.from_numpy(s.latent[0]).float(), ref.mean[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(torch.from_numpy(s.latent[1]).float(), ref.logvar[0], atol=2e-3, rtol=2e-3)

    moments = torch.randn(3, 2, 4, 8, 8)
    want = DiagonalGaussianDistribution(torch.cat([moments[:, 0], moments[:, 1]], 1)).sample(
        generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sample_latents(moments, torch.Generator().manual_seed(5)), want)

    batch = collate([sample_to_tensors(decode_sample(encode_sample(x)), R) for x in samples])
    assert batch["latent_dist"].shape == (2, 2, 4, R // 8, R // 8)
    fake = SimpleNamespace(components=SimpleNamespace(vae=vae), accelerator=SimpleNamespace(device="cpu"),
                           weight_dtype=torch.float32, cfg=SimpleNamespace(data=SimpleNamespace(use_latents=True)))
    drawn = Trainer.image_latents(fake, batch)
    assert drawn.shape == (2, 4, R // 8, R // 8) and drawn.dtype == torch.float32
    assert not torch.equal(drawn, batch["latent_dist"][:, 0].float())
    del batch["latent_dist"]
    with pytest.raises(TrainingDataError, match="latents.enabled"):
        Trainer.image_latents(fake, batch)
