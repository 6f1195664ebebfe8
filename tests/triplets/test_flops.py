"""``triplets.flops``: a triplet's FLOPs are the sum of counted model calls, the list of calls is what the builder
really runs (checked against a counted end-to-end run of the tiny builder), and the real-size table of the docs."""

import numpy as np
import pytest

from cnc.config import load_config
from cnc.flops import FlopCounting
from cnc.tiny import synthetic_photo
from tests.support import TINY_CONFIG
from triplets.batch import ensure_status
from triplets.config import BuildConfig
from triplets.flops import models_of_builder, published_models, triplet_flops, unet_evaluations

R = 64


def _batch(n: int) -> dict:
    keys = np.array([f"k{i}" for i in range(n)], dtype=object)
    return ensure_status({"key": keys, "source": keys.copy(), "caption": np.array([""] * n, dtype=object),
                          "image": np.stack([synthetic_photo(i, R, R) for i in range(n)]),
                          "has_dataset_mask": np.zeros(n, bool), "dataset_mask": np.zeros((n, R, R), np.uint8)})


@pytest.mark.parametrize("overrides", [[], ["segment.backend=dataset", "quality.enabled=false", "latents.enabled=true",
                                            "inpaint.guidance_scale=1.0"]])
def test_table_equals_a_counted_run_of_the_builder(overrides, one_torch_thread):
    """Every stage of the tiny builder, run for real on the CPU under FlopCounterMode, costs per triplet what the table
    says (the SAM decoder's dense positional encoding is counted once per batch there, not per image: < 1e-4)."""
    from triplets.builder import TripletBuilder

    cfg = load_config(BuildConfig, TINY_CONFIG, [f"resolution={R}", "min_side=32", "inpaint.num_inference_steps=2",
                                                 "device=cpu", *overrides])
    builder = TripletBuilder(cfg)
    builder.model_stages[1].prompt_embeddings()  # once per stage, not per triplet
    n = 2
    batch = _batch(n)
    if cfg.segment.backend == "dataset":
        batch["has_dataset_mask"][:] = True
        batch["dataset_mask"][:, 16:40, 20:44] = 1
    counted = {}
    for stage in builder.model_stages:
        with FlopCounting() as c:
            batch = stage(batch)
        counted[stage.name] = c.total / n
    assert list(batch["error"]) == [""] * n  # every row went through every stage
    table = triplet_flops(cfg, models_of_builder(builder))
    assert table.total == pytest.approx(sum(r.flop_per_call * r.calls_per_triplet for r in table.rows))
    assert table.total == pytest.approx(sum(table.by_stage().values()))
    expected = table.by_stage()
    assert set(expected) == {s for s, v in counted.items() if v}
    for stage, flops in counted.items():
        if stage == "segment":
            assert flops == pytest.approx(expected.get(stage, 0), rel=1e-4)
        else:
            assert flops == expected.get(stage, 0), stage
    unet = next(r for r in table.rows if r.model.startswith("UNet"))
    assert unet.calls_per_triplet == (2 + 1) * (2 if cfg.inpaint.guidance_scale > 1 else 1)  # PNDM: steps + 1


def test_unet_evaluations_follow_the_pipeline_schedule():
    from cnc.tiny import tiny_scheduler

    pndm = tiny_scheduler("pndm")
    assert unet_evaluations(pndm, 25, 1.0) == 26
    assert unet_evaluations(pndm, 25, 0.5) < 26
    assert unet_evaluations(tiny_scheduler("ddim"), 25, 1.0) == 25


def test_real_size_table_at_the_shipped_settings():
    """The docs' table (published architectures on the meta device): SD-inpainting UNet 0.803 TFLOP per sample at
    64² latents with attention, 26 × 2 evaluations at 25 PNDM steps; DPT-Large at 384², CLIP at 224² whatever the
    resolution; the total is the sum of the rows."""
    cfg = load_config(BuildConfig, TINY_CONFIG.parent / "default.yaml", [])
    table = triplet_flops(cfg, published_models(cfg))
    rows = {r.model.split(" (")[0]: r for r in table.rows if r.stage != "quality"}
    assert rows["UNet"].calls_per_triplet == 52 and rows["UNet"].flop_per_call == pytest.approx(0.8034e12, rel=1e-3)
    assert rows["DPT"].input == "1×3×384×384" and rows["CLIP vision"].input == "1×3×224×224"
    assert rows["SAM image encoder"].flop_per_call == pytest.approx(5.96e12, rel=1e-2)
    assert table.total == pytest.approx(sum(r.flop_per_triplet for r in table.rows))
    # quality v2 adds only CLIP on two crops: D(I) comes from the sam prior's DPT pass (the same model and input)
    assert 53e12 < table.total - table.by_stage()["quality"] < 53.3e12 and 0.3e12 < table.by_stage()["quality"] < 0.4e12
    big = triplet_flops(cfg.model_copy(update={"resolution": 768}), published_models(cfg))
    by_model = {(r.stage, r.model.split(" (")[0]): r for r in big.rows}
    assert by_model[("depth", "DPT")].flop_per_call == rows["DPT"].flop_per_call  # fixed input sizes do not scale
    assert by_model[("embed", "CLIP vision")].flop_per_call == rows["CLIP vision"].flop_per_call
    assert by_model[("inpaint", "UNet")].flop_per_call > 2 * rows["UNet"].flop_per_call
