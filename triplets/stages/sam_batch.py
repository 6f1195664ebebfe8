"""Batched segment-anything inference: one image-encoder call and one decoder call per batch, SDPA attention.

:class:`BatchedSam` replaces ``SamPredictor.set_image`` + ``predict`` per image (one encoder call and one host sync
each) by the same computation for a whole batch:

* every image is resized with SAM's own ``ResizeLongestSide`` and normalised/padded with ``Sam.preprocess`` (exactly
  what the predictor does), the stacked batch goes through the image encoder once; off the CPU the resize to 1024 is
  SAM's tensor variant (``apply_image_torch``: antialiased bilinear on the device, within the tolerance that
  ``tests/support.py`` states) instead of a PIL resize per image on the model thread;
* the prompts (one box + one positive point per image) of the whole batch go through the prompt encoder and the mask
  decoder in one call each (:func:`decode_masks`: the decoder's own layers, image i paired with prompt i instead of
  every prompt with one image), and the masks stay on the device (:meth:`BatchedSam.predict`);
* precision (``dtype``): fp32 runs without autocast, as the predictor did. With a reduced dtype (fp16/bf16, the GPU
  default) ``precision="autocast"`` runs encoder and decoder under ``torch.autocast`` over the fp32 weights;
  ``precision="weights"`` casts the image encoder's weights to the dtype (half the weight traffic, no per-layer
  casts; the small prompt encoder and decoder stay fp32 under autocast);
* the image encoder's attention goes through ``torch.nn.functional.scaled_dot_product_attention``
  (:func:`use_sdpa_attention`). SAM adds a decomposed relative-position bias to every attention logit;
  ``attention="bias"`` passes it as a dense additive mask of (B·heads, HW, HW) (for a global block of ViT-H:
  B·16 × 4096², 512 MB per image in fp16), which only the memory-efficient kernel accepts; ``attention="folded"``
  folds it into the product itself: ``q' = [q, rel_h/scale, rel_w/scale]``, ``k' = [k, onehot(row), onehot(col)]``
  give ``scale·q'·k' = scale·q·k + rel_h[row] + rel_w[col]`` exactly, with no mask, so flash attention can run it
  (head dim 80 → 208 in global blocks, padded to a multiple of 8; same logits within float rounding).
"""

from __future__ import annotations

import contextlib
import types

import numpy as np

ATTENTION_MODES = ("bias", "folded")
PRECISION_MODES = ("autocast", "weights")


def _rel_terms(self, q, h: int, w: int):
    """SAM's decomposed relative-position terms of queries ``q`` ``(B·heads, h·w, d)``: ``(rel_h, rel_w)`` of shapes
    ``(B·heads, h, w, h)`` and ``(B·heads, h, w, w)`` (``add_decomposed_rel_pos`` before it broadcasts them)."""
    import torch
    from segment_anything.modeling.image_encoder import get_rel_pos

    rh = get_rel_pos(h, h, self.rel_pos_h)
    rw = get_rel_pos(w, w, self.rel_pos_w)
    r_q = q.reshape(q.shape[0], h, w, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh.to(r_q.dtype))
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw.to(r_q.dtype))
    return rel_h, rel_w


def _qkv(self, x):
    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    return qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)  # (B·heads, h·w, d) each


def _output(self, out, b: int, h: int, w: int):
    out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return self.proj(out)


def _sdpa_forward(self, x):
    """``segment_anything.modeling.image_encoder.Attention.forward`` through SDPA, the bias as a dense mask."""
    import torch.nn.functional as F

    b, h, w, _ = x.shape
    q, k, v = _qkv(self, x)
    bias = None
    if self.use_rel_pos:
        rel_h, rel_w = _rel_terms(self, q, h, w)
        bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(b * self.num_heads, h * w, h * w)
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=None if bias is None else bias[None],
                                         scale=self.scale)[0]
    return _output(self, out, b, h, w)


def _folded_forward(self, x):
    """The same attention with the relative-position bias folded into ``q·k`` (no mask: flash-attention eligible)."""
    import torch
    import torch.nn.functional as F

    b, h, w, _ = x.shape
    q, k, v = _qkv(self, x)
    d = q.shape[-1]
    if self.use_rel_pos:
        rel_h, rel_w = _rel_terms(self, q, h, w)
        n, hw = q.shape[0], h * w
        key = torch.arange(hw, device=q.device)
        row = torch.nn.functional.one_hot(key // w, h).to(q.dtype)  # (h·w, h): the key's row
        col = torch.nn.functional.one_hot(key % w, w).to(q.dtype)  # (h·w, w): the key's column
        q = torch.cat([q, rel_h.reshape(n, hw, h) / self.scale, rel_w.reshape(n, hw, w) / self.scale], -1)
        k = torch.cat([k, row.expand(n, -1, -1), col.expand(n, -1, -1)], -1)
    pad = -q.shape[-1] % 8  # flash kernels want q, k, v of one head dim, a multiple of 8
    q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
    v = F.pad(v, (0, q.shape[-1] - d))
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=self.scale)[0][..., :d]
    return _output(self, out, b, h, w)


def use_sdpa_attention(sam, mode: str = "bias") -> int:
    """Route every attention block of ``sam.image_encoder`` through SDPA (``mode``: ``bias`` or ``folded``, see the
    module docstring); returns how many were switched."""
    from segment_anything.modeling.image_encoder import Attention

    if mode not in ATTENTION_MODES:
        raise ValueError(f"unknown SAM attention {mode!r}; valid: {', '.join(ATTENTION_MODES)}")
    forward = _sdpa_forward if mode == "bias" else _folded_forward
    n = 0
    for module in sam.image_encoder.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(forward, module)
            n += 1
    return n


def decode_masks(sam, features, coords, boxes):
    """Prompt encoder + mask decoder for a batch, image ``i`` with prompt ``i`` (one point + one box each).

    Args:
        features: ``(N, C, h, w)`` image embeddings.
        coords: ``(N, 1, 2)`` point coordinates and ``boxes`` ``(N, 4)`` XYXY, both in the 1024-px input frame.

    Returns:
        ``(low-res mask logits (N, 3, 4h, 4w), predicted IoU (N, 3))``: what ``MaskDecoder(...,
        multimask_output=True)`` returns for each image alone. ``MaskDecoder.predict_masks`` repeats one image's
        embedding for every prompt; here the batch dimension pairs images with their own prompts, through the same
        layers in the same order.
    """
    import torch

    pe, dec = sam.prompt_encoder, sam.mask_decoder
    n = features.shape[0]
    labels = torch.ones((n, 1), dtype=torch.int, device=features.device)
    sparse, dense = pe(points=(coords, labels), boxes=boxes, masks=None)  # (N, 3, C), (N, C, h, w)
    tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat((tokens.unsqueeze(0).expand(n, -1, -1), sparse), dim=1)
    src = features + dense
    pos_src = pe.get_dense_pe().expand(n, -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = dec.transformer(src, pos_src, tokens)
    iou_token_out, mask_tokens_out = hs[:, 0, :], hs[:, 1:(1 + dec.num_mask_tokens), :]
    upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)],
                           dim=1)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    iou = dec.iou_prediction_head(iou_token_out)
    return masks[:, 1:], iou[:, 1:]  # multimask output: the three candidates


class BatchedSam:
    """SAM over a batch of same-size images, one box + one point prompt each.

    Args:
        sam: a ``segment_anything`` ``Sam`` (moved to ``device`` and put in eval mode here).
        device: torch device string.
        dtype: ``torch.float32`` (no autocast), ``torch.float16`` or ``torch.bfloat16``.
        sdpa: route the image encoder's attention through SDPA.
        device_resize: resize on the device with ``apply_image_torch`` (default: when ``device`` is not the CPU; on
            the CPU the predictor's PIL resize is kept, so CPU outputs equal ``SamPredictor``'s).
        attention: ``bias`` | ``folded`` (module docstring; with ``sdpa``).
        precision: ``autocast`` | ``weights`` (module docstring; only with a reduced ``dtype``).
    """

    def __init__(self, sam, device: str, dtype, sdpa: bool = True, device_resize: bool | None = None,
                 attention: str = "bias", precision: str = "autocast"):
        import torch
        from segment_anything.utils.transforms import ResizeLongestSide

        if precision not in PRECISION_MODES:
            raise ValueError(f"unknown SAM precision {precision!r}; valid: {', '.join(PRECISION_MODES)}")
        self.sam = sam.to(device).eval()
        self.device, self.dtype = device, dtype
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.autocast = dtype != torch.float32
        self.encoder_dtype = dtype if self.autocast and precision == "weights" else None
        if self.encoder_dtype is not None:
            self.sam.image_encoder.to(dtype)
        self.device_resize = torch.device(device).type != "cpu" if device_resize is None else device_resize
        if sdpa:
            use_sdpa_attention(self.sam, attention)

    def _autocast(self, enabled: bool = True):
        import torch

        if not (self.autocast and enabled):
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.dtype)

    def predict(self, images: np.ndarray, boxes: np.ndarray, points: np.ndarray):
        """:meth:`__call__` with the results left on the device: ``(masks (N, 3, H, W) bool, scores (N, 3) float32)``
        as tensors."""
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
            if self.encoder_dtype is not None:  # reduced-precision weights: no autocast around the encoder
                features = sam.image_encoder(pixels.to(self.encoder_dtype)).float()  # (N, 256, 64, 64)
            else:
                with self._autocast():
                    features = sam.image_encoder(pixels)
            with self._autocast():
                low_res, iou = decode_masks(sam, features, coords, box_t)
            masks = sam.postprocess_masks(low_res.float(), input_size, original) > sam.mask_threshold
            return masks, iou.float()

    def __call__(self, images: np.ndarray, boxes: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masks for ``(N, H, W, 3)`` uint8 images, ``(N, 4)`` XYXY boxes and ``(N, 2)`` XY points (pixels).

        Returns ``(masks (N, 3, H, W) bool, scores (N, 3) float32)``: the three multimask candidates of each image and
        their predicted IoU, as ``SamPredictor.predict(..., multimask_output=True)`` returns them.
        """
        masks, scores = self.predict(images, boxes, points)
        return masks.cpu().numpy(), scores.cpu().numpy()
