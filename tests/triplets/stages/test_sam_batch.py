"""Batched SAM (:mod:`triplets.stages.sam_batch`) on CPU: equals the per-image predictor, rows do not depend on their
neighbours, bf16 autocast and the on-device resize stay within the stated tolerances, SDPA attention equals the
library's (issue 15); the batched decoder, the folded (flash-eligible) attention, fp16/bf16 encoder weights and the
candidate choice on the device equal (or stay within the stated tolerance of) what they replace (issue 29)."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cnc.tiny import synthetic_photo, tiny_sam
from tests.support import MASK_IOU_MIN, SCORE_ATOL
from triplets.stages.sam_batch import BatchedSam, _folded_forward, decode_masks, use_sdpa_attention
from triplets.stages.segment import _select_on_device, select_candidates

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


def test_batched_decoder_equals_the_decoder_image_by_image():
    sam = tiny_sam()
    torch.manual_seed(1)
    n, c, (h, w) = 3, sam.prompt_encoder.embed_dim, sam.prompt_encoder.image_embedding_size
    features = torch.randn(n, c, h, w)
    coords, boxes = torch.rand(n, 1, 2) * 64, torch.rand(n, 4) * 64
    with torch.inference_mode():
        masks, iou = decode_masks(sam, features, coords, boxes)
        for i in range(n):
            sparse, dense = sam.prompt_encoder(points=(coords[i:i + 1], torch.ones(1, 1, dtype=torch.int)),
                                               boxes=boxes[i:i + 1], masks=None)
            ref_masks, ref_iou = sam.mask_decoder(image_embeddings=features[i:i + 1],
                                                  image_pe=sam.prompt_encoder.get_dense_pe(),
                                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                                  multimask_output=True)
            torch.testing.assert_close(masks[i:i + 1], ref_masks, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(iou[i:i + 1], ref_iou, rtol=1e-5, atol=1e-5)


class SdpaCalls(TorchDispatchMode):
    """Records (query head dim, whether a mask was passed) of every attention kernel call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "scaled_dot_product" in str(func):
            names = [a.name for a in func._schema.arguments]
            mask = kwargs.get("attn_mask")
            if mask is None and "attn_mask" in names and names.index("attn_mask") < len(args):
                mask = args[names.index("attn_mask")]
            self.calls.append((args[0].shape[-1], mask is not None))
        return func(*args, **kwargs)


@pytest.mark.parametrize("window", [0, 3])
def test_folded_attention_equals_sam_attention_without_a_mask(window):
    """Global (window 0) and windowed blocks: the bias folded into q·k gives SAM's own attention (fp32), the kernel
    gets no mask and q/k/v of one head dim, a multiple of 8 (what flash attention needs)."""
    from segment_anything.modeling.image_encoder import Block

    torch.manual_seed(0)
    block = Block(dim=32, num_heads=2, use_rel_pos=True, window_size=window, input_size=(5, 5)).eval()
    torch.nn.init.normal_(block.attn.rel_pos_h, std=0.5)
    torch.nn.init.normal_(block.attn.rel_pos_w, std=0.5)
    x = torch.randn(2, 5, 5, 32)
    with torch.inference_mode():
        ref = block(x)
        block.attn.forward = _folded_forward.__get__(block.attn)
        with SdpaCalls() as calls:
            got = block(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert calls.calls and all(d % 8 == 0 and not masked for d, masked in calls.calls), calls.calls


def test_bias_attention_passes_the_dense_mask():
    sam = tiny_sam()
    assert use_sdpa_attention(sam, "bias") == 1
    with torch.inference_mode(), SdpaCalls() as calls:
        sam.image_encoder(torch.randn(1, 3, 64, 64))
    assert calls.calls == [(16, True)]  # head dim 32 / 2 heads, the (B·heads, HW, HW) bias as a mask
    with pytest.raises(ValueError, match="folded"):
        use_sdpa_attention(sam, "dense")


def test_folded_and_reduced_weight_sam_within_tolerance():
    images = _images(3)
    boxes, points = _prompts(3)
    ref_masks, ref_scores = BatchedSam(tiny_sam(), "cpu", torch.float32)(images, boxes, points)
    folded_masks, folded_scores = BatchedSam(tiny_sam(), "cpu", torch.float32, attention="folded")(images, boxes,
                                                                                                  points)
    np.testing.assert_allclose(folded_scores, ref_scores, rtol=1e-4, atol=1e-5)
    assert np.mean(folded_masks != ref_masks) < 1e-3
    low = BatchedSam(tiny_sam(), "cpu", torch.bfloat16, precision="weights")
    assert low.sam.image_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    assert low.sam.mask_decoder.iou_token.weight.dtype == torch.float32  # the small decoder stays fp32
    masks, scores = low(images, boxes, points)
    assert min(_iou(masks[i, j], ref_masks[i, j]) for i in range(3) for j in range(3)) >= MASK_IOU_MIN
    assert np.abs(scores - ref_scores).max() <= SCORE_ATOL and not np.array_equal(scores, ref_scores)
    with pytest.raises(ValueError, match="precision"):
        BatchedSam(tiny_sam(), "cpu", torch.float32, precision="half")


def _numpy_choice(cands, scores, lo, hi):
    """The per-image NumPy loop the device choice replaced."""
    out, found = np.zeros(cands.shape[:1] + cands.shape[2:], np.uint8), []
    for i in range(len(cands)):
        hit = False
        for j in np.argsort(-scores[i], kind="stable"):
            area = float(cands[i, j].mean())
            if lo <= area <= hi:
                out[i], hit = cands[i, j].astype(np.uint8), True
                break
        found.append(hit)
    return out, np.array(found)


def test_candidate_choice_on_the_device_equals_the_numpy_loop():
    rng = np.random.default_rng(0)
    n, k, h, w = 40, 3, 16, 16
    density = rng.choice([0.0, 0.005, 0.3, 0.97, 1.0], (n, k, 1, 1))
    cands = rng.random((n, k, h, w)) < density
    scores = rng.choice([0.1, 0.5, 0.9], (n, k)).astype(np.float32)  # ties: the lower index wins
    cands[0, :, :, :] = False
    cands[0, 1, :4, :4] = True  # area 16/256 = 0.0625: exactly on a bound below
    for lo, hi in [(0.01, 0.95), (0.0625, 0.5)]:
        want, want_found = _numpy_choice(cands, scores, lo, hi)
        for select in (select_candidates, _select_on_device):  # the accelerator path, run here on the CPU
            got, found = select(torch.from_numpy(cands), torch.from_numpy(scores), lo, hi)
            assert np.array_equal(found, want_found) and np.array_equal(got, want)
            assert got.dtype == np.uint8 and found.any() and not found.all()


def test_segment_stage_host_pool_gives_the_same_masks():
    """Priors and prompts on the builder's host threads (ray.encode_threads > 1) = inline, row for row."""
    from concurrent.futures import ThreadPoolExecutor

    from cnc.hub import TINY, resolve_pretrained
    from triplets.stages.segment import SegmentStage

    stage = SegmentStage("sam", sam_checkpoint=resolve_pretrained(TINY, "segment.sam_checkpoint", is_file=True),
                         sam_model_type="tiny", saliency_model=resolve_pretrained(TINY, "segment.saliency_model"),
                         device="cpu", min_area=0.0, max_area=1.0)
    rows = {"image": _images(4)}
    inline = stage.process(rows)[0]
    with ThreadPoolExecutor(3) as pool:
        stage.host_pool = pool
        pooled = stage.process(rows)[0]
    assert np.array_equal(inline["mask"], pooled["mask"]) and list(inline["mask_source"]) == list(
        pooled["mask_source"])
