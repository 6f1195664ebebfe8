"""U²-Net salient-object segmenter (``segment.backend: u2net``), as the reference made Pick-a-Pic masks.

The network (:mod:`cnc.u2net`, below the model hub so the tiny store can write its seeded tiny weights) is the
standard U²-Net with configurable widths; parameter names follow the released ``u2net.pth`` / ``u2netp.pth`` so those
files load as they are. Widths are read from the checkpoint, so the full model (44.0M parameters), the small
``u2netp`` (1.1M) and the tiny test variant all load through :func:`load_u2net`.

Pre- and post-processing follow the reference (``utils/primitives.py::GetSODMask``,
``data/get_mask_pickapic.py``): the image at build resolution as RGB in [0, 1] (no ImageNet mean/std), bilinearly
resized to 320x320 (antialias off); the fused output (sigmoid) is clamped to [0, 1] and thresholded at ``> 0.5``
(no min-max of the prediction); the binary map is resized back bilinearly. The reference saved that soft-edged map;
this project keeps masks binary, so the resized map is thresholded again at 0.5 (the bilinear midpoint).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cnc.hub import TINY
from cnc.u2net import U2NET_FULL, U2NET_SMALL, U2NET_TINY, U2Net, config_from_state_dict
from triplets.stages.base import resolve_device, resolve_dtype
from triplets.stages.segment import register_segmenter

log = logging.getLogger(__name__)

#: Input side of the reference (``GetSODMask``).
U2NET_INPUT_SIZE = 320
def load_u2net(checkpoint: str | Path, config_key: str = "segment.u2net_checkpoint") -> U2Net:
    """Build a U²-Net from a ``.pth`` state dict (``torch.load(weights_only=True)``; a ``module.`` prefix from
    DataParallel is stripped; the widths are read from the weights). Returned in eval mode. (The config value
    ``tiny`` resolves to a seeded tiny checkpoint file in the cnc cache before this is called.)

    Raises:
        ValueError: the file is not a U²-Net state dict (message names the file and ``config_key``).
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        net = U2Net(**config_from_state_dict(state))
        net.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"{checkpoint} (config key {config_key}) is not a U²-Net checkpoint: "
                         f"{str(err).splitlines()[0]}") from None
    return net.eval()


def u2net_preprocess(images: np.ndarray, size: int = U2NET_INPUT_SIZE) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 -> ``(N, 3, size, size)`` float in [0, 1]: bilinear, antialias off, no mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def u2net_postprocess(pred: torch.Tensor, out_hw: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """Fused map ``(N, 1, h, w)`` -> binary masks ``(N, H, W)`` uint8 {0, 1}.

    clamp to [0, 1], ``> threshold`` (no min-max), bilinear resize to ``out_hw`` (reference), ``>= 0.5`` (binary).
    """
    binary = (pred.float().clamp(0, 1) > threshold).float()
    if tuple(binary.shape[-2:]) != tuple(out_hw):
        binary = F.interpolate(binary, size=tuple(out_hw), mode="bilinear", align_corners=False)
    return (binary[:, 0] >= 0.5).cpu().numpy().astype(np.uint8)


@register_segmenter("u2net")
class U2NetSegmenter:
    """``segment.backend: u2net``: U²-Net on the whole image with the reference's pre/post-processing."""

    def __init__(self, u2net_checkpoint: str = TINY, u2net_threshold: float = 0.5, device: str = "auto",
                 dtype: str = "auto", seed: int = 0, **_: object):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        torch.manual_seed(seed)
        self.net = load_u2net(u2net_checkpoint).to(self.device, self.dtype)
        self.threshold = u2net_threshold
        log.info("u2net segmenter: %s (%.2fM parameters)", u2net_checkpoint,
                 sum(p.numel() for p in self.net.parameters()) / 1e6)

    def __call__(self, rows: dict) -> tuple[np.ndarray, list[str]]:
        images = rows["image"]
        x = u2net_preprocess(images).to(self.device, self.dtype)
        with torch.inference_mode():
            fused = self.net(x)[0]
        return u2net_postprocess(fused, images.shape[1:3], self.threshold), ["u2net"] * len(images)


__all__ = ["U2NET_FULL", "U2NET_INPUT_SIZE", "U2NET_SMALL", "U2NET_TINY", "U2Net", "U2NetSegmenter",
           "config_from_state_dict", "load_u2net", "u2net_postprocess", "u2net_preprocess"]
