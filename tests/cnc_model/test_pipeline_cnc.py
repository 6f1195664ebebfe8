"""CnCPipeline on tiny components: sizes, determinism, masks, lambda, CFG, save/load, compose."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cnc.tiny import TINY_IMAGE_EMBED_DIM
from cnc_model.attention import SoftGuidanceAttnProcessor
from cnc_model.compose import compose
from cnc_model.inputs import mask_from_depth
from cnc_model.pipeline_cnc import CnCPipeline
from cnc_model.testing.tiny import randomize_zero_convs, tiny_cnc_pipeline


@pytest.fixture(scope="module")
def pipe():
    p = tiny_cnc_pipeline()
    randomize_zero_convs(p.local_fuser)  # make depth conditioning visible
    return p


def _run(pipe, seed=0, **kw):
    args = dict(fg_depth=_depth(0), bg_depth=_depth(1), num_inference_steps=2, height=64, width=96, output_type="np",
                generator=torch.Generator().manual_seed(seed))
    args.update(kw)
    return pipe("a lower tower", **args)


def _depth(seed, h=64, w=96):
    return np.random.default_rng(seed).random((h, w), dtype=np.float32)


def _photo(seed, h=64, w=64):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_output_size_pil_and_np(pipe):
    out = _run(pipe, output_type="pil")
    assert len(out.images) == 1 and out.images[0].size == (96, 64)
    arr = _run(pipe, height=72, width=56).images  # 9x7 latent: odd sizes
    assert arr.shape == (1, 72, 56, 3) and np.isfinite(arr).all() and 0 <= arr.min() and arr.max() <= 1


def test_deterministic_for_fixed_generator(pipe):
    a, b, c = _run(pipe, seed=3).images, _run(pipe, seed=3).images, _run(pipe, seed=4).images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def test_conditions_change_output(pipe):
    base = _run(pipe).images
    assert np.abs(base - _run(pipe, bg_depth=_depth(7)).images).max() > 1e-5
    emb = torch.randn(TINY_IMAGE_EMBED_DIM)
    assert np.abs(base - _run(pipe, fg_reference=emb).images).max() > 1e-5


def test_lambda_applies_without_cfg(pipe):
    """Reference defect #15: lambda was ignored at CFG 1; here it must act on every path."""
    kw = dict(guidance_scale=1.0, fg_reference=torch.randn(TINY_IMAGE_EMBED_DIM))
    assert np.abs(_run(pipe, fg_scale=1.0, **kw).images - _run(pipe, fg_scale=0.0, **kw).images).max() > 1e-5


def test_mask_default_rule_and_explicit_mask(pipe):
    depth = torch.zeros(1, 1, 8, 8)
    depth[..., 2:6, 2:6] = 1.0
    assert torch.equal(mask_from_depth(depth), depth)
    assert mask_from_depth(torch.ones(1, 1, 8, 8)) is None
    out = _run(pipe)
    assert out.masks.shape == (1, 1, 64, 96) and set(out.masks.unique().tolist()) <= {0.0, 1.0}
    explicit = np.zeros((32, 48), dtype=np.float32)  # any resolution; resized to the image
    explicit[8:24, 12:36] = 1
    masked = _run(pipe, mask=explicit)
    assert masked.masks.shape == (1, 1, 64, 96)
    assert np.abs(masked.images - out.images).max() > 1e-6
    assert _run(pipe, fg_depth=None, mask=None).masks is None  # no mask, no fg depth: plain attention


def test_batched_prompts_and_negative_prompt(pipe):
    out = pipe(["low", "lowest"], fg_depth=torch.rand(2, 1, 64, 64), bg_depth=_depth(0, 64, 64),
               negative_prompt=["er", "er"], num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 64, 64, 3)


def test_input_validation(pipe):
    with pytest.raises(ValueError, match="multiples of 8"):
        _run(pipe, height=60)
    with pytest.raises(ValueError, match="width"):
        _run(pipe, fg_reference=torch.randn(7))


def test_pil_references_need_image_encoder():
    p = tiny_cnc_pipeline(with_image_encoder=False)
    with pytest.raises(ValueError, match="image_encoder"):
        _run(p, fg_reference=_photo(0))


def test_pipeline_save_load_roundtrip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["local_fuser"] == ["cnc_model.models.local_fuser", "LocalFuser"]
    assert index["global_fuser"] == ["cnc_model.models.global_fuser", "GlobalFuser"]
    loaded = CnCPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert all(isinstance(p, SoftGuidanceAttnProcessor) for p in loaded.local_fuser.attn_processors.values())
    kw = dict(fg_reference=_photo(1), bg_reference=_photo(2))
    np.testing.assert_allclose(_run(loaded, **kw).images, _run(pipe, **kw).images, atol=1e-4)


def test_reinstalls_processors_if_replaced(pipe):
    ref = _run(pipe).images
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.unet.set_attn_processor(AttnProcessor2_0())  # what xformers / default-processor calls would do
    np.testing.assert_allclose(_run(pipe).images, ref, atol=1e-6)
    assert all(isinstance(p, SoftGuidanceAttnProcessor) for p in pipe.unet.attn_processors.values())


def test_compose_makes_the_builds_conditions(pipe):
    """compose() = the build's crop geometry + segment / depth / embed stages (triplets.conditions), then the pipeline
    on exactly those conditions."""
    from cnc.config import load_config
    from triplets.conditions import ConditionMaker, ConditionSettings
    from triplets.config import BuildConfig

    settings = ConditionSettings.from_build(load_config(BuildConfig, "build/tiny", ["resolution=64"]))
    maker = ConditionMaker(settings, device="cpu")
    fg, bg = np.asarray(_photo(0, 80, 120)), np.asarray(_photo(1, 50, 70))
    res = compose(pipe, fg, bg, "low", maker, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0))
    direct = maker(fg, bg, 64)
    assert res.images.shape == (1, 64, 64, 3) and res.mask.shape == (64, 64) and res.mask.dtype == np.uint8
    for name in ("mask", "fg_depth", "bg_depth", "fg_image", "fg_emb", "bg_emb"):
        np.testing.assert_array_equal(getattr(res.conditions, name), getattr(direct, name), err_msg=name)
    expected = pipe("low", fg_depth=direct.fg_depth_float(), bg_depth=direct.bg_depth_float(),
                    mask=direct.mask.astype(np.float32), fg_reference=direct.fg_emb, bg_reference=direct.bg_emb,
                    num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(res.images, expected)


def test_attention_fp32_logits_is_a_call_argument():
    """``attention_fp32_logits=True`` on one call = the pipeline set to fp32 logits; it changes a bf16 pipeline's
    images and is off again after the call (the run's setting stays the default)."""
    p = tiny_cnc_pipeline()
    randomize_zero_convs(p.local_fuser)
    p.to(dtype=torch.bfloat16)
    mask = np.ones((64, 96), np.float32)
    mask[:, :48] = 0
    emb = torch.randn(TINY_IMAGE_EMBED_DIM)
    kw = dict(mask=mask, fg_reference=emb, bg_reference=-emb)
    on = _run(p, attention_fp32_logits=True, **kw).images
    assert not p.attention_fp32_logits
    off = _run(p, **kw).images
    p.set_attention(fp32_logits=True)
    np.testing.assert_array_equal(_run(p, **kw).images, on)
    assert np.abs(on - off).max() > 0


def test_optional_fusers_sample_one_training_stage(tmp_path):
    """local_fuser=None == a fresh (zero-conv) local fuser; global_fuser=None == text-only context."""
    from cnc_model.testing.tiny import tiny_cnc_components

    full = CnCPipeline(**tiny_cnc_components())  # fresh local fuser: its residuals are exactly zero
    no_local = CnCPipeline(**{**tiny_cnc_components(), "local_fuser": None})
    emb = torch.randn(TINY_IMAGE_EMBED_DIM)
    kw = dict(fg_reference=emb, bg_reference=-emb, mask=np.ones((64, 96), np.float32))
    np.testing.assert_allclose(_run(no_local, **kw).images, _run(full, **kw).images, atol=1e-6)

    no_global = CnCPipeline(**{**tiny_cnc_components(), "global_fuser": None})
    text_only = _run(no_global).images
    assert text_only.shape == (1, 64, 96, 3) and np.isfinite(text_only).all()
    np.testing.assert_array_equal(text_only, _run(no_global, fg_reference=emb, fg_scale=2.0).images)
    assert np.abs(text_only - _run(full).images).max() > 1e-5  # the 8 reference tokens do matter with a fuser

    no_global.save_pretrained(tmp_path / "local-only")
    index = json.loads((tmp_path / "local-only" / "model_index.json").read_text())
    assert index["global_fuser"] == [None, None]
    reloaded = CnCPipeline.from_pretrained(tmp_path / "local-only")
    assert reloaded.global_fuser is None
    np.testing.assert_allclose(_run(reloaded).images, text_only, atol=1e-4)
