"""``depth.preprocess: reference``: the reference's MiDaS input (RGB in [0, 1], no processor) and normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnc.tiny import synthetic_photo, tiny_dpt
from tests.support import DEPTH_MAX_ATOL, DEPTH_MEAN_ATOL
from triplets.config import BuildConfig
from triplets.stages.depth import DepthStage


def _images(n: int, r: int = 64) -> np.ndarray:
    return np.stack([synthetic_photo(i, r, r) for i in range(n)])


def _rows(n=2, r=48, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (n, r, r, 3), dtype=np.uint8)
    bg = rng.integers(0, 256, (n, r, r, 3), dtype=np.uint8)
    mask = np.zeros((n, r, r), np.uint8)
    mask[:, 8:30, 10:40] = 1
    return {"image": image, "mask": mask, "background": bg}


def _hand_reference(model, images: np.ndarray) -> np.ndarray:
    """get_primitives.py by hand: x = uint8 / 255 as (B, 3, H, W), MiDaS(x), per-image (batch 1) min-max to [0, 1].

    DPT-Large (patch 16) predicts at the input size; the tiny DPT (patch 8) at twice it, so its map is brought back
    to the image size first (bicubic, as the stage does for any model).
    """
    out = []
    for img in images:  # the reference ran batch 1, so its batch-global min/max is per image
        x = torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
        with torch.no_grad():
            d = model(pixel_values=x).predicted_depth
            d = torch.nn.functional.interpolate(d[:, None], size=img.shape[:2], mode="bicubic")[0, 0].double()
        d = d - d.min()
        out.append((d / d.max()).numpy())
    return np.stack(out)


def _tiny_dpt_path() -> str:
    from cnc.hub import resolve_pretrained

    return resolve_pretrained("tiny", "depth.model")


def test_reference_mode_equals_hand_computed_reference():
    rows = _rows()
    stage = DepthStage(_tiny_dpt_path(), device="cpu", dtype="float32", preprocess="reference")
    cols, failures = stage.process(rows)
    assert failures == {}
    model, _ = tiny_dpt(0)
    fg = rows["image"] * rows["mask"][..., None]
    for key, imgs in (("fg_depth", fg), ("bg_depth", rows["background"])):
        expected = _hand_reference(model, imgs)
        got = cols[key].astype(np.float64) / 65535.0
        np.testing.assert_allclose(got, expected, atol=1.0 / 65535 + 1e-6)
    # and it is not the processor path
    proc = DepthStage(_tiny_dpt_path(), device="cpu", dtype="float32").process(rows)[0]
    assert np.abs(proc["bg_depth"].astype(float) - cols["bg_depth"].astype(float)).mean() > 100


def test_reference_mode_config_and_bad_mode():
    assert BuildConfig().depth.preprocess == "processor"
    assert BuildConfig(depth={"preprocess": "reference"}).depth.preprocess == "reference"
    with pytest.raises(ValueError):
        BuildConfig(depth={"preprocess": "midas"})
    with pytest.raises(ValueError, match="unknown depth preprocess"):
        DepthStage(_tiny_dpt_path(), device="cpu", preprocess="midas")


def test_depth_bf16_within_tolerance():
    model, processor = tiny_dpt()
    pixels = processor(images=list(_images(4)), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        ref = model(pixel_values=pixels).predicted_depth.float()
        low = model.to(torch.bfloat16)(pixel_values=pixels.to(torch.bfloat16)).predicted_depth.float()

    def norm(x):
        lo, hi = x.amin((1, 2), keepdim=True), x.amax((1, 2), keepdim=True)
        return (x - lo) / (hi - lo)

    diff = (norm(low) - norm(ref)).abs()
    assert diff.mean() <= DEPTH_MEAN_ATOL and diff.max() <= DEPTH_MAX_ATOL, (diff.mean(), diff.max())
    assert diff.max() > 0
