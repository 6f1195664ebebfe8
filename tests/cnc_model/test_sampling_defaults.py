"""Reference sampling defaults: prompt suffix, negative prompt, depth strength, separate exemplars."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cnc_model.compose import compose
from cnc_model.pipeline_cnc import REFERENCE_NEGATIVE_PROMPT, REFERENCE_PROMPT_SUFFIX
from cnc_model.sources import sampling_prompts
from cnc_model.testing.tiny import randomize_zero_convs, tiny_cnc_pipeline


@pytest.fixture(scope="module")
def pipe():
    p = tiny_cnc_pipeline()
    randomize_zero_convs(p.local_fuser)
    return p


def _run(pipe, prompt="a lower tower", **kw):
    rng = np.random.default_rng(0)
    args = dict(fg_depth=rng.random((64, 64), dtype=np.float32), bg_depth=rng.random((64, 64), dtype=np.float32),
                num_inference_steps=2, height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return pipe(prompt, **args).images


def test_prompt_suffix_is_appended_to_the_prompt_only(pipe):
    suffixed = _run(pipe, prompt_suffix=", lowest", negative_prompt="newer")
    np.testing.assert_array_equal(suffixed, _run(pipe, prompt="a lower tower, lowest", negative_prompt="newer"))
    assert np.abs(suffixed - _run(pipe, negative_prompt="newer")).max() > 1e-6


def test_depth_strength_scales_each_map(pipe):
    rng = np.random.default_rng(0)
    fg, bg = rng.random((64, 64), dtype=np.float32), rng.random((64, 64), dtype=np.float32)
    mask = np.ones((64, 64), np.float32)  # explicit: the mask does not depend on the scaled depth
    zero = _run(pipe, fg_depth=np.zeros_like(fg), bg_depth=bg * 0.5, mask=mask)
    np.testing.assert_allclose(_run(pipe, fg_depth=fg, bg_depth=bg, mask=mask, fg_depth_scale=0.0, bg_depth_scale=0.5),
                               zero, atol=1e-6)
    assert np.abs(_run(pipe, fg_depth=fg, bg_depth=bg, mask=mask) - zero).max() > 1e-6


def test_reference_prompt_defaults_are_switchable():
    assert sampling_prompts(None, None, True) == (REFERENCE_NEGATIVE_PROMPT, REFERENCE_PROMPT_SUFFIX)
    assert sampling_prompts(None, None, False) == ("", "")
    assert sampling_prompts("blurry", None, True) == ("blurry", REFERENCE_PROMPT_SUFFIX)
    assert REFERENCE_NEGATIVE_PROMPT.startswith("longbody, lowres") and "masterpiece" in REFERENCE_PROMPT_SUFFIX


def test_compose_takes_separate_fg_and_bg_exemplars(pipe):
    from cnc.config import load_config
    from triplets.conditions import ConditionMaker, ConditionSettings
    from triplets.config import BuildConfig

    rng = np.random.default_rng(3)
    photo = lambda: Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))  # noqa: E731
    fg, bg, other = photo(), photo(), photo()
    maker = ConditionMaker(ConditionSettings.from_build(load_config(BuildConfig, "build/tiny", ["resolution=64"])),
                           device="cpu")
    kw = dict(num_inference_steps=2, output_type="np")
    same = compose(pipe, fg, bg, "low", maker, generator=torch.Generator().manual_seed(0), **kw).images
    explicit = compose(pipe, fg, bg, "low", maker, fg_reference=fg, bg_reference=bg,
                       generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_array_equal(same, explicit)  # default exemplars = the two photos
    swapped = compose(pipe, fg, bg, "low", maker, fg_reference=other, generator=torch.Generator().manual_seed(0),
                      **kw)
    assert np.abs(same - swapped.images).max() > 1e-6  # appearance from another image, depth unchanged
    direct = maker(fg, bg, 64)
    np.testing.assert_array_equal(swapped.conditions.fg_depth, direct.fg_depth)
    assert not np.array_equal(swapped.conditions.fg_emb, direct.fg_emb)
