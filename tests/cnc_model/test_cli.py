"""``cnc sample`` end to end on a tiny pipeline: conditions from a build config (``-c build/tiny``), overrides, the
missing-model line, the ``conditions/`` record, ``--shard-sample``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnc import tiny
from cnc_model.testing.tiny import tiny_cnc_pipeline


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_cnc_pipeline().save_pretrained(root / "ckpt")
    model, processor = tiny.tiny_dpt(0)
    model.save_pretrained(root / "dpt")
    processor.save_pretrained(root / "dpt")
    rng = np.random.default_rng(0)
    for name, size in (("fg.png", (70, 50)), ("bg.png", (64, 64))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name)
    return root


def _args(root, *extra):
    return ["sample", str(root / "ckpt"), "--prompt", "a lower tower", "--fg", str(root / "fg.png"), "--bg",
            str(root / "bg.png"), "--steps", "2", "--height", "64", "--width", "96", "--seed", "1", *extra]


def test_cnc_sample_end_to_end(assets, tmp_path):
    import json

    from cnc.cli import app
    from triplets.image_io import decode_png

    out = tmp_path / "out"
    result = CliRunner().invoke(app, _args(assets, "--output", str(out), "-c", "build/tiny", "--depth-model",
                                           str(assets / "dpt"), "--num-images", "2", "--fg-scale", "0.5"))
    assert result.exit_code == 0, result.output
    samples = sorted(out.glob("sample_*.png"))
    assert len(samples) == 2 and Image.open(samples[0]).size == (96, 64)
    sheet = Image.open(out / "sheet.png")
    assert sheet.size == (96 * (5 + 2), 64)  # fg, bg, fg depth, bg depth, mask | 2 outputs
    cond = out / "conditions"
    assert decode_png((cond / "fg_depth.png").read_bytes()).shape == (64, 96)
    assert decode_png((cond / "bg_depth.png").read_bytes()).dtype == np.uint16
    assert set(np.unique(decode_png((cond / "mask.png").read_bytes()))) <= {0, 255}
    record = json.loads((cond / "conditions.json").read_text())
    # the pipeline folder records no training conditions: the explicit build config, the shortcut as an override
    assert record["origin"].startswith("explicit (build/tiny) + --set depth.model=") and record["trained"] is None
    assert record["settings"]["depth"]["model"] == str(assets / "dpt") and record["size"] == [64, 96]
    assert "depth.model" in record["models"] and record["attention"]["fp32_logits"] is False


def test_cnc_sample_missing_depth_model_fails_fast(assets, tmp_path):
    from cnc.cli import app

    missing = tmp_path / "no-such-dpt"
    result = CliRunner().invoke(app, _args(assets, "--output", str(tmp_path / "o"), "-c", "build/tiny",
                                           "--depth-model", str(missing)))
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(missing) in lines[0] and "--depth-model" in lines[0] and "depth.model" in lines[0]
    assert not (tmp_path / "o").exists()
    dataset = CliRunner().invoke(app, _args(assets, "--output", str(tmp_path / "d"), "-c", "build/tiny", "--set",
                                            "segment.backend=dataset"))
    assert dataset.exit_code == 2 and "--fg-mask" in dataset.output, dataset.output


def test_cnc_sample_with_the_builders_sam_segmenter(assets, tmp_path):
    from cnc.cli import app

    out = tmp_path / "sam"
    result = CliRunner().invoke(app, _args(assets, "--output", str(out), "-c", "build/tiny", "--sam-checkpoint",
                                           "tiny", "--dtype", "bfloat16", "--attention-fp32-logits"))
    assert result.exit_code == 0, result.output
    mask_tile = np.asarray(Image.open(out / "sheet.png").convert("L"))[:, 4 * 96:5 * 96]
    assert set(np.unique(mask_tile)) <= {0, 255} and 0 < mask_tile.mean() < 255
    import json

    record = json.loads((out / "conditions" / "conditions.json").read_text())
    assert record["attention"] == {"resize_mode": "reference", "fp32_logits": True, "dtype": "bfloat16"}


def test_cnc_sample_from_a_built_shard_sample(assets, tmp_path):
    from cnc.cli import app
    from cnc.config import load_config
    from triplets.builder import TripletBuilder
    from triplets.config import BuildConfig
    from triplets.readers import read_items
    from triplets.shardio import write_shard

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.open(assets / "fg.png").save(photos / "obj.png")
    (photos / "obj.txt").write_text("a lower tower")
    cfg = load_config(BuildConfig, "configs/build/tiny.yaml",
                      ["resolution=64", "min_side=32", "inpaint.num_inference_steps=2", "segment.min_area=0.0"])
    samples, failures = TripletBuilder(cfg)(read_items(str(photos)))
    assert not failures
    write_shard(tmp_path / "000000.tar", samples)
    out = tmp_path / "from-shard"
    args = ["sample", str(assets / "ckpt"), "--shard-sample", f"{tmp_path / '000000.tar'}#obj", "--steps", "2",
            "--output", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert Image.open(out / "sample_0.png").size == (64, 64)
    mask_tile = np.asarray(Image.open(out / "sheet.png").convert("L"))[:, 4 * 64:5 * 64]
    assert np.array_equal(mask_tile > 127, samples[0].mask.astype(bool))
    from triplets.sample import encode_sample

    shard = encode_sample(samples[0])
    for member in ("mask.png", "fg_depth.png", "bg_depth.png"):  # conditions/ holds the triplet's own maps
        assert (out / "conditions" / member).read_bytes() == shard[member], member
    bad = CliRunner().invoke(app, args[:3] + [f"{tmp_path / '000000.tar'}#nope"] + args[4:])
    assert bad.exit_code == 2 and "no sample with key 'nope'" in bad.output
