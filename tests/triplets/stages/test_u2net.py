"""U²-Net segmenter (``segment.backend: u2net``): architecture, safe loading, reference pre/post-processing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.support import REPO
from triplets.stages import SEGMENTERS, SegmentStage
from triplets.stages.u2net import (
    U2NET_TINY,
    U2Net,
    load_u2net,
    u2net_postprocess,
    u2net_preprocess,
)


def test_load_weights_only_with_widths_from_the_file(tmp_path):
    torch.manual_seed(0)
    net = U2Net(**U2NET_TINY)
    path = tmp_path / "u2net_tiny.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)  # DataParallel-style prefix
    loaded = load_u2net(path)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], net.eval()(x)[0], rtol=0, atol=0)
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=r"bad\.pth \(config key segment\.u2net_checkpoint\) is not a U²-Net"):
        load_u2net(bad)
    unsafe = tmp_path / "unsafe.pth"
    torch.save(net, unsafe)  # a pickled module: refused by weights_only=True
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_u2net(unsafe)


def test_preprocess_is_plain_0_1_at_320_without_mean_std():
    imgs = np.zeros((2, 64, 64, 3), np.uint8)
    imgs[0] = 255
    imgs[1, :, :32] = 255
    x = u2net_preprocess(imgs)
    assert x.shape == (2, 3, 320, 320) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones_like(x[0]), atol=1e-6)  # bilinear weights may round in the last bit
    assert torch.allclose(x[1, :, :, :150], torch.tensor(1.0), atol=1e-6)  # bilinear, no antialias
    assert torch.all(x[1, :, :, 170:] == 0.0)


def test_postprocess_strict_threshold_clamp_and_binary_resize():
    pred = torch.full((1, 1, 4, 4), 0.5)
    pred[0, 0, :, 2:] = 0.51
    pred[0, 0, 0, 0] = 1.7  # clamped, still foreground
    masks = u2net_postprocess(pred, (8, 8))
    assert masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    expected = np.zeros((8, 8), np.uint8)
    expected[:, 4:] = 1  # 0.5 is not > 0.5; the right half is
    expected[:2, :2] = 1  # the clamped pixel, upsampled bilinearly and cut at 0.5
    np.testing.assert_array_equal(masks[0], expected)


def test_segment_stage_with_u2net_backend(tmp_path):
    assert "u2net" in SEGMENTERS
    torch.manual_seed(1)
    path = tmp_path / "u2net.pth"
    torch.save(U2Net(**U2NET_TINY).state_dict(), path)
    stage = SegmentStage("u2net", min_area=0.0, max_area=1.0, u2net_checkpoint=str(path), device="cpu",
                         dtype="float32")
    images = np.random.default_rng(0).integers(0, 256, (1, 48, 48, 3), dtype=np.uint8)
    cols, failures = stage.process({"image": images})
    assert failures == {} and cols["mask"].shape == (1, 48, 48) and list(cols["mask_source"]) == ["u2net"]
    net = load_u2net(path)
    with torch.no_grad():
        fused = net(u2net_preprocess(images))[0]
    np.testing.assert_array_equal(cols["mask"], u2net_postprocess(fused, (48, 48)))


def test_build_cli_missing_u2net_weights_fails_in_one_line(tmp_path):
    (tmp_path / "in").mkdir()
    proc = subprocess.run([sys.executable, "-m", "cnc.cli", "build", "--config", "configs/build/tiny.yaml",
                           "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                           "--set", "segment.backend=u2net", "--set", f"segment.u2net_checkpoint={tmp_path}/no.pth"],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "segment.u2net_checkpoint" in proc.stderr
