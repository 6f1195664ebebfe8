"""Quality scores on constructed cases with known answers, and the scorer on tiny real models."""

from __future__ import annotations

import numpy as np
import pytest

from cnc.config import load_config
from pipelines.plan import fingerprint
from triplets.config import BuildConfig
from triplets.quality import (
    SCORES,
    FilterConfig,
    FilterSpecError,
    QualityFilter,
    QualityScorer,
    changed_fraction,
    depth_order,
    mask_shape,
    parse_where,
    removal_score,
    saliency_residual,
    score_value,
)

R = 32


def _square(y0, y1, x0, x1, r=R) -> np.ndarray:
    m = np.zeros((r, r), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def test_mask_shape_known_components_border_and_fill():
    m = _square(0, 4, 10, 14) | _square(20, 24, 20, 26)  # two blobs, the first touches the top edge
    shape = mask_shape(m)
    assert shape["components"] == 2
    assert shape["area"] == pytest.approx((16 + 24) / R**2, abs=1e-6)
    border_pixels = 4 * R - 4
    assert shape["border"] == pytest.approx(4 / border_pixels, abs=1e-6)  # 4 pixels of the top row
    assert shape["bbox_fill"] == pytest.approx(40 / (24 * 16), abs=1e-6)  # bbox rows 0..23, cols 10..25
    full = mask_shape(np.ones((R, R), np.uint8))
    assert (full["components"], full["border"], full["bbox_fill"]) == (1, 1.0, 1.0)
    diagonal = np.eye(R, dtype=np.uint8)  # 8-connected: one component
    assert mask_shape(diagonal)["components"] == 1
    assert mask_shape(np.zeros((R, R), np.uint8)) == {"area": 0.0, "components": 0, "border": 0.0, "bbox_fill": 0.0}


def test_depth_order_known_pairs():
    m = _square(8, 24, 8, 24)
    near, far = np.full((R, R), 50000, np.uint16), np.full((R, R), 10000, np.uint16)
    assert depth_order(m, near, far) == {"order": 1.0, "margin": pytest.approx(40000 / 65535, abs=1e-6)}
    assert depth_order(m, far, near) == {"order": 0.0, "margin": pytest.approx(-40000 / 65535, abs=1e-6)}
    half = far.copy()
    half[8:16] = 60000  # the top half of M is nearer in the foreground map
    assert depth_order(m, half, np.full((R, R), 30000, np.uint16))["order"] == 0.5
    assert depth_order(np.zeros((R, R), np.uint8), near, far) == {"order": None, "margin": None}


def _scene():
    """A red square object on a grey ground; its saliency (a disparity bump) stands out in I."""
    image = np.full((R, R, 3), 120, np.uint8)
    mask = _square(10, 20, 10, 20)
    image[mask > 0] = (220, 30, 30)
    dilated = _square(6, 24, 6, 24)
    sal = np.zeros((R, R), np.float32)
    sal[mask > 0] = 1.0
    return image, mask, dilated, sal


def test_removal_fails_when_background_equals_image():
    image, mask, dilated, sal = _scene()
    changed = changed_fraction(image, image.copy(), mask)
    residual = saliency_residual(sal, sal.copy(), mask, dilated)
    assert (changed, residual) == (0.0, 1.0)
    assert removal_score(changed, residual) == 0.0


def test_removal_succeeds_when_object_region_is_flat_filled():
    image, mask, dilated, sal = _scene()
    background = image.copy()
    background[dilated > 0] = 120  # the inpainted region filled flat with the ground colour
    flat_saliency = np.full((R, R), 0.3, np.float32)
    changed = changed_fraction(image, background, mask)
    residual = saliency_residual(sal, flat_saliency, mask, dilated)
    assert (changed, residual) == (1.0, 0.0)
    assert removal_score(changed, residual) == 1.0
    half = sal.copy()
    half[mask > 0] = 0.5  # half of the saliency contrast left: half removed
    assert saliency_residual(sal, half, mask, dilated) == pytest.approx(0.5)
    # no reference when the object does not stand out in I: the score falls back to the pixel change
    assert saliency_residual(np.zeros((R, R)), flat_saliency, mask, dilated) is None
    assert removal_score(0.8, None) == 0.8


def test_scorer_on_tiny_models_identity_and_flat_fill():
    """The real scorer (tiny DPT saliency + tiny CLIP): I_b == I scores as not removed, with CLIP similarity 1."""
    from cnc.hub import resolve_pretrained
    from triplets.stages.depth import DPTDepth
    from triplets.stages.embed import CLIPImageEmbedder

    dpt, clip = resolve_pretrained("tiny", "depth.model"), resolve_pretrained("tiny", "embed.model")
    scorer = QualityScorer(DPTDepth(dpt, "cpu", "float32"), CLIPImageEmbedder(clip, "cpu", "float32"),
                           dilation_px=50)
    image, mask, _, _ = _scene()
    flat = image.copy()
    flat[10:20, 10:20] = 120
    depth = np.zeros((R, R), np.uint16)
    same, filled = scorer(np.stack([image, image]), np.stack([mask, mask]), np.stack([image, flat]),
                          np.stack([depth, depth]), np.stack([depth, depth]))
    assert same["removal"]["changed"] == 0.0 and same["removal"]["score"] == 0.0
    assert same["removal"]["clip_sim"] == pytest.approx(1.0, abs=1e-4)
    assert same["removal"]["residual"] in (None, 1.0)
    assert filled["removal"]["changed"] == 1.0 and filled["removal"]["clip_sim"] < 1.0
    assert filled["removal"]["score"] == removal_score(1.0, filled["removal"]["residual"])
    assert same["mask"] == mask_shape(mask) and same["version"] == 1
    assert {score_value(same, name) is None for name in SCORES} <= {True, False}


def test_where_conditions_and_filter_config():
    meta = {"quality": {"removal": {"score": 0.4, "clip_sim": 0.9}, "depth": {"order": 0.8, "margin": None},
                        "mask": {"components": 3}}}
    assert parse_where("removal>=0.3").holds(meta) and not parse_where("removal >= 0.5").holds(meta)
    assert not parse_where("depth_margin>-1").holds(meta)  # undefined never satisfies a condition
    for bad in ("removal=>1", "nosuch>=1", "removal>=abc"):
        with pytest.raises(FilterSpecError):
            parse_where(bad)
    qf = FilterConfig(min_removal=0.3, max_mask_components=2).build()
    assert qf.reason(meta) == "mask_components<=2"
    assert qf.reason({"key": "old"}) is None  # unscored samples kept by default
    assert QualityFilter(qf.conditions, keep_unscored=False).reason({}) == "unscored"
    assert not FilterConfig().build()  # nothing configured: no filter


def test_quality_config_is_part_of_the_fingerprint():
    on = load_config(BuildConfig, None, [])
    off = load_config(BuildConfig, None, ["quality.enabled=false"])
    assert on.quality.enabled and fingerprint(on) != fingerprint(off)
