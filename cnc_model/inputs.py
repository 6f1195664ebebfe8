"""Input normalisation for the CnC pipeline: depth maps, masks and reference embeddings.

Conventions: depth maps are relative inverse depth (near = large) in [0, 1]; masks are in [0, 1] with 1 = foreground;
images are RGB.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

#: Threshold of the min-max-normalised fg depth used when no mask is given (see :func:`mask_from_depth`).
DEPTH_MASK_THRESHOLD = 0.5


def _to_tensor(x) -> torch.Tensor:
    if isinstance(x, Image.Image):
        return torch.from_numpy(np.asarray(x.convert("L"), dtype=np.float32) / 255.0)
    if isinstance(x, np.ndarray):
        arr = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        return torch.from_numpy(arr)
    if torch.is_tensor(x):
        return x.float()
    raise TypeError(f"expected a PIL image, numpy array or tensor, got {type(x).__name__}")


def to_map_tensor(x, batch: int, height: int, width: int, name: str, mode: str = "bilinear") -> torch.Tensor:
    """A single-channel map -> ``(batch, 1, height, width)`` float32.

    Accepts ``(H, W)``, ``(1, H, W)``, ``(B, 1, H, W)``, ``(B, H, W)`` arrays/tensors (float in [0, 1] or uint8 in
    [0, 255]) or a PIL image (converted to L), or a list of those (one per sample). A batch of 1 is broadcast.
    """
    if isinstance(x, (list, tuple)):
        return torch.cat([to_map_tensor(item, 1, height, width, name, mode) for item in x]).expand(batch, -1, -1, -1)
    t = _to_tensor(x)
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[:, None]  # (1, H, W) or (B, H, W)
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"{name} must be (H, W), (1, H, W), (B, H, W) or (B, 1, H, W); got {tuple(t.shape)}")
    if t.shape[0] not in (1, batch):
        raise ValueError(f"{name} has batch {t.shape[0]}, expected 1 or {batch}")
    if tuple(t.shape[-2:]) != (height, width):
        kwargs = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
        t = F.interpolate(t, size=(height, width), mode=mode, **kwargs)
    return t.expand(batch, -1, -1, -1).clamp(0, 1)


def depth_to_rgb(depth: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """``(B, 1, H, W)`` -> ``(B, channels, H, W)``: the depth repeated, as the reference's 3-channel depth JPEGs."""
    return depth.repeat(1, channels, 1, 1)


def mask_from_depth(depth: torch.Tensor, threshold: float = DEPTH_MASK_THRESHOLD) -> torch.Tensor | None:
    """Foreground mask from a fg depth map: per-sample min-max normalisation, then ``> threshold``.

    Rule: the fg depth is computed from the foreground photo on a black background, where the object is nearer
    (larger inverse depth) than the black surround, so the upper half of its normalised range is the object.
    ``depth`` ``(B, 1, H, W)`` -> float ``(B, 1, H, W)`` in {0, 1}; ``None`` when a map is constant (no mask can be
    derived; soft guidance is then off).
    """
    flat = depth.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    if bool((hi - lo <= 1e-6).any()):
        logger.warning("fg depth is constant; cannot derive a mask, soft guidance disabled")
        return None
    norm = (depth - lo.view(-1, 1, 1, 1)) / (hi - lo).view(-1, 1, 1, 1)
    return (norm > threshold).float()


def to_embedding(x, batch: int, dim: int) -> torch.Tensor | None:
    """A precomputed CLIP embedding (``(E,)``, ``(1, E)`` or ``(B, E)`` array/tensor) -> ``(batch, E)`` float32.

    Returns ``None`` for images (they need the image encoder). ``x=None`` gives zeros (= the training dropout of a
    missing reference).
    """
    if x is None:
        return torch.zeros(batch, dim)
    if isinstance(x, (np.ndarray, torch.Tensor)) and not (isinstance(x, np.ndarray) and x.dtype == np.uint8):
        t = torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x).float()
        t = t.reshape(1, -1) if t.ndim == 1 else t.reshape(t.shape[0], -1)
        if t.shape[-1] != dim:
            raise ValueError(f"reference embedding has width {t.shape[-1]}, the global fuser expects {dim}")
        if t.shape[0] not in (1, batch):
            raise ValueError(f"reference embedding batch {t.shape[0]}, expected 1 or {batch}")
        return t.expand(batch, -1)
    return None
