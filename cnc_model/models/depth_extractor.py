"""Two-stream depth feature extractor of the CnC local fuser (reference ``FeatureExtractor``).

Parameter names follow the reference (``fg_extractor.{0,2,4,6}``, ``bg_extractor.*``, ``extractors.i.0``,
``zero_convs.i``) so the released ``local_adapter.feature_extractor.*`` weights load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn

#: Injected channel counts of the reference (SD 1.5, block_out_channels (320, 640, 1280, 1280)).
REFERENCE_INJECT_CHANNELS = (192, 256, 384, 512)


def default_inject_channels(block_out_channels: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Injected channels per encoder level, derived from the UNet's ``block_out_channels``.

    SD 1.5 ``(320, 640, 1280, 1280)`` gives the reference ``(192, 256, 384, 512)``. Other UNets scale the reference
    values by ``block_out_channels[0] / 320`` rounded to a multiple of 8 (at least 8); levels beyond the fourth
    reuse 512.
    """
    scale = block_out_channels[0] / 320
    ref = [REFERENCE_INJECT_CHANNELS[min(i, 3)] for i in range(len(block_out_channels))]
    return tuple(max(8, int(round(c * scale / 8)) * 8) for c in ref)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _stem(in_channels: int) -> nn.Sequential:
    """3->32 (s1), 32->64 (s2), 64->64 (s1), 64->64 (s2), each 3x3 conv + SiLU: ``(B,3,H,W) -> (B,64,H/4,W/4)``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.SiLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.SiLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
        nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.SiLU(),
    )


class DepthFeatureExtractor(nn.Module):
    """fg and bg depth stems (no weight sharing), concatenated, then one stride-2 stage per encoder level.

    Args:
        in_channels: channels of each depth map (3: the depth repeated to RGB, like the reference).
        inject_channels: output channels per level, e.g. ``(192, 256, 384, 512)``.

    Input: ``fg_depth``, ``bg_depth`` ``(B, in_channels, H, W)`` in [0, 1] at image resolution.
    Output: one feature map per level, ``(B, inject_channels[i], ceil(H / 2**(i+3)), ceil(W / 2**(i+3)))``; each
    passes a zero-initialised 3x3 conv, so a fresh extractor outputs zeros.
    """

    def __init__(self, in_channels: int = 3, inject_channels: tuple[int, ...] = REFERENCE_INJECT_CHANNELS) -> None:
        super().__init__()
        self.fg_extractor = _stem(in_channels)
        self.bg_extractor = _stem(in_channels)
        chans = [128, *inject_channels]
        self.extractors = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, stride=2), nn.SiLU())
            for i in range(len(inject_channels))
        )
        self.zero_convs = nn.ModuleList(_zero(nn.Conv2d(c, c, 3, padding=1)) for c in inject_channels)

    def forward(self, fg_depth: torch.Tensor, bg_depth: torch.Tensor) -> list[torch.Tensor]:
        """See the class docstring for shapes."""
        features = torch.cat([self.fg_extractor(fg_depth), self.bg_extractor(bg_depth)], dim=1)  # (B, 128, H/4, W/4)
        outputs = []
        for extractor, zero_conv in zip(self.extractors, self.zero_convs):
            features = extractor(features)
            outputs.append(zero_conv(features))
        return outputs
