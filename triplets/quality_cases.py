"""Labelled triplets whose answer is known by construction: the cases of the quality benchmark
(``benchmarks/quality_benchmark.py``) and of its small version under test.

A *scene* is a background B (a random crop of one of the repository's example photos, ``examples/images``, or a
procedural texture) with an object composited onto it through a known binary mask M: ``I = B`` outside M, the
object inside (1 px feathered edge). The truth is B itself, so every I_b variant has a label:

============================  =====  ============================================================================
removal variant               label  I_b
============================  =====  ============================================================================
``clean``                     1      B (the true background)
``clean_regenerated``         1      B, with the inpainted region (M dilated) re-generated: noise + slight blur
``clean_fill``                1      OpenCV Telea inpainting of the dilated region (a smooth fill from the rim)
``clean_low_contrast``        1      B, in a scene whose object has B's colour statistics (a low-contrast object)
``kept``                      0      I (the object not removed)
``kept_jpeg``                 0      I re-encoded as JPEG (quality 60-90)
``kept_brighter``             0      I with a global brightness shift of 4-12 levels (either sign)
``kept_jpeg_brighter``        0      both
``kept_regenerated``          0      I with the dilated region re-generated (the object re-painted in place)
``kept_low_contrast``         0      the low-contrast scene's I, JPEG re-encoded
``partial``                   0      B on 40-60 % of M (split by a random line through M), I on the rest
``replaced``                  0      B with another object composited inside the dilated region
``smeared``                   0      I Gaussian-blurred inside the dilated region (a smeared object)
============================  =====  ============================================================================

Depth cases give the depth-order score disparity maps of known geometry, since a real MiDaS is not needed to know
the answer: the scene's disparity is a slanted plane plus smooth relief, the object a patch at the background's
disparity plus or minus a margin (``nearer``: label 1, ``farther``: label 0), or an upright object at the
disparity of the ground where it stands (``standing``: label 1; its margin shrinks to 0 at its foot). D(I) (with
the object) and D(I_b) (without it) are each blurred at edges as DPT is, put through their own random positive
affine map (scale 0.3-3, any shift — MiDaS disparity is relative, each map has its own), a mild gamma and noise;
D(I_b) is stored as the build stores it (min-max normalised uint16). ``depth_kept`` (I_b = I, D(I_b) = D(I) up to
its own affine map) is reported beside them, unlabelled.

:func:`roc_auc` and :func:`precision_recall` are the metrics the benchmark reports.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from triplets.sample import quantize_depth
from triplets.stages.inpaint import dilate_mask

#: The example photos shipped with the repository (used when present; procedural backgrounds otherwise).
EXAMPLE_PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "images"

REMOVAL_VARIANTS: dict[str, int] = {
    "clean": 1, "clean_regenerated": 1, "clean_fill": 1, "clean_low_contrast": 1,
    "kept": 0, "kept_jpeg": 0, "kept_brighter": 0, "kept_jpeg_brighter": 0, "kept_regenerated": 0,
    "kept_low_contrast": 0, "partial": 0, "replaced": 0, "smeared": 0,
}
DEPTH_VARIANTS: dict[str, int] = {"nearer": 1, "standing": 1, "farther": 0}


@dataclass
class Case:
    """One labelled triplet (R = resolution).

    Attributes:
        scene / variant: scene index and variant name (the tables above); ``task``: ``removal`` or ``depth``.
        label: 1 = a good triplet for ``task`` (object removed / object nearer than what replaced it), else 0;
            ``None`` for cases reported without a label (``depth_kept``).
        image / background: ``(R, R, 3)`` uint8 I and I_b; mask: ``(R, R)`` uint8 {0, 1} M.
        image_disparity: ``(R, R)`` float32 D(I), raw (near = large; any scale).
        bg_depth: ``(R, R)`` uint16 D(I_b) min-max normalised, as stored.
    """

    scene: int
    variant: str
    task: str
    label: int | None
    image: np.ndarray
    mask: np.ndarray
    background: np.ndarray
    image_disparity: np.ndarray
    bg_depth: np.ndarray
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- ingredients
def _photos(photo_dir: Path | None) -> list[np.ndarray]:
    from PIL import Image

    folder = EXAMPLE_PHOTOS if photo_dir is None else Path(photo_dir)
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.glob("*.jpg")):
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def _resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(arr, (size[1], size[0]), interpolation=cv2.INTER_AREA if arr.shape[0] > size[0]
                      else cv2.INTER_CUBIC)


def _crop(photo: np.ndarray, rng: np.random.Generator, size: tuple[int, int], min_frac: float = 0.5) -> np.ndarray:
    """A random crop of ``photo`` with the aspect of ``size``, resized to ``size``."""
    h, w = photo.shape[:2]
    frac = rng.uniform(min_frac, 1.0)
    ch = int(min(h, w * size[0] / size[1]) * frac)
    cw = max(2, int(ch * size[1] / size[0]))
    ch = max(2, ch)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return _resize(photo[y:y + ch, x:x + cw], size)


def _smooth_noise(rng: np.random.Generator, r: int, cells: int, channels: int = 1) -> np.ndarray:
    """Smooth random field ``(r, r, channels)`` in about [-1, 1] (bicubic upsampling of a ``cells`` grid)."""
    import cv2

    grid = rng.uniform(-1, 1, (cells, cells, channels)).astype(np.float32)
    out = cv2.resize(grid, (r, r), interpolation=cv2.INTER_CUBIC)
    return out.reshape(r, r, channels)


def procedural_background(rng: np.random.Generator, r: int) -> np.ndarray:
    """A textured scene ``(r, r, 3)`` uint8: a colour gradient, smooth colour blobs and fine grain."""
    yy, xx = np.mgrid[0:r, 0:r] / r
    base = rng.uniform(40, 200, 3)
    slope = rng.uniform(-60, 60, (2, 3))
    img = base + yy[..., None] * slope[0] + xx[..., None] * slope[1]
    img = img + 35 * _smooth_noise(rng, r, int(rng.integers(3, 7)), 3) + 12 * _smooth_noise(rng, r, r // 8, 3)
    img = img + rng.normal(0, rng.uniform(2, 8), (r, r, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def random_mask(rng: np.random.Generator, r: int, area: tuple[float, float] = (0.03, 0.2),
                margin: float = 0.1) -> np.ndarray:
    """A binary object mask ``(r, r)`` uint8 {0, 1}: a rotated ellipse, a polygon or a smooth blob, one component,
    covering a fraction of the image drawn from ``area``, away from the border by ``margin``."""
    import cv2

    target = rng.uniform(*area) * r * r
    kind = rng.integers(0, 3)
    m = np.zeros((r, r), np.uint8)
    lo, hi = margin * r, (1 - margin) * r
    for _ in range(20):
        cy, cx = rng.uniform(0.35, 0.65, 2) * r
        if kind == 0:
            aspect = rng.uniform(0.4, 1.0)
            a = np.sqrt(target / (np.pi * aspect))
            cv2.ellipse(m, (int(cx), int(cy)), (max(2, int(a)), max(2, int(a * aspect))), float(rng.uniform(0, 180)),
                        0, 360, 1, -1)
        elif kind == 1:
            n = int(rng.integers(5, 9))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = np.sqrt(target / np.pi) * rng.uniform(0.7, 1.3, n)
            pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).astype(np.int32)
            cv2.fillPoly(m, [pts], 1)
        else:
            field_ = _smooth_noise(rng, r, 6)[..., 0]
            yy, xx = np.mgrid[0:r, 0:r]
            rad = np.sqrt(target / np.pi)
            bump = 1.0 - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / rad
            blob = (bump + 0.4 * field_) > 0
            n, labels, stats, _ = cv2.connectedComponentsWithStats(blob.astype(np.uint8), connectivity=8)
            if n > 1:
                m = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
        ys, xs = np.nonzero(m)
        if len(ys) and ys.min() >= lo and ys.max() <= hi and xs.min() >= lo and xs.max() <= hi and m.sum() > 16:
            return m
        m[:] = 0
        target *= 0.8
    m[int(0.4 * r):int(0.6 * r), int(0.4 * r):int(0.6 * r)] = 1
    return m


def _composite(bg: np.ndarray, obj: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``obj`` over ``bg`` through ``mask`` with a 1 px feathered edge (real objects are anti-aliased)."""
    import cv2

    alpha = cv2.GaussianBlur(mask.astype(np.float32), (3, 3), 0.7)[..., None]
    alpha = np.maximum(alpha, mask[..., None].astype(np.float32))
    return np.clip(bg * (1 - alpha) + obj * alpha + 0.5, 0, 255).astype(np.uint8)


def _object_texture(rng: np.random.Generator, photos: list[np.ndarray], r: int) -> np.ndarray:
    """An object's appearance ``(r, r, 3)`` float: a photo patch, recoloured, or a shaded flat colour."""
    if photos and rng.uniform() < 0.6:
        tex = _crop(photos[int(rng.integers(len(photos)))], rng, (r, r), 0.15).astype(np.float32)
        gain = rng.uniform(0.6, 1.4, 3)
        return np.clip((tex - tex.mean((0, 1))) * rng.uniform(0.7, 1.3) + tex.mean((0, 1)) * gain, 0, 255)
    colour = rng.uniform(0, 255, 3)
    shade = 40 * _smooth_noise(rng, r, 3)
    return np.clip(colour + shade + rng.normal(0, rng.uniform(2, 10), (r, r, 1)), 0, 255)


def _low_contrast_texture(rng: np.random.Generator, photos: list[np.ndarray], bg: np.ndarray,
                          mask: np.ndarray) -> np.ndarray:
    """An object with the colour statistics of the background under it (mean within a few levels, texture of
    another patch at the background's own contrast): it hardly stands out."""
    r = bg.shape[0]
    tex = (_crop(photos[int(rng.integers(len(photos)))], rng, (r, r), 0.15) if photos
           else procedural_background(rng, r)).astype(np.float32)
    m = mask > 0
    under = bg[m].astype(np.float32)
    mu_b, sd_b = under.mean(0), under.std(0) + 1.0
    mu_t, sd_t = tex[m].mean(0), tex[m].std(0) + 1.0
    offset = rng.uniform(4, 10) * rng.choice([-1, 1], 3)
    return np.clip((tex - mu_t) / sd_t * sd_b * rng.uniform(0.5, 0.9) + mu_b + offset, 0, 255)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def _regenerate(img: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``img`` with ``region`` re-generated as an inpainting model re-paints it: slight blur, grain, a small tint."""
    import cv2

    soft = cv2.GaussianBlur(img.astype(np.float32), (0, 0), rng.uniform(0.6, 1.2))
    soft = soft + rng.normal(0, rng.uniform(2, 5), img.shape) + rng.uniform(-4, 4, 3)
    out = img.astype(np.float32)
    m = region > 0
    out[m] = soft[m]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------ disparity
def scene_disparity(rng: np.random.Generator, r: int) -> np.ndarray:
    """Disparity of a background ``(r, r)`` float (near = large): a slanted ground plane plus smooth relief."""
    yy, xx = np.mgrid[0:r, 0:r] / r
    plane = 1.0 + rng.uniform(0.5, 2.0) * yy + rng.uniform(-0.5, 0.5) * xx
    return (plane + 0.25 * _smooth_noise(rng, r, int(rng.integers(3, 6)))[..., 0]).astype(np.float32)


def observe_disparity(true: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a monocular estimator returns for a true disparity map: edges blurred, its own positive affine map
    (relative disparity: scale 0.3-3, any shift), a mild gamma and noise. ``(r, r)`` float32."""
    import cv2

    r = true.shape[0]
    soft = cv2.GaussianBlur(true.astype(np.float32), (0, 0), max(0.8, r / 128))
    lo, hi = float(soft.min()), float(soft.max())
    unit = (soft - lo) / max(hi - lo, 1e-6)
    unit = unit ** rng.uniform(0.85, 1.15)
    out = rng.uniform(0.3, 3.0) * unit + rng.uniform(-2, 2)
    return (out + rng.normal(0, 0.01 * float(out.std() + 1e-3), out.shape)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------- cases
def make_cases(n_scenes: int, resolution: int = 128, seed: int = 0, dilation_px: int = 50,
               photo_dir: Path | None = None, removal: bool = True, depth: bool = True) -> Iterator[Case]:
    """The labelled cases of ``n_scenes`` scenes (every removal variant and both depth variants per scene, plus
    ``depth_kept``), deterministic in ``seed``. Half the scenes use the example photos as backgrounds when they are
    present, the other half procedural textures."""
    import cv2

    photos = _photos(photo_dir)
    r = resolution
    for s in range(n_scenes):
        rng = np.random.default_rng([seed, s])
        use_photo = bool(photos) and s % 2 == 0
        bg = _crop(photos[s // 2 % len(photos)], rng, (r, r), 0.4) if use_photo else procedural_background(rng, r)
        mask = random_mask(rng, r)
        dil = dilate_mask(mask, dilation_px, r)
        image = _composite(bg, _object_texture(rng, photos, r), mask)
        low = _composite(bg, _low_contrast_texture(rng, photos, bg, mask), mask)
        true_bg = scene_disparity(rng, r)
        disp_bg = observe_disparity(true_bg, rng)
        info = {"background": "photo" if use_photo else "procedural", "area": float(mask.mean())}

        def case(variant: str, task: str, label, img: np.ndarray, background: np.ndarray,
                 d_image: np.ndarray | None = None, d_bg: np.ndarray | None = None, scene=s, info=info,
                 mask=mask, disp_bg=disp_bg) -> Case:
            d_image = disp_bg if d_image is None else d_image  # removal cases: depth is not what they test
            d_bg = disp_bg if d_bg is None else d_bg
            return Case(scene, variant, task, label, img, mask, background, d_image.astype(np.float32),
                        quantize_depth(d_bg)[0], dict(info))

        if removal:
            sign = rng.choice([-1, 1])
            jq = int(rng.integers(60, 91))
            shift = sign * rng.uniform(4, 12)
            partial = _partial(bg, image, mask, rng)
            other = random_mask(rng, r, (0.02, 0.15))
            other = _fit_inside(other, dil, mask, rng)
            replaced = _composite(bg, _object_texture(rng, photos, r), other)
            sigma = max(1.5, 0.2 * np.sqrt(mask.sum()))
            smeared = image.copy()
            blur = cv2.GaussianBlur(image, (0, 0), sigma)
            smeared[dil > 0] = blur[dil > 0]
            fill = cv2.inpaint(image, dil, max(3, r // 32), cv2.INPAINT_TELEA)
            variants = {
                "clean": bg, "clean_regenerated": _regenerate(bg, dil, rng), "clean_fill": fill,
                "kept": image, "kept_jpeg": _jpeg(image, jq),
                "kept_brighter": np.clip(image.astype(np.float32) + shift + 0.5, 0, 255).astype(np.uint8),
                "kept_jpeg_brighter": np.clip(_jpeg(image, jq).astype(np.float32) + shift + 0.5, 0,
                                              255).astype(np.uint8),
                "kept_regenerated": _regenerate(image, dil, rng), "partial": partial, "replaced": replaced,
                "smeared": smeared,
            }
            for name, background in variants.items():
                yield case(name, "removal", REMOVAL_VARIANTS[name], image, background)
            yield case("clean_low_contrast", "removal", 1, low, bg)
            yield case("kept_low_contrast", "removal", 0, low, _jpeg(low, jq))
        if depth:
            m = mask > 0
            ring = (dilate_mask(mask, 30, r) > 0) & ~m
            local = float(np.median(true_bg[ring]))
            spread = float(np.percentile(true_bg, 95) - np.percentile(true_bg, 5))
            relief = 0.05 * _smooth_noise(rng, r, 4)[..., 0] * spread
            ys = np.nonzero(m)[0]
            foot = float(np.median(true_bg[ys.max()][m[ys.max()]]))  # where a standing object touches the ground
            kept = None
            for name, label in DEPTH_VARIANTS.items():
                true_img = true_bg.copy()
                if name == "standing":  # upright at its foot's disparity: nearer than the ground behind it
                    true_img[m] = foot + relief[m]
                else:
                    delta = rng.uniform(0.05, 0.6) * spread * (1 if label else -1)
                    true_img[m] = local + delta + relief[m]
                yield case(name, "depth", label, image, bg, observe_disparity(true_img, rng),
                           observe_disparity(true_bg, rng))
                kept = true_img if name == "nearer" else kept
            yield case("depth_kept", "depth", None, image, image, observe_disparity(kept, rng),
                       observe_disparity(kept, rng))


def _partial(bg: np.ndarray, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """B on the part of M on one side of a random line through M's centroid (40-60 % of M), I elsewhere."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    ang = rng.uniform(0, 2 * np.pi)
    side = (ys - cy) * np.cos(ang) - (xs - cx) * np.sin(ang)
    cut = np.quantile(side, rng.uniform(0.4, 0.6))
    out = image.copy()
    sel = side <= cut
    out[ys[sel], xs[sel]] = bg[ys[sel], xs[sel]]
    return out


def _fit_inside(other: np.ndarray, region: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``other`` moved so its centroid sits on M's centroid and clipped to ``region`` (the inpainted area): the
    replacement object stands where the removed one stood."""
    ys, xs = np.nonzero(other)
    my, mx = np.nonzero(mask)
    dy, dx = int(round(my.mean() - ys.mean())), int(round(mx.mean() - xs.mean()))
    out = np.zeros_like(other)
    r = other.shape[0]
    ny, nx = np.clip(ys + dy, 0, r - 1), np.clip(xs + dx, 0, r - 1)
    out[ny, nx] = 1
    out &= (region > 0).astype(np.uint8)
    if out.sum() < 0.5 * mask.sum():  # too small to stand in for the object: use M itself
        out = mask.copy()
    return out


# --------------------------------------------------------------------------------------------------------- metrics
def roc_auc(labels: list[int], scores: list[float | None]) -> float | None:
    """ROC-AUC of ``scores`` (higher = predicted positive) against binary ``labels``: the probability that a
    random positive scores above a random negative, ties counting one half (Mann-Whitney U). Undefined scores
    (``None``) are ranked lowest — an undefined score never helps. ``None`` without both classes."""
    y = np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        return None
    s = np.array([-np.inf if v is None else float(v) for v in scores])
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_recall(labels: list[int], scores: list[float | None], threshold: float,
                     higher_is_better: bool = True) -> tuple[float | None, float, float]:
    """``(precision, recall, kept share)`` of keeping the samples with ``score >= threshold`` (``<=`` when lower is
    better); undefined scores are not kept. Precision is ``None`` when nothing is kept."""
    y = np.asarray(labels, dtype=bool)
    keep = np.array([v is not None and (v >= threshold if higher_is_better else v <= threshold) for v in scores])
    kept = int(keep.sum())
    precision = float((keep & y).sum() / kept) if kept else None
    recall = float((keep & y).sum() / max(1, int(y.sum())))
    return precision, recall, kept / max(1, len(y))


# ------------------------------------------------------------------------------------------------------ evaluation
#: The scores the benchmark evaluates and the task whose labels they are judged against.
EVALUATED: dict[str, str] = {"removal": "removal", "removal_changed": "removal", "removal_contrast": "removal",
                             "clip_sim": "removal", "depth_order": "depth", "depth_margin": "depth"}


def score_cases(cases: list[Case], scorer=None, dilation_px: int = 50, change_floor: float = 6.0,
                batch_size: int = 8) -> list[dict]:
    """The shipped ``quality`` dict of every case (:func:`triplets.quality.statistics` with the case's D(I) and
    D(I_b)); with a :class:`~triplets.quality.QualityScorer` also its learned terms (``clip_sim``)."""
    from triplets.quality import statistics

    sims = [None] * len(cases)
    if scorer is not None and scorer.embedder is not None:
        for lo in range(0, len(cases), batch_size):
            part = cases[lo:lo + batch_size]
            got = scorer.clip_sims(np.stack([c.image for c in part]), np.stack([c.mask for c in part]),
                                   np.stack([c.background for c in part]))
            sims[lo:lo + len(part)] = [float(v) for v in got]
    return [statistics(c.image, c.mask, c.background, c.bg_depth, c.image_disparity, dilation_px, change_floor,
                       sims[i]) for i, c in enumerate(cases)]


def evaluate(cases: list[Case], qualities: list[dict]) -> dict[str, dict]:
    """Per evaluated score: ``auc`` (ROC-AUC with the score's good end as positive), ``n``, ``undefined`` and, at
    the shipped threshold, ``threshold``, ``precision``, ``recall`` and ``kept`` (share kept)."""
    from triplets.quality import SCORES, score_value

    out = {}
    for name, task in EVALUATED.items():
        sc = SCORES[name]
        rows = [(c.label, score_value({"quality": q}, name)) for c, q in zip(cases, qualities)
                if c.task == task and c.label is not None]
        labels, values = [r[0] for r in rows], [r[1] for r in rows]
        if all(v is None for v in values):
            out[name] = {"auc": None, "n": len(rows), "undefined": len(rows)}
            continue
        sign = -1.0 if sc.better == "low" else 1.0
        res = {"auc": roc_auc(labels, [None if v is None else sign * v for v in values]), "n": len(rows),
               "undefined": sum(v is None for v in values), "threshold": sc.threshold}
        if sc.threshold is not None:
            p, r, k = precision_recall(labels, values, sc.threshold, sc.better != "low")
            res.update(precision=p, recall=r, kept=k)
        out[name] = res
    return out


def by_variant(cases: list[Case], qualities: list[dict], name: str) -> dict[str, tuple[float, float, float, int]]:
    """Variant → ``(mean, min, max, undefined)`` of score ``name`` over the cases of that variant."""
    from triplets.quality import score_value

    groups: dict[str, list] = {}
    for c, q in zip(cases, qualities):
        groups.setdefault(c.variant, []).append(score_value({"quality": q}, name))
    out = {}
    for variant, vals in groups.items():
        ok = [v for v in vals if v is not None]
        out[variant] = ((float(np.mean(ok)), float(min(ok)), float(max(ok))) if ok else (np.nan, np.nan, np.nan)) \
            + (len(vals) - len(ok),)
    return out


def sweep(cases: list[Case], qualities: list[dict], name: str, thresholds: list[float]) -> list[tuple]:
    """``(threshold, precision, recall, kept share)`` of keeping ``name`` at its good side of each threshold."""
    from triplets.quality import SCORES, score_value

    sc = SCORES[name]
    task = EVALUATED[name]
    rows = [(c.label, score_value({"quality": q}, name)) for c, q in zip(cases, qualities)
            if c.task == task and c.label is not None]
    labels, values = [r[0] for r in rows], [r[1] for r in rows]
    return [(t, *precision_recall(labels, values, t, sc.better != "low")) for t in thresholds]
