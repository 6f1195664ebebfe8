"""Per-sample quality scores of a triplet, stored in the sample ``json`` under ``quality``.

Every score is computed from the fields a sample stores plus two models the build already holds: the saliency model
of the segment backend and the CLIP image encoder of the embed stage (shared instances, never a second copy)::

    "quality": {
      "version": 1,
      "removal": {"changed": 0.97, "residual": 0.12, "clip_sim": 0.61, "score": 0.85},
      "depth":   {"order": 0.93, "margin": 0.21},
      "mask":    {"area": 0.18, "components": 1, "border": 0.0, "bbox_fill": 0.64}
    }

*removal* — did inpainting take the object out of I_b? With ``box`` = the bounding box of the dilated mask (the
inpainted region):

* ``changed``: fraction of M whose pixels changed between I and I_b (max channel difference > ``change_threshold``
  of 255). I_b == I inside M gives 0.
* ``residual``: saliency contrast of M against its surround (``box`` minus M) in I_b, relative to the same contrast
  in I, clipped to [0, 1]. Saliency maps come from the segment backend's model (``sam``: the DPT disparity prior;
  ``u2net``: the U²-Net map; ``dataset``: the depth stage's DPT), both scaled by one affine map to [0, 1]. The
  contrast is measured on the part of M that is salient in I (above the ``prior_quantile`` of I's map) when there
  is one. 1 = the object stands out as much as before; 0 = nothing salient is left where it was. ``null`` when the
  object does not stand out in I (no reference) or M fills its box.
* ``clip_sim``: cosine similarity of CLIP ``image_embeds`` of I and I_b cropped to ``box`` (1 = same content).
* ``score`` = ``changed * (1 - residual)`` (``residual`` null → ``changed``): 0 = object still there, 1 = removed.

*depth* — on the stored uint16 maps normalised to [0, 1], inside M: ``order`` = fraction of M where the foreground
disparity exceeds the background disparity (the object is nearer than what replaced it), ``margin`` = mean of
``fg - bg`` in M (in [-1, 1]).

*mask* — ``area`` (fraction of the image), ``components`` (8-connected), ``border`` (fraction of the image's border
pixels inside M), ``bbox_fill`` (|M| / area of M's bounding box).

:data:`SCORES` names each number for ``cnc inspect``, ``cnc filter --where`` and the trainer's ``data.filter``.

Size: the scores, the stage that computes them during a build, and the filter predicates that read them share one
schema (the ``quality`` json); keeping them together keeps that schema in one place.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cnc.base.errors import UserError
from triplets.sample import DEPTH_MAX
from triplets.stages.base import Stage
from triplets.stages.inpaint import dilate_mask

log = logging.getLogger(__name__)
QUALITY_VERSION = 1
DIGITS = 6


# ------------------------------------------------------------------------------------------------- the score names
@dataclass(frozen=True)
class Score:
    """One number of ``quality``: where it lives, its histogram range and which end is good.

    ``better``: ``"high"``, ``"low"`` or ``""`` (no good end, e.g. the mask area).
    """

    name: str
    path: tuple[str, str]
    lo: float
    hi: float
    better: str
    doc: str


SCORES: dict[str, Score] = {s.name: s for s in (
    Score("removal", ("removal", "score"), 0, 1, "high", "object removal: changed * (1 - residual)"),
    Score("removal_changed", ("removal", "changed"), 0, 1, "high", "fraction of M changed between I and I_b"),
    Score("removal_residual", ("removal", "residual"), 0, 1, "low", "saliency contrast left in M in I_b"),
    Score("clip_sim", ("removal", "clip_sim"), 0, 1, "low", "CLIP similarity of the I and I_b crops"),
    Score("depth_order", ("depth", "order"), 0, 1, "high", "fraction of M where fg disparity > bg disparity"),
    Score("depth_margin", ("depth", "margin"), -1, 1, "high", "mean fg - bg disparity in M"),
    Score("mask_area", ("mask", "area"), 0, 1, "", "fraction of the image in M"),
    Score("mask_components", ("mask", "components"), 0, 10, "low", "8-connected components of M"),
    Score("mask_border", ("mask", "border"), 0, 1, "low", "fraction of the image border inside M"),
    Score("mask_bbox_fill", ("mask", "bbox_fill"), 0, 1, "high", "|M| / area of its bounding box"),
)}


def score_value(meta: dict, name: str) -> float | None:
    """The value of score ``name`` in a sample's metadata; ``None`` when unscored (old shard) or undefined."""
    q = meta.get("quality") if isinstance(meta, dict) else None
    if not isinstance(q, dict):
        return None
    group, key = SCORES[name].path
    v = q.get(group, {}).get(key) if isinstance(q.get(group), dict) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def has_quality(meta: dict) -> bool:
    return isinstance(meta, dict) and isinstance(meta.get("quality"), dict)


# --------------------------------------------------------------------------------------------------- pure scores
def _r(x: float) -> float:
    return round(float(x), DIGITS)


def mask_shape(mask: np.ndarray) -> dict:
    """Shape of a binary mask ``(H, W)`` {0,1}: ``area``, ``components`` (8-connected), ``border``, ``bbox_fill``."""
    import cv2

    m = (np.asarray(mask) > 0).astype(np.uint8)
    h, w = m.shape
    n = int(m.sum())
    if n == 0:
        return {"area": 0.0, "components": 0, "border": 0.0, "bbox_fill": 0.0}
    ncomp = cv2.connectedComponents(m, connectivity=8)[0] - 1
    border = np.concatenate([m[0], m[-1], m[1:-1, 0], m[1:-1, -1]]) if h > 1 and w > 1 else m.ravel()
    ys, xs = np.nonzero(m)
    bbox = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return {"area": _r(n / m.size), "components": int(ncomp), "border": _r(border.mean()), "bbox_fill": _r(n / bbox)}


def depth_order(mask: np.ndarray, fg_depth: np.ndarray, bg_depth: np.ndarray) -> dict:
    """Foreground vs background disparity inside M.

    Args:
        mask: ``(H, W)`` {0,1}.
        fg_depth / bg_depth: ``(H, W)`` uint16 normalised disparity (near = 65535), as stored.

    Returns:
        ``{"order": fraction of M with fg > bg, "margin": mean(fg - bg) in M in [-1, 1]}``; both ``None`` for an
        empty mask.
    """
    m = np.asarray(mask) > 0
    if not m.any():
        return {"order": None, "margin": None}
    fg = fg_depth[m].astype(np.float64) / DEPTH_MAX
    bg = bg_depth[m].astype(np.float64) / DEPTH_MAX
    return {"order": _r((fg > bg).mean()), "margin": _r((fg - bg).mean())}


def region_box(dilated: np.ndarray) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` (exclusive ends) of the bounding box of a non-empty ``(H, W)`` mask; the whole image
    when empty."""
    ys, xs = np.nonzero(dilated)
    if len(ys) == 0:
        return 0, dilated.shape[0], 0, dilated.shape[1]
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def changed_fraction(image: np.ndarray, background: np.ndarray, mask: np.ndarray, threshold: int = 24) -> float | None:
    """Fraction of M where ``max_c |I - I_b| > threshold`` (uint8 ``(H, W, 3)`` images); ``None`` for an empty M."""
    m = np.asarray(mask) > 0
    if not m.any():
        return None
    diff = np.abs(image.astype(np.int16) - background.astype(np.int16)).max(axis=-1)
    return _r((diff[m] > threshold).mean())


def saliency_residual(sal_image: np.ndarray, sal_background: np.ndarray, mask: np.ndarray, dilated: np.ndarray,
                      quantile: float = 0.85) -> float | None:
    """Saliency contrast of M against its surround left in I_b, relative to I (see the module docstring).

    Args:
        sal_image / sal_background: ``(H, W)`` float saliency of I and I_b (any range; high = salient).
        mask: M ``(H, W)`` {0,1}; dilated: the inpainted region ``(H, W)`` {0,1} (its bounding box is the region).
        quantile: the part of M above this quantile of I's saliency is the reference (all of M when empty).

    Returns:
        a value in [0, 1], or ``None`` when M does not stand out in I or leaves no surround in its box.
    """
    m = np.asarray(mask) > 0
    y0, y1, x0, x1 = region_box(np.asarray(dilated) > 0)
    box = np.zeros_like(m)
    box[y0:y1, x0:x1] = True
    ring = box & ~m
    if not m.any() or not ring.any():
        return None
    lo, hi = float(min(sal_image.min(), sal_background.min())), float(max(sal_image.max(), sal_background.max()))
    scale = hi - lo if hi > lo else 1.0  # one affine map for both: the ratio below does not depend on it
    si = (np.asarray(sal_image, np.float64) - lo) / scale
    sb = (np.asarray(sal_background, np.float64) - lo) / scale
    ref = m & (si >= np.quantile(si, quantile))
    if not ref.any():
        ref = m
    c_i = si[ref].mean() - si[ring].mean()
    if c_i <= 1e-6:
        return None
    c_b = sb[ref].mean() - sb[ring].mean()
    return _r(min(max(c_b / c_i, 0.0), 1.0))


def removal_score(changed: float | None, residual: float | None) -> float | None:
    """``changed * (1 - residual)``; ``residual`` ``None`` → ``changed``; ``changed`` ``None`` → ``None``."""
    if changed is None:
        return None
    return _r(changed * (1.0 - (residual or 0.0)))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return _r(float(np.dot(a, b)) / (na * nb)) if na > 0 and nb > 0 else 0.0


# ----------------------------------------------------------------------------------------------- saliency backends
SaliencyMap = Callable[[np.ndarray], np.ndarray]
"""``(N, H, W, 3)`` uint8 RGB → ``(N, H, W)`` float saliency (high = salient; any range)."""


class U2NetSaliency:
    """The U²-Net segmenter's fused map as a saliency map (the segmenter's own network, not a copy)."""

    def __init__(self, segmenter):
        self.segmenter = segmenter

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        from triplets.stages.u2net import u2net_preprocess

        seg = self.segmenter
        x = u2net_preprocess(images).to(seg.device, seg.dtype)
        with torch.inference_mode():
            fused = seg.net(x)[0].float().clamp(0, 1)
            fused = F.interpolate(fused, size=tuple(images.shape[1:3]), mode="bilinear", align_corners=False)
        return fused[:, 0].cpu().numpy().astype(np.float32)


def saliency_of(segment_stage, depth_stage=None) -> SaliencyMap:
    """The saliency model a build already holds for its segment backend (shared, not reloaded).

    ``sam``: the DPT of the saliency prior; ``u2net``: the U²-Net; any other backend (``dataset``): the depth stage's
    DPT.
    """
    seg = segment_stage.segmenter
    if hasattr(seg, "prior_depth"):
        return seg.prior_depth
    if hasattr(seg, "net"):
        return U2NetSaliency(seg)
    if depth_stage is None:
        raise ValueError(f"segment backend {segment_stage.backend!r} has no saliency model and no depth stage is given")
    return depth_stage.estimator


# ---------------------------------------------------------------------------------------------------- the scorer
class QualityScorer:
    """Scores a batch of triplets with shared model instances.

    Args:
        saliency: a :data:`SaliencyMap` (see :func:`saliency_of`).
        embedder: a :class:`~triplets.stages.embed.CLIPImageEmbedder` (``(N, H, W, 3)`` uint8 → ``(N, D)``).
        dilation_px: the inpainting dilation at 512 px (``inpaint.dilation_px``; scaled with the resolution).
        change_threshold: per-channel difference (of 255) above which a pixel counts as changed.
        quantile: saliency quantile of the removal reference (``segment.prior_quantile``).
    """

    def __init__(self, saliency: SaliencyMap, embedder, dilation_px: int = 50, change_threshold: int = 24,
                 quantile: float = 0.85):
        self.saliency, self.embedder = saliency, embedder
        self.dilation_px, self.change_threshold, self.quantile = dilation_px, change_threshold, quantile

    def __call__(self, image: np.ndarray, mask: np.ndarray, background: np.ndarray, fg_depth: np.ndarray,
                 bg_depth: np.ndarray) -> list[dict]:
        """Batch ``(N, R, R, 3)`` uint8 I and I_b, ``(N, R, R)`` {0,1} M, ``(N, R, R)`` uint16 depths → N dicts."""
        from PIL import Image

        n, r = len(image), image.shape[1]
        sal = self.saliency(np.concatenate([image, background], axis=0))
        dilated = [dilate_mask(m, self.dilation_px, r) for m in mask]
        boxes = [region_box(d > 0) for d in dilated]
        side = 224  # crops are resized to one size so the CLIP processor sees a uniform batch
        crops = [np.asarray(Image.fromarray(np.ascontiguousarray(img[y0:y1, x0:x1])).resize((side, side),
                                                                                            Image.BICUBIC))
                 for img, (y0, y1, x0, x1) in [(image[i], boxes[i]) for i in range(n)]
                 + [(background[i], boxes[i]) for i in range(n)]]
        emb = self.embedder(np.stack(crops))
        out = []
        for i in range(n):
            changed = changed_fraction(image[i], background[i], mask[i], self.change_threshold)
            residual = saliency_residual(sal[i], sal[n + i], mask[i], dilated[i], self.quantile)
            out.append({
                "version": QUALITY_VERSION,
                "removal": {"changed": changed, "residual": residual, "clip_sim": cosine(emb[i], emb[n + i]),
                            "score": removal_score(changed, residual)},
                "depth": depth_order(mask[i], fg_depth[i], bg_depth[i]),
                "mask": mask_shape(mask[i]),
            })
        return out


class QualityStage(Stage):
    """``quality``: adds the ``quality`` column (one dict per row, see the module docstring).

    Needs ``image``, ``mask``, ``background``, ``fg_depth``, ``bg_depth``. Takes the scorer (with the build's own
    model instances) rather than model ids, so it never loads a second copy of a model.
    """

    name = "quality"

    def __init__(self, scorer: QualityScorer):
        self.scorer = scorer

    def process(self, rows: dict) -> tuple[dict, dict[int, str]]:
        scores = self.scorer(rows["image"], rows["mask"], rows["background"], rows["fg_depth"], rows["bg_depth"])
        col = np.empty(len(scores), dtype=object)
        col[:] = scores
        return {"quality": col}, {}

    def empty(self, batch: dict) -> dict:
        return {"quality": np.full(len(batch["key"]), None, dtype=object)}


# ------------------------------------------------------------------------------------------------------ filtering
class FilterSpecError(UserError, ValueError):
    """A ``--where`` condition or a filter threshold that names no score or does not parse."""


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq, "!=": operator.ne}
_WHERE = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|==|!=|>|<)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Condition:
    """``score OP value``; a sample with the score undefined does not satisfy it."""

    score: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.score}{self.op}{self.value:g}"

    def holds(self, meta: dict) -> bool:
        v = score_value(meta, self.score)
        return v is not None and _OPS[self.op](v, self.value)


def parse_where(text: str) -> Condition:
    """``"removal>=0.5"`` → :class:`Condition` (raises :class:`FilterSpecError` naming the valid scores)."""
    m = _WHERE.match(text)
    if not m:
        raise FilterSpecError(f"--where {text!r}: expected SCORE OP NUMBER, e.g. removal>=0.5 (OP: "
                              f"{', '.join(_OPS)})")
    name, op, value = m.groups()
    if name not in SCORES:
        raise FilterSpecError(f"--where {text!r}: unknown score {name!r}; valid: {', '.join(SCORES)}")
    try:
        number = float(value)
    except ValueError:
        raise FilterSpecError(f"--where {text!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise FilterSpecError(f"--where {text!r}: the value must be finite")
    return Condition(name, op, number)


class QualityFilter:
    """All conditions must hold. Samples without ``quality`` (old shards) pass when ``keep_unscored``.

    ``reason(meta)`` is ``None`` for a kept sample, else the first failed condition (``"removal>=0.5"``) or
    ``"unscored"``.
    """

    def __init__(self, conditions: list[Condition], keep_unscored: bool = True):
        self.conditions, self.keep_unscored = list(conditions), keep_unscored

    def __bool__(self) -> bool:
        return bool(self.conditions)

    def reason(self, meta: dict) -> str | None:
        if not self.conditions:
            return None
        if not has_quality(meta):
            return None if self.keep_unscored else "unscored"
        for c in self.conditions:
            if not c.holds(meta):
                return str(c)
        return None

    def __call__(self, meta: dict) -> bool:
        return self.reason(meta) is None

    def describe(self) -> str:
        return " and ".join(map(str, self.conditions)) or "(none)"


class FilterConfig(BaseModel):
    """``data.filter`` of the trainer: thresholds on the ``quality`` scores, applied while streaming.

    Every threshold is off (``null``) by default; a sample whose score is undefined fails a threshold on it.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a NaN threshold would drop every sample

    min_removal: float | None = Field(None, description="removal score >= this (0 = object still there, 1 = gone)")
    max_removal_residual: float | None = Field(None, description="saliency contrast left in M <= this")
    max_clip_sim: float | None = Field(None, description="CLIP similarity of the I and I_b crops <= this")
    min_depth_order: float | None = Field(None, description="fraction of M with fg nearer than bg >= this")
    min_depth_margin: float | None = Field(None, description="mean fg - bg disparity in M >= this")
    min_mask_area: float | None = Field(None, description="mask area >= this")
    max_mask_area: float | None = Field(None, description="mask area <= this")
    max_mask_components: int | None = Field(None, description="connected components of M <= this")
    max_mask_border: float | None = Field(None, description="fraction of the image border in M <= this")
    min_mask_bbox_fill: float | None = Field(None, description="|M| / bbox area >= this")
    keep_unscored: bool = Field(True, description="keep samples without quality scores (shards built before "
                                                  "scoring; add scores with `cnc score`)")

    def conditions(self) -> list[Condition]:
        out = []
        for key, value in self.model_dump().items():
            if key == "keep_unscored" or value is None:
                continue
            bound, name = key.split("_", 1)
            out.append(Condition(name, ">=" if bound == "min" else "<=", float(value)))
        return out

    def build(self) -> QualityFilter:
        return QualityFilter(self.conditions(), self.keep_unscored)


def quality_summary_line(meta: dict) -> str:
    """``"removal 0.85 · depth order 0.93 · ..."`` for captions (empty when unscored)."""
    parts = []
    for name in ("removal", "clip_sim", "depth_order", "mask_components", "mask_border"):
        v = score_value(meta, name)
        if v is not None:
            parts.append(f"{name} {v:.2f}" if name != "mask_components" else f"components {v:.0f}")
    return " · ".join(parts)


# ------------------------------------------------------------------------------------------- scoring old shards
def scorer_models(cfg) -> dict[str, str]:
    """Config key → model id of what :func:`scorer_from_config` loads for a :class:`~triplets.config.BuildConfig`:
    the segment backend's saliency model and the CLIP image encoder (never the inpainting or SAM models)."""
    backend = cfg.segment.backend
    if backend == "sam":
        ids = {"segment.saliency_model": cfg.segment.saliency_model}
    elif backend == "u2net":
        ids = {"segment.u2net_checkpoint": cfg.segment.u2net_checkpoint}
    else:
        ids = {"depth.model": cfg.depth.model}
    ids["embed.model"] = cfg.embed.model
    return ids


def scorer_from_config(cfg, device: str | None = None) -> QualityScorer:
    """A :class:`QualityScorer` with the models of build config ``cfg`` (:func:`scorer_models`), resolved first.

    Raises:
        cnc.base.errors.ModelUnavailableError: one line per missing model naming its config key.
    """
    from cnc.base.errors import ModelUnavailableError
    from cnc.hub import resolve_pretrained
    from triplets.stages.depth import DPTDepth
    from triplets.stages.embed import CLIPImageEmbedder

    resolved, missing = {}, []
    for key, mid in scorer_models(cfg).items():
        try:
            resolved[key] = resolve_pretrained(mid, key, is_file=key == "segment.u2net_checkpoint", seed=cfg.seed)
        except ModelUnavailableError as exc:
            missing.append(str(exc))
    if missing:
        raise ModelUnavailableError("\n".join(missing))
    common = dict(device=device or cfg.device, dtype=cfg.dtype)
    if "segment.saliency_model" in resolved:
        saliency: SaliencyMap = DPTDepth(resolved["segment.saliency_model"], **common)
    elif "segment.u2net_checkpoint" in resolved:
        from triplets.stages.u2net import U2NetSegmenter

        saliency = U2NetSaliency(U2NetSegmenter(resolved["segment.u2net_checkpoint"], **common))
    else:
        saliency = DPTDepth(resolved["depth.model"], **common)
    return QualityScorer(saliency, CLIPImageEmbedder(resolved["embed.model"], **common), cfg.inpaint.dilation_px,
                         cfg.quality.change_threshold, cfg.segment.prior_quantile)
