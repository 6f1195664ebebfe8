"""``compose``: sample CnC from a foreground photo and a background photo.

Runs the inference-time preprocessing of the reference demo: mask from a segmenter (or from depth), fg depth
= depth(fg ⊙ mask) (the reference's default "v2", the same rule as training), bg depth = depth(bg), references = the
two photos. Models are injected as callables so the ``triplets`` stages (or any other backend) can be plugged in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


def _reference(ref, height: int, width: int):
    """An exemplar image (PIL / uint8 array) -> RGB PIL at the output size; embeddings pass through."""
    if isinstance(ref, Image.Image) or (isinstance(ref, np.ndarray) and ref.dtype == np.uint8 and ref.ndim == 3):
        return Image.fromarray(_rgb(ref, height, width))
    return ref


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
    fg_reference: Any = None,
    bg_reference: Any = None,
    **kwargs,
) -> ComposeResult:
    """Generate an image putting the object of ``fg_image`` into the scene of ``bg_image``.

    Steps: both photos resized to ``height x width`` (bicubic); mask = ``segmenter(fg)`` or, without a segmenter,
    ``depth(fg)`` min-max normalised ``> 0.5`` (all-ones if the depth is constant); fg depth =
    ``depth(fg * mask)`` (object on black); bg depth = ``depth(bg)``; references = the two photos (needs the
    pipeline's image encoder) unless ``fg_reference`` / ``bg_reference`` (PIL images, uint8 arrays or precomputed CLIP
    embeddings) give separate exemplars: depth from one photo, appearance from another. Reference images are resized
    to the output size first, as in the reference demo. ``kwargs`` go to ``pipe(...)`` (``num_inference_steps``,
    ``guidance_scale``, ``generator``, ``fg_scale``, ``bg_scale``, ``fg_depth_scale``, ``bg_depth_scale``,
    ``negative_prompt``, ``prompt_suffix``, ``output_type``...).
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
    refs = [Image.fromarray(photo) if ref is None else _reference(ref, height, width)
            for ref, photo in ((fg_reference, fg), (bg_reference, bg))]
    out = pipe(prompt, fg_depth=fg_depth, bg_depth=bg_depth, mask=mask.astype(np.float32),
               fg_reference=refs[0], bg_reference=refs[1], height=height, width=width, **kwargs)
    return ComposeResult(images=out.images, fg_image=fg, bg_image=bg, fg_depth=fg_depth, bg_depth=bg_depth,
                         mask=mask)


class DPTDepthEstimator:
    """transformers ``DPTForDepthEstimation`` (e.g. ``Intel/dpt-large``, or ``tiny``) as a :data:`DepthEstimator`.

    Wraps the shard builder's :class:`triplets.stages.depth.DPTDepth` (the model's own image processor, prediction
    resized bicubically to the input size) and min-max normalises each map to [0, 1], so sampling
    sees depth made exactly as in training.
    """

    def __init__(self, model: str, device: str = "cpu", dtype: str = "float32") -> None:
        from triplets.stages.depth import DPTDepth

        self.depth = DPTDepth(model, device=device, dtype=dtype)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        raw = self.depth(np.asarray(images, dtype=np.uint8))
        lo = raw.reshape(len(raw), -1).min(1)[:, None, None]
        hi = raw.reshape(len(raw), -1).max(1)[:, None, None]
        return np.clip((raw - lo) / np.maximum(hi - lo, 1e-8), 0, 1).astype(np.float32)


class SamSaliencySegmenter:
    """The shard builder's ``sam`` mask backend (SAM prompted by the DPT saliency prior) as a :data:`Segmenter`."""

    def __init__(self, sam_checkpoint: str, saliency_model: str, sam_model_type: str = "vit_h", device: str = "cpu",
                 min_area: float = 0.01, max_area: float = 0.95) -> None:
        from triplets.stages.segment import SamSegmenter

        self.segmenter = SamSegmenter(sam_checkpoint=sam_checkpoint, sam_model_type=sam_model_type,
                                      saliency_model=saliency_model, min_area=min_area, max_area=max_area,
                                      device=device, dtype="float32")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        masks, _ = self.segmenter({"image": np.asarray(images, dtype=np.uint8)})
        return (masks > 0).astype(np.uint8)
