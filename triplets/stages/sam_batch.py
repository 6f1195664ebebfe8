"""Batched segment-anything inference: one image-encoder call per batch, reduced precision on GPU, SDPA attention.

:class:`BatchedSam` replaces ``SamPredictor.set_image`` + ``predict`` per image (one encoder call and one host sync
each) by the same computation for a whole batch:

* every image is resized with SAM's own ``ResizeLongestSide`` and normalised/padded with ``Sam.preprocess`` (exactly
  what the predictor does), the stacked batch goes through the image encoder once; off the CPU the resize to 1024 is
  SAM's tensor variant (``apply_image_torch``: antialiased bilinear on the device, within the tolerance that
  ``tests/triplets/test_gpu_efficiency.py`` states) instead of a PIL resize per image on the model thread;
* prompts (one box + one positive point per image) go through the prompt encoder and mask decoder image by image
  (the decoder is built for one image with many prompts; it costs < 1 % of the encoder) and the masks stay on the
  device until one transfer at the end;
* with a reduced ``dtype`` (fp16/bf16, GPU default) the encoder and decoder run under ``torch.autocast``; fp32 (the
  CPU default) runs without autocast, as the predictor did;
* the image encoder's attention is routed through ``torch.nn.functional.scaled_dot_product_attention`` with the
  decomposed relative-position bias as its additive mask (:func:`use_sdpa_attention`); same math, no explicit
  softmax of the (HW × HW) matrix in the model's dtype.
"""

from __future__ import annotations

import contextlib
import types

import numpy as np


def _sdpa_forward(self, x):
    """``segment_anything.modeling.image_encoder.Attention.forward`` through SDPA (same inputs and outputs)."""
    import torch
    import torch.nn.functional as F
    from segment_anything.modeling.image_encoder import get_rel_pos

    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
    bias = None
    if self.use_rel_pos:
        rh = get_rel_pos(h, h, self.rel_pos_h)
        rw = get_rel_pos(w, w, self.rel_pos_w)
        r_q = q.reshape(b * self.num_heads, h, w, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh.to(r_q.dtype))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw.to(r_q.dtype))
        bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(b * self.num_heads, h * w, h * w)
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=None if bias is None else bias[None],
                                         scale=self.scale)[0]
    out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return self.proj(out)


def use_sdpa_attention(sam) -> int:
    """Route every attention block of ``sam.image_encoder`` through SDPA; returns how many were switched."""
    from segment_anything.modeling.image_encoder import Attention

    n = 0
    for module in sam.image_encoder.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(_sdpa_forward, module)
            n += 1
    return n


class BatchedSam:
    """SAM over a batch of same-size images, one box + one point prompt each.

    Args:
        sam: a ``segment_anything`` ``Sam`` (moved to ``device`` and put in eval mode here).
        device: torch device string.
        dtype: ``torch.float32`` (no autocast), ``torch.float16`` or ``torch.bfloat16`` (autocast).
        sdpa: route the image encoder's attention through SDPA.
        device_resize: resize on the device with ``apply_image_torch`` (default: when ``device`` is not the CPU; on
            the CPU the predictor's PIL resize is kept, so CPU outputs equal ``SamPredictor``'s).
    """

    def __init__(self, sam, device: str, dtype, sdpa: bool = True, device_resize: bool | None = None):
        import torch
        from segment_anything.utils.transforms import ResizeLongestSide

        self.sam = sam.to(device).eval()
        self.device, self.dtype = device, dtype
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.autocast = dtype != torch.float32
        self.device_resize = torch.device(device).type != "cpu" if device_resize is None else device_resize
        if sdpa:
            use_sdpa_attention(self.sam)

    def _autocast(self):
        import torch

        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.dtype)

    def __call__(self, images: np.ndarray, boxes: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masks for ``(N, H, W, 3)`` uint8 images, ``(N, 4)`` XYXY boxes and ``(N, 2)`` XY points (pixels).

        Returns ``(masks (N, 3, H, W) bool, scores (N, 3) float32)``: the three multimask candidates of each image and
        their predicted IoU, as ``SamPredictor.predict(..., multimask_output=True)`` returns them.
        """
        import torch

        sam, tf = self.sam, self.transform
        original = tuple(images.shape[1:3])
        with torch.inference_mode():
            if self.device_resize:
                batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
                resized = tf.apply_image_torch(batch.float())  # (N, 3, h, 1024) float in [0, 255]
            else:
                resized = torch.stack([torch.as_tensor(tf.apply_image(img), device=self.device).permute(2, 0, 1)
                                       for img in images])  # (N, 3, h, 1024) uint8
            input_size = tuple(resized.shape[-2:])
            pixels = sam.preprocess(resized)  # (N, 3, 1024, 1024) float32, normalised and padded
            coords = torch.as_tensor(tf.apply_coords(points.astype(np.float32)[:, None, :], original),
                                     dtype=torch.float, device=self.device)  # (N, 1, 2)
            box_t = torch.as_tensor(tf.apply_boxes(boxes.astype(np.float32), original), dtype=torch.float,
                                    device=self.device)  # (N, 4)
            labels = torch.ones((1, 1), dtype=torch.int, device=self.device)
            masks, scores = [], []
            with self._autocast():
                features = sam.image_encoder(pixels)  # (N, 256, 64, 64)
                dense_pe = sam.prompt_encoder.get_dense_pe()
                for i in range(len(images)):
                    sparse, dense = sam.prompt_encoder(points=(coords[i:i + 1], labels), boxes=box_t[i:i + 1],
                                                       masks=None)
                    low_res, iou = sam.mask_decoder(image_embeddings=features[i:i + 1], image_pe=dense_pe,
                                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                                    multimask_output=True)
                    masks.append(sam.postprocess_masks(low_res.float(), input_size, original) > sam.mask_threshold)
                    scores.append(iou.float())
            return torch.cat(masks).cpu().numpy(), torch.cat(scores).cpu().numpy()
