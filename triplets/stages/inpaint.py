"""``inpaint``: the clean background I_b by Stable Diffusion inpainting.

Reference settings (prompt, negative prompt, 25 steps, guidance 10, strength 1, M dilated by
a 50 px square at 512 px — scaled with the resolution) but batched, in fp16/bf16 on GPU, and
with a **per-sample seed** derived from the base seed and the sample key
(:func:`sample_seed`): one CPU ``torch.Generator`` per row, so a background depends only on
its own input, not on its batch neighbours. Speed without changing that: the two prompt embeddings are computed once
per stage (not per batch), the masked images of a batch go through the VAE encoder in one call while each row's
latent is still sampled with its own generator (:class:`BatchEncodingInpaintPipeline`), and pre/post-processing
(normalisation, mask binarisation, conversion to uint8, paste-back) runs as tensor ops on the model's device, with
one transfer back per batch. The PNDM scheduler steps without host synchronisation
(:mod:`triplets.stages.schedulers`; identical outputs), and ``channels_last`` stores the UNet's activations in NHWC
(faster convolutions on tensor cores; outputs within float rounding). With ``paste_back`` (default) the pixels of I
outside the dilated mask are pasted back, so I_b differs from I only where the object was
(the reference let the VAE round trip alter the whole image).
"""

from __future__ import annotations

import hashlib

import numpy as np

from triplets.stages.base import Stage, resolve_device, resolve_dtype


def sample_seed(base_seed: int, key: str) -> int:
    """Deterministic 31-bit seed of one sample: sha256 of ``"{base_seed}:{key}"``."""
    return int(hashlib.sha256(f"{base_seed}:{key}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def dilate_mask(mask: np.ndarray, dilation_px: int, resolution: int) -> np.ndarray:
    """Square dilation of a ``(H, W)`` {0,1} mask by ``dilation_px`` at 512 px, scaled to ``resolution``."""
    import cv2

    k = int(round(dilation_px * resolution / 512))
    if k <= 1:
        return mask.astype(np.uint8)
    return cv2.dilate(mask.astype(np.uint8), np.ones((k, k), np.uint8))


def _batch_encoding_pipeline():
    """:class:`diffusers.StableDiffusionInpaintPipeline` whose VAE encodes a batch of masked images at once.

    diffusers encodes image by image when given a list of generators; this subclass encodes the batch in one call and
    samples each row's latent ``mean + std · ε`` with ``ε`` drawn from that row's generator, exactly as the per-image
    path draws it (same shape, same generator, same order). Built lazily so importing this module stays light.
    """
    import torch
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils.torch_utils import randn_tensor

    class BatchEncodingInpaintPipeline(StableDiffusionInpaintPipeline):
        def _encode_vae_image(self, image, generator):
            if not isinstance(generator, list):
                return super()._encode_vae_image(image, generator)
            dist = self.vae.encode(image).latent_dist  # (N, 4, h, w) mean / std
            rows = []
            for i, gen in enumerate(generator):
                mean, std = dist.mean[i:i + 1], dist.std[i:i + 1]
                rows.append(mean + std * randn_tensor(mean.shape, generator=gen, device=mean.device, dtype=mean.dtype))
            return self.vae.config.scaling_factor * torch.cat(rows, dim=0)

    return BatchEncodingInpaintPipeline


class InpaintStage(Stage):
    """Adds ``background`` ``(N, R, R, 3)`` uint8 and ``seed`` ``(N,)`` int64. Needs ``image``, ``mask``."""

    name = "inpaint"

    def __init__(self, model: str = "stable-diffusion-v1-5/stable-diffusion-inpainting",
                 prompt: str = "empty scenery, ultra detailed, no people",
                 negative_prompt: str = "low resolution, worst quality, low quality", num_inference_steps: int = 25,
                 guidance_scale: float = 10.0, strength: float = 1.0, dilation_px: int = 50, paste_back: bool = True,
                 base_seed: int = 0, device: str = "auto", dtype: str = "auto", compile_mode: str = "off",
                 channels_last: bool = False):
        from triplets.stages.schedulers import sync_free

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.pipe = _batch_encoding_pipeline().from_pretrained(
            model, dtype=self.dtype, safety_checker=None, requires_safety_checker=False)
        self.pipe.to(self.device)  # already in self.dtype (a dtype cast here makes diffusers warn)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.scheduler = sync_free(self.pipe.scheduler)
        if channels_last:
            import torch

            self.pipe.unet.to(memory_format=torch.channels_last)
        if compile_mode != "off":  # the UNet is ≈ 80 % of a triplet's FLOPs; compiled lazily on the first batch
            import torch

            self.pipe.unet = torch.compile(self.pipe.unet, mode=None if compile_mode == "default" else compile_mode)
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.steps, self.guidance, self.strength = num_inference_steps, guidance_scale, strength
        self.dilation_px, self.paste_back, self.base_seed = dilation_px, paste_back, base_seed
        self.model_id = model
        self._embeds = None  # (prompt, negative) embeddings, (1, 77, D) each, computed on first use

    def prompt_embeddings(self):
        """The prompt and negative-prompt embeddings ``(1, 77, D)`` on the device, computed once."""
        import torch

        if self._embeds is None:
            with torch.inference_mode():
                self._embeds = self.pipe.encode_prompt(self.prompt, self.pipe.device, 1, self.guidance > 1.0,
                                                       self.negative_prompt)
        return self._embeds

    def process(self, rows: dict) -> tuple[dict, dict[int, str]]:
        import torch

        images, masks, keys = rows["image"], rows["mask"], rows["key"]
        n, r = len(images), images.shape[1]
        dilated = np.stack([dilate_mask(m, self.dilation_px, r) for m in masks])
        seeds = np.array([sample_seed(self.base_seed, k) for k in keys], np.int64)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        positive, negative = self.prompt_embeddings()
        device = self.pipe.device
        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(images)).to(device)  # (N, R, R, 3) uint8
            keep = torch.from_numpy(dilated).to(device)[:, None].float()  # (N, 1, R, R) {0, 1}
            out = self.pipe(
                prompt_embeds=positive.expand(n, -1, -1),
                negative_prompt_embeds=None if negative is None else negative.expand(n, -1, -1),
                image=pixels.permute(0, 3, 1, 2).float() / 255.0, mask_image=keep,
                height=r, width=r, strength=self.strength, guidance_scale=self.guidance,
                num_inference_steps=self.steps, generator=generators, output_type="pt",
            ).images  # (N, 3, R, R) float in [0, 1]
            bg = (out.float().permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8)
            if self.paste_back:
                bg = torch.where(keep[:, 0, :, :, None] > 0, bg, pixels)
            bg = bg.cpu().numpy()
        return {"background": bg, "seed": seeds}, {}

    def empty(self, batch: dict) -> dict:
        n = len(batch["key"])
        shape = batch["image"].shape if "image" in batch else (n, 0, 0, 3)
        return {"background": np.zeros(shape, np.uint8), "seed": np.zeros(n, np.int64)}
