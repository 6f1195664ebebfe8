"""The four triplet stages with tiny seeded models: shapes, dtypes, determinism, masks, failure reasons."""

import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cnc.config import load_config
from cnc.hub import resolve_pretrained
from cnc.tiny import synthetic_photo
from triplets.builder import TripletBuilder
from triplets.config import BuildConfig
from triplets.errors import ModelUnavailableError
from triplets.readers import read_items
from triplets.stages import SegmentStage
from triplets.stages.inpaint import dilate_mask, sample_seed

R = 64
FAST = [f"resolution={R}", "min_side=32", "inpaint.num_inference_steps=2", "batch_size=4"]


def _photo(seed: int, w=96, h=80) -> np.ndarray:
    return synthetic_photo(seed, h, w)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    for i in range(4):
        Image.fromarray(_photo(i)).save(d / f"p{i}.jpg", quality=92)
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("not an image")
    good = io.BytesIO()
    Image.fromarray(_photo(9)).save(good, "JPEG")
    (d / "truncated.jpg").write_bytes(good.getvalue()[:300])
    (d / "captions.jsonl").write_text("".join(f'{{"key": "p{i}", "caption": "photo {i}"}}\n' for i in range(4)))
    return d


@pytest.fixture(scope="module")
def cfg():
    return load_config(BuildConfig, "configs/build/tiny.yaml", FAST)


@pytest.fixture(scope="module")
def builder(cfg):
    return TripletBuilder(cfg)


@pytest.fixture(scope="module")
def built(builder, photo_dir):
    items = read_items(str(photo_dir))
    return items, builder.run_batch(items), builder(items)


def test_columns_shapes_dtypes_and_ranges(built):
    items, batch, _ = built
    n = len(items)
    assert batch["image"].shape == (n, R, R, 3) and batch["image"].dtype == np.uint8
    assert batch["mask"].shape == (n, R, R) and batch["mask"].dtype == np.uint8
    assert batch["background"].shape == (n, R, R, 3) and batch["background"].dtype == np.uint8
    for col in ("fg_depth", "bg_depth"):
        assert batch[col].shape == (n, R, R) and batch[col].dtype == np.uint16
    assert batch["fg_emb"].shape == (n, 32) and batch["fg_emb"].dtype == np.float32
    ok = [i for i, e in enumerate(batch["error"]) if e == ""]
    assert len(ok) == 4
    for i in ok:
        assert set(np.unique(batch["mask"][i])) <= {0, 1}
        assert 0.01 <= batch["mask_area"][i] <= 0.95
        assert batch["fg_depth"][i].max() == 65535 and batch["fg_depth"][i].min() == 0
        lo, hi = batch["fg_depth_range"][i]
        assert hi > lo
        assert np.isfinite(batch["fg_emb"][i]).all() and not np.allclose(batch["fg_emb"][i], batch["bg_emb"][i])


def test_bad_inputs_get_reasons_and_good_ones_are_unaffected(built, builder):
    items, batch, (samples, failures) = built
    reasons = {f["key"]: (f["stage"], f["reason"]) for f in failures}
    assert reasons["zero"] == ("decode", "empty file (0 bytes)")
    assert reasons["text"][1].startswith("not an image")
    assert "truncated" in reasons["truncated"][1] or "corrupt" in reasons["truncated"][1]
    assert sorted(s.key for s in samples) == ["p0", "p1", "p2", "p3"]
    # each good sample is identical when built alone (no influence of bad neighbours)
    alone, _ = builder([it for it in items if it["key"] == "p1"])
    p1 = next(s for s in samples if s.key == "p1")
    assert np.array_equal(alone[0].mask, p1.mask)
    assert np.abs(alone[0].background.astype(int) - p1.background.astype(int)).max() <= 2
    assert np.array_equal(alone[0].fg_depth, p1.fg_depth) or \
        np.abs(alone[0].fg_depth.astype(int) - p1.fg_depth.astype(int)).max() <= 64


def test_inpainting_is_deterministic_per_key_and_seed(built, builder, cfg):
    items, batch, _ = built
    again = builder.run_batch(items)
    assert np.array_equal(again["background"], batch["background"])
    assert np.array_equal(again["seed"], batch["seed"])
    i = items.index(next(it for it in items if it["key"] == "p0"))
    assert batch["seed"][i] == sample_seed(cfg.seed, "p0") and sample_seed(1, "p0") != sample_seed(0, "p0")
    other = TripletBuilder(load_config(BuildConfig, "configs/build/tiny.yaml", FAST + ["seed=7"]))
    assert not np.array_equal(other.run_batch(items)["background"][i], batch["background"][i])


def test_paste_back_keeps_pixels_outside_the_dilated_mask(built):
    items, batch, _ = built
    for i, e in enumerate(batch["error"]):
        if e:
            continue
        keep = dilate_mask(batch["mask"][i], 50, R) == 0
        assert np.array_equal(batch["background"][i][keep], batch["image"][i][keep])
        assert not np.array_equal(batch["background"][i], batch["image"][i])


def test_dataset_masks_empty_and_near_full_are_reasons():
    stage = SegmentStage(backend="dataset", min_area=0.05, max_area=0.9)
    n = 4
    masks = np.zeros((n, 16, 16), np.uint8)
    masks[1] = 1
    masks[2, 4:12, 4:12] = 1
    out = stage({"key": list("abcd"), "image": np.zeros((n, 16, 16, 3), np.uint8), "dataset_mask": masks,
                 "has_dataset_mask": np.array([True, True, True, False])})
    assert out["error"][0].startswith("empty mask") and out["error_stage"][0] == "segment"
    assert out["error"][1].startswith("near-full mask")
    assert out["error"][2] == "" and out["mask"][2].sum() == 64 and out["mask_area"][2] == 0.25
    assert out["error"][3] == "no dataset mask for this sample"
    with pytest.raises(ValueError, match="valid: dataset, sam"):
        SegmentStage(backend="u2net-missing")


def test_cocostuff_dataset_masks_through_the_builder(tmp_path):
    import json

    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    stuff = tmp_path / "stuffthingmaps_trainval2017" / "val2017"
    stuff.mkdir(parents=True)
    Image.fromarray(_photo(1)).save(tmp_path / "val2017" / "000000000001.jpg")
    labels = np.full((80, 96), 120, np.uint8)  # stuff
    labels[20:60, 30:70] = 17  # a thing (cat)
    labels[0:5, :] = 255  # unlabeled
    Image.fromarray(labels).save(stuff / "000000000001.png")
    ann = {"images": [{"id": 1, "file_name": "000000000001.jpg"}],
           "annotations": [{"id": 1, "image_id": 1, "caption": "a cat"}]}
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(ann))
    cfg = load_config(BuildConfig, "configs/build/tiny.yaml", FAST + ["segment.backend=dataset"])
    builder = TripletBuilder(cfg)
    samples, failures = builder(read_items(str(tmp_path / "annotations" / "captions_val2017.json")))
    assert not failures
    # no saliency prior to reuse: the depth stage adds I to its own DPT call for the quality scores' D(I)
    assert builder.model_stages[2].image_disparity == "compute"
    assert samples[0].meta["quality"]["version"] == 2 and samples[0].meta["quality"]["removal"]["score"] is not None
    m = samples[0].mask
    assert set(np.unique(m)) == {0, 1}
    assert 0.2 < m.mean() < 0.45  # the 40x40 thing box after crop/resize, nothing else
    assert samples[0].meta["mask_source"] == "dataset"


def test_depth_options_and_embed_source(photo_dir):
    items = [it for it in read_items(str(photo_dir)) if it["key"].startswith("p")][:2]
    base = load_config(BuildConfig, "configs/build/tiny.yaml", FAST)
    b1 = TripletBuilder(base).run_batch(items)
    b2 = TripletBuilder(load_config(BuildConfig, "configs/build/tiny.yaml",
                                    FAST + ["depth.mask_foreground_depth=true", "embed.fg_source=foreground"])
                        ).run_batch(items)
    assert np.array_equal(b1["mask"], b2["mask"])
    assert (b2["fg_depth"][b2["mask"] == 0] == 0).all()
    assert np.array_equal(b1["bg_depth"], b2["bg_depth"])
    assert not np.allclose(b1["fg_emb"], b2["fg_emb"])
    assert np.allclose(b1["bg_emb"], b2["bg_emb"])


def test_saliency_prior_and_depth_stage_share_one_dpt(builder):
    segment, depth = builder.stages[1], builder.stages[3]
    assert segment.segmenter.prior_depth is depth.estimator  # same model named twice: loaded once


def test_stages_are_picklable_and_work_after_a_round_trip(builder, photo_dir):
    items = [it for it in read_items(str(photo_dir)) if it["key"] == "p2"]
    clone = pickle.loads(pickle.dumps(builder))
    a, b = builder(items)[0][0], clone(items)[0][0]
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.background, b.background)


def test_missing_weights_fail_fast_with_model_and_key(tmp_path):
    with pytest.raises(ModelUnavailableError, match=r"segment.sam_checkpoint"):
        resolve_pretrained(str(tmp_path / "sam.pth"), "segment.sam_checkpoint", is_file=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = ("from cnc.hub import resolve_pretrained\n"
            "resolve_pretrained('stable-diffusion-v1-5/stable-diffusion-inpainting', 'inpaint.model')")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "stable-diffusion-v1-5/stable-diffusion-inpainting" in proc.stderr and "inpaint.model" in proc.stderr


def test_quality_reuses_the_builds_maps_and_models_and_scores_off_the_model_thread(builder, built):
    """No second DPT pass (D(I) is the sam prior's, D(I_b) the stored map), CLIP shared, and the statistics run in
    `assemble` (the worker's encode threads), not among the model stages."""
    from concurrent.futures import ThreadPoolExecutor

    from triplets.quality import QUALITY_VERSION, QualityStage

    segment, _, depth, embed, quality = builder.model_stages
    assert isinstance(quality, QualityStage) and quality.scorer.embedder is embed.embedder
    assert depth.image_disparity == "reuse" and depth.estimator is segment.segmenter.prior_depth
    items, batch, (samples, _) = built
    assert "quality" not in batch and batch["quality_clip_sim"].dtype == np.float32
    # the D(I) the scores use is the segmenter's own pass, reused as it is
    healthy = [i for i, e in enumerate(batch["error"]) if not e]
    prior = segment.segmenter.prior_depth(batch["image"][healthy])
    assert np.allclose(batch["image_disparity"][healthy], prior, atol=1e-4)
    # DPT images per healthy row: 1 (I, segment) + 2 (I_f, I_b, depth); version 1 ran 2 more in its quality stage
    seen = []

    def count(module, args, kwargs, output):
        seen.append(len(kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]))

    hook = depth.estimator.model.register_forward_hook(count, with_kwargs=True)
    try:
        builder.run_batch(items)
    finally:
        hook.remove()
    assert sum(seen) == 3 * len(healthy)
    with ThreadPoolExecutor(2, "test-encode") as pool:
        threaded, _ = builder.assemble(batch, pool)
    for s, t in zip(samples, threaded):
        q = s.meta["quality"]
        assert t.meta["quality"] == q and q["version"] == QUALITY_VERSION
        assert set(q) == {"version", "removal", "depth", "mask"}
        assert q["mask"]["area"] == pytest.approx(s.meta["mask_area"], abs=1e-5)
        assert q["removal"]["score"] is None or 0 <= q["removal"]["score"] <= 1
    # statistics that cannot be computed fail their own row only; a non-finite D(I) leaves depth undefined
    broken = dict(batch, image_disparity=np.array(list(batch["image_disparity"]) + [None], dtype=object)[:-1])
    broken["image_disparity"][healthy[0]] = np.zeros((3, 3), np.float32)
    broken["image_disparity"][healthy[1]] = np.full((R, R), np.nan, np.float32)
    got, fails = builder.assemble(broken)
    assert [(f["key"], f["stage"]) for f in fails if f["stage"] == "quality"] == [(batch["key"][healthy[0]],
                                                                                   "quality")]
    nan_row = next(s for s in got if s.key == batch["key"][healthy[1]])
    assert nan_row.meta["quality"]["depth"] == {"order": None, "margin": None}
