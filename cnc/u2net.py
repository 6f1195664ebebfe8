"""The U²-Net network (Qin et al., 2020): nested residual U-blocks RSU-7/6/5/4/4F, six side outputs fused by a 1x1
conv, with configurable widths. Parameter and class names follow the released ``u2net.pth`` / ``u2netp.pth``, so those
files load as they are (:func:`triplets.stages.u2net.load_u2net`, the ``u2net`` segment backend).

It lives below :mod:`cnc.hub` because :mod:`cnc.tiny_store` writes the seeded tiny U²-Net weights the ``tiny`` model
value resolves to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Encoder widths (stage1..stage5/6), encoder mid widths, decoder mid widths (stage1d..stage5d) of the released nets.
U2NET_FULL = dict(widths=(64, 128, 256, 512, 512), mids=(32, 32, 64, 128, 256), dec_mids=(16, 32, 64, 128, 256))
U2NET_SMALL = dict(widths=(64,) * 5, mids=(16,) * 5, dec_mids=(16,) * 5)  # u2netp
U2NET_TINY = dict(widths=(8,) * 5, mids=(4,) * 5, dec_mids=(4,) * 5)


class REBNCONV(nn.Module):  # the released checkpoints' class and attribute names
    """3x3 conv (dilation ``d``, same padding) + BatchNorm + ReLU: ``(B, cin, H, W) -> (B, cout, H, W)``."""

    def __init__(self, cin: int, cout: int, dilation: int = 1):
        super().__init__()
        self.conv_s1 = nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation)
        self.bn_s1 = nn.BatchNorm2d(cout)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)


class RSU(nn.Module):
    """Residual U-block of height ``depth`` (RSU-7 ... RSU-4): ``(B, cin, H, W) -> (B, cout, H, W)``.

    ``rebnconvin`` maps to ``cout``; an encoder of ``depth - 1`` REBNCONVs (max-pool 2, ceil mode, between them), a
    dilation-2 bottom conv, a decoder of REBNCONVs on ``[upsampled, skip]``; output = decoder + ``rebnconvin``.
    """

    def __init__(self, depth: int, cin: int, mid: int, cout: int):
        super().__init__()
        self.depth = depth
        self.rebnconvin = REBNCONV(cin, cout)
        self.rebnconv1 = REBNCONV(cout, mid)
        for i in range(2, depth):
            setattr(self, f"rebnconv{i}", REBNCONV(mid, mid))
        setattr(self, f"rebnconv{depth}", REBNCONV(mid, mid, dilation=2))
        for i in range(depth - 1, 1, -1):
            setattr(self, f"rebnconv{i}d", REBNCONV(2 * mid, mid))
        self.rebnconv1d = REBNCONV(2 * mid, cout)
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        skips, hx = [], hxin
        for i in range(1, self.depth):
            hx = getattr(self, f"rebnconv{i}")(hx)
            skips.append(hx)
            if i < self.depth - 1:
                hx = self.pool(hx)
        hx = getattr(self, f"rebnconv{self.depth}")(hx)
        for i in range(self.depth - 1, 0, -1):
            skip = skips[i - 1]
            hx = getattr(self, f"rebnconv{i}d")(torch.cat([_up(hx, skip), skip], 1))
        return hx + hxin


class RSU4F(nn.Module):
    """Dilated residual U-block (no pooling; dilations 1, 2, 4, 8): ``(B, cin, H, W) -> (B, cout, H, W)``."""

    def __init__(self, cin: int, mid: int, cout: int):
        super().__init__()
        self.rebnconvin = REBNCONV(cin, cout)
        self.rebnconv1 = REBNCONV(cout, mid)
        self.rebnconv2 = REBNCONV(mid, mid, dilation=2)
        self.rebnconv3 = REBNCONV(mid, mid, dilation=4)
        self.rebnconv4 = REBNCONV(mid, mid, dilation=8)
        self.rebnconv3d = REBNCONV(2 * mid, mid, dilation=4)
        self.rebnconv2d = REBNCONV(2 * mid, mid, dilation=2)
        self.rebnconv1d = REBNCONV(2 * mid, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        hx1 = self.rebnconv1(hxin)
        hx2 = self.rebnconv2(hx1)
        hx3 = self.rebnconv3(hx2)
        hx4 = self.rebnconv4(hx3)
        hx3d = self.rebnconv3d(torch.cat([hx4, hx3], 1))
        hx2d = self.rebnconv2d(torch.cat([hx3d, hx2], 1))
        return self.rebnconv1d(torch.cat([hx2d, hx1], 1)) + hxin


class U2Net(nn.Module):
    """U²-Net: six encoder stages, five decoder stages, six side outputs and their 1x1 fusion.

    Args:
        in_ch, out_ch: image and mask channels (3, 1).
        widths: output channels of encoder stages 1-5 (stage 6 = stage 5); decoder stage k outputs
            ``widths[k-2]`` (stage 1d: ``widths[0]``).
        mids: inner widths of encoder stages 1-5 (stage 6 = stage 5).
        dec_mids: inner widths of decoder stages 1d-5d.

    Input ``(B, in_ch, H, W)`` (any size; the reference uses 320x320, RGB in [0, 1]). Output: 7 maps
    ``(B, out_ch, H, W)`` in [0, 1] (sigmoid): the fused map first, then the side outputs d1..d6.
    """

    def __init__(self, in_ch: int = 3, out_ch: int = 1, widths=U2NET_FULL["widths"], mids=U2NET_FULL["mids"],
                 dec_mids=U2NET_FULL["dec_mids"]):
        super().__init__()
        w, m, dm = tuple(widths), tuple(mids), tuple(dec_mids)
        if not len(w) == len(m) == len(dm) == 5:
            raise ValueError("U2Net widths, mids and dec_mids need 5 entries each")
        self.config = {"in_ch": in_ch, "out_ch": out_ch, "widths": w, "mids": m, "dec_mids": dm}
        self.stage1 = RSU(7, in_ch, m[0], w[0])
        self.stage2 = RSU(6, w[0], m[1], w[1])
        self.stage3 = RSU(5, w[1], m[2], w[2])
        self.stage4 = RSU(4, w[2], m[3], w[3])
        self.stage5 = RSU4F(w[3], m[4], w[4])
        self.stage6 = RSU4F(w[4], m[4], w[4])
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.stage5d = RSU4F(2 * w[4], dm[4], w[3])
        self.stage4d = RSU(4, 2 * w[3], dm[3], w[2])
        self.stage3d = RSU(5, 2 * w[2], dm[2], w[1])
        self.stage2d = RSU(6, 2 * w[1], dm[1], w[0])
        self.stage1d = RSU(7, 2 * w[0], dm[0], w[0])
        side_in = (w[0], w[0], w[1], w[2], w[3], w[4])
        for i, c in enumerate(side_in, 1):
            setattr(self, f"side{i}", nn.Conv2d(c, out_ch, 3, padding=1))
        self.outconv = nn.Conv2d(6 * out_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hx1 = self.stage1(x)
        hx2 = self.stage2(self.pool(hx1))
        hx3 = self.stage3(self.pool(hx2))
        hx4 = self.stage4(self.pool(hx3))
        hx5 = self.stage5(self.pool(hx4))
        hx6 = self.stage6(self.pool(hx5))
        hx5d = self.stage5d(torch.cat([_up(hx6, hx5), hx5], 1))
        hx4d = self.stage4d(torch.cat([_up(hx5d, hx4), hx4], 1))
        hx3d = self.stage3d(torch.cat([_up(hx4d, hx3), hx3], 1))
        hx2d = self.stage2d(torch.cat([_up(hx3d, hx2), hx2], 1))
        hx1d = self.stage1d(torch.cat([_up(hx2d, hx1), hx1], 1))
        d1 = self.side1(hx1d)
        sides = [d1] + [_up(getattr(self, f"side{i}")(h), d1)
                        for i, h in zip(range(2, 7), (hx2d, hx3d, hx4d, hx5d, hx6))]
        fused = self.outconv(torch.cat(sides, 1))
        return tuple(torch.sigmoid(d) for d in (fused, *sides))


def config_from_state_dict(state: dict) -> dict:
    """``U2Net`` keyword arguments read from a checkpoint's conv shapes (u2net, u2netp, tiny, ...)."""
    try:
        widths = tuple(int(state[f"stage{i}.rebnconvin.conv_s1.weight"].shape[0]) for i in range(1, 6))
        mids = tuple(int(state[f"stage{i}.rebnconv1.conv_s1.weight"].shape[0]) for i in range(1, 6))
        dec = tuple(int(state[f"stage{i}d.rebnconv1.conv_s1.weight"].shape[0]) for i in range(1, 6))
        in_ch = int(state["stage1.rebnconvin.conv_s1.weight"].shape[1])
        out_ch = int(state["outconv.weight"].shape[0])
    except KeyError as err:
        raise ValueError(f"not a U²-Net state dict: missing {err.args[0]}") from None
    return {"in_ch": in_ch, "out_ch": out_ch, "widths": widths, "mids": mids, "dec_mids": dec}
