"""Validation images: :class:`~cnc_model.pipeline_cnc.CnCPipeline` on fixed samples, saved as a grid and logged.

Each row of ``OUTPUT/validation/step-NNNNNNN.png`` is one validation sample (key and caption under it), under the
column titles::

    image I | fg depth | bg depth | mask M | background I_b | generated

The pipeline is built from the live (unwrapped) modules. A stage that does not train one of the fusers leaves it
out (``None``), which ``CnCPipeline`` supports: ``local`` samples with the 77 text tokens it is trained with,
``global`` without depth residuals.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from triplets.sample import TripletSample

logger = logging.getLogger(__name__)
COLUMNS = ("image", "fg depth", "bg depth", "mask", "background", "generated")


def make_grid(samples: list[TripletSample], outputs: np.ndarray, footer: str = "") -> Image.Image:
    """Rows of :data:`COLUMNS` under their titles, each captioned with the sample key and caption
    (:func:`triplets.inspect.grid.labelled_grid`); ``outputs`` ``(B, H, W, 3)`` in [0, 1]."""
    from triplets.inspect.grid import GridRow, labelled_grid

    size = outputs.shape[1]
    rows = [GridRow([s.image, s.fg_depth_float(), s.bg_depth_float(), s.mask * 255, s.background, out],
                    title=s.key, text=s.caption) for s, out in zip(samples, outputs)]
    return labelled_grid(COLUMNS, rows, size, footer=footer)


@torch.no_grad()
def run_validation(*, vae, text_encoder, tokenizer, unet, noise_scheduler, local_fuser, global_fuser,
                   samples: list[TripletSample], resolution: int, num_inference_steps: int, guidance_scale: float,
                   seed: int) -> Image.Image:
    """Generate one image per sample with ``CnCPipeline`` and return the grid (a fuser may be ``None``).

    The caller restores train mode and the RNG.
    """
    from diffusers import DDIMScheduler

    from cnc_model.pipeline_cnc import CnCPipeline

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
    return make_grid(samples, np.asarray(out.images),
                     footer=f"{num_inference_steps} DDIM steps, guidance {guidance_scale:g}, seed {seed}")


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
