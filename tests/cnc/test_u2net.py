"""The U²-Net network (:mod:`cnc.u2net`): the released architectures' sizes and parameter names, any input size,
outputs in [0, 1]."""

from __future__ import annotations

import torch

from cnc.u2net import U2NET_FULL, U2NET_SMALL, U2NET_TINY, U2Net, config_from_state_dict


def test_released_architectures_sizes_and_key_names():
    full = U2Net(**U2NET_FULL)
    assert sum(p.numel() for p in full.parameters()) == 44_009_869  # u2net.pth (176 MB)
    assert sum(p.numel() for p in U2Net(**U2NET_SMALL).parameters()) == 1_131_181  # u2netp.pth (4.7 MB)
    sd = full.state_dict()
    for key, shape in {"stage1.rebnconvin.conv_s1.weight": (64, 3, 3, 3), "stage1.rebnconv7.conv_s1.weight":
                       (32, 32, 3, 3), "stage5.rebnconv4.bn_s1.running_mean": (256,),
                       "stage5d.rebnconvin.conv_s1.weight": (512, 1024, 3, 3),
                       "stage1d.rebnconv1d.conv_s1.weight": (64, 32, 3, 3), "side6.weight": (1, 512, 3, 3),
                       "outconv.weight": (1, 6, 1, 1)}.items():
        assert tuple(sd[key].shape) == shape, key
    assert config_from_state_dict(sd)["widths"] == U2NET_FULL["widths"]
    assert full.stage5.rebnconv4.conv_s1.dilation == (8, 8) and full.stage1.rebnconv7.conv_s1.dilation == (2, 2)


def test_tiny_shapes_any_size_and_ranges():
    net = U2Net(**U2NET_TINY).eval()
    with torch.no_grad():
        outs = net(torch.rand(2, 3, 50, 70))
    assert len(outs) == 7 and all(o.shape == (2, 1, 50, 70) for o in outs)
    assert all(float(o.min()) >= 0 and float(o.max()) <= 1 for o in outs)
