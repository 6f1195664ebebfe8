"""``compose``: sample CnC from a foreground photo and a background photo, with the build's conditions.

The conditions come from :class:`triplets.conditions.ConditionMaker` -- the shard builder's own decode + crop
geometry, segment stage (``sam``, ``u2net`` or a dataset mask), depth stage (``depth.preprocess``) and embed stage,
with the settings the model's training shards were built with (:func:`cnc_model.loading.Source.conditions`): mask =
segment(fg), fg depth = depth(fg ⊙ mask) (the reference's default "v2", the same rule as training), bg depth =
depth(bg), embeddings = CLIP of the two photos (or of separate exemplars). Nothing here makes a condition another way.

Example::

    from cnc_model.compose import compose, condition_maker
    from cnc_model.loading import describe, load_pipeline

    source = describe("out/train/joint")
    pipe = load_pipeline(source)
    result = compose(pipe, "corgi.jpg", "beach.jpg", "a corgi on a beach", condition_maker(source))
    result.images[0].save("out.png"); result.conditions.write("conditions/", result.choice.record())
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class ComposeResult:
    """Outputs and the conditions that produced them.

    Args:
        images: the pipeline's images (PIL list for ``output_type="pil"``).
        conditions: :class:`triplets.conditions.Conditions` (cropped photos, mask, uint16 depths, embeddings).
        fg_image, bg_image: the cropped input photos, ``(H, W, 3)`` uint8.
        fg_depth, bg_depth: ``(H, W)`` float32 in [0, 1] (the uint16 maps / 65535).
        mask: ``(H, W)`` uint8 in {0, 1}.
    """

    images: Any
    conditions: Any
    fg_image: np.ndarray
    bg_image: np.ndarray
    fg_depth: np.ndarray
    bg_depth: np.ndarray
    mask: np.ndarray


def condition_maker(source=None, *, config=None, overrides: list[str] | None = None, device: str = "auto",
                    embeddings: bool = True):
    """``(ConditionMaker, ConditionChoice)`` for sampling ``source`` (a :class:`cnc_model.loading.Source`, or
    ``None``): the settings its training shards were built with by default; ``config`` (a build config file or
    shipped name) and ``overrides`` (``key=value`` build keys) change them, and the choice lists every difference
    (:class:`triplets.conditions.ConditionChoice`)."""
    from triplets.conditions import ConditionMaker, choose_conditions

    trained, notes = (None, []) if source is None else source.conditions()
    choice = choose_conditions(trained, config=config, overrides=overrides, notes=notes)
    return ConditionMaker(choice.settings, device=device, embeddings=embeddings), choice


def compose(
    pipe,
    fg_image,
    bg_image,
    prompt: str | list[str],
    conditions,
    *,
    height: int | None = None,
    width: int | None = None,
    fg_mask=None,
    fg_mask_kind: str = "binary",
    fg_reference: Any = None,
    bg_reference: Any = None,
    **kwargs,
) -> ComposeResult:
    """Generate an image putting the object of ``fg_image`` into the scene of ``bg_image``.

    Args:
        pipe: a :class:`~cnc_model.pipeline_cnc.CnCPipeline`.
        fg_image, bg_image: photos (paths, encoded bytes, PIL images or ``(H, W, 3)`` uint8 arrays).
        prompt: text prompt(s); the batch is ``len(prompt)``.
        conditions: a :class:`triplets.conditions.ConditionMaker` (or the pair :func:`condition_maker` returns).
        height, width: output size (default: the conditions' build resolution, square); the photos are cropped to it
            with the build's geometry (short side, centre crop).
        fg_mask, fg_mask_kind: a dataset mask for the fg photo (needed with ``segment.backend: dataset``).
        fg_reference, bg_reference: separate exemplar photos for the global tokens (default: the two photos), or
            precomputed CLIP embeddings passed to the pipeline unchanged.
        kwargs: to ``pipe(...)`` (``num_inference_steps``, ``guidance_scale``, ``generator``, ``fg_scale``,
            ``bg_scale``, ``fg_depth_scale``, ``bg_depth_scale``, ``negative_prompt``, ``prompt_suffix``,
            ``output_type``, ``attention_fp32_logits``...).
    """
    maker = conditions[0] if isinstance(conditions, tuple) else conditions
    size = maker.settings.resolution
    height, width = height or size, width or size
    precomputed = {k: v for k, v in (("fg", fg_reference), ("bg", bg_reference)) if _is_embedding(v)}
    cond = maker(fg_image, bg_image, (height, width), fg_mask=fg_mask, fg_mask_kind=fg_mask_kind,
                 fg_reference=None if "fg" in precomputed else fg_reference,
                 bg_reference=None if "bg" in precomputed else bg_reference)
    if not cond.mask.any():
        logger.warning("empty foreground mask: the fg tokens will be invisible everywhere")
    refs = {}
    for name in ("fg", "bg"):
        emb = precomputed.get(name, getattr(cond, f"{name}_emb"))
        if emb is None and pipe.global_fuser is not None:
            emb = getattr(cond, f"{name}_image")  # no embed stage: the pipeline's own image encoder
        refs[f"{name}_reference"] = emb
    fg_depth, bg_depth = cond.fg_depth_float(), cond.bg_depth_float()
    out = pipe(prompt, fg_depth=fg_depth, bg_depth=bg_depth, mask=cond.mask.astype(np.float32),
               height=height, width=width, **refs, **kwargs)
    return ComposeResult(images=out.images, conditions=cond, fg_image=cond.fg_image, bg_image=cond.bg_image,
                         fg_depth=fg_depth, bg_depth=bg_depth, mask=cond.mask)


def _is_embedding(x) -> bool:
    import torch

    if torch.is_tensor(x):
        return True
    return isinstance(x, np.ndarray) and x.dtype != np.uint8 and x.ndim <= 2


class DPTDepthEstimator:
    """transformers ``DPTForDepthEstimation`` (e.g. ``Intel/dpt-large``, or ``tiny``) as a per-map [0, 1] estimator:
    ``(N, H, W, 3) uint8 -> (N, H, W) float32`` (near = 1). Used by ``cnc eval``'s depth MAE.

    Wraps the shard builder's :class:`triplets.stages.depth.DPTDepth` (the model's own image processor, prediction
    resized bicubically to the input size) and min-max normalises each map to [0, 1], as the build does.
    """

    def __init__(self, model: str, device: str = "cpu", dtype: str = "float32") -> None:
        from triplets.stages.depth import DPTDepth

        self.depth = DPTDepth(model, device=device, dtype=dtype)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        raw = self.depth(np.asarray(images, dtype=np.uint8))
        lo = raw.reshape(len(raw), -1).min(1)[:, None, None]
        hi = raw.reshape(len(raw), -1).max(1)[:, None, None]
        return np.clip((raw - lo) / np.maximum(hi - lo, 1e-8), 0, 1).astype(np.float32)
