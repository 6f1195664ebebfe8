"""Batched SAM (:mod:`triplets.stages.sam_batch`) on CPU: equals the per-image predictor, rows do not depend on their
neighbours, bf16 autocast and the on-device resize stay within the stated tolerances, SDPA attention equals the
library's (issue 15)."""

import numpy as np
import torch

from cnc.tiny import synthetic_photo, tiny_sam
from tests.support import MASK_IOU_MIN, SCORE_ATOL
from triplets.stages.sam_batch import BatchedSam

R = 64


def _images(n: int, r: int = R) -> np.ndarray:
    return np.stack([synthetic_photo(i, r, r) for i in range(n)])


def _prompts(n: int, r: int = R):
    rng = np.random.default_rng(0)
    lo = rng.integers(2, r // 3, (n, 2))
    hi = lo + rng.integers(r // 4, r // 2, (n, 2))
    boxes = np.concatenate([lo, hi], 1).astype(np.float32)
    points = ((lo + hi) / 2).astype(np.float32)
    return boxes, points


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def test_batched_sam_matches_predictor_fp32():
    """fp32 on CPU: the batched path gives the predictor's candidates and scores (within float rounding)."""
    from segment_anything import SamPredictor

    images = _images(3)
    boxes, points = _prompts(3)
    masks, scores = BatchedSam(tiny_sam(), "cpu", torch.float32)(images, boxes, points)
    assert masks.shape == (3, 3, R, R) and masks.dtype == bool and scores.shape == (3, 3)
    predictor = SamPredictor(tiny_sam().eval())
    for i in range(3):
        with torch.inference_mode():
            predictor.set_image(images[i])
            ref, ref_scores, _ = predictor.predict(point_coords=points[i:i + 1], point_labels=np.array([1]),
                                                   box=boxes[i], multimask_output=True)
        np.testing.assert_allclose(scores[i], ref_scores, rtol=1e-4, atol=1e-5)
        assert np.mean(masks[i] != ref) < 1e-3  # only pixels whose logit is ~0 may flip


def test_batched_sam_rows_do_not_depend_on_neighbours():
    images = _images(4)
    boxes, points = _prompts(4)
    sam = BatchedSam(tiny_sam(), "cpu", torch.float32)
    full, full_scores = sam(images, boxes, points)
    alone, alone_scores = sam(images[2:3], boxes[2:3], points[2:3])
    np.testing.assert_allclose(full_scores[2], alone_scores[0], rtol=1e-4, atol=1e-5)
    assert np.mean(full[2] != alone[0]) < 1e-3


def test_sam_bf16_autocast_within_tolerance():
    images = _images(4)
    boxes, points = _prompts(4)
    ref_masks, ref_scores = BatchedSam(tiny_sam(), "cpu", torch.float32)(images, boxes, points)
    masks, scores = BatchedSam(tiny_sam(), "cpu", torch.bfloat16)(images, boxes, points)
    ious = [_iou(masks[i, j], ref_masks[i, j]) for i in range(4) for j in range(3)]
    assert min(ious) >= MASK_IOU_MIN, ious
    assert np.abs(scores - ref_scores).max() <= SCORE_ATOL
    assert not np.array_equal(scores, ref_scores)  # the reduced precision really ran


def test_sdpa_attention_equals_library_attention():
    from triplets.stages.sam_batch import use_sdpa_attention

    x = torch.as_tensor(_images(2)).permute(0, 3, 1, 2).float()
    ref_sam, sdpa_sam = tiny_sam(), tiny_sam()
    torch.nn.init.normal_(ref_sam.image_encoder.blocks[0].attn.rel_pos_h, std=0.5)
    sdpa_sam.load_state_dict(ref_sam.state_dict())
    assert use_sdpa_attention(sdpa_sam) == 1
    with torch.inference_mode():
        pixels = torch.cat([ref_sam.preprocess(t[None]) for t in x])
        torch.testing.assert_close(sdpa_sam.image_encoder(pixels), ref_sam.image_encoder(pixels), rtol=1e-4, atol=1e-5)


def test_sam_device_resize_within_tolerance():
    """The tensor resize used off the CPU (antialiased bilinear) vs the predictor's PIL resize: same masks within
    the stated tolerance."""
    images = _images(3)
    boxes, points = _prompts(3)
    ref_masks, ref_scores = BatchedSam(tiny_sam(), "cpu", torch.float32)(images, boxes, points)
    masks, scores = BatchedSam(tiny_sam(), "cpu", torch.float32, device_resize=True)(images, boxes, points)
    assert min(_iou(masks[i, j], ref_masks[i, j]) for i in range(3) for j in range(3)) >= MASK_IOU_MIN
    assert np.abs(scores - ref_scores).max() <= SCORE_ATOL
