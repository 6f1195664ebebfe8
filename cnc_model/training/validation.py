"""Validation images: :class:`~cnc_model.pipeline_cnc.CnCPipeline` on fixed samples, saved as a grid and logged.

Each row of ``OUTPUT/validation/step-NNNNNNN.png`` is one validation sample::

    image I | fg depth | bg depth | mask M | background I_b | generated

The pipeline is built from the live (unwrapped) modules. A stage that does not train one of the fusers gets a
stand-in that reproduces the stage's model exactly: ``local`` uses a 0-token global fuser (the context stays the
77 text tokens it is trained with), ``global`` a fresh local fuser whose zero convolutions make its residuals exactly 0.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from triplets.sample import TripletSample

logger = logging.getLogger(__name__)
COLUMNS = ("image", "fg depth", "bg depth", "mask", "background", "generated")


def text_only_global_fuser(image_embed_dim: int, cross_attention_dim: int):
    """A :class:`GlobalFuser` with 0 tokens per reference: ``CnCPipeline`` then runs with the 77 text tokens only."""
    from cnc_model.models.global_fuser import GlobalFuser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
        return GlobalFuser(image_embed_dim=image_embed_dim, cross_attention_dim=cross_attention_dim,
                           tokens_per_reference=0, hidden_mult=1).eval()


def zero_local_fuser(unet):
    """A fresh ``LocalFuser.from_unet(unet)``: its zero convolutions make the residuals exactly zero."""
    from cnc_model.models.local_fuser import LocalFuser

    return LocalFuser.from_unet(unet).to(device=unet.device, dtype=unet.dtype).eval()


def _tile(arr: np.ndarray, size: int) -> Image.Image:
    """``(H, W)`` / ``(H, W, 3)`` uint8 or float in [0, 1] -> RGB tile of ``size``."""
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(arr).convert("RGB").resize((size, size))


def make_grid(samples: list[TripletSample], outputs: np.ndarray) -> Image.Image:
    """Rows of :data:`COLUMNS`; ``outputs`` ``(B, H, W, 3)`` in [0, 1]."""
    size = outputs.shape[1]
    grid = Image.new("RGB", (size * len(COLUMNS), size * len(samples)))
    for r, (s, out) in enumerate(zip(samples, outputs)):
        tiles = [s.image, s.fg_depth_float(), s.bg_depth_float(), s.mask * 255, s.background, out]
        for c, tile in enumerate(tiles):
            grid.paste(_tile(np.asarray(tile), size), (c * size, r * size))
    return grid


@torch.no_grad()
def run_validation(*, vae, text_encoder, tokenizer, unet, noise_scheduler, local_fuser, global_fuser,
                   samples: list[TripletSample], resolution: int, num_inference_steps: int, guidance_scale: float,
                   seed: int, image_embed_dim: int, extra: dict) -> Image.Image:
    """Generate one image per sample with ``CnCPipeline`` and return the grid.

    ``extra`` caches the stand-in fusers between calls. The caller restores train mode and the RNG.
    """
    from diffusers import DDIMScheduler

    from cnc_model.pipeline_cnc import CnCPipeline

    if global_fuser is None:
        global_fuser = extra.setdefault("text_only_global_fuser", text_only_global_fuser(
            image_embed_dim, unet.config.cross_attention_dim).to(unet.device))
    if local_fuser is None:
        local_fuser = extra.setdefault("zero_local_fuser", zero_local_fuser(unet))
    pipe = CnCPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, local_fuser=local_fuser,
                       global_fuser=global_fuser, scheduler=DDIMScheduler.from_config(noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    maps = {name: torch.from_numpy(np.stack([getattr(s, f"{name}_float")() for s in samples]))[:, None]
            for name in ("fg_depth", "bg_depth")}
    mask = torch.from_numpy(np.stack([s.mask for s in samples]).astype(np.float32))[:, None]
    out = pipe(
        prompt=[s.caption for s in samples], fg_depth=maps["fg_depth"], bg_depth=maps["bg_depth"], mask=mask,
        fg_reference=np.stack([s.fg_emb for s in samples]), bg_reference=np.stack([s.bg_emb for s in samples]),
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=resolution, width=resolution,
        generator=torch.Generator(device="cpu").manual_seed(seed), output_type="np",
    )
    return make_grid(samples, np.asarray(out.images))


def save_and_log(grid: Image.Image, output_dir: Path, step: int, accelerator) -> Path:
    """Write ``validation/step-N.png`` and add it to TensorBoard (when a tracker is configured)."""
    path = Path(output_dir) / "validation" / f"step-{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
            tracker.writer.add_text("validation/columns", " | ".join(COLUMNS), step)
    logger.info("validation images of step %d: %s", step, path)
    return path
