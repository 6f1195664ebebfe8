"""``segment``: the salient-object mask M (binary ``(N, R, R)`` uint8 in {0, 1}).

Backends are chosen by name from :data:`SEGMENTERS` (``register_segmenter`` adds more, e.g.
U²-Net or BiRefNet). Every backend maps ``(rows) → masks``; the stage then checks the area:
masks covering less than ``min_area`` of the image fail with ``empty mask``, more than
``max_area`` with ``near-full mask`` (a per-sample reason, not a crash).

``sam`` — segment-anything SAM (batched, :mod:`triplets.stages.sam_batch`; fp16/bf16 autocast on GPU per ``dtype``,
fp32 on CPU) prompted from a saliency prior. The prior is the
DPT disparity of the image (near = large): pixels above the ``prior_quantile`` of the map form
the "near" region; its largest connected component is the most prominent near object. SAM
gets that component's bounding box plus one positive point (the component pixel of highest
disparity) and returns three candidates; the best-scoring candidate whose area is within
bounds wins. If none is, the prior component itself is used (``mask_source = "prior"``).

``dataset`` — masks supplied with the input (COCO-Stuff thing classes, or ``masks/`` PNGs);
rows without one fail with ``no dataset mask``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from triplets.stages.base import Stage, resolve_device, resolve_dtype


class Segmenter(Protocol):
    """A mask backend: rows (with ``image`` ``(N,R,R,3)`` uint8) → ``(masks (N,R,R) uint8 {0,1}, sources)``."""

    def __call__(self, rows: dict) -> tuple[np.ndarray, list[str]]: ...


SEGMENTERS: dict[str, Callable[..., Segmenter]] = {}


def register_segmenter(name: str):
    """Decorator adding a backend factory to :data:`SEGMENTERS`."""

    def deco(factory):
        SEGMENTERS[name] = factory
        return factory

    return deco


def saliency_prior(disparity: np.ndarray, quantile: float = 0.85) -> np.ndarray:
    """Largest connected "near" region of a disparity map: ``(H, W)`` float → ``(H, W)`` uint8 {0,1}."""
    import cv2

    thr = np.quantile(disparity, quantile)
    near = (disparity >= thr).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(near, connectivity=8)
    if n <= 1:
        return near
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (labels == best).astype(np.uint8)


def prior_prompt(prior: np.ndarray, disparity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SAM prompt from a prior mask: ``(box XYXY (4,), point XY (1, 2))`` in pixels."""
    ys, xs = np.nonzero(prior)
    if len(xs) == 0:
        h, w = prior.shape
        return np.array([0, 0, w - 1, h - 1], np.float32), np.array([[w / 2, h / 2]], np.float32)
    i = int(np.argmax(disparity[ys, xs]))
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)
    return box, np.array([[xs[i], ys[i]]], np.float32)


@register_segmenter("sam")
class SamSegmenter:
    """SAM prompted by the DPT saliency prior (see module docstring)."""

    def __init__(self, sam_checkpoint: str, sam_model_type: str = "vit_h", saliency_model: str = "Intel/dpt-large",
                 prior_quantile: float = 0.85, min_area: float = 0.01, max_area: float = 0.95,
                 device: str = "auto", dtype: str = "auto", **_: object):
        from triplets.stages.depth import shared_dpt
        from triplets.stages.sam_batch import BatchedSam

        self.device = resolve_device(device)
        models = sam_architectures()
        if sam_model_type not in models:
            raise ValueError(f"segment.sam_model_type {sam_model_type!r} unknown; valid: {list(models)}")
        sam = _load_sam(models[sam_model_type], sam_checkpoint)
        self.sam = BatchedSam(sam, self.device, resolve_dtype(dtype, self.device))
        self.prior_depth = shared_dpt(saliency_model, device, dtype)
        self.quantile, self.min_area, self.max_area = prior_quantile, min_area, max_area

    def __call__(self, rows: dict) -> tuple[np.ndarray, list[str]]:
        masks, sources, _ = self.segment(rows)
        return masks, sources

    def segment(self, rows: dict) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
        """Masks, sources and the extra column ``image_disparity`` ``(N, R, R)`` float32: the prior's raw DPT
        disparity of I, which the depth and quality stages reuse instead of running DPT on I again."""
        images = rows["image"]
        disparity = self.prior_depth(images)
        priors = [saliency_prior(d, self.quantile) for d in disparity]
        prompts = [prior_prompt(p, d) for p, d in zip(priors, disparity)]
        cands, scores = self.sam(images, np.stack([b for b, _ in prompts]), np.concatenate([p for _, p in prompts]))
        masks, sources = np.zeros(images.shape[:3], np.uint8), []
        for i, prior in enumerate(priors):
            chosen, source = prior, "prior"
            for j in np.argsort(-scores[i], kind="stable"):
                area = float(cands[i, j].mean())
                if self.min_area <= area <= self.max_area:
                    chosen, source = cands[i, j].astype(np.uint8), "sam"
                    break
            masks[i] = chosen
            sources.append(source)
        return masks, sources, {"image_disparity": np.asarray(disparity, np.float32)}


def sam_architectures() -> dict[str, Callable]:
    """``sam_model_type`` → builder: segment-anything's ``vit_h`` / ``vit_l`` / ``vit_b`` and the tiny test model."""
    from segment_anything import sam_model_registry

    from cnc.tiny_store import TINY_SAM_TYPE, tiny_sam_architecture

    return {**sam_model_registry, TINY_SAM_TYPE: tiny_sam_architecture}


def _load_sam(builder, checkpoint: str):
    """Build a SAM and load its weights safely (``weights_only=True``)."""
    import torch

    sam = builder(checkpoint=None)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sam.load_state_dict(state)
    return sam


@register_segmenter("dataset")
class DatasetSegmenter:
    """Masks that came with the input (``dataset_mask`` column from the load stage)."""

    def __init__(self, **_: object):
        pass

    def __call__(self, rows: dict) -> tuple[np.ndarray, list[str]]:
        return rows["dataset_mask"].astype(np.uint8), ["dataset" if h else "" for h in rows["has_dataset_mask"]]


class SegmentStage(Stage):
    """Adds ``mask`` ``(N, R, R)`` uint8 {0,1}, ``mask_area`` ``(N,)`` float and ``mask_source``, plus the columns a
    backend computed on the way (its ``segment(rows)`` method's third value: ``sam`` adds ``image_disparity``)."""

    name = "segment"

    def __init__(self, backend: str = "sam", min_area: float = 0.01, max_area: float = 0.95, **backend_kwargs):
        if backend not in SEGMENTERS:
            raise ValueError(f"unknown segment backend {backend!r}; valid: {', '.join(sorted(SEGMENTERS))}")
        self.backend = backend
        self.segmenter = SEGMENTERS[backend](min_area=min_area, max_area=max_area, **backend_kwargs)
        self.min_area, self.max_area = min_area, max_area

    def process(self, rows: dict) -> tuple[dict, dict[int, str]]:
        if hasattr(self.segmenter, "segment"):
            masks, sources, extra = self.segmenter.segment(rows)
        else:
            (masks, sources), extra = self.segmenter(rows), {}
        masks = (masks > 0).astype(np.uint8)
        areas = masks.reshape(len(masks), -1).mean(axis=1)
        failures: dict[int, str] = {}
        for i, (area, src) in enumerate(zip(areas, sources)):
            if src == "":
                failures[i] = "no dataset mask for this sample"
            elif area < self.min_area:
                failures[i] = f"empty mask (area {area:.4f} < min_area {self.min_area})"
            elif area > self.max_area:
                failures[i] = f"near-full mask (area {area:.4f} > max_area {self.max_area})"
        return {"mask": masks, "mask_area": areas, "mask_source": np.array(sources, dtype=object), **extra}, failures

    def empty(self, batch: dict) -> dict:
        n = len(batch["key"])
        r = batch["image"].shape[1] if "image" in batch else 0
        return {"mask": np.zeros((n, r, r), np.uint8), "mask_area": np.zeros(n),
                "mask_source": np.array([""] * n, dtype=object)}
