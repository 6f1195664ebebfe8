"""The inpaint stage (:mod:`triplets.stages.inpaint`): the batched path equals diffusers' per-image path and a row does
not depend on its neighbours (issue 15)."""

import numpy as np
import pytest
import torch

from cnc.tiny import synthetic_photo

R = 64


def _images(n: int, r: int = R) -> np.ndarray:
    return np.stack([synthetic_photo(i, r, r) for i in range(n)])


@pytest.fixture(scope="module")
def inpaint_stage():
    from cnc.hub import TINY, resolve_pretrained
    from triplets.stages.inpaint import InpaintStage

    return InpaintStage(resolve_pretrained(TINY, "inpaint.model"), num_inference_steps=2, device="cpu")


def _masks(n: int, r: int = R) -> np.ndarray:
    yy, xx = np.mgrid[0:r, 0:r]
    return np.stack([((yy - r / 2) ** 2 + (xx - r / 2 - i) ** 2 < (r / 5) ** 2).astype(np.uint8) for i in range(n)])


def test_inpaint_equals_per_image_path_and_ignores_neighbours(inpaint_stage):
    """Prompt embeddings once, one VAE call for the batch, tensor pre/post-processing: the backgrounds of the
    per-image-encoding path (within fp32 rounding), and a row alone gets what it gets within a batch."""
    images, masks, keys = _images(2), _masks(2), np.array(["a", "b"], dtype=object)
    got = inpaint_stage.process({"image": images, "mask": masks, "key": keys})[0]["background"]
    ref = _reference_inpaint(inpaint_stage, images, masks, keys)
    assert got.dtype == np.uint8 and got.shape == images.shape
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1  # fp32 rounding of the batched VAE encode at most
    assert np.mean(got != ref) < 0.01
    alone = inpaint_stage.process({"image": images[1:], "mask": masks[1:], "key": keys[1:]})[0]["background"]
    assert np.abs(got[1].astype(int) - alone[0].astype(int)).max() <= 1


def _reference_inpaint(stage, images, masks, keys):
    """The per-image-encoding path the stage replaced: PIL inputs, prompts as text, diffusers' own list handling."""
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from triplets.stages.inpaint import dilate_mask, sample_seed

    pipe = StableDiffusionInpaintPipeline(**stage.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    r = images.shape[1]
    dilated = np.stack([dilate_mask(m, stage.dilation_px, r) for m in masks])
    gens = [torch.Generator("cpu").manual_seed(sample_seed(stage.base_seed, k)) for k in keys]
    with torch.inference_mode():
        out = pipe(prompt=[stage.prompt] * len(keys), negative_prompt=[stage.negative_prompt] * len(keys),
                   image=[Image.fromarray(im) for im in images], mask_image=[Image.fromarray(d * 255) for d in dilated],
                   height=r, width=r, strength=stage.strength, guidance_scale=stage.guidance,
                   num_inference_steps=stage.steps, generator=gens, output_type="np").images
    bg = np.clip(np.round(np.asarray(out, np.float32) * 255), 0, 255).astype(np.uint8)
    return np.where(dilated[..., None] > 0, bg, images)


def test_channels_last_is_operational_and_within_rounding(inpaint_stage):
    """``channels_last`` stores the inpainting UNet NHWC (measured by benchmarks/gpu_check.sh); the backgrounds stay
    within float rounding of the default layout and the plan fingerprint is unchanged."""
    from cnc.config import load_config
    from cnc.hub import TINY, resolve_pretrained
    from pipelines.plan import fingerprint
    from triplets.builder import TripletBuilder
    from triplets.config import BuildConfig
    from triplets.stages.inpaint import InpaintStage

    nhwc = InpaintStage(resolve_pretrained(TINY, "inpaint.model"), num_inference_steps=2, device="cpu",
                        channels_last=True)
    assert nhwc.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    rows = {"image": _images(2), "mask": _masks(2), "key": np.array(["a", "b"], dtype=object)}
    a = inpaint_stage.process(rows)[0]["background"].astype(int)
    b = nhwc.process(rows)[0]["background"].astype(int)
    assert np.abs(a - b).max() <= 2
    off = load_config(BuildConfig, "configs/build/tiny.yaml", [])
    on = load_config(BuildConfig, "configs/build/tiny.yaml", ["channels_last=true"])
    assert fingerprint(on) == fingerprint(off)
    builder = TripletBuilder(on.model_copy(update={"device": "cpu", "quality": off.quality.model_copy(
        update={"enabled": False})}))
    assert builder.model_stages[1].pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
