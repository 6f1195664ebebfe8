"""``latents`` (optional, ``latents.enabled``): the VAE latent distribution of I, stored as ``latent.npy``.

The trainer otherwise encodes every image with the VAE at every step (≈ 27 % of a joint step's FLOPs) although the
data has no augmentation. This stage encodes I once at the training resolution and keeps the distribution itself,
not a sample of it: ``(N, 2, 4, r, r)`` float16 with the mean in row 0 and the log-variance (clamped to [-30, 20]
as diffusers' ``DiagonalGaussianDistribution`` does) in row 1, ``r = latents.resolution / 8``. The trainer then
draws ``mean + exp(logvar / 2) · ε`` per step (:func:`cnc_model.data.sample_latents`): the same distribution as
``vae.encode(x).latent_dist.sample()``, up to the float16 storage.

The VAE is the inpainting pipeline's (already loaded; Stable Diffusion inpainting ships the SD 1.x VAE, the one CnC
trains with). The image is resized (bilinear, antialiased) when ``latents.resolution`` differs from the build's.
"""

from __future__ import annotations

import numpy as np

from triplets.stages.base import Stage


class LatentStage(Stage):
    """Adds ``latent`` ``(N, 2, 4, r, r)`` float16. Needs ``image``.

    Args:
        vae: a diffusers ``AutoencoderKL`` on its device and dtype (the inpainting pipeline's).
        resolution: side of the image the VAE encodes (the trainer's ``data.resolution``).
    """

    name = "latents"

    def __init__(self, vae, resolution: int):
        if resolution % 8:
            raise ValueError(f"latents.resolution must be a multiple of 8, got {resolution}")
        self.vae, self.resolution = vae, resolution

    def process(self, rows: dict) -> tuple[dict, dict[int, str]]:
        import torch
        import torch.nn.functional as F

        vae = self.vae
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(rows["image"])).to(vae.device).permute(0, 3, 1, 2).float()
            if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
                x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                                  antialias=True)
            x = (x / 127.5 - 1.0).clamp(-1, 1).to(vae.dtype)  # (N, 3, r·8, r·8) in [-1, 1]
            dist = vae.encode(x).latent_dist
            latent = torch.stack([dist.mean, dist.logvar], dim=1).to(torch.float16)  # (N, 2, 4, r, r)
        return {"latent": latent.cpu().numpy()}, {}

    def empty(self, batch: dict) -> dict:
        n, r = len(batch["key"]), self.resolution // 8
        return {"latent": np.zeros((n, 2, 4, r, r), np.float16)}
