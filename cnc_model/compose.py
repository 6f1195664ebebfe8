"""``compose``: sample CnC from a foreground photo and a background photo.

Runs the inference-time preprocessing of the reference demo: mask from a segmenter (or from depth), fg depth
= depth(fg ⊙ mask) (the reference's default "v2", the same rule as training), bg depth = depth(bg), references = the
two photos. Models are injected as callables so the ``triplets`` stages (or any other backend) can be plugged in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image

from cnc_model.inputs import DEPTH_MASK_THRESHOLD

logger = logging.getLogger(__name__)

#: ``images (N, H, W, 3) uint8 -> (N, H, W) float32 in [0, 1]`` (relative inverse depth, near = large).
DepthEstimator = Callable[[np.ndarray], np.ndarray]
#: ``images (N, H, W, 3) uint8 -> (N, H, W) uint8 in {0, 1}`` (1 = salient foreground).
Segmenter = Callable[[np.ndarray], np.ndarray]


@dataclass
class ComposeResult:
    """Outputs and the conditions that produced them.

    Args:
        images: the pipeline's images (PIL list for ``output_type="pil"``).
        fg_image, bg_image: the resized input photos, ``(H, W, 3)`` uint8.
        fg_depth, bg_depth: ``(H, W)`` float32 in [0, 1].
        mask: ``(H, W)`` uint8 in {0, 1}.
    """

    images: Any
    fg_image: np.ndarray
    bg_image: np.ndarray
    fg_depth: np.ndarray
    bg_depth: np.ndarray
    mask: np.ndarray


def _rgb(image, height: int, width: int) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.uint8)


def _mask_from_depth(depth: np.ndarray) -> np.ndarray:
    lo, hi = float(depth.min()), float(depth.max())
    if hi - lo <= 1e-6:
        return np.ones_like(depth, dtype=np.uint8)
    return ((depth - lo) / (hi - lo) > DEPTH_MASK_THRESHOLD).astype(np.uint8)


def compose(
    pipe,
    fg_image: Image.Image | np.ndarray,
    bg_image: Image.Image | np.ndarray,
    prompt: str | list[str],
    depth_estimator: DepthEstimator,
    segmenter: Segmenter | None = None,
    height: int = 512,
    width: int = 512,
    **kwargs,
) -> ComposeResult:
    """Generate an image putting the object of ``fg_image`` into the scene of ``bg_image``.

    Steps: both photos resized to ``height x width`` (bicubic); mask = ``segmenter(fg)`` or, without a segmenter,
    ``depth(fg)`` min-max normalised ``> 0.5`` (all-ones if the depth is constant); fg depth =
    ``depth(fg * mask)`` (object on black); bg depth = ``depth(bg)``; references = the two photos (needs the
    pipeline's image encoder). ``kwargs`` go to ``pipe(...)`` (``num_inference_steps``, ``guidance_scale``,
    ``generator``, ``fg_scale``, ``bg_scale``, ``negative_prompt``, ``output_type``...).
    """
    fg = _rgb(fg_image, height, width)
    bg = _rgb(bg_image, height, width)
    if segmenter is not None:
        mask = np.asarray(segmenter(fg[None]))[0].astype(np.uint8)
    else:
        mask = _mask_from_depth(np.asarray(depth_estimator(fg[None]), dtype=np.float32)[0])
    if mask.shape != fg.shape[:2]:
        raise ValueError(f"segmenter returned a {mask.shape} mask for a {fg.shape[:2]} image")
    if not mask.any():
        logger.warning("empty foreground mask: the fg tokens will be invisible everywhere")
    fg_depth = np.asarray(depth_estimator((fg * mask[..., None])[None]), dtype=np.float32)[0]
    bg_depth = np.asarray(depth_estimator(bg[None]), dtype=np.float32)[0]
    out = pipe(prompt, fg_depth=fg_depth, bg_depth=bg_depth, mask=mask.astype(np.float32),
               fg_reference=Image.fromarray(fg), bg_reference=Image.fromarray(bg), height=height, width=width,
               **kwargs)
    return ComposeResult(images=out.images, fg_image=fg, bg_image=bg, fg_depth=fg_depth, bg_depth=bg_depth,
                         mask=mask)


class DPTDepthEstimator:
    """transformers ``DPTForDepthEstimation`` (e.g. ``Intel/dpt-large``) as a :data:`DepthEstimator`.

    Uses the model's own image processor; the prediction is resized (bicubic) to the input size and min-max
    normalised per map to [0, 1] (project convention, method.md §2.5).
    """

    def __init__(self, model: str, device: str = "cpu", local_files_only: bool = False) -> None:
        from transformers import DPTForDepthEstimation, DPTImageProcessor

        self.processor = DPTImageProcessor.from_pretrained(model, local_files_only=local_files_only)
        self.model = DPTForDepthEstimation.from_pretrained(model, local_files_only=local_files_only).to(device).eval()
        self.device = device

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        inputs = self.processor(images=[np.array(i) for i in images], return_tensors="pt").to(self.device)
        with torch.no_grad():
            pred = self.model(**inputs).predicted_depth  # (N, h, w)
        pred = F.interpolate(pred[:, None].float(), size=images.shape[1:3], mode="bicubic", align_corners=False)[:, 0]
        lo = pred.flatten(1).min(1).values.view(-1, 1, 1)
        hi = pred.flatten(1).max(1).values.view(-1, 1, 1)
        return ((pred - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1).cpu().numpy().astype(np.float32)
