"""``depth``: MiDaS (DPT) disparity of I_f = I⊙M and of I_b.

Uses transformers ``DPTForDepthEstimation`` with its own ``DPTImageProcessor`` (the reference
skipped the processor; its torchvision resize/normalisation runs on the model's device, on the uint8 batch moved there
once), predicts relative inverse depth (near = large), resizes it back to the
image size (bicubic) and min-max normalises **each map** to uint16 (raw range kept).

``preprocess`` selects the model input:

* ``processor`` (default) -- the model's ``DPTImageProcessor`` (resize to its size, mean/std).
* ``reference`` -- what the reference fed MiDaS (``data/get_primitives.py``): the RGB image at build resolution
  (512) as ``(N, 3, H, W)`` float in [0, 1], no resize, no mean/std. Its normalisation (min-max over the batch,
  with batch 1 = per map) is the per-map min-max done here anyway. Use it to build conditions that match the
  released weights.
"""

from __future__ import annotations

import weakref

import numpy as np

from triplets.sample import quantize_depth
from triplets.stages.base import Stage, resolve_device, resolve_dtype

PREPROCESS_MODES = ("processor", "reference")


def check_preprocess(mode: str) -> str:
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"unknown depth preprocess {mode!r}; valid: {', '.join(PREPROCESS_MODES)}")
    return mode


class DPTDepth:
    """Batched disparity estimator.

    Call with ``(N, H, W, 3)`` uint8 RGB → ``(N, H, W)`` float32 raw disparity (near = large).
    ``preprocess`` (a call argument, so one shared instance serves every mode): ``processor`` or ``reference``
    (module docstring); in ``reference`` mode H and W must be multiples of the model's patch size (16 for DPT-Large;
    512 is).
    """

    def __init__(self, model: str = "Intel/dpt-large", device: str = "auto", dtype: str = "auto"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        from transformers import DPTForDepthEstimation, DPTImageProcessor

        self.processor = DPTImageProcessor.from_pretrained(model)
        self.model = DPTForDepthEstimation.from_pretrained(model)
        self.model.to(self.device, self.dtype).eval()
        self.model_id = model

    def __call__(self, images: np.ndarray, preprocess: str = "processor") -> np.ndarray:
        import torch

        check_preprocess(preprocess)
        n, h, w = images.shape[:3]
        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)  # uint8
            if preprocess == "reference":
                pixels = batch.float() / 255.0
            else:  # the processor's resize and mean/std as tensor ops on the model's device
                pixels = self.processor(images=list(batch), return_tensors="pt", device=self.device)["pixel_values"]
            pred = self.model(pixel_values=pixels.to(self.device, self.dtype)).predicted_depth
            pred = torch.nn.functional.interpolate(pred[:, None].float(), size=(h, w), mode="bicubic",
                                                   align_corners=False)[:, 0]
        return pred.cpu().numpy().astype(np.float32)


_SHARED: weakref.WeakValueDictionary[tuple, DPTDepth] = weakref.WeakValueDictionary()


def shared_dpt(model: str, device: str = "auto", dtype: str = "auto") -> DPTDepth:
    """One :class:`DPTDepth` per (model, device, dtype) in this process while any stage holds it.

    The ``sam`` saliency prior and the depth stage usually name the same DPT: they share its weights instead of
    loading them twice (DPT-Large: ~1.4 GB fp32).
    """
    key = (model, resolve_device(device), dtype)
    estimator = _SHARED.get(key)
    if estimator is None:
        estimator = DPTDepth(model, device, dtype)
        _SHARED[key] = estimator
    return estimator


class DepthStage(Stage):
    """Adds ``fg_depth``/``bg_depth`` ``(N, R, R)`` uint16 and ``fg_depth_range``/``bg_depth_range`` ``(N, 2)``.

    Needs ``image``, ``mask`` and ``background``. With ``mask_foreground_depth`` the normalised
    D_f is multiplied by M (reference: not masked).

    ``image_disparity`` (what the quality scores need): ``"off"``; ``"compute"`` adds the ``image_disparity`` column
    ``(N, R, R)`` float32, the raw disparity of the whole photo I, from the same model call as D_f and D_b;
    ``"reuse"`` keeps the column an earlier stage computed with this very model and input mode (the ``sam``
    segmenter's saliency prior) and computes it when the batch lacks it.
    """

    name = "depth"

    def __init__(self, model: str = "Intel/dpt-large", mask_foreground_depth: bool = False, device: str = "auto",
                 dtype: str = "auto", preprocess: str = "processor", image_disparity: str = "off"):
        if image_disparity not in ("off", "compute", "reuse"):
            raise ValueError(f"image_disparity must be off, compute or reuse, got {image_disparity!r}")
        self.estimator = shared_dpt(model, device, dtype)
        self.preprocess = check_preprocess(preprocess)
        self.mask_foreground_depth = mask_foreground_depth
        self.image_disparity = image_disparity

    def process(self, rows: dict) -> tuple[dict, dict[int, str]]:
        image, mask, bg = rows["image"], rows["mask"], rows["background"]
        n = len(image)
        fg = image * mask[..., None]
        want = self.image_disparity == "compute" or (
            self.image_disparity == "reuse" and "image_disparity" not in rows)
        raw = self.estimator(np.concatenate([fg, bg, image] if want else [fg, bg], axis=0), self.preprocess)
        cols = {"fg_depth": np.zeros(mask.shape, np.uint16), "bg_depth": np.zeros(mask.shape, np.uint16),
                "fg_depth_range": np.zeros((n, 2)), "bg_depth_range": np.zeros((n, 2))}
        for i in range(n):
            fq, fr = quantize_depth(raw[i])
            bq, br = quantize_depth(raw[n + i])
            if self.mask_foreground_depth:
                fq = fq * mask[i].astype(np.uint16)
            cols["fg_depth"][i], cols["fg_depth_range"][i] = fq, fr
            cols["bg_depth"][i], cols["bg_depth_range"][i] = bq, br
        if want:
            cols["image_disparity"] = raw[2 * n:].astype(np.float32)
        return cols, {}

    def empty(self, batch: dict) -> dict:
        n = len(batch["key"])
        r = batch["image"].shape[1] if "image" in batch else 0
        cols = {"fg_depth": np.zeros((n, r, r), np.uint16), "bg_depth": np.zeros((n, r, r), np.uint16),
                "fg_depth_range": np.zeros((n, 2)), "bg_depth_range": np.zeros((n, 2))}
        if self.image_disparity != "off":
            cols["image_disparity"] = np.zeros((n, r, r), np.float32)
        return cols
