"""Quality scores on constructed cases with known answers: every failure mode of quality version 1 as a regression
test with its expected verdict, undefined scores, and the scorer (the `cnc score` path) on tiny real models."""

from __future__ import annotations

import numpy as np
import pytest

from cnc.config import load_config
from pipelines.plan import content_config, fingerprint
from triplets.config import BuildConfig
from triplets.quality import (
    CONTRAST_FLOOR,
    QUALITY_VERSION,
    SCORES,
    align_disparity,
    changed_fraction,
    contrast_residual,
    depth_order,
    mask_shape,
    pixel_features,
    quality_version,
    region_contrast,
    removal_score,
    rim,
    score_value,
    statistics,
)
from triplets.quality_cases import _jpeg, _regenerate, make_cases, observe_disparity, scene_disparity
from triplets.sample import quantize_depth
from triplets.stages.inpaint import dilate_mask

R = 32
REMOVAL_OK = SCORES["removal"].threshold
ORDER_OK = SCORES["depth_order"].threshold


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


# ------------------------------------------------------------------------------------------- removal, known cases
@pytest.fixture(scope="module")
def scene():
    """One benchmark scene at 96 px (photo background, composited object): ``{variant: Case}``."""
    return {c.variant: c for c in make_cases(1, 96, seed=3, depth=False)}


def _removal(case, background=None) -> dict:
    bg = case.background if background is None else background
    return statistics(case.image, case.mask, bg, case.bg_depth, case.image_disparity)["removal"]


def test_not_removed_scores_zero_also_after_jpeg_and_a_brightness_shift(scene):
    kept = scene["kept"]
    for background in (kept.image, _jpeg(kept.image, 70), np.clip(kept.image.astype(int) + 9, 0, 255).astype(np.uint8),
                       scene["kept_jpeg_brighter"].background):
        r = _removal(kept, background)
        assert r["changed"] <= 0.05 and r["score"] <= 0.05, r


def test_perfect_removal_scores_as_removed(scene):
    r = _removal(scene["clean"])
    assert r["changed"] >= 0.95 and r["contrast"] < 0.5 and r["score"] >= REMOVAL_OK


def test_replaced_partial_and_smeared_objects_score_below_the_threshold(scene):
    for variant in ("replaced", "partial", "smeared"):
        assert _removal(scene[variant])["score"] < REMOVAL_OK, variant


def test_a_low_contrast_object_perfectly_removed_scores_as_removed(scene):
    """Version 1 scored it 0: the object's saliency contrast was too small to measure a ratio on."""
    low = scene["clean_low_contrast"]
    m = low.mask > 0
    assert region_contrast(pixel_features(low.image), m, rim(m)) < CONTRAST_FLOOR  # the object hardly stands out...
    r = _removal(low)
    assert r["changed"] >= 0.9 and r["score"] >= REMOVAL_OK  # ...yet its removal is seen
    assert _removal(scene["kept_low_contrast"])["score"] <= 0.05  # and not removing it is not mistaken for it


def test_an_object_regenerated_in_place_scores_as_not_removed_without_any_saliency_map(scene):
    """Version 1 fell back to `changed` where the saliency map showed no contrast and scored 1.0 here."""
    kept = scene["kept"]
    rng = np.random.default_rng(0)
    region = dilate_mask(kept.mask, 50, 96)
    repainted = _regenerate(kept.image, region, rng)
    r = _removal(kept, repainted)
    assert r["changed"] >= 0.5  # every pixel was re-generated...
    assert r["contrast"] >= 0.8 and r["score"] < REMOVAL_OK  # ...but the object is still there


def test_removal_is_undefined_not_another_score_when_it_cannot_be_measured():
    image = np.full((R, R, 3), 100, np.uint8)
    full = np.ones((R, R), np.uint8)  # M fills the image: no rim to compare with
    assert contrast_residual(image, image, full) is None
    assert removal_score(1.0, None) is None and removal_score(None, 0.0) is None
    q = statistics(image, np.zeros((R, R), np.uint8), image, np.zeros((R, R), np.uint16), None)
    assert q["removal"] == {"changed": None, "contrast": None, "score": None, "clip_sim": None}
    assert changed_fraction(image, image, full, full) == 0.0  # no outside: no noise estimate, the floor only


# --------------------------------------------------------------------------------------------- depth, known cases
def _depth_scene(r: int = 64, delta: float = 0.4, seed: int = 0):
    """Disparity maps of a slanted ground with a square object ``delta`` (of the scene's spread) nearer or farther
    than its surround: ``(mask, inpainted region, D(I) true, D(I_b) true)``."""
    rng = np.random.default_rng(seed)
    mask = _square(24, 40, 24, 40, r)
    true_bg = scene_disparity(rng, r)
    spread = float(np.percentile(true_bg, 95) - np.percentile(true_bg, 5))
    true_img = true_bg.copy()
    true_img[mask > 0] = true_bg[mask > 0].mean() + delta * spread
    return mask, dilate_mask(mask, 50, r), true_img, true_bg


def test_depth_order_tells_nearer_farther_and_not_removed_apart():
    """Version 1 compared the per-map min-max normalised D(I_f) — the object on black, always at the top of its
    map's range — with D(I_b), and gave 1.0 to all three cases below."""
    rng = np.random.default_rng(1)
    for delta, want_order in ((0.4, 1.0), (-0.4, 0.0)):
        mask, region, d_img, d_bg = _depth_scene(delta=delta)
        observed = observe_disparity(d_img, rng)  # its own scale and shift, blurred edges, gamma, noise
        stored_bg = quantize_depth(observe_disparity(d_bg, rng))[0]  # min-max normalised, as stored
        got = depth_order(mask, region, observed, stored_bg)
        assert got["order"] == pytest.approx(want_order, abs=0.1), (delta, got)
        assert (got["margin"] > 0.1) if delta > 0 else (got["margin"] < -0.1)
    mask, region, d_img, _ = _depth_scene(delta=0.4)  # I_b = I: the object is still in both maps
    kept = depth_order(mask, region, observe_disparity(d_img, rng), quantize_depth(observe_disparity(d_img, rng))[0])
    assert kept["order"] < ORDER_OK and abs(kept["margin"]) < 0.05


def test_alignment_recovers_each_maps_own_scale_and_shift():
    mask, region, d_img, _ = _depth_scene()
    aligned = align_disparity(d_img, 2.5 * d_img - 0.7, region)
    assert np.allclose(aligned, 2.5 * d_img - 0.7, atol=1e-9)
    assert align_disparity(d_img, -d_img, region) is None  # decreasing fit: the maps disagree, no alignment
    assert align_disparity(np.ones_like(d_img), d_img, region) is None  # flat D(I): scale not identifiable


def test_depth_is_undefined_not_another_score_when_it_cannot_be_measured():
    mask, region, d_img, d_bg = _depth_scene()
    bg = quantize_depth(d_bg)[0]
    everything = np.ones_like(region)  # inpainted region covers the image: no shared scene to align on
    assert depth_order(mask, everything, d_img, bg) == {"order": None, "margin": None}
    assert depth_order(mask, region, None, bg) == {"order": None, "margin": None}  # no D(I)
    assert depth_order(np.zeros_like(mask), region, d_img, bg) == {"order": None, "margin": None}


# ------------------------------------------------------------------------------------------- the `cnc score` path
@pytest.fixture(scope="module")
def tiny_scorer():
    from cnc.hub import resolve_pretrained
    from triplets.quality import QualityScorer
    from triplets.stages.depth import DPTDepth
    from triplets.stages.embed import CLIPImageEmbedder

    dpt, clip = resolve_pretrained("tiny", "depth.model"), resolve_pretrained("tiny", "embed.model")
    return QualityScorer(CLIPImageEmbedder(clip, "cpu", "float32"), DPTDepth(dpt, "cpu", "float32"), dilation_px=50)


def test_clip_sim_follows_the_object_not_the_inpainted_box(tiny_scorer, scene):
    """Version 1 cropped the dilated mask's box (a fixed number of pixels around M), so its similarity tracked the
    box size. The same triplet at twice the size, or with another dilation, now gives the same clip_sim."""
    import cv2

    c = scene["replaced"]

    def big(x, interp=cv2.INTER_CUBIC):
        return cv2.resize(x, (192, 192), interpolation=interp)

    small = tiny_scorer.clip_sims(c.image[None], c.mask[None], c.background[None])[0]
    large = tiny_scorer.clip_sims(big(c.image)[None], big(c.mask, cv2.INTER_NEAREST)[None],
                                  big(c.background)[None])[0]
    assert small < 0.999 and abs(small - large) < 0.02
    same = tiny_scorer.clip_sims(c.image[None], c.mask[None], c.image[None])[0]
    assert same == pytest.approx(1.0, abs=1e-4)


def test_scorer_on_tiny_models_scores_version_2_from_stored_fields(tiny_scorer, scene):
    c = scene["kept"]
    q_same, q_clean = tiny_scorer(np.stack([c.image, c.image]), np.stack([c.mask, c.mask]),
                                  np.stack([c.image, scene["clean"].background]), np.stack([c.bg_depth, c.bg_depth]))
    assert quality_version({"quality": q_same}) == QUALITY_VERSION == 2
    assert q_same["removal"]["score"] == 0.0 and q_same["removal"]["clip_sim"] == pytest.approx(1.0, abs=1e-4)
    assert q_clean["removal"]["score"] >= REMOVAL_OK
    assert q_same["mask"] == mask_shape(c.mask)
    # D(I) came from the scorer's own depth model: the same as passing it in
    d_img = tiny_scorer.image_disparity(c.image[None])
    again = tiny_scorer(c.image[None], c.mask[None], c.image[None], c.bg_depth[None], d_img)[0]
    assert again["depth"] == q_same["depth"]
    assert {name: score_value({"quality": q_same}, name) for name in SCORES}["removal"] == 0.0


def test_quality_config_and_version_are_part_of_the_fingerprint():
    on = load_config(BuildConfig, None, [])
    off = load_config(BuildConfig, None, ["quality.enabled=false"])
    assert on.quality.enabled and fingerprint(on) != fingerprint(off)
    assert content_config(on)["quality"]["version"] == QUALITY_VERSION
    assert "version" not in content_config(off)["quality"]
    # a version-1 build's saved config still loads (for `cnc score`): its retired pixel threshold is dropped
    old = BuildConfig.model_validate({"quality": {"enabled": True, "change_threshold": 24}})
    assert old.quality.change_floor == BuildConfig().quality.change_floor
