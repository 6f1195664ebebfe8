"""``inpaint``: the clean background I_b by Stable Diffusion inpainting.

Reference settings (prompt, negative prompt, 25 steps, guidance 10, strength 1, M dilated by
a 50 px square at 512 px — scaled with the resolution) but batched, in fp16/bf16 on GPU, and
with a **per-sample seed** derived from the base seed and the sample key
(:func:`sample_seed`): one CPU ``torch.Generator`` per row, so a background depends only on
its own input, not on its batch neighbours. With ``paste_back`` (default) the pixels of I
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


class InpaintStage(Stage):
    """Adds ``background`` ``(N, R, R, 3)`` uint8 and ``seed`` ``(N,)`` int64. Needs ``image``, ``mask``."""

    name = "inpaint"

    def __init__(self, model: str = "stable-diffusion-v1-5/stable-diffusion-inpainting",
                 prompt: str = "empty scenery, ultra detailed, no people",
                 negative_prompt: str = "low resolution, worst quality, low quality", num_inference_steps: int = 25,
                 guidance_scale: float = 10.0, strength: float = 1.0, dilation_px: int = 50, paste_back: bool = True,
                 base_seed: int = 0, device: str = "auto", dtype: str = "auto"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        from diffusers import StableDiffusionInpaintPipeline

        self.pipe = StableDiffusionInpaintPipeline.from_pretrained(
            model, dtype=self.dtype, safety_checker=None, requires_safety_checker=False)
        self.pipe.to(self.device)  # already in self.dtype (a dtype cast here makes diffusers warn)
        self.pipe.set_progress_bar_config(disable=True)
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.steps, self.guidance, self.strength = num_inference_steps, guidance_scale, strength
        self.dilation_px, self.paste_back, self.base_seed = dilation_px, paste_back, base_seed
        self.model_id = model

    def process(self, rows: dict) -> tuple[dict, dict[int, str]]:
        from PIL import Image

        import torch

        images, masks, keys = rows["image"], rows["mask"], rows["key"]
        n, r = len(images), images.shape[1]
        dilated = np.stack([dilate_mask(m, self.dilation_px, r) for m in masks])
        seeds = np.array([sample_seed(self.base_seed, k) for k in keys], np.int64)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            out = self.pipe(
                prompt=[self.prompt] * n, negative_prompt=[self.negative_prompt] * n,
                image=[Image.fromarray(im) for im in images], mask_image=[Image.fromarray(d * 255) for d in dilated],
                height=r, width=r, strength=self.strength, guidance_scale=self.guidance,
                num_inference_steps=self.steps, generator=generators, output_type="np",
            ).images
        bg = np.clip(np.round(np.asarray(out, np.float32) * 255), 0, 255).astype(np.uint8)
        if self.paste_back:
            bg = np.where(dilated[..., None] > 0, bg, images)
        return {"background": bg, "seed": seeds}, {}

    def empty(self, batch: dict) -> dict:
        n = len(batch["key"])
        shape = batch["image"].shape if "image" in batch else (n, 0, 0, 3)
        return {"background": np.zeros(shape, np.uint8), "seed": np.zeros(n, np.int64)}
