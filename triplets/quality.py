"""Per-sample quality scores of a triplet, stored in the sample ``json`` under ``quality`` (version 2)::

    "quality": {
      "version": 2,
      "removal": {"changed": 0.97, "contrast": 0.21, "score": 0.77, "clip_sim": 0.61},
      "depth":   {"order": 0.93, "margin": 0.21},
      "mask":    {"area": 0.18, "components": 1, "border": 0.0, "bbox_fill": 0.64}
    }

Each score's meaning and how well it measures it (ROC-AUC on the labelled benchmark of
:mod:`triplets.quality_cases`, ``benchmarks/quality_benchmark.py``) is tabled in docs/build.md ("Quality scores").
A score that cannot be measured on a sample is ``null`` — never silently another score; filters decide what an
undefined score means (``cnc filter --keep-unscored/--drop-unscored``, ``data.filter.keep_unscored``).

*removal* — did inpainting take the object out of I_b? Model-free (the same numbers on any device, any backend).
With the *rim* = a band around M of width ``RIM_WIDTH * sqrt(|M|)`` and the *inpainted region* = M dilated by
``inpaint.dilation_px``:

* ``changed``: fraction of M whose pixels changed between I and I_b beyond what a global brightness shift and
  re-encoding explain: per-channel difference, minus its median outside the inpainted region (the global shift),
  largest channel, averaged over a small window (``CHANGE_WINDOW`` of the side) so compression noise averages out;
  a pixel counts when that exceeds ``max(change_floor, 1.5 × its 99th percentile outside the inpainted region)``.
  I_b == I (also re-encoded, or brighter) gives 0; a low-contrast object replaced by its background gives ~1.
* ``contrast``: how much M still stands out from its rim in I_b compared with I:
  ``C(I_b) / max(C(I), CONTRAST_FLOOR)`` clipped to [0, 1], where ``C`` is the mean over four pixel features
  (luma, two opponent colours, gradient magnitude) of the Kolmogorov-Smirnov distance between the feature's
  values in M and in the rim. 1 = the region differs from its surround as much as the object did (kept,
  re-painted, replaced, smeared); near 0 = it blends in. The floor keeps a low-contrast object's ratio meaningful.
* ``score`` = ``changed × (1 − contrast)``: 0 = the object is still there, 1 = removed.
* ``clip_sim`` (``quality.clip_sim``; learned: the embed stage's CLIP): cosine similarity of CLIP ``image_embeds``
  of a square crop around M (side ``CLIP_CONTEXT`` × M's bounding box) of I and of I with M replaced by I_b's
  pixels. The crop follows M, not the inpainted box, so the score does not depend on the box's size. ``null`` when
  off.

*depth* — is the object nearer than what replaced it? D(I) (the depth model's disparity of the whole photo) and the
stored D(I_b) are each relative (own scale and shift), so D(I) is first mapped onto D(I_b) by the least-squares
scale and shift on a band just outside the inpainted region, where I and I_b show the same scene. In M:
``order`` = fraction of pixels where the aligned D(I) exceeds D(I_b) by more than ``ORDER_TOLERANCE`` of D(I_b)'s
spread (its 5-95 % range); ``margin`` = mean aligned ``D(I) − D(I_b)`` over that spread, clipped to [-1, 1].
Both ``null`` when the band is too small, flat, or D(I) does not increase with D(I_b) there (no alignment).

*mask* — ``area`` (fraction of the image), ``components`` (8-connected), ``border`` (fraction of the image's border
pixels inside M), ``bbox_fill`` (|M| / area of M's bounding box).

Where the statistics run: during a build, D(I) is the one the build already computed (the ``sam`` segmenter's
saliency prior when it is the depth model's own pass, else the depth stage's, batched with its other two maps) and
D(I_b) the stored map, so no model runs twice; the CLIP crops are cut on the model's device; the per-image
statistics (:func:`statistics`, NumPy/OpenCV, on the fields at most :data:`WORK_SIDE` pixels wide) run beside JPEG
encoding in the worker's encode threads, off the model thread (:meth:`triplets.builder.TripletBuilder.assemble`).

:data:`SCORES` names each number for ``cnc inspect``, ``cnc filter --where`` and the trainer's ``data.filter``, with
its shipped threshold.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from triplets.sample import DEPTH_MAX
from triplets.stages.base import Stage
from triplets.stages.inpaint import dilate_mask

log = logging.getLogger(__name__)
#: Version of the scores' definitions; ``cnc score`` rewrites older ones, ``cnc filter`` refuses to mix them.
QUALITY_VERSION = 2
DIGITS = 6
RIM_WIDTH = 0.3          # rim band width / sqrt(|M|)
CONTRAST_FLOOR = 0.5     # smallest C(I) a contrast ratio divides by
CHANGE_WINDOW = 1 / 64   # averaging window of the change map / image side (at least 3 px)
ORDER_TOLERANCE = 0.02   # depth.order: nearer by more than this share of D(I_b)'s 5-95 % range
CLIP_CONTEXT = 1.25      # clip_sim crop side / longer side of M's bounding box
WORK_SIDE = 256          # removal and depth statistics run at most this wide (the mask shape at full size)
_BINS = 64


# ------------------------------------------------------------------------------------------------- the score names
@dataclass(frozen=True)
class Score:
    """One number of ``quality``: where it lives, its histogram range, which end is good and its shipped threshold.

    ``better``: ``"high"``, ``"low"`` or ``""`` (no good end, e.g. the mask area). ``threshold``: the
    benchmark-chosen cut (``score >= threshold`` keeps when high is better, ``<=`` when low is); ``None`` where the
    benchmark gives no basis for one.
    """

    name: str
    path: tuple[str, str]
    lo: float
    hi: float
    better: str
    doc: str
    threshold: float | None = None

    @property
    def keep_op(self) -> str:
        return "<=" if self.better == "low" else ">="


SCORES: dict[str, Score] = {s.name: s for s in (
    Score("removal", ("removal", "score"), 0, 1, "high", "object removal: changed * (1 - contrast)", 0.5),
    Score("removal_changed", ("removal", "changed"), 0, 1, "high", "fraction of M changed beyond a global shift and "
          "re-encoding noise"),
    Score("removal_contrast", ("removal", "contrast"), 0, 1, "low", "M's contrast to its rim left in I_b, relative "
          "to I", 0.4),
    Score("clip_sim", ("removal", "clip_sim"), 0, 1, "low", "CLIP similarity of the crop around M with and without "
          "I_b inside M"),
    Score("depth_order", ("depth", "order"), 0, 1, "high", "fraction of M nearer in D(I) than in D(I_b), aligned on "
          "the scene around the inpainted region", 0.5),
    Score("depth_margin", ("depth", "margin"), -1, 1, "high", "mean aligned D(I) - D(I_b) in M / D(I_b)'s spread",
          0.05),
    Score("mask_area", ("mask", "area"), 0, 1, "", "fraction of the image in M"),
    Score("mask_components", ("mask", "components"), 0, 10, "low", "8-connected components of M"),
    Score("mask_border", ("mask", "border"), 0, 1, "low", "fraction of the image border inside M"),
    Score("mask_bbox_fill", ("mask", "bbox_fill"), 0, 1, "high", "|M| / area of its bounding box"),
)}


def quality_version(meta: dict) -> int | None:
    """The ``quality.version`` of a sample's metadata; ``None`` when it has no scores (or no version)."""
    q = meta.get("quality") if isinstance(meta, dict) else None
    v = q.get("version") if isinstance(q, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def has_quality(meta: dict) -> bool:
    """True when the sample carries scores of this version (:data:`QUALITY_VERSION`)."""
    return quality_version(meta) == QUALITY_VERSION


def score_value(meta: dict, name: str) -> float | None:
    """The value of score ``name`` in a sample's metadata; ``None`` when unscored, scored by another version, or
    undefined on this sample."""
    if not has_quality(meta):
        return None
    q = meta["quality"]
    group, key = SCORES[name].path
    v = q.get(group, {}).get(key) if isinstance(q.get(group), dict) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


# --------------------------------------------------------------------------------------------------- pure scores
def _r(x: float | None) -> float | None:
    """Rounded to :data:`DIGITS`; ``None`` stays ``None`` and a non-finite value becomes ``None`` (undefined)."""
    return None if x is None or not math.isfinite(float(x)) else round(float(x), DIGITS)


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


def _grow(m: np.ndarray, k: int) -> np.ndarray:
    """``m`` ``(H, W)`` bool dilated by a ``(2k+1)`` square."""
    import cv2

    return cv2.dilate(m.astype(np.uint8), np.ones((2 * k + 1, 2 * k + 1), np.uint8)) > 0


def rim(mask: np.ndarray) -> np.ndarray:
    """The band around M ``(H, W)`` bool, ``RIM_WIDTH * sqrt(|M|)`` wide (at least 2 px), M excluded."""
    m = np.asarray(mask) > 0
    return _grow(m, max(2, int(round(RIM_WIDTH * math.sqrt(m.sum()))))) & ~m


def pixel_features(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB → ``(H, W, 4)`` float32 in [0, 255]: luma, red-green, yellow-blue, gradient
    magnitude (Sobel of luma / 4, capped)."""
    import cv2

    f = image.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    gx, gy = cv2.Sobel(luma, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(luma, cv2.CV_32F, 0, 1, ksize=3)
    return np.stack([luma, (r - g + 255) / 2, ((r + g) / 2 - b + 255) / 2,
                     np.minimum(np.sqrt(gx * gx + gy * gy) / 4, 255)], -1)


def region_contrast(features: np.ndarray, inside: np.ndarray, outside: np.ndarray) -> float:
    """Mean over feature channels of the Kolmogorov-Smirnov distance (on 64 bins over [0, 255]) between the values in
    ``inside`` and in ``outside`` (``(H, W)`` bool, both non-empty): 0 = same distributions, 1 = disjoint."""
    idx = np.clip((features * (_BINS / 256)).astype(np.int32), 0, _BINS - 1)
    a, b = idx[inside], idx[outside]  # (n, C)
    offsets = np.arange(idx.shape[-1]) * _BINS
    ha = np.bincount((a + offsets).ravel(), minlength=_BINS * idx.shape[-1]).reshape(-1, _BINS)
    hb = np.bincount((b + offsets).ravel(), minlength=_BINS * idx.shape[-1]).reshape(-1, _BINS)
    cdf_a = np.cumsum(ha, 1) / len(a)
    cdf_b = np.cumsum(hb, 1) / len(b)
    return float(np.abs(cdf_a - cdf_b).max(1).mean())


def contrast_residual(image: np.ndarray, background: np.ndarray, mask: np.ndarray) -> float | None:
    """``removal.contrast`` (module docstring): ``C(I_b) / max(C(I), CONTRAST_FLOOR)`` in [0, 1]; ``None`` when M is
    empty or leaves no rim (it fills the image)."""
    m = np.asarray(mask) > 0
    ring = rim(m)
    if not m.any() or not ring.any():
        return None
    c_i = region_contrast(pixel_features(image), m, ring)
    c_b = region_contrast(pixel_features(background), m, ring)
    return _r(min(c_b / max(c_i, CONTRAST_FLOOR), 1.0))


def changed_fraction(image: np.ndarray, background: np.ndarray, mask: np.ndarray, inpainted: np.ndarray,
                     floor: float = 6.0) -> float | None:
    """``removal.changed`` (module docstring) for uint8 ``(H, W, 3)`` I and I_b, M and the inpainted region
    ``(H, W)`` {0,1}; ``floor`` in levels of 255. ``None`` for an empty M."""
    import cv2

    m = np.asarray(mask) > 0
    if not m.any():
        return None
    outside = np.asarray(inpainted) == 0
    diff = background.astype(np.float32) - image.astype(np.float32)
    enough = int(outside.sum()) >= 64
    if enough:
        diff -= np.median(diff[outside], axis=0)
    win = max(3, int(round(image.shape[0] * CHANGE_WINDOW)) | 1)
    change = cv2.blur(np.abs(diff).max(-1), (win, win))
    noise = float(np.quantile(change[outside], 0.99)) if enough else 0.0
    return _r((change[m] > max(floor, 1.5 * noise)).mean())


def removal_score(changed: float | None, contrast: float | None) -> float | None:
    """``changed × (1 − contrast)``; ``None`` when either is undefined."""
    if changed is None or contrast is None:
        return None
    return _r(changed * (1.0 - contrast))


def align_disparity(image_disparity: np.ndarray, bg_disparity: np.ndarray, inpainted: np.ndarray,
                    min_pixels: int = 32) -> np.ndarray | None:
    """D(I) mapped onto D(I_b)'s scale: ``a · D(I) + c`` with ``(a, c)`` the least-squares fit on the band just
    outside the inpainted region (width 1/16 of the side; all of the outside when the band is too small).

    Returns ``(H, W)`` float64, or ``None`` when there is no usable band (fewer than ``min_pixels``), D(I) is flat
    on it, or the fit is not increasing (``a <= 0``: the maps disagree about the scene).
    """
    x, y = np.asarray(image_disparity, np.float64), np.asarray(bg_disparity, np.float64)
    region = np.asarray(inpainted) > 0
    band = _grow(region, max(3, x.shape[0] // 16)) & ~region
    if band.sum() < min_pixels:
        band = ~region
    if band.sum() < min_pixels:
        return None
    xs, ys = x[band], y[band]
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        return None
    vx = float(xs.var())
    if vx <= 1e-12 * max(1.0, float(np.abs(xs).max()) ** 2):
        return None
    a = float(((xs - xs.mean()) * (ys - ys.mean())).mean()) / vx
    if not a > 0:
        return None
    return a * x + (float(ys.mean()) - a * float(xs.mean()))


def depth_order(mask: np.ndarray, inpainted: np.ndarray, image_disparity: np.ndarray | None,
                bg_depth: np.ndarray) -> dict:
    """``depth.order`` and ``depth.margin`` (module docstring).

    Args:
        mask / inpainted: M and the inpainted region, ``(H, W)`` {0,1}.
        image_disparity: D(I) ``(H, W)`` float, raw (any scale; near = large), or ``None`` (not available).
        bg_depth: D(I_b) ``(H, W)`` uint16 as stored (min-max normalised; near = 65535).

    Returns:
        ``{"order": [0, 1], "margin": [-1, 1]}``; both ``None`` when undefined.
    """
    m = np.asarray(mask) > 0
    if image_disparity is None or not m.any():
        return {"order": None, "margin": None}
    bg = np.asarray(bg_depth, np.float64) / DEPTH_MAX
    aligned = align_disparity(image_disparity, bg, inpainted)
    if aligned is None:
        return {"order": None, "margin": None}
    spread = float(np.percentile(bg, 95) - np.percentile(bg, 5))
    if spread <= 1e-6:
        spread = float(bg.max() - bg.min())
    if spread <= 1e-6:
        return {"order": None, "margin": None}
    diff = (aligned[m] - bg[m]) / spread
    if not np.isfinite(diff).all():
        return {"order": None, "margin": None}
    return {"order": _r((diff > ORDER_TOLERANCE).mean()), "margin": _r(np.clip(diff.mean(), -1.0, 1.0))}


def clip_boxes(mask: np.ndarray) -> np.ndarray:
    """Square crops around M for ``clip_sim``: ``(N, 4)`` float ``(x0, y0, x1, y1)`` of side ``CLIP_CONTEXT`` × the
    longer side of M's bounding box (at least 8 px, at most the image), centred on the box and shifted inside the
    image. ``mask``: ``(N, H, W)`` {0,1}; an empty mask gives the whole image."""
    n, h, w = mask.shape
    out = np.zeros((n, 4), np.float64)
    for i in range(n):
        ys, xs = np.nonzero(mask[i])
        if len(ys) == 0:
            out[i] = (0, 0, w, h)
            continue
        side = min(max(8.0, CLIP_CONTEXT * max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)), h, w)
        cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
        y0 = min(max(cy - side / 2, 0.0), h - side)
        x0 = min(max(cx - side / 2, 0.0), w - side)
        out[i] = (x0, y0, x0 + side, y0 + side)
    return out


def _crop_side(embedder) -> int:
    """The side CLIP's processor feeds the model (its centre crop; 224 for ViT-L/14): crops cut at that size pass
    its resize and crop unchanged."""
    crop = getattr(embedder.processor, "crop_size", None)
    side = getattr(crop, "height", None) if crop is not None and not isinstance(crop, dict) else \
        (crop or {}).get("height")
    return int(side or 224)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity, NaN (undefined) when either vector is zero or not finite."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if not (na > 0 and nb > 0 and math.isfinite(na) and math.isfinite(nb)):
        return float("nan")
    return round(float(np.dot(a, b)) / (na * nb), DIGITS)


def statistics(image: np.ndarray, mask: np.ndarray, background: np.ndarray, bg_depth: np.ndarray,
               image_disparity: np.ndarray | None, dilation_px: int = 50, change_floor: float = 6.0,
               clip_sim: float | None = None) -> dict:
    """The ``quality`` dict of one triplet (the one place it is assembled; build and ``cnc score`` both call it).

    Args:
        image / background: ``(R, R, 3)`` uint8 I and I_b; mask: ``(R, R)`` {0,1} M.
        bg_depth: ``(R, R)`` uint16 stored D(I_b); image_disparity: ``(R, R)`` float raw D(I) or ``None``.
        dilation_px: ``inpaint.dilation_px`` (at 512 px; scaled to R); change_floor: ``quality.change_floor``.
        clip_sim: the CLIP similarity when measured (:class:`QualityScorer`), else ``None``.
    """
    inpainted = dilate_mask(mask, dilation_px, image.shape[0])
    shape = mask_shape(mask)
    image, mask, background, bg_depth, image_disparity, inpainted = _working_size(
        image, mask, background, bg_depth, image_disparity, inpainted)
    changed = changed_fraction(image, background, mask, inpainted, change_floor)
    contrast = contrast_residual(image, background, mask)
    return {
        "version": QUALITY_VERSION,
        "removal": {"changed": changed, "contrast": contrast, "score": removal_score(changed, contrast),
                    "clip_sim": _r(clip_sim)},
        "depth": depth_order(mask, inpainted, image_disparity, bg_depth),
        "mask": shape,
    }


def _working_size(image, mask, background, bg_depth, image_disparity, inpainted):
    """The fields at most :data:`WORK_SIDE` pixels wide (area-averaged; M where at least half a working pixel is in
    M, the inpainted region where any of it is), so the statistics cost the same at any build resolution. Unchanged
    when already small enough or when M would vanish."""
    import cv2

    h, w = mask.shape
    if max(h, w) <= WORK_SIDE:
        return image, mask, background, bg_depth, image_disparity, inpainted
    size = (max(1, round(w * WORK_SIDE / max(h, w))), max(1, round(h * WORK_SIDE / max(h, w))))

    def area(x):
        return cv2.resize(np.ascontiguousarray(x), size, interpolation=cv2.INTER_AREA)

    small = (area(mask.astype(np.float32)) >= 0.5).astype(np.uint8)
    if not small.any():
        return image, mask, background, bg_depth, image_disparity, inpainted
    return (area(image), small, area(background), area(bg_depth),
            None if image_disparity is None else area(image_disparity.astype(np.float32)),
            (area(inpainted.astype(np.float32)) > 0).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------- the scorer
class QualityScorer:
    """The model part of the scores, with shared model instances, and :func:`statistics` for the rest.

    Args:
        embedder: a :class:`~triplets.stages.embed.CLIPImageEmbedder` for ``clip_sim``, or ``None`` (not measured).
        disparity: a :class:`~triplets.stages.depth.DPTDepth` giving D(I) where the caller has none (``cnc score``),
            or ``None``; ``preprocess``: its input mode (``depth.preprocess``).
        dilation_px / change_floor: see :func:`statistics`.
    """

    def __init__(self, embedder=None, disparity=None, dilation_px: int = 50, change_floor: float = 6.0,
                 preprocess: str = "processor"):
        self.embedder, self.disparity, self.preprocess = embedder, disparity, preprocess
        self.dilation_px, self.change_floor = dilation_px, change_floor

    def clip_sims(self, image: np.ndarray, mask: np.ndarray, background: np.ndarray) -> np.ndarray:
        """``(N,)`` float32 ``clip_sim`` (NaN without an embedder). The crops are cut and resized to the model's input
        side on the embedder's device in one batched call (``torchvision.ops.roi_align``)."""
        n = len(image)
        if self.embedder is None or n == 0:
            return np.full(n, np.nan, np.float32)
        import torch
        from torchvision.ops import roi_align

        device = self.embedder.device
        with torch.inference_mode():
            img = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(0, 3, 1, 2)
            bg = torch.from_numpy(np.ascontiguousarray(background)).to(device).permute(0, 3, 1, 2)
            m = torch.from_numpy(np.ascontiguousarray(mask)).to(device)[:, None] > 0
            both = torch.cat([img, torch.where(m, bg, img)]).float()
            boxes = torch.from_numpy(clip_boxes(np.asarray(mask))).to(device, torch.float32)
            rois = torch.cat([torch.arange(2 * n, device=device, dtype=torch.float32)[:, None],
                              torch.cat([boxes, boxes])], 1)
            side = _crop_side(self.embedder)
            crops = roi_align(both, rois, output_size=(side, side), aligned=True)
            crops = crops.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        emb = self.embedder(crops)
        return np.array([cosine(emb[i], emb[n + i]) for i in range(n)], np.float32)

    def image_disparity(self, image: np.ndarray) -> np.ndarray | None:
        """D(I) ``(N, R, R)`` float32 with the scorer's depth model, or ``None`` without one."""
        return None if self.disparity is None else self.disparity(image, self.preprocess)

    def statistics(self, image, mask, background, bg_depth, image_disparity, clip_sim=None) -> dict:
        """:func:`statistics` of one row with this scorer's settings (NaN ``clip_sim`` = not measured)."""
        cs = None if clip_sim is None or not math.isfinite(float(clip_sim)) else float(clip_sim)
        return statistics(image, mask, background, bg_depth, image_disparity, self.dilation_px, self.change_floor,
                          cs)

    def __call__(self, image: np.ndarray, mask: np.ndarray, background: np.ndarray, bg_depth: np.ndarray,
                 image_disparity: np.ndarray | None = None) -> list[dict]:
        """Batch ``(N, R, R, 3)`` uint8 I and I_b, ``(N, R, R)`` {0,1} M, ``(N, R, R)`` uint16 D(I_b) and optional
        ``(N, R, R)`` D(I) (computed with the scorer's depth model when absent) → N ``quality`` dicts."""
        if image_disparity is None:
            image_disparity = self.image_disparity(image)
        sims = self.clip_sims(image, mask, background)
        return [self.statistics(image[i], mask[i], background[i], bg_depth[i],
                                None if image_disparity is None else image_disparity[i], sims[i])
                for i in range(len(image))]


class QualityStage(Stage):
    """``quality`` (model thread): the ``quality_clip_sim`` column ``(N,)`` float32 (NaN when ``clip_sim`` is off).

    The statistics need no model and run later, in the encode threads (:meth:`TripletBuilder.assemble`). Takes the
    scorer (with the build's own CLIP instance) rather than model ids, so it never loads a second copy.
    """

    name = "quality"

    def __init__(self, scorer: QualityScorer):
        self.scorer = scorer

    def process(self, rows: dict) -> tuple[dict, dict[int, str]]:
        return {"quality_clip_sim": self.scorer.clip_sims(rows["image"], rows["mask"], rows["background"])}, {}

    def empty(self, batch: dict) -> dict:
        return {"quality_clip_sim": np.full(len(batch["key"]), np.nan, np.float32)}


def quality_summary_line(meta: dict) -> str:
    """``"removal 0.85 · depth_order 0.93 · ..."`` for captions (empty when unscored)."""
    parts = []
    for name in ("removal", "clip_sim", "depth_order", "mask_components", "mask_border"):
        v = score_value(meta, name)
        if v is not None:
            parts.append(f"{name} {v:.2f}" if name != "mask_components" else f"components {v:.0f}")
    return " · ".join(parts)


# ------------------------------------------------------------------------------------------- scoring old shards
def scorer_models(cfg) -> dict[str, str]:
    """Config key → model id of what :func:`scorer_from_config` loads for a :class:`~triplets.config.BuildConfig`:
    the depth model (D(I), which shards do not store) and, with ``quality.clip_sim``, the CLIP image encoder."""
    ids = {"depth.model": cfg.depth.model}
    if cfg.quality.clip_sim:
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
            resolved[key] = resolve_pretrained(mid, key, seed=cfg.seed)
        except ModelUnavailableError as exc:
            missing.append(str(exc))
    if missing:
        raise ModelUnavailableError("\n".join(missing))
    common = dict(device=device or cfg.device, dtype=cfg.dtype)
    embedder = CLIPImageEmbedder(resolved["embed.model"], **common) if "embed.model" in resolved else None
    return QualityScorer(embedder, DPTDepth(resolved["depth.model"], **common), cfg.inpaint.dilation_px,
                         cfg.quality.change_floor, cfg.depth.preprocess)
